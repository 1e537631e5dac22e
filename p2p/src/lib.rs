//! The function-tree manager: one balanced binary tree of nodes per function, so that each node
//! downloads an image from one parent and uploads it to at most two children (FaaSNet, USENIX
//! ATC 2021; `DESIGN.md` section 4). This crate's one job is the control-plane bookkeeping of
//! those trees: who joins where, how the tree is repaired when a node leaves or dies, and which
//! nodes must switch parent as a result. It is pure and synchronous: no networking, no clock
//! (time is passed in as milliseconds), so it can be driven by a server or by a discrete-event
//! simulation alike.
//!
//! The modules:
//! - [`tree`]: [`FunctionTree`], one function's tree (join, leave, fail, queries, invariant check);
//! - [`manager`]: [`Manager`], many functions' trees plus heartbeat liveness and expiry;
//! - [`sim`]: a discrete-event simulation of a cold-start burst (registry-only versus function
//!   trees, with failures) that drives the real [`Manager`];
//! - [`store`]: the [`Store`] trait for persisting a [`Snapshot`] of the manager, and
//!   [`MemoryStore`].
//!
//! # Tree shape
//!
//! Every tree is kept *complete* (the shape of a binary heap): all levels are full except
//! possibly the last, which is filled from the left. That is stronger than the AVL balance the
//! design asks for, and it gives the optimal height `ceil(log2(N + 1))`. See [`tree`] for how
//! join, leave and fail keep that shape and why no rotations are ever needed.

pub mod manager;
pub mod sim;
pub mod store;
pub mod tree;

pub use manager::{FunctionId, Manager, ManagerError, Millis};
pub use store::{MemoryStore, Snapshot, Store, StoreError, TreeSnapshot};
pub use tree::{Change, FunctionTree, Links, NodeId, Placement, Side, TreeError};
