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
//! `if arbor_testkit::skip_unless_root("name") { return; }` (and/or [`skip_unless_tools`]); under
//! CI a test that would skip fails instead ([`skip`]).

mod arbord;
pub mod cluster;
mod containerd;
pub mod etcd;
pub mod functions;
pub mod hostile;
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
pub use etcd::Etcd;
pub use image::{
    BUSYBOX_APPLETS, ECHO_HANDLER, ImageSpec, LayerSource, SAMPLE_PROBE, busybox_image,
    echo_function_image, sample_image, skopeo_push, write_oci_layout, write_oci_layout_with_config,
};
pub use layer::{
    DEFAULT_MTIME, Entry, EntryKind, XorShift64, corpus, layer_tar, layer_tar_gnu,
    pseudo_random_bytes, tar_dir,
};
pub use proxy::{Fault, FaultProxy};
pub use registry::Registry;
pub use util::{
    fd_holders, find_in_path, free_port, http_get, http_request, is_mounted, kill_fd_holders,
    log_tail, mounts_below,
};

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
    skip(test, "needs root (containerd, mounts, runc)")
}

/// The stdout of a command that must have succeeded (`what` names it in the panic, with both
/// output streams).
pub fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Says why `test` cannot run and returns true, so the test returns early: prints
/// `skipped: <test>: <reason>` to stderr. Under CI (`CI` set and not `false`/`0`) a test that
/// cannot run is a failure, not a pass: this panics instead, so a machine that lacks root, FUSE or
/// a tool cannot turn the end-to-end suite green by skipping it.
pub fn skip(test: &str, reason: &str) -> bool {
    if in_ci() {
        panic!("{test} cannot run under CI: {reason}");
    }
    eprintln!("skipped: {test}: {reason}");
    true
}

/// True when the `CI` environment variable is set to anything but empty, `0` or `false`.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
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
    skip(
        test,
        &format!("not found: {} (run scripts/setup.sh)", missing.join(", ")),
    )
}
