//! The shim process's life cycle (`containerd_shim::Shim`): `start` (find or spawn the shim
//! of the container's group and print its address), `delete` (clean up after a shim that
//! died), and serving the task service.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::DeleteResponse;
use containerd_shim::asynchronous::{ExitSignal, Shim, spawn};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Flags, StartOpts};
use containerd_shim_protos::protobuf::MessageField;
use runc::options::DeleteOpts;
use tracing::{info, warn};

use crate::container::{SpecInfo, timestamp};
use crate::options::RuntimeOptions;
use crate::probe::ArbordProbe;
use crate::runc_client::{client, is_gone};
use crate::service::{TaskService, blocking, unmount};

/// The runtime name containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.arbor.v1";

/// Annotations that put a container into another's shim: CRI's sandbox id (a pod's
/// containers share the sandbox's shim) and runc's explicit group.
const GROUP_ANNOTATIONS: [&str; 2] = [
    "io.kubernetes.cri.sandbox-id",
    "io.containerd.runc.v2.group",
];
const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// The shim (one process per container group).
pub struct ArborShim {
    id: String,
    namespace: String,
    /// containerd's gRPC socket (`-address`): where the start probe finds the container's
    /// snapshotter and the arbord behind it.
    containerd: String,
    exit: Arc<ExitSignal>,
}

/// The id of the group (and so of the shim) a container belongs to: the sandbox's for a CRI
/// container, else its own.
pub fn group_of(id: &str, annotations: &HashMap<String, String>) -> String {
    if annotations.get(CRI_CONTAINER_TYPE).map(String::as_str) == Some("sandbox") {
        return id.to_string();
    }
    GROUP_ANNOTATIONS
        .iter()
        .find_map(|k| annotations.get(*k).filter(|v| !v.is_empty()))
        .cloned()
        .unwrap_or_else(|| id.to_string())
}

#[async_trait]
impl Shim for ArborShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        ArborShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            containerd: args.address.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // containerd runs `start` in the bundle.
        let spec = blocking(|| SpecInfo::read(Path::new(".")))
            .await
            .unwrap_or_default();
        let group = group_of(&opts.id, &spec.annotations);
        if group != opts.id {
            // The sandbox's bundle is our sibling; its shim wrote its address there.
            let sibling = Path::new("..").join(&group).join("address");
            if let Ok(address) = tokio::fs::read_to_string(&sibling).await {
                let address = address.trim().to_string();
                if containerd_shim_protos::shim_async::Client::connect(&address)
                    .await
                    .is_ok()
                {
                    info!(group = %group, address = %address, "joining the sandbox's shim");
                    containerd_shim::util::write_str_to_file("address", &address).await?;
                    return Ok(address);
                }
            }
        }
        let address = spawn(opts, &group, Vec::new()).await?;
        containerd_shim::util::write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = std::env::current_dir()
            .map_err(|e| containerd_shim::Error::Other(format!("current dir: {e}")))?;
        let b = bundle.clone();
        let options = blocking(move || RuntimeOptions::load(&b))
            .await
            .unwrap_or_default();
        match client(&options, &self.namespace, &bundle) {
            Ok(runc) => {
                if let Err(e) = runc
                    .delete(&self.id, Some(&DeleteOpts::new().force(true)))
                    .await
                    && !is_gone(&e)
                {
                    warn!(container = %self.id, error = %e, "runc delete --force failed");
                }
            }
            Err(e) => warn!(error = %e, "no runc client"),
        }
        if let Err(e) = unmount(bundle.join("rootfs")).await {
            warn!(container = %self.id, error = %e, "unmounting the rootfs failed");
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(timestamp(std::time::SystemTime::now())),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService::new(
            &self.namespace,
            publisher,
            self.exit.clone(),
            Arc::new(ArbordProbe::new(&self.containerd)),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_containers_join_the_sandbox() {
        let mut a = HashMap::new();
        assert_eq!(group_of("c1", &a), "c1");
        a.insert(CRI_CONTAINER_TYPE.to_string(), "sandbox".to_string());
        a.insert(GROUP_ANNOTATIONS[0].to_string(), "c1".to_string());
        assert_eq!(group_of("c1", &a), "c1");
        a.insert(CRI_CONTAINER_TYPE.to_string(), "container".to_string());
        assert_eq!(group_of("c2", &a), "c1");
        let mut g = HashMap::new();
        g.insert(GROUP_ANNOTATIONS[1].to_string(), "grp".to_string());
        assert_eq!(group_of("c3", &g), "grp");
    }
}
