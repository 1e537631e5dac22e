//! `containerd-shim-arbor-v1`: the containerd shim (task API v2, containerd 1.6 to 2.x) that
//! runs Arbor's function containers with runc, one shim process per pod, and records each
//! container's start phases for the function-aware probe that will report them to arbord
//! ([`probe`]).
//!
//! * [`shim`]: the process's life cycle (`start`, `delete`, serve), grouping a pod's
//!   containers into the sandbox's shim;
//! * [`service`]: the task API (create, start, exec, kill, delete, wait, state, pids, stats,
//!   pause/resume, resize-pty, close-io, update, connect, shutdown) and its events;
//! * [`runc_client`]: runc invocations awaited through the shim's reaper;
//! * [`stdio`]: FIFOs, pipes and terminals; [`cgroup`]: OOM events and metrics;
//!   [`options`]: runtime options by type URL; [`container`]: per-process state;
//! * [`probe`]: **where function awareness hooks in** (a no-op today).

pub mod cgroup;
pub mod container;
pub mod error;
pub mod options;
pub mod probe;
pub mod runc_client;
pub mod service;
pub mod shim;
pub mod stdio;

pub use error::{Error, Result};
pub use shim::{ArborShim, RUNTIME_ID};
