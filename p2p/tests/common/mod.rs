//! Shorthands shared by the tree and manager tests.

use arbor_p2p::{Change, NodeId};

pub fn id(s: &str) -> NodeId {
    NodeId::from(s)
}

pub fn parent(node: &str, parent: Option<&str>) -> Change {
    Change::Parent {
        node: id(node),
        parent: parent.map(id),
    }
}

pub fn removed(node: &str) -> Change {
    Change::Removed { node: id(node) }
}
