//! [`Manager`]: the function trees of many functions plus node liveness.
//!
//! A node may run several functions and is then a member of several trees, each served
//! independently. Liveness is per node: a node heartbeats (joining counts as a heartbeat), and
//! [`Manager::expire`] fails every node whose last heartbeat is older than a timeout out of every
//! tree it is in. Time is always passed in by the caller (milliseconds on any monotonic clock
//! the caller chooses); nothing here reads a clock.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::store::{SNAPSHOT_VERSION, Snapshot, Store, StoreError, TreeSnapshot};
use crate::tree::{Change, FunctionTree, NodeId, Placement, TreeError};

/// Milliseconds on the caller's clock.
pub type Millis = u64;

/// A function (one container image served by one tree).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FunctionId(pub String);

impl FunctionId {
    /// Wraps a string as a function id.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for FunctionId {
    fn from(id: &str) -> Self {
        Self(id.to_owned())
    }
}

impl From<String> for FunctionId {
    fn from(id: String) -> Self {
        Self(id)
    }
}

impl fmt::Display for FunctionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Errors of manager operations.
#[derive(Debug, Error)]
pub enum ManagerError {
    /// No tree exists for the function (no node ever joined, or all left).
    #[error("unknown function {0}")]
    UnknownFunction(FunctionId),
    /// The tree operation failed.
    #[error("function {function}: {source}")]
    Tree {
        /// The function whose tree refused the operation.
        function: FunctionId,
        /// Why.
        #[source]
        source: TreeError,
    },
    /// A snapshot does not describe a valid manager state.
    #[error("invalid snapshot: {0}")]
    InvalidSnapshot(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Every function's tree and every node's last heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manager {
    trees: BTreeMap<FunctionId, FunctionTree>,
    heartbeats: BTreeMap<NodeId, Millis>,
}

impl Manager {
    /// A manager with no functions and no nodes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `node` was alive at `now`. Heartbeats arriving out of order never move the
    /// last-seen time backwards.
    pub fn heartbeat(&mut self, node: &NodeId, now: Millis) {
        let last = self.heartbeats.entry(node.clone()).or_insert(now);
        *last = (*last).max(now);
    }

    /// The last heartbeat of `node`, if it has one.
    pub fn last_heartbeat(&self, node: &NodeId) -> Option<Millis> {
        self.heartbeats.get(node).copied()
    }

    /// `node` starts running `function` at `now`: it joins that function's tree (created on
    /// first join) and the join counts as a heartbeat.
    pub fn join(
        &mut self,
        function: &FunctionId,
        node: NodeId,
        now: Millis,
    ) -> Result<Placement, ManagerError> {
        let tree = self.trees.entry(function.clone()).or_default();
        let placement = tree
            .join(node.clone())
            .map_err(|source| ManagerError::Tree {
                function: function.clone(),
                source,
            })?;
        self.heartbeat(&node, now);
        Ok(placement)
    }

    /// `node` stops running `function` gracefully. An emptied tree is dropped.
    pub fn leave(
        &mut self,
        function: &FunctionId,
        node: &NodeId,
    ) -> Result<Vec<Change>, ManagerError> {
        self.remove(function, node, false)
    }

    /// `node` is known to have crashed while running `function` (same repair as a leave).
    pub fn fail(
        &mut self,
        function: &FunctionId,
        node: &NodeId,
    ) -> Result<Vec<Change>, ManagerError> {
        self.remove(function, node, true)
    }

    fn remove(
        &mut self,
        function: &FunctionId,
        node: &NodeId,
        failed: bool,
    ) -> Result<Vec<Change>, ManagerError> {
        let tree = self
            .trees
            .get_mut(function)
            .ok_or_else(|| ManagerError::UnknownFunction(function.clone()))?;
        let result = if failed {
            tree.fail(node)
        } else {
            tree.leave(node)
        };
        let changes = result.map_err(|source| ManagerError::Tree {
            function: function.clone(),
            source,
        })?;
        if tree.is_empty() {
            self.trees.remove(function);
        }
        Ok(changes)
    }

    /// Fails `node` out of every tree it is in and forgets its heartbeat. Returns the changes,
    /// grouped by function in function order.
    pub fn fail_node(&mut self, node: &NodeId) -> Vec<(FunctionId, Change)> {
        let mut out = Vec::new();
        for (function, tree) in &mut self.trees {
            if let Ok(changes) = tree.fail(node) {
                out.extend(changes.into_iter().map(|c| (function.clone(), c)));
            }
        }
        self.trees.retain(|_, tree| !tree.is_empty());
        self.heartbeats.remove(node);
        out
    }

    /// Fails out of every tree each node whose last heartbeat is older than `timeout` at `now`
    /// (`now - last > timeout`), in node-id order, and forgets those nodes. Returns all changes.
    pub fn expire(&mut self, now: Millis, timeout: Millis) -> Vec<(FunctionId, Change)> {
        let dead: Vec<NodeId> = self
            .heartbeats
            .iter()
            .filter(|(_, last)| now.saturating_sub(**last) > timeout)
            .map(|(node, _)| node.clone())
            .collect();
        dead.iter().flat_map(|node| self.fail_node(node)).collect()
    }

    /// The tree of `function`, if any node runs it.
    pub fn tree(&self, function: &FunctionId) -> Option<&FunctionTree> {
        self.trees.get(function)
    }

    /// Every function with a non-empty tree, in order.
    pub fn functions(&self) -> impl Iterator<Item = &FunctionId> {
        self.trees.keys()
    }

    /// The functions whose trees `node` is in.
    pub fn functions_of(&self, node: &NodeId) -> Vec<&FunctionId> {
        self.trees
            .iter()
            .filter(|(_, tree)| tree.contains(node))
            .map(|(function, _)| function)
            .collect()
    }

    /// The whole state as a serializable [`Snapshot`].
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: SNAPSHOT_VERSION,
            functions: self
                .trees
                .iter()
                .map(|(f, t)| (f.clone(), TreeSnapshot { parents: t.links() }))
                .collect(),
            heartbeats: self.heartbeats.clone(),
        }
    }

    /// Rebuilds a manager from a snapshot, validating it: a known version, every tree a valid
    /// complete binary tree, and every member with a heartbeat (so it can expire).
    pub fn restore(snapshot: Snapshot) -> Result<Self, ManagerError> {
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(ManagerError::InvalidSnapshot(format!(
                "version {} (expected {SNAPSHOT_VERSION})",
                snapshot.version
            )));
        }
        let mut trees = BTreeMap::new();
        for (function, tree) in snapshot.functions {
            let tree = FunctionTree::from_links(&tree.parents)
                .map_err(|e| ManagerError::InvalidSnapshot(format!("function {function}: {e}")))?;
            if let Some(node) = tree
                .members()
                .iter()
                .find(|n| !snapshot.heartbeats.contains_key(*n))
            {
                return Err(ManagerError::InvalidSnapshot(format!(
                    "function {function}: member {node} has no heartbeat"
                )));
            }
            if !tree.is_empty() {
                trees.insert(function, tree);
            }
        }
        Ok(Self {
            trees,
            heartbeats: snapshot.heartbeats,
        })
    }

    /// Saves [`snapshot`](Self::snapshot) to `store`.
    pub fn save_to(&self, store: &mut dyn Store) -> Result<(), StoreError> {
        store.save(&self.snapshot())
    }

    /// Restores the manager last saved to `store`; `None` if the store is empty.
    pub fn load_from(store: &dyn Store) -> Result<Option<Self>, ManagerError> {
        store.load()?.map(Self::restore).transpose()
    }
}
