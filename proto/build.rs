//! Generates the snapshots server and the CRI image client with the workspace's tonic.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_arg("--experimental_allow_proto3_optional");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        // Share `Mount` with containerd-client so mounts pass between the two unchanged.
        .extern_path(".containerd.types", "::containerd_client::types")
        .compile_with_config(
            config,
            &["proto/github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto"],
            &["proto"],
        )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/cri/api.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
