//! Persisting the manager's state: a serde-serializable [`Snapshot`] and the [`Store`] trait, so
//! that an etcd-backed store (FaaSNet keeps this state in etcd) can be added beside
//! [`MemoryStore`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::manager::{FunctionId, Millis};
use crate::tree::{Links, NodeId};

/// The snapshot format version written by this crate.
pub const SNAPSHOT_VERSION: u32 = 1;

/// One function's tree as a parent map: every member with its parent and the child slot it
/// occupies there (`None` for the root). The slot is kept so that the exact tree, not just an
/// equivalent one, is restored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeSnapshot {
    /// Member to (parent, slot); `None` for the root.
    pub parents: Links,
}

/// The whole manager state: every function's tree and every node's last heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Format version, [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// Each function's tree (only non-empty trees).
    pub functions: BTreeMap<FunctionId, TreeSnapshot>,
    /// Each node's last heartbeat, in the caller's milliseconds.
    pub heartbeats: BTreeMap<NodeId, Millis>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            version: SNAPSHOT_VERSION,
            functions: BTreeMap::new(),
            heartbeats: BTreeMap::new(),
        }
    }
}

/// Errors of a [`Store`] backend.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The backend failed (connection, permission, ...).
    #[error("store backend: {0}")]
    Backend(String),
    /// The stored bytes could not be decoded.
    #[error("stored snapshot is corrupt: {0}")]
    Corrupt(String),
}

/// Where the manager's state is kept between restarts.
pub trait Store {
    /// The last saved snapshot, `None` if nothing was ever saved.
    fn load(&self) -> Result<Option<Snapshot>, StoreError>;
    /// Replaces the stored snapshot.
    fn save(&mut self, snapshot: &Snapshot) -> Result<(), StoreError>;
}

/// A [`Store`] in process memory (tests, simulations, single-process deployments).
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    snapshot: Option<Snapshot>,
    saves: u64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times [`save`](Store::save) was called.
    pub fn saves(&self) -> u64 {
        self.saves
    }
}

impl Store for MemoryStore {
    fn load(&self) -> Result<Option<Snapshot>, StoreError> {
        Ok(self.snapshot.clone())
    }

    fn save(&mut self, snapshot: &Snapshot) -> Result<(), StoreError> {
        self.snapshot = Some(snapshot.clone());
        self.saves += 1;
        Ok(())
    }
}
