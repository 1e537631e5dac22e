//! Test and benchmark harness: real `docker-registry` and containerd instances started privately
//! per test, and deterministic generation of OCI images and layer tars.
//!
//! * [`Registry`]: a `docker-registry` (distribution 2.8) on `127.0.0.1:<free port>`, optionally
//!   with htpasswd basic auth.
//! * [`Arbord`]: a private `arbord` (own root, socket, metrics port) and the proxy-plugin
//!   config that points a [`Containerd`] at it.
//! * [`Containerd`]: a private containerd (own root, state, socket, config and namespace) with
//!   helpers around `ctr`.
//! * [`Entry`], [`layer_tar`], [`layer_tar_gnu`], [`tar_dir`], [`corpus`]: layer tars built
//!   byte-for-byte reproducibly, including a corpus that exercises every tar feature real images
//!   use.
//! * [`ImageSpec`], [`write_oci_layout`], [`skopeo_push`], [`busybox_image`]: OCI images in an OCI
//!   layout directory, pushed with skopeo.
//!
//! Everything cleans up after itself: `Drop` stops processes, unmounts what is left mounted and
//! removes temporary directories. Set `ARBOR_TESTKIT_KEEP=1` to keep the directories (logs,
//! configs, storage) for debugging, and `ARBOR_TESTKIT_TMPDIR` to choose where they are created
//! (default: the system temp dir; keep it short, unix socket paths are limited to 107 bytes).
//!
//! Tests that need root or the external tools should start with
//! `if arbor_testkit::skip_unless_root("name") { return; }` (and/or [`skip_unless_tools`]).

mod arbord;
mod containerd;
mod image;
mod layer;
pub mod netns;
mod proxy;
mod registry;
pub mod tree;
mod util;

#[cfg(test)]
mod tests;

pub use arbord::{Arbord, ArbordOptions};
pub use containerd::{Containerd, ContainerdOptions};
pub use image::{
    BUSYBOX_APPLETS, ImageSpec, LayerSource, SAMPLE_PROBE, busybox_image, sample_image,
    skopeo_push, write_oci_layout,
};
pub use layer::{
    DEFAULT_MTIME, Entry, EntryKind, XorShift64, corpus, layer_tar, layer_tar_gnu,
    pseudo_random_bytes, tar_dir,
};
pub use proxy::{Fault, FaultProxy};
pub use registry::Registry;
pub use util::{find_in_path, http_get, http_request, is_mounted, log_tail, mounts_below};

/// True if running as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Prints `skipped: <test>: <reason>` to stderr and returns true when the test must skip because
/// it is not running as root.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("skipped: {test}: needs root (containerd, mounts, runc)");
    true
}

/// Prints `skipped: <test>: <tool> not found ...` to stderr and returns true when one of `tools`
/// (program names looked up in `PATH`, or absolute paths) is missing.
pub fn skip_unless_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| find_in_path(t).is_none())
        .collect();
    if missing.is_empty() {
        return false;
    }
    eprintln!(
        "skipped: {test}: not found: {} (run scripts/setup.sh)",
        missing.join(", ")
    );
    true
}
