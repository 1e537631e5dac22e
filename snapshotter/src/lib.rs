//! containerd snapshotter: overlay snapshots plus lazily mounted remote layers.
//!
//! [`Snapshotter`] keeps containerd's snapshot semantics (Prepare, View, Mounts, Commit,
//! Remove, Stat, Update, Usage, Walk, Cleanup) over directories under one root, with metadata
//! in an embedded transactional store ([`meta`]). Layers converted by `arbor convert` are
//! mounted through the FUSE filesystem instead of being unpacked ([`remote`]), following
//! containerd's remote-snapshot protocol ([`labels`]). [`service`] serves it as containerd's
//! `containerd.services.snapshots.v1` gRPC service (a proxy plugin). [`trees`] reads and serves
//! the layers of functions through their function trees (parent, grandparent, registry).

pub mod error;
pub mod filter;
pub mod introspect;
pub mod labels;
pub mod learn;
pub mod meta;
pub mod remote;
pub mod service;
pub mod snapshotter;
pub mod trees;

pub use error::{Error, Result};
pub use remote::{Remote, RemoteOptions};
pub use service::Service;
pub use snapshotter::Snapshotter;
