//! gRPC bindings Arbor needs beyond `containerd-client`: the server side of containerd's
//! snapshots service (`containerd.services.snapshots.v1`, generated from the protos that
//! containerd-client ships, with the workspace's one tonic) and a subset of the Kubernetes CRI
//! image service (`runtime.v1.ImageService`) for tools and tests that pull through CRI.

/// `containerd.services.snapshots.v1`: messages and the `Snapshots` server trait.
pub mod snapshots {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("containerd.services.snapshots.v1");
}

/// `runtime.v1` (CRI): the image service subset.
pub mod cri {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("runtime.v1");
}

pub use containerd_client;
pub use containerd_client::types::Mount;
