//! `containerd-shim-arbor-v1`: see the `arbor_runtime_shim` library.

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<arbor_runtime_shim::ArborShim>(
        arbor_runtime_shim::RUNTIME_ID,
        None,
    )
    .await;
}
