//! Arbor's containerd client: puts an image into containerd so that the `arbor` snapshotter
//! mounts its converted layers lazily ([`pull`]). The library behind `arbor pull` and
//! `arbor run`, meant to be shared with the runtime shim and the function gateway.
//!
//! It speaks containerd's API over its socket (content, leases, snapshots, diff, images), as
//! containerd's own unpacker does, adding the remote-snapshot labels `ctr image pull` does not
//! pass; see [`pull`] for what it does and checks.

mod error;
pub mod pull;
pub mod ready;
pub mod run;

pub use error::{Error, Result};
pub use pull::{LayerReport, PullReport, Target, chain_ids, has_image, pull};
pub use run::{Observer, Phase, PullPolicy, RunOptions, RunOutcome, run};
