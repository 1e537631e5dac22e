//! One function's tree: a binary tree of node ids along which image chunks stream.
//!
//! # Representation and invariant
//!
//! The tree is kept **complete**: its nodes, read in level order, occupy positions
//! `0..len` of an implicit heap layout, where position `i` has parent `(i - 1) / 2` and children
//! `2i + 1` (left) and `2i + 2` (right). All levels are therefore full except possibly the last,
//! which fills from the left. A complete tree is binary by construction, contains each member
//! once (a member is one slot of a vector, indexed by a map), is height-balanced in the AVL
//! sense (for every node the two subtree heights differ by at most 1), and has the smallest
//! possible height, `ceil(log2(N + 1))`.
//!
//! Pure AVL balance would *not* be enough for the bound `height <= ceil(log2(N + 1)) + 1`: an
//! AVL tree may be a Fibonacci tree (54 nodes, height 8, where `ceil(log2 55) + 1 = 7`), so this
//! module keeps the stronger complete shape instead.
//!
//! # Operations
//!
//! - **Join** appends the node at position `len`: its parent is the first node in level order
//!   with fewer than two children (FaaSNet's breadth-first placement); the first node becomes
//!   the root. The shape stays complete; nobody else's parent changes.
//! - **Leave / fail** (same structural repair): the last node in level order (always a leaf)
//!   moves into the removed node's position, then the removed node is dropped. This is the
//!   binary-heap deletion. It is the design's repair, specialised to a complete tree:
//!   - removing the last node is unlinking a leaf;
//!   - a node with exactly one child in a complete tree has a leaf as that child, and it is the
//!     last node, so the node is replaced by its child;
//!   - a node with two children is replaced by a leaf (the last one in level order; FaaSNet takes
//!     one found breadth-first in the subtree). The moved node was a leaf, so nothing below its
//!     old position loses its source.
//!   - removing a leaf other than the last fills its hole with the last node, so the shape stays
//!     complete (one extra parent change compared with plain unlinking).
//!
//!   Because the result is again complete, no rotations are ever needed: the AVL rotations of the
//!   design exist to repair imbalance that this placement never creates. Each removal changes at
//!   most three parents (the moved node and the removed node's children).
//!
//! Every mutation reports the [`Change`]s it caused, only for nodes whose parent really changed,
//! so a node can follow a stream of parent changes instead of polling.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A node (a VM or host running functions), identified by an opaque string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl NodeId {
    /// Wraps a string as a node id.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for NodeId {
    fn from(id: &str) -> Self {
        Self(id.to_owned())
    }
}

impl From<String> for NodeId {
    fn from(id: String) -> Self {
        Self(id)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which child slot of its parent a node occupies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Side {
    /// The first child.
    Left,
    /// The second child.
    Right,
}

/// One effect of a tree operation on a member, as a node watching the tree would see it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Change {
    /// `node` now streams from `parent` (`None`: it is the root and reads the registry). Reported
    /// for a node that joined and for every member whose parent actually changed.
    Parent {
        /// The member whose source changed.
        node: NodeId,
        /// Its new parent.
        parent: Option<NodeId>,
    },
    /// `node` is no longer in the tree (it left or failed).
    Removed {
        /// The member that left.
        node: NodeId,
    },
}

/// A tree as a parent map: every member with its parent and the child slot it occupies there
/// (`None` for the root). The persisted form of a [`FunctionTree`].
pub type Links = BTreeMap<NodeId, Option<(NodeId, Side)>>;

/// Where a joining node was placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The node's parent, `None` if it became the root.
    pub parent: Option<NodeId>,
    /// Which child slot of the parent it took, `None` for the root.
    pub side: Option<Side>,
    /// Its depth (the root is at depth 0).
    pub depth: usize,
    /// The changes the join caused: exactly one, the joiner's own [`Change::Parent`].
    pub changes: Vec<Change>,
}

/// Errors of tree operations.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TreeError {
    /// The node joined a tree it is already in.
    #[error("node {0} is already a member of this tree")]
    AlreadyMember(NodeId),
    /// The node is not in this tree.
    #[error("node {0} is not a member of this tree")]
    NotMember(NodeId),
    /// A parent map does not describe a valid (complete binary) tree.
    #[error("invalid tree: {0}")]
    Invalid(String),
}

/// The binary tree of nodes for one function, kept complete (see the [module docs](self)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunctionTree {
    /// Members in level order; position `i` has children `2i + 1` and `2i + 2`.
    order: Vec<NodeId>,
    /// Position of every member in `order`.
    index: HashMap<NodeId, usize>,
}

fn parent_pos(pos: usize) -> Option<usize> {
    pos.checked_sub(1).map(|p| p / 2)
}

fn side_of(pos: usize) -> Option<Side> {
    match pos {
        0 => None,
        p if p % 2 == 1 => Some(Side::Left),
        _ => Some(Side::Right),
    }
}

/// Number of levels of a complete tree with `n` nodes: `ceil(log2(n + 1))`.
fn levels(n: usize) -> usize {
    (usize::BITS - n.leading_zeros()) as usize
}

impl FunctionTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether the tree has no members.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Whether `node` is a member.
    pub fn contains(&self, node: &NodeId) -> bool {
        self.index.contains_key(node)
    }

    /// The root (the only member that reads the registry), if any.
    pub fn root(&self) -> Option<&NodeId> {
        self.order.first()
    }

    /// Number of levels (0 for an empty tree, 1 for a lone root).
    pub fn height(&self) -> usize {
        levels(self.order.len())
    }

    /// All members in level order (root first).
    pub fn members(&self) -> &[NodeId] {
        &self.order
    }

    fn pos(&self, node: &NodeId) -> Result<usize, TreeError> {
        self.index
            .get(node)
            .copied()
            .ok_or_else(|| TreeError::NotMember(node.clone()))
    }

    fn parent_at(&self, pos: usize) -> Option<&NodeId> {
        parent_pos(pos).and_then(|p| self.order.get(p))
    }

    fn children_at(&self, pos: usize) -> Vec<&NodeId> {
        [2 * pos + 1, 2 * pos + 2]
            .into_iter()
            .filter_map(|c| self.order.get(c))
            .collect()
    }

    /// The parent of `node` (`None` for the root).
    pub fn parent(&self, node: &NodeId) -> Result<Option<&NodeId>, TreeError> {
        Ok(self.parent_at(self.pos(node)?))
    }

    /// Which child slot of its parent `node` occupies (`None` for the root).
    pub fn side(&self, node: &NodeId) -> Result<Option<Side>, TreeError> {
        Ok(side_of(self.pos(node)?))
    }

    /// The children of `node`, left first (at most two).
    pub fn children(&self, node: &NodeId) -> Result<Vec<&NodeId>, TreeError> {
        Ok(self.children_at(self.pos(node)?))
    }

    /// Parent, grandparent, ... up to the root: the chain of fallback sources for `node`.
    pub fn ancestors(&self, node: &NodeId) -> Result<Vec<&NodeId>, TreeError> {
        let mut pos = self.pos(node)?;
        let mut chain = Vec::new();
        while let Some(p) = parent_pos(pos) {
            if let Some(id) = self.order.get(p) {
                chain.push(id);
            }
            pos = p;
        }
        Ok(chain)
    }

    /// Depth of `node` (the root is at depth 0).
    pub fn depth(&self, node: &NodeId) -> Result<usize, TreeError> {
        Ok(levels(self.pos(node)? + 1) - 1)
    }

    /// Every member with its parent (`None` for the root).
    pub fn parent_map(&self) -> BTreeMap<NodeId, Option<NodeId>> {
        self.order
            .iter()
            .enumerate()
            .map(|(pos, id)| (id.clone(), self.parent_at(pos).cloned()))
            .collect()
    }

    /// Every member with its parent and child slot (`None` for the root): the persisted form.
    pub fn links(&self) -> Links {
        self.order
            .iter()
            .enumerate()
            .map(|(pos, id)| {
                let link = self.parent_at(pos).cloned().zip(side_of(pos));
                (id.clone(), link)
            })
            .collect()
    }

    /// Rebuilds a tree from [`links`](Self::links). Fails unless the links describe a single
    /// complete binary tree (one root, every slot used once, no cycles, no gaps).
    pub fn from_links(links: &Links) -> Result<Self, TreeError> {
        let mut root = None;
        let mut kids: HashMap<&NodeId, [Option<&NodeId>; 2]> = HashMap::new();
        for (node, link) in links {
            match link {
                None => {
                    if let Some(other) = root.replace(node) {
                        return Err(TreeError::Invalid(format!("two roots: {other} and {node}")));
                    }
                }
                Some((parent, side)) => {
                    if !links.contains_key(parent) {
                        return Err(TreeError::Invalid(format!(
                            "{node} has parent {parent}, which is not a member"
                        )));
                    }
                    let slot = &mut kids.entry(parent).or_default()[*side as usize];
                    if let Some(other) = slot.replace(node) {
                        return Err(TreeError::Invalid(format!(
                            "{other} and {node} share the {side:?} slot of {parent}"
                        )));
                    }
                }
            }
        }
        let n = links.len();
        let mut order: Vec<Option<NodeId>> = vec![None; n];
        if let Some(root) = root {
            let mut stack = vec![(root, 0usize)];
            while let Some((node, pos)) = stack.pop() {
                let slot = order.get_mut(pos).ok_or_else(|| {
                    TreeError::Invalid(format!("{node} sits below the last level (not complete)"))
                })?;
                *slot = Some(node.clone());
                if let Some(children) = kids.get(node) {
                    for (i, child) in children.iter().enumerate() {
                        if let Some(child) = child {
                            stack.push((child, 2 * pos + 1 + i));
                        }
                    }
                }
            }
        }
        let order = order
            .into_iter()
            .collect::<Option<Vec<NodeId>>>()
            .ok_or_else(|| {
                TreeError::Invalid("not a complete tree reachable from one root".into())
            })?;
        let index = order
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        let tree = Self { order, index };
        tree.check().map_err(TreeError::Invalid)?;
        Ok(tree)
    }

    /// Adds `node` at the first position in level order with a free child slot (the first node
    /// becomes the root).
    pub fn join(&mut self, node: NodeId) -> Result<Placement, TreeError> {
        if self.contains(&node) {
            return Err(TreeError::AlreadyMember(node));
        }
        let pos = self.order.len();
        let parent = self.parent_at(pos).cloned();
        self.index.insert(node.clone(), pos);
        self.order.push(node.clone());
        Ok(Placement {
            parent: parent.clone(),
            side: side_of(pos),
            depth: levels(pos + 1) - 1,
            changes: vec![Change::Parent { node, parent }],
        })
    }

    /// `node` leaves gracefully; the tree is repaired as described in the [module docs](self).
    /// Returns [`Change::Removed`] for `node`, then the parent changes in level order.
    pub fn leave(&mut self, node: &NodeId) -> Result<Vec<Change>, TreeError> {
        self.remove(node)
    }

    /// `node` crashed (missed heartbeats). The structural repair is the same as for
    /// [`leave`](Self::leave); the distinction is for callers and logs.
    pub fn fail(&mut self, node: &NodeId) -> Result<Vec<Change>, TreeError> {
        self.remove(node)
    }

    fn remove(&mut self, node: &NodeId) -> Result<Vec<Change>, TreeError> {
        let pos = self.pos(node)?;
        // Nodes whose parent may change: the removed node's children and the last node (which
        // moves into `pos`). Nobody else's position or parent position changes.
        let mut affected: Vec<(NodeId, Option<NodeId>)> = Vec::with_capacity(3);
        for child in self.children_at(pos) {
            affected.push((child.clone(), Some(node.clone())));
        }
        let last = self.order.len() - 1;
        let moved = self
            .order
            .get(last)
            .filter(|m| last != pos && !affected.iter().any(|(id, _)| id == *m));
        if let Some(moved) = moved {
            affected.push((moved.clone(), self.parent_at(last).cloned()));
        }
        self.order.swap_remove(pos);
        self.index.remove(node);
        if let Some(moved) = self.order.get(pos) {
            self.index.insert(moved.clone(), pos);
        }

        let mut moved: Vec<(usize, Change)> = Vec::with_capacity(affected.len());
        for (id, old_parent) in affected {
            let new_pos = self.pos(&id)?;
            let new_parent = self.parent_at(new_pos).cloned();
            if new_parent != old_parent {
                moved.push((
                    new_pos,
                    Change::Parent {
                        node: id,
                        parent: new_parent,
                    },
                ));
            }
        }
        moved.sort_by_key(|(p, _)| *p);
        let mut changes = Vec::with_capacity(moved.len() + 1);
        changes.push(Change::Removed { node: node.clone() });
        changes.extend(moved.into_iter().map(|(_, c)| c));
        Ok(changes)
    }

    /// Verifies every invariant: the index agrees with the level order (each member exactly
    /// once), parent and child links agree in both directions, there is a single root and every
    /// member is reachable from it (each non-root's parent sits at a smaller position), each node
    /// has at most two children, every node is height-balanced (subtree heights differ by at most
    /// 1, AVL) and the height is at most `ceil(log2(N + 1)) + 1` (for a complete tree it is
    /// exactly `ceil(log2(N + 1))`). Runs in O(N) without allocating per node.
    pub fn check(&self) -> Result<(), String> {
        let n = self.order.len();
        if self.index.len() != n {
            return Err(format!("index has {} entries, order {n}", self.index.len()));
        }
        for (pos, id) in self.order.iter().enumerate() {
            if self.index.get(id) != Some(&pos) {
                return Err(format!(
                    "{id} at position {pos} is indexed at {:?}",
                    self.index.get(id)
                ));
            }
        }
        let child_positions = |pos: usize| [2 * pos + 1, 2 * pos + 2];
        let mut roots = 0;
        for (pos, id) in self.order.iter().enumerate() {
            for child in child_positions(pos).into_iter().filter(|c| *c < n) {
                if parent_pos(child) != Some(pos) {
                    return Err(format!("child at {child} of {id} has another parent"));
                }
            }
            match parent_pos(pos) {
                None => roots += 1,
                Some(p) if p < pos && child_positions(p).contains(&pos) => {}
                Some(p) => {
                    return Err(format!(
                        "{id} names position {p} as parent, which disowns it"
                    ));
                }
            }
        }
        if n > 0 && roots != 1 {
            return Err(format!("{roots} roots"));
        }
        // Heights bottom-up: children sit at larger positions, so a reverse scan sees them first.
        let mut height = vec![0usize; n];
        for pos in (0..n).rev() {
            let [l, r] = child_positions(pos).map(|c| height.get(c).copied().unwrap_or(0));
            if l.abs_diff(r) > 1 {
                return Err(format!(
                    "{} unbalanced: subtree heights {l} and {r}",
                    self.order[pos]
                ));
            }
            height[pos] = 1 + l.max(r);
        }
        let h = height.first().copied().unwrap_or(0);
        if h != self.height() {
            return Err(format!("height {h}, reported {}", self.height()));
        }
        let bound = levels(n) + 1;
        if h > bound {
            return Err(format!(
                "height {h} exceeds ceil(log2({n} + 1)) + 1 = {bound}"
            ));
        }
        Ok(())
    }
}
