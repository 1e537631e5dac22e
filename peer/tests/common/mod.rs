//! Shorthands the tree and etcd tests share.

use std::time::Duration;

use arbor_proto::arbor::{Node, Position, TreeInfo};
use tokio::sync::watch;

/// Member `i`: id `n{i}`, a made-up peer address.
pub fn node(i: usize) -> Node {
    Node {
        id: format!("n{i}"),
        addr: format!("10.0.0.{i}:7000"),
    }
}

/// The member ids of a tree, in level order.
pub fn ids(tree: &TreeInfo) -> Vec<&str> {
    tree.members.iter().map(|n| n.id.as_str()).collect()
}

/// Waits (at most 10 s) until the position `rx` holds satisfies `f`.
pub async fn wait_for(
    rx: &mut watch::Receiver<Option<Position>>,
    what: &str,
    f: impl FnMut(&Option<Position>) -> bool,
) {
    let waited = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(f))
        .await
        .map(|r| r.map(|_| ()));
    match waited {
        Ok(r) => r.unwrap(),
        Err(_) => panic!("timed out waiting for {what}; last {:?}", *rx.borrow()),
    }
}
