//! End-to-end test of `containerd-shim-arbor-v1` under Kubernetes' path: a private containerd
//! 1.6 with its CRI plugin (the packaged `arbor` runtime handler and snapshotter config, a CNI
//! bridge network of its own, a sandbox image in a local registry), driven over the CRI gRPC
//! API as kubelet would: PullImage, RunPodSandbox with handler `arbor` and a function's pod
//! annotations, CreateContainer/StartContainer, then StopPodSandbox/RemovePodSandbox. It needs
//! root, the packages from `scripts/setup.sh` (containerd, runc, docker-registry, skopeo, the
//! CNI plugins under /usr/lib/cni) and the workspace's binaries (`cargo build --workspace
//! --bins`); without them it prints why it skipped.

mod common;
use common::{SHIM, built_bins, push_converted, target_dir};
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use arbor_proto::cri::image_service_client::ImageServiceClient;
use arbor_proto::cri::runtime_service_client::RuntimeServiceClient;
use arbor_proto::cri::{
    ContainerConfig, ContainerFilter, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec as CriImage, LinuxPodSandboxConfig, ListContainersRequest,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxState, PodSandboxStatusRequest,
    PullImageRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};
use arbor_testkit::{
    Arbord, ArbordOptions, Containerd, ContainerdOptions, Entry, ImageSpec, LayerSource, Registry,
    busybox_image, http_get, layer_tar, mounts_below, skip_unless_root, skip_unless_tools,
    skopeo_push, write_oci_layout,
};
use tonic::transport::Channel;

/// CRI's containerd namespace.
const K8S: &str = "k8s.io";
const TOOLS: &[&str] = &[
    "docker-registry",
    "skopeo",
    "containerd",
    "ctr",
    "runc",
    "ip",
    "/bin/busybox",
    "/usr/lib/cni/bridge",
    "/usr/lib/cni/host-local",
    "/usr/lib/cni/loopback",
];
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Where libcni caches ADD results (containerd 1.6's CRI does not make it configurable).
const CNI_CACHE: &str = "/var/lib/cni/results";
const RPC_TIMEOUT: Duration = Duration::from_secs(120);

fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One line of /proc/self/mountinfo: mount point, filesystem type, super options.
struct MountInfo {
    point: PathBuf,
    fstype: String,
    options: String,
}

fn mountinfo() -> Vec<MountInfo> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let point = pre.split(' ').nth(4)?.replace("\\040", " ");
            let mut post = post.split(' ');
            let fstype = post.next()?.to_string();
            let _source = post.next();
            Some(MountInfo {
                point: PathBuf::from(point),
                fstype,
                options: post.next().unwrap_or("").to_string(),
            })
        })
        .collect()
}

fn is_fuse_mount(p: &Path) -> bool {
    mountinfo()
        .iter()
        .any(|m| m.point == p && m.fstype.starts_with("fuse"))
}

/// Removes a cgroup directory tree (deepest first; cgroupfs lets rmdir remove a cgroup whose
/// control files are still listed).
fn rmdir_tree(p: &Path) {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(p);
}

/// Every cgroup directory named `name` at the top of a hierarchy (v1: one per controller, v2:
/// the unified one).
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let root = Path::new("/sys/fs/cgroup");
    if root.join(name).is_dir() {
        v.push(root.join(name));
    }
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let p = e.path().join(name);
            if p.is_dir() {
                v.push(p);
            }
        }
    }
    v
}

/// The host-side network state a pod of this test may leave: the CNI bridge (unique per test),
/// the pods' network namespaces, their cgroups. Dropped after containerd, it removes whatever
/// is still there, so a failing test leaves no bridge, netns or cgroup behind.
struct HostNet {
    bridge: String,
    /// The CNI network's name (host-local keeps its leases in `ipam_dir/<network>`).
    network: String,
    subnet: String,
    ipam_dir: PathBuf,
    cgroup_parent: String,
    netns: RefCell<Vec<PathBuf>>,
}

impl HostNet {
    fn new(tmp: &Path) -> HostNet {
        let pid = std::process::id();
        let bridge = format!("arbcri{}", pid % 1_000_000);
        // A /24 of 10.88/16 that no address or route on the host uses yet.
        let used = {
            let out = |args: &[&str]| {
                Command::new("ip")
                    .args(args)
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            out(&["-4", "addr"]) + &out(&["-4", "route"])
        };
        let first = 20 + (pid % 200);
        let n = (0..230)
            .map(|i| 20 + (first - 20 + i) % 230)
            .find(|n| !used.contains(&format!("10.88.{n}.")))
            .expect("a free 10.88.x.0/24");
        HostNet {
            bridge,
            network: format!("arbor-cri-{pid}"),
            subnet: format!("10.88.{n}.0/24"),
            ipam_dir: tmp.join("ipam"),
            cgroup_parent: format!("arbor-cri-{pid}"),
            netns: RefCell::new(Vec::new()),
        }
    }

    /// The CNI network: a bridge with the gateway address (so the host reaches pod IPs) and
    /// host-local addresses from the private /24, leases kept under the test's directory.
    fn conflist(&self) -> String {
        serde_json::json!({
            "cniVersion": "0.4.0",
            "name": self.network,
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": self.subnet }]],
                    "dataDir": self.ipam_dir.display().to_string(),
                },
            }],
        })
        .to_string()
    }

    /// host-local's leases: the files named by an IP address in the network's directory.
    fn leases(&self) -> Vec<String> {
        std::fs::read_dir(self.ipam_dir.join(&self.network))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Interfaces enslaved to the bridge (the pods' host-side veths).
    fn bridge_ports(&self) -> Vec<String> {
        std::fs::read_dir(format!("/sys/class/net/{}/brif", self.bridge))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// libcni's cached results for this network.
    fn cni_cache_entries(&self) -> Vec<String> {
        std::fs::read_dir(CNI_CACHE)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&format!("{}-", self.network)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for HostNet {
    fn drop(&mut self) {
        for ns in self.netns.borrow().iter() {
            if ns.exists() {
                // SAFETY: umount2 on a path we own (a netns bind mount of this test's pod).
                if let Ok(c) = std::ffi::CString::new(ns.as_os_str().as_encoded_bytes()) {
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
                let _ = std::fs::remove_file(ns);
            }
        }
        if Path::new("/sys/class/net").join(&self.bridge).exists() {
            let _ = Command::new("ip")
                .args(["link", "del", &self.bridge])
                .output();
        }
        for entry in self.cni_cache_entries() {
            let _ = std::fs::remove_file(Path::new(CNI_CACHE).join(entry));
        }
        for d in cgroup_dirs(&self.cgroup_parent) {
            rmdir_tree(&d);
        }
    }
}

/// A CRI client on containerd's socket.
struct Cri {
    rt: tokio::runtime::Runtime,
    ch: Channel,
}

impl Cri {
    fn connect(socket: &Path) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ch = rt
            .block_on(arbor_proto::connect(socket))
            .expect("connecting to containerd");
        Cri { rt, ch }
    }

    fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.ch.clone())
    }

    fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.ch.clone())
    }

    /// Runs one call to its answer (or a timeout).
    fn call<T>(
        &self,
        f: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        self.rt.block_on(async {
            match tokio::time::timeout(RPC_TIMEOUT, f).await {
                Ok(r) => r.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded("no answer in time")),
            }
        })
    }
}

/// A registry with a converted busybox function image and a plain sandbox (pause) image, arbord,
/// and a containerd with CRI: the packaged 1.6/1.7 snapshotter and `arbor` runtime snippets
/// (pointed at this arbord), the test's CNI network and its own sandbox image. Dropping it
/// stops and removes the pods it ran (through CRI), then containerd, arbord, the registry and
/// the host network state.
struct Scene {
    pods: RefCell<Vec<String>>,
    cri: Cri,
    ctd: Containerd,
    arbord: Arbord,
    _reg: Registry,
    net: HostNet,
    tmp: tempfile::TempDir,
    image: String,
}

impl Scene {
    fn start(test: &str) -> Option<Scene> {
        if skip_unless_root(test) || skip_unless_tools(test, TOOLS) {
            return None;
        }
        let dir = built_bins(test)?;
        let tmp = tempfile::tempdir().unwrap();
        let net = HostNet::new(tmp.path());
        let reg = Registry::start().expect("starting registry");

        // The function's image, converted: read lazily through arbord.
        let spec = busybox_image(
            vec![
                Entry::dir("app"),
                Entry::file("app/hello.txt", "hello from a lazy layer\n"),
            ],
            &["/bin/cat", "/app/hello.txt"],
        );
        let image = push_converted(&reg, tmp.path(), &dir, &spec, "fn/hello");
        // The sandbox image: one plain layer (busybox and nothing it shares with the function's
        // layers) whose command sleeps until CRI kills it. CRI pulls it itself, offline.
        let busybox = std::fs::read("/bin/busybox").unwrap();
        let pause_layer = layer_tar(&[
            Entry::dir("bin"),
            Entry::executable("bin/busybox", busybox),
            Entry::symlink("bin/sleep", "busybox"),
            Entry::file("pause", "arbor test sandbox\n"),
        ]);
        let pause = ImageSpec {
            layers: vec![LayerSource::Tar(pause_layer)],
            cmd: vec!["/bin/sleep".into(), "86400".into()],
            ..busybox_image(Vec::new(), &[])
        };
        let pause_layout = tmp.path().join("pause");
        write_oci_layout(&pause_layout, "v1", &pause).expect("writing pause layout");
        let pause_ref = reg.reference("test/pause:v1");
        skopeo_push(&pause_layout, "v1", &pause_ref, None).expect("skopeo push pause");

        let arbord = Arbord::start(&ArbordOptions {
            bin: dir.join("arbord"),
            ..Default::default()
        })
        .expect("starting arbord");

        let cni_conf = tmp.path().join("net.d");
        std::fs::create_dir_all(&cni_conf).unwrap();
        std::fs::write(cni_conf.join("10-arbor-test.conflist"), net.conflist()).unwrap();
        std::fs::create_dir_all(&net.ipam_dir).unwrap();
        let certs = reg.write_cri_hosts(tmp.path()).expect("writing hosts.toml");
        let snapshotter = include_str!("../../packaging/containerd/config-1.6-1.7.toml")
            .replace(
                "/run/arbor/snapshotter.sock",
                &arbord.socket().display().to_string(),
            )
            .replace("/var/lib/arbor/", &arbord.root().display().to_string());
        let runtime = include_str!("../../packaging/containerd/runtime-arbor-1.6-1.7.toml");
        let config = format!(
            r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_ref}"
  disable_apparmor = true
  # The sandbox's -998 and the containers' scores no lower than containerd's own (this host
  # may deny lowering them).
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{conf}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"

{snapshotter}

# A node's config also has the default runc runtime (CRI refuses to start without it).
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

{runtime}
"#,
            conf = cni_conf.display(),
            certs = certs.display(),
        );
        let ctd = Containerd::start_with(&ContainerdOptions {
            extra_config: config,
            cri: true,
        })
        .expect("starting containerd with CRI");
        let cri = Cri::connect(ctd.socket());
        Some(Scene {
            pods: RefCell::new(Vec::new()),
            cri,
            ctd,
            arbord,
            _reg: reg,
            net,
            tmp,
            image,
        })
    }

    fn pod_config(&self, annotations: &[(&str, &str)]) -> PodSandboxConfig {
        let logs = self.tmp.path().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "hello".into(),
                uid: format!("uid-{}", std::process::id()),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: "hello".into(),
            log_directory: logs.display().to_string(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: format!("/{}", self.net.cgroup_parent),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.ctd
            .state_dir()
            .join("io.containerd.runtime.v2.task")
            .join(K8S)
            .join(id)
    }

    /// Serving shim processes of this containerd: (pid, the `-id` they serve).
    fn shims(&self) -> Vec<(u32, String)> {
        let sock = self.ctd.socket().display().to_string();
        let mut v = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_shim = args.first().is_some_and(|a| a.ends_with(SHIM));
            // `start` and `delete` are short-lived actions, not the serving shim.
            let action = args.last().is_some_and(|a| a == "start" || a == "delete");
            let flag = |f: &str| args.windows(2).find(|w| w[0] == f).map(|w| w[1].clone());
            if is_shim && !action && flag("-address").as_deref() == Some(sock.as_str()) {
                v.push((pid, flag("-id").unwrap_or_default()));
            }
        }
        v
    }

    fn logs(&self) -> String {
        format!(
            "containerd log:\n{}\narbord log:\n{}",
            self.ctd.log_tail(60),
            self.arbord.log_tail(20)
        )
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        // Best effort, before containerd goes: what a failed test left running.
        for pod in self.pods.borrow().iter() {
            let containers = self
                .cri
                .call(self.cri.runtime().list_containers(ListContainersRequest {
                    filter: Some(ContainerFilter {
                        pod_sandbox_id: pod.clone(),
                        ..Default::default()
                    }),
                }))
                .map(|r| r.containers)
                .unwrap_or_default();
            for c in containers {
                let _ = self
                    .cri
                    .call(self.cri.runtime().stop_container(StopContainerRequest {
                        container_id: c.id.clone(),
                        timeout: 0,
                    }));
                let _ = self.cri.call(
                    self.cri
                        .runtime()
                        .remove_container(RemoveContainerRequest { container_id: c.id }),
                );
            }
            let _ = self
                .cri
                .call(self.cri.runtime().stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: pod.clone(),
                }));
            let _ = self.cri.call(
                self.cri
                    .runtime()
                    .remove_pod_sandbox(RemovePodSandboxRequest {
                        pod_sandbox_id: pod.clone(),
                    }),
            );
        }
    }
}

/// The network namespace path in a sandbox's verbose status (its OCI spec's network
/// namespace).
fn netns_of(info: &HashMap<String, String>) -> Option<PathBuf> {
    let v: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    v["runtimeSpec"]["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .map(PathBuf::from)
}

/// A pod through CRI (kubelet's path) on the `arbor` runtime handler: its function container
/// answers HTTP on the pod IP, the sandbox and the container share one shim, the shim reports
/// the start to arbord (once: the sandbox carries the pod's annotations too but is not
/// probed), which learns the start-up set; the rootfs layers are arbord's lazy mounts. Stopping
/// and removing the pod leaves no shim, mount, netns, address lease, veth or cgroup.
#[test]
fn a_cri_pod_on_the_arbor_runtime_serves_its_function_and_leaves_nothing() {
    let Some(s) =
        Scene::start("a_cri_pod_on_the_arbor_runtime_serves_its_function_and_leaves_nothing")
    else {
        return;
    };
    // The pod spec the docs show (docs/kubernetes.md), as kubelet turns it into CRI calls:
    // its annotations on the sandbox, its runtime class's handler, its container's command.
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kubernetes/function-pod.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["kind"], "Pod");
    assert_eq!(manifest["spec"]["runtimeClassName"], "arbor");
    let class = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kubernetes/runtimeclass.yaml"),
    )
    .unwrap();
    assert!(
        class.contains("name: arbor") && class.contains("handler: arbor"),
        "{class}"
    );
    let annotations: Vec<(String, String)> = manifest["metadata"]["annotations"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let annotations: Vec<(&str, &str)> = annotations
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert!(annotations.contains(&("arbor.io/function", "hello")));
    let container = &manifest["spec"]["containers"][0];
    assert_eq!(
        container["image"]
            .as_str()
            .unwrap()
            .replace("REGISTRY/", ""),
        s.image.split_once('/').unwrap().1,
        "the manifest names the test's image"
    );
    let command: Vec<String> = container["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let pod_config = s.pod_config(&annotations);

    // Pull through CRI (the CRI-wide snapshotter is arbor): the layers are mounted lazily.
    let image_ref = s
        .cri
        .call(s.cri.images().pull_image(PullImageRequest {
            image: Some(CriImage {
                image: s.image.clone(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: Some(pod_config.clone()),
        }))
        .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", s.logs()))
        .image_ref;
    assert!(
        s.arbord
            .metric("arbor_snapshotter_remote_mounts_total")
            .unwrap_or(0.0)
            >= 2.0,
        "CRI's pull did not mount the function's layers lazily\n{}",
        s.logs()
    );

    // The pod, on the arbor runtime handler.
    let pod = s
        .cri
        .call(s.cri.runtime().run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            // The RuntimeClass `arbor`'s handler (packaging/kubernetes/runtimeclass.yaml).
            runtime_handler: "arbor".into(),
        }))
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", s.logs()))
        .pod_sandbox_id;
    s.pods.borrow_mut().push(pod.clone());
    let status = s
        .cri
        .call(s.cri.runtime().pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: true,
        }))
        .unwrap_or_else(|e| panic!("PodSandboxStatus: {e}\n{}", s.logs()));
    let st = status.status.clone().unwrap();
    assert_eq!(st.state(), PodSandboxState::SandboxReady);
    assert_eq!(st.runtime_handler, "arbor");
    let ip = st
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    assert!(
        ip.starts_with(s.net.subnet.trim_end_matches("0/24")),
        "pod IP {ip:?} not from {}",
        s.net.subnet
    );
    let netns = netns_of(&status.info)
        .unwrap_or_else(|| panic!("no netns in the sandbox's status: {:?}", status.info));
    s.net.netns.borrow_mut().push(netns.clone());
    assert!(netns.exists(), "{}", netns.display());
    assert_eq!(s.net.leases(), vec![ip.clone()], "host-local's leases");
    let veths = s.net.bridge_ports();
    assert_eq!(veths.len(), 1, "bridge ports: {veths:?}");

    // The function: a container that opens its port a second after it starts.
    let created = s
        .cri
        .call(s.cri.runtime().create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: container["name"].as_str().unwrap().into(),
                    attempt: 0,
                }),
                image: Some(CriImage {
                    image: image_ref.clone(),
                    ..Default::default()
                }),
                command: command.clone(),
                log_path: "fn.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(pod_config.clone()),
        }))
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", s.logs()))
        .container_id;
    s.cri
        .call(s.cri.runtime().start_container(StartContainerRequest {
            container_id: created.clone(),
        }))
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", s.logs()));
    let cst = s
        .cri
        .call(s.cri.runtime().container_status(ContainerStatusRequest {
            container_id: created.clone(),
            verbose: false,
        }))
        .unwrap()
        .status
        .unwrap();
    assert_eq!(cst.state(), ContainerState::ContainerRunning, "{cst:?}");

    // It answers on the pod IP, from the host, through the bridge.
    let addr = format!("{ip}:9000");
    let mut last = String::new();
    let answered = wait_for(Duration::from_secs(30), || {
        match http_get(&addr, "/hello.txt", None) {
            Ok((200, body)) => {
                last = body;
                true
            }
            Ok((code, body)) => {
                last = format!("{code}: {body}");
                false
            }
            Err(e) => {
                last = format!("{e:#}");
                false
            }
        }
    });
    assert!(answered, "no HTTP answer on {addr}: {last}\n{}", s.logs());
    assert_eq!(last, "hello from a lazy layer\n");

    // One shim for the pod: the sandbox's, serving the container too.
    let shims = s.shims();
    assert_eq!(shims.len(), 1, "shims: {shims:?}");
    assert_eq!(shims[0].1, pod, "the shim serves the sandbox's group");
    let addr_of = |id: &str| std::fs::read_to_string(s.bundle(id).join("address")).unwrap();
    assert_eq!(addr_of(&created), addr_of(&pod));

    // The container's rootfs is an overlay over arbord's lazy (FUSE) layers.
    let rootfs = s.bundle(&created).join("rootfs");
    let mounts = mountinfo();
    let overlay = mounts
        .iter()
        .find(|m| m.point == rootfs && m.fstype == "overlay")
        .unwrap_or_else(|| panic!("{} is not an overlay mount", rootfs.display()));
    let lowers: Vec<PathBuf> = overlay
        .options
        .split(',')
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap_or("")
        .split(':')
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect();
    assert_eq!(lowers.len(), 2, "lower dirs: {lowers:?}");
    for l in &lowers {
        assert!(
            l.starts_with(s.arbord.root()) && is_fuse_mount(l),
            "lower dir {} is not one of arbord's lazy layers",
            l.display()
        );
    }

    // The shim reported the start to arbord (once: the sandbox is not probed), which learned
    // the image's start-up set from it.
    let reported = wait_for(Duration::from_secs(30), || {
        s.arbord.metric("arbor_starts_ready_total").unwrap_or(0.0) >= 1.0
    });
    assert!(reported, "no start reported\n{}", s.logs());
    let mut text = String::new();
    let learned = wait_for(Duration::from_secs(30), || {
        let out = Command::new(target_dir().join("arbor"))
            .args(["trace", "show", "--plain-http", "--address"])
            .arg(s.ctd.socket())
            .args(["--namespace", K8S, &s.image])
            .env("ARBORD_ROOT", s.arbord.root())
            .output()
            .unwrap();
        text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        out.status.success() && text.contains("from arbord")
    });
    assert!(learned, "no set learned: {text}\n{}", s.logs());
    assert!(text.contains("app/hello.txt"), "{text}");
    assert!(text.contains("function hello"), "{text}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        s.arbord.metric("arbor_starts_ready_total").unwrap(),
        1.0,
        "the start was reported more than once\n{}",
        s.logs()
    );

    // Stop and remove the pod (its container still running): nothing is left.
    s.cri
        .call(s.cri.runtime().stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        }))
        .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", s.logs()));
    s.cri
        .call(s.cri.runtime().remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        }))
        .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", s.logs()));
    let left = s
        .cri
        .call(s.cri.runtime().list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            }),
        }))
        .unwrap()
        .containers;
    assert!(left.is_empty(), "containers left: {left:?}");
    let gone = s
        .cri
        .call(s.cri.runtime().pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        }));
    assert_eq!(
        gone.as_ref().map_err(|e| e.code()).err(),
        Some(tonic::Code::NotFound),
        "{gone:?}"
    );

    assert!(
        wait_for(Duration::from_secs(30), || s.shims().is_empty()),
        "shims left: {:?}\n{}",
        s.shims(),
        s.logs()
    );
    for id in [&pod, &created] {
        assert!(!s.bundle(id).exists(), "bundle of {id} left");
    }
    assert!(
        wait_for(Duration::from_secs(10), || mounts_below(s.ctd.base_dir())
            .is_empty()),
        "mounts left under containerd's dirs: {:?}",
        mounts_below(s.ctd.base_dir())
    );
    let arbord_mounts = mounts_below(s.arbord.root());
    let not_layers: Vec<&PathBuf> = arbord_mounts
        .iter()
        .filter(|m| !(m.ends_with("fs") && is_fuse_mount(m)))
        .collect();
    assert!(
        not_layers.is_empty(),
        "mounts under arbord's root other than its layers: {not_layers:?}"
    );
    assert!(!netns.exists(), "netns {} left", netns.display());
    assert!(
        !mountinfo().iter().any(|m| m.point == netns),
        "netns {} still mounted",
        netns.display()
    );
    assert!(
        s.net.leases().is_empty(),
        "host-local leases left: {:?}",
        s.net.leases()
    );
    assert!(
        s.net.bridge_ports().is_empty(),
        "bridge ports left: {:?}",
        s.net.bridge_ports()
    );
    for v in &veths {
        assert!(
            !Path::new("/sys/class/net").join(v).exists(),
            "veth {v} left"
        );
    }
    assert!(
        s.net.cni_cache_entries().is_empty(),
        "CNI cache entries left: {:?}",
        s.net.cni_cache_entries()
    );
    let cgroups_left = || -> Vec<PathBuf> {
        cgroup_dirs(&s.net.cgroup_parent)
            .iter()
            .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    };
    assert!(
        wait_for(Duration::from_secs(10), || cgroups_left().is_empty()),
        "container cgroups left: {:?}",
        cgroups_left()
    );
    s.pods.borrow_mut().clear();
}
