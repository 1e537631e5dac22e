//! Generates containerd's API (clients, and the snapshots server arbord implements) and the CRI
//! subset with the workspace's one tonic. The `.proto` files are vendored under `proto/` and
//! compiled by `protox`, a protobuf compiler in Rust that also carries the well-known
//! `google/protobuf/*.proto` types, so building Arbor needs no system `protoc` and no
//! `libprotobuf-dev`.

use std::path::PathBuf;

/// containerd API files to generate (their imports come along).
const CONTAINERD: &[&str] = &[
    "services/containers/v1/containers.proto",
    "services/content/v1/content.proto",
    "services/diff/v1/diff.proto",
    "services/events/v1/events.proto",
    "services/images/v1/images.proto",
    "services/leases/v1/leases.proto",
    "services/namespaces/v1/namespace.proto",
    "services/snapshots/v1/snapshots.proto",
    "services/tasks/v1/tasks.proto",
    "services/version/v1/version.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    let mut files: Vec<PathBuf> = CONTAINERD
        .iter()
        .map(|f| root.join("github.com/containerd/containerd/api").join(f))
        .collect();
    files.push(root.join("cri/api.proto"));
    files.push(root.join("arbor/v1/starts.proto"));
    files.push(root.join("arbor/v1/p2p.proto"));
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .include_file("_includes.rs")
        // A peer's block bytes travel as `Bytes`: sent as slices of the blocks the server
        // holds and received as slices of tonic's buffer, instead of a copy each way.
        .bytes(".arbor.v1.RangePiece.data")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
