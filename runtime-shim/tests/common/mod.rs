//! What the shim's end-to-end tests share: where the workspace's binaries are, the check that
//! they were built, and a converted image in a test registry.

#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::process::Command;

use arbor_testkit::{ImageSpec, Registry, ok, skip, skopeo_push, write_oci_layout};

pub const SHIM: &str = "containerd-shim-arbor-v1";

/// `target/<profile>`, where cargo put this package's shim and the workspace's binaries.
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_containerd-shim-arbor-v1"))
        .parent()
        .expect("shim binary has a parent dir")
        .to_path_buf()
}

/// The target dir if `arbor`, `arbord` and the shim are built there; else says why `test`
/// skips (a failure under CI) and returns `None`.
pub fn built_bins(test: &str) -> Option<PathBuf> {
    let dir = target_dir();
    for bin in ["arbor", "arbord", SHIM] {
        if !dir.join(bin).exists() {
            skip(
                test,
                &format!(
                    "{} is missing: build the workspace first (cargo build --workspace --bins)",
                    dir.join(bin).display()
                ),
            );
            return None;
        }
    }
    Some(dir)
}

/// Pushes `spec` as `REPO:v1` (layout written under `tmp`) and its `arbor convert`ed copy as
/// `REPO:v1-arbor`; returns the converted image's reference.
pub fn push_converted(
    reg: &Registry,
    tmp: &Path,
    bins: &Path,
    spec: &ImageSpec,
    repo: &str,
) -> String {
    let layout = tmp.join("layout");
    write_oci_layout(&layout, "v1", spec).expect("writing layout");
    let src = reg.reference(&format!("{repo}:v1"));
    skopeo_push(&layout, "v1", &src, None).expect("skopeo push");
    let image = reg.reference(&format!("{repo}:v1-arbor"));
    ok(
        Command::new(bins.join("arbor"))
            .args(["convert", "--plain-http", &src, &image])
            .output()
            .expect("running arbor convert"),
        "arbor convert",
    );
    image
}
