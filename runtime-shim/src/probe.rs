//! Function awareness: each container records its start phases ([`Phases`]): when Create was
//! asked for, when `runc create` was done, and when Start was done (with the init pid). After
//! Start the task service hands them to a [`StartProbe`] on a background task, never delaying
//! Start itself. The shim's probe is [`ArbordProbe`]: for a container that names a function
//! or a port (annotations `arbor.io/function`, `arbor.io/port`, default port 9000), it polls
//! the port from a thread `setns`'d into the container's network namespace until it opens,
//! then reports the phases (layers: when arbord mounted its lazy layers; create, start, port)
//! with the container's rootfs to the arbord
//! behind its snapshotter (`arbor.v1.Starts/Ready`, see `arbor_client::ready`), which exports
//! them as Prometheus metrics and learns the image's start-up set from the start.

use std::time::{Instant, SystemTime};

use async_trait::async_trait;

/// When a container passed each start phase (wall clock for reports, monotonic for spans).
#[derive(Debug, Clone)]
pub struct Phases {
    /// The Create request arrived.
    pub create_requested: (SystemTime, Instant),
    /// `runc create` returned (the init process exists, stopped before the user's program).
    pub runc_created: Option<(SystemTime, Instant)>,
    /// `runc start` returned: the user's program runs as `pid`.
    pub started: Option<(SystemTime, Instant, u32)>,
}

impl Phases {
    pub fn new() -> Phases {
        Phases {
            create_requested: (SystemTime::now(), Instant::now()),
            runc_created: None,
            started: None,
        }
    }

    pub fn mark_created(&mut self) {
        self.runc_created = Some((SystemTime::now(), Instant::now()));
    }

    pub fn mark_started(&mut self, pid: u32) {
        self.started = Some((SystemTime::now(), Instant::now(), pid));
    }
}

impl Default for Phases {
    fn default() -> Self {
        Phases::new()
    }
}

/// What the probe is told about a started container.
#[derive(Debug, Clone)]
pub struct Started {
    pub namespace: String,
    pub container_id: String,
    pub bundle: String,
    /// The OCI spec's annotations (CRI forwards the `arbor.io/*` ones).
    pub annotations: std::collections::HashMap<String, String>,
    pub phases: Phases,
    /// The rootfs mounts containerd passed at Create.
    pub rootfs: Vec<arbor_proto::Mount>,
}

/// Runs in the background after a container started.
#[async_trait]
pub trait StartProbe: Send + Sync {
    async fn started(&self, container: Started);
}

/// The probe used today: nothing.
#[derive(Debug, Default)]
pub struct NoProbe;

#[async_trait]
impl StartProbe for NoProbe {
    async fn started(&self, _container: Started) {}
}

/// Longest the probe waits for a function's port.
pub const PORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// CRI's annotation telling a pod's sandbox (pause) container from its other containers.
const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// Whether a container is a function to probe: it names a function or a port, and it is not
/// a CRI pod's sandbox. CRI copies a pod's allowed annotations (`pod_annotations`, e.g.
/// `arbor.io/*`) into the sandbox's spec as well as into each container's; the sandbox shares
/// the pod's network namespace, so probing it too would report the function's start twice,
/// the second time with the pause image's rootfs.
pub fn is_function(annotations: &std::collections::HashMap<String, String>) -> bool {
    let named = annotations.contains_key(arbor_client::ready::ANN_FUNCTION)
        || annotations.contains_key(arbor_client::ready::ANN_PORT);
    named && annotations.get(CRI_CONTAINER_TYPE).map(String::as_str) != Some("sandbox")
}

/// Probes a function's port and reports its start to arbord (see the module docs).
#[derive(Debug)]
pub struct ArbordProbe {
    /// containerd's socket.
    containerd: std::path::PathBuf,
}

impl ArbordProbe {
    pub fn new(containerd_address: &str) -> ArbordProbe {
        let path = containerd_address
            .strip_prefix("unix://")
            .unwrap_or(containerd_address);
        ArbordProbe {
            containerd: std::path::PathBuf::from(path),
        }
    }

    async fn probe(&self, c: Started) -> Result<String, arbor_client::Error> {
        use arbor_client::ready;
        let Some((started_wall, _, pid)) = c.phases.started else {
            return Ok("not started".into());
        };
        let port = ready::port_of(c.annotations.iter());
        let opened = ready::wait_port(pid, port, PORT_TIMEOUT).await?;
        let mut t = arbor_client::Target {
            address: self.containerd.clone(),
            namespace: c.namespace.clone(),
            snapshotter: String::new(),
        };
        t.snapshotter = ready::container_snapshotter(&t, &c.container_id).await?;
        let arbord = arbor_client::pull::arbord(&t).await?;
        let (create_wall, _) = c.phases.create_requested;
        let created_wall = c.phases.runc_created.map_or(create_wall, |(w, _)| w);
        // "Layers ready": when arbord mounted the container's lazy layers (before Create; the
        // phase runs from the first mount to the last).
        let mounted: Vec<i64> = ready::layers(&arbord, c.rootfs.clone())
            .await
            .map(|l| l.layers.iter().map(|x| x.mounted_unix_nano).collect())
            .unwrap_or_default();
        let layers_phase = match (mounted.iter().min(), mounted.iter().max()) {
            (Some(&a), Some(&b)) => Some(arbor_proto::arbor::Phase {
                name: "layers".into(),
                start_unix_nano: a,
                end_unix_nano: b,
            }),
            _ => None,
        };
        let report = arbor_proto::arbor::ReadyRequest {
            namespace: c.namespace.clone(),
            container_id: c.container_id.clone(),
            function: c
                .annotations
                .get(ready::ANN_FUNCTION)
                .cloned()
                .unwrap_or_default(),
            rootfs: c.rootfs,
            manifest: String::new(),
            started_unix_nano: ready::unix_nanos(create_wall),
            ready_unix_nano: ready::unix_nanos(opened),
            phases: layers_phase
                .into_iter()
                .chain([
                    ready::phase("create", create_wall, created_wall),
                    ready::phase("start", created_wall, started_wall),
                    ready::phase("port", started_wall, opened),
                ])
                .collect(),
        };
        let r = ready::report(&arbord, report).await?;
        Ok(format!(
            "port {port} open {:.2} s after create; arbord learns for {:?}",
            opened
                .duration_since(create_wall)
                .map_or(0.0, |d| d.as_secs_f64()),
            r.manifest
        ))
    }
}

#[async_trait]
impl StartProbe for ArbordProbe {
    async fn started(&self, c: Started) {
        if !is_function(&c.annotations) {
            return;
        }
        let id = c.container_id.clone();
        match self.probe(c).await {
            Ok(what) => tracing::info!(container = %id, "{what}"),
            Err(e) => tracing::warn!(container = %id, error = %e, "start probe"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_are_named_containers_but_not_sandboxes() {
        let ann = |kv: &[(&str, &str)]| -> std::collections::HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(!is_function(&ann(&[])));
        assert!(is_function(&ann(&[("arbor.io/function", "hello")])));
        assert!(is_function(&ann(&[("arbor.io/port", "8080")])));
        let pod = [
            ("arbor.io/function", "hello"),
            ("arbor.io/port", "9000"),
            ("io.kubernetes.cri.sandbox-id", "s1"),
        ];
        let mut sandbox = pod.to_vec();
        sandbox.push((CRI_CONTAINER_TYPE, "sandbox"));
        assert!(!is_function(&ann(&sandbox)));
        let mut container = pod.to_vec();
        container.push((CRI_CONTAINER_TYPE, "container"));
        assert!(is_function(&ann(&container)));
    }
}
