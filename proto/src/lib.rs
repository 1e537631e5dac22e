//! gRPC bindings for everything Arbor speaks: containerd's API (clients for the services `arbor
//! pull`/`run` drive, and the server side of the snapshots service `arbord` implements) and a
//! subset of the Kubernetes CRI (`runtime.v1`) for tools and tests that pull through CRI.
//!
//! All of it is generated at build time from the `.proto` files vendored under `proto/proto/`
//! (containerd's, Apache-2.0, as containerd-client 0.9 ships them) by a protobuf compiler in
//! Rust, with the workspace's one tonic: no system `protoc` is needed.

#[allow(clippy::all, missing_docs, rustdoc::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/_includes.rs"));
}

/// containerd's API, by protobuf package (`containerd.services.content.v1` is
/// `containerd::services::content::v1`).
pub use generated::containerd;

/// `containerd.types`: `Mount`, `Descriptor`, `Platform`, ...
pub use generated::containerd::types;

/// `containerd.services.snapshots.v1`: messages, the client and the `Snapshots` server trait.
pub use generated::containerd::services::snapshots::v1 as snapshots;

/// `arbor.v1`: arbord's own services: `Starts` (start reports and learned start-up sets) on its
/// socket; `Peer` (blob ranges for a function tree's children) and `Tree` (the function-tree
/// manager) over TCP between nodes.
pub use generated::arbor::v1 as arbor;

/// `runtime.v1` (CRI): the image service and the runtime service calls that run a pod.
pub use generated::runtime::v1 as cri;

pub use types::Mount;

/// The metadata key containerd reads the namespace of a request from.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";

/// Connects to a gRPC server on a unix socket (containerd's, or arbord's snapshots socket).
/// The connection is made lazily by tonic and re-made when it breaks.
pub async fn connect(
    path: impl AsRef<std::path::Path>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.as_ref().to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}
