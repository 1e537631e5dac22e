//! Function trees end to end: three `arbord`s, each in its own network namespace behind a
//! `tc tbf`-shaped link of one bridge, a registry in a fourth namespace behind a slower link,
//! and the tree manager in a fifth `arbord` on the host. Each node lazily mounts the same layer
//! for the same function (through the snapshots API, as containerd would) and reads it whole:
//! the first node reads the registry, the others read it from their parent, so the registry
//! serves about one copy; every node gets the exact bytes. Then a parent is frozen (SIGSTOP):
//! its child gives it up within the stall deadline and reads on from the registry, and the
//! manager fails the frozen node out of the tree. Needs root, iproute2, docker-registry, skopeo.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use arbor_proto::snapshots::PrepareSnapshotRequest;
use arbor_proto::snapshots::snapshots_client::SnapshotsClient;
use arbor_testkit::cluster::{Cluster, ClusterSpec};
use arbor_testkit::{
    Arbord, ArbordOptions, Entry, ImageSpec, LayerSource, Registry, layer_tar, pseudo_random_bytes,
    skip_unless_root, skip_unless_tools, skopeo_push, write_oci_layout,
};
use sha2::{Digest as _, Sha256};

const FUNCTION: &str = "fn/p2p-test";
const MIB: u64 = 1 << 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One layer of incompressible files (so the blob is as big as the data).
fn image() -> (ImageSpec, BTreeMap<String, String>) {
    let mut entries = vec![Entry::dir("data")];
    let mut sums = BTreeMap::new();
    for (i, size) in [(0, 9 * MIB), (1, 7 * MIB), (2, 3 * MIB + 12345)] {
        let data = pseudo_random_bytes(1000 + i, size as usize);
        sums.insert(format!("data/f{i}.bin"), hex(&Sha256::digest(&data)));
        entries.push(Entry::file(format!("data/f{i}.bin"), data));
    }
    let spec = ImageSpec {
        layers: vec![LayerSource::Tar(layer_tar(&entries))],
        cmd: vec!["/bin/true".into()],
        entrypoint: Vec::new(),
        env: Vec::new(),
        labels: Vec::new(),
    };
    (spec, sums)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The labels `arbor pull --function` sends for `layer` to the arbord rooted at `root`.
fn labels(
    root: &Path,
    reference: &str,
    layer: &serde_json::Value,
    chain: &str,
) -> BTreeMap<String, String> {
    use arbor_snapshotter::labels as l;
    let mut out: BTreeMap<String, String> = layer["annotations"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("containerd.io/snapshot/"))
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let digest = layer["digest"].as_str().unwrap();
    out.insert(l::TARGET.into(), chain.into());
    out.insert(l::ARBOR_LAYER_DIGEST.into(), digest.into());
    out.insert(l::ARBOR_IMAGE_REF.into(), reference.into());
    out.insert(l::ARBOR_FUNCTION.into(), FUNCTION.into());
    let key = l::read_pull_key(root).expect("arbord's pull key");
    out.insert(
        l::PULL_MAC.into(),
        l::pull_mac(&key, digest, reference, chain),
    );
    out
}

async fn prepare(a: &Arbord, labels: &BTreeMap<String, String>, chain: &str) {
    let ch = arbor_proto::connect(a.socket()).await.unwrap();
    let r = SnapshotsClient::new(ch)
        .prepare(PrepareSnapshotRequest {
            snapshotter: "arbor".into(),
            key: format!("default/1/extract {chain}"),
            parent: String::new(),
            labels: labels.clone().into_iter().collect(),
        })
        .await;
    // A lazily mounted layer answers AlreadyExists (containerd's remote-snapshot protocol).
    assert_eq!(
        r.err().map(|s| s.code()),
        Some(tonic::Code::AlreadyExists),
        "the layer must be mounted lazily; log:\n{}",
        a.log_tail(40)
    );
}

/// The one lazy mount of `a`.
fn mount_dir(a: &Arbord) -> PathBuf {
    let m = arbor_testkit::mounts_below(a.root());
    assert_eq!(m.len(), 1, "{m:?}");
    m[0].clone()
}

/// Reads every file of the mount and checks it against `sums`.
fn read_all(dir: &Path, sums: &BTreeMap<String, String>) {
    for (name, want) in sums {
        let data = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&hex(&Sha256::digest(&data)), want, "{name} differs");
    }
}

fn wait_metric(a: &Arbord, sample: &str, want: f64) {
    let t = Instant::now();
    loop {
        let v = a.metric(sample).unwrap_or(f64::NAN);
        if v == want {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{sample} is {v}, not {want}; log:\n{}",
            a.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metric(a: &Arbord, sample: &str) -> f64 {
    a.metric(sample).unwrap()
}

/// A shaped cluster of `n` nodes, each running arbord with `[p2p]` on, a registry in its own
/// namespace holding the converted test image, and the tree manager in a host-side arbord.
struct Setup {
    cluster: Cluster,
    _reg: Registry,
    _tmp: tempfile::TempDir,
    sums: BTreeMap<String, String>,
    dst: String,
    layer: serde_json::Value,
    blob_size: u64,
    /// The managers' addresses.
    manager_addrs: Vec<String>,
    managers: Vec<Arbord>,
    nodes: Vec<Arbord>,
}

fn setup(
    n: usize,
    node_rate: u64,
    registry_rate: u64,
    etcd: Option<&arbor_testkit::Etcd>,
) -> Setup {
    let cluster = Cluster::new(&ClusterSpec::new(n, node_rate).with_registry(registry_rate))
        .expect("building the cluster");
    let reg = Registry::start_in_netns(cluster.registry_ns().unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (spec, sums) = image();
    write_oci_layout(&tmp.path().join("layout"), "v1", &spec).unwrap();
    let src = reg.reference("p2p/app:v1");
    skopeo_push(&tmp.path().join("layout"), "v1", &src, None).unwrap();
    let dst = reg.reference("p2p/app:v1-arbor");
    let arbor = Path::new(env!("CARGO_BIN_EXE_arbord")).with_file_name("arbor");
    let out = Command::new(&arbor)
        .args(["convert", "--plain-http", "--no-infer", &src, &dst])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let layer = reg.manifest("p2p/app", "v1-arbor").unwrap()["layers"][0].clone();
    let blob_size = layer["size"].as_u64().unwrap();
    let reg_host = reg.addr().rsplit_once(':').unwrap().0.to_string();

    // The tree manager(s), on the host's side of the bridge: one with its state in memory, or
    // two electing a leader through etcd.
    let addrs: Vec<String> = (0..if etcd.is_some() { 2 } else { 1 })
        .map(|_| format!("{}:{}", cluster.host_addr(), free_port()))
        .collect();
    let list = addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let managers: Vec<Arbord> = addrs
        .iter()
        .map(|a| {
            let etcd = etcd.map_or(String::new(), |e| format!("etcd = [\"{}\"]\n", e.addr()));
            Arbord::start(&ArbordOptions {
                bin: PathBuf::from(env!("CARGO_BIN_EXE_arbord")),
                config: Some(format!(
                    "[p2p]\nrun_manager = true\nmanager = [{list}]\nmanager_listen = \"{a}\"\n\
                     heartbeat_timeout_secs = 5\n{etcd}"
                )),
                ..Default::default()
            })
            .expect("starting a tree manager")
        })
        .collect();
    let manager = list.clone();
    // Started side by side (each waits for its socket).
    let nodes: Vec<Arbord> = std::thread::scope(|s| {
        let handles: Vec<_> = cluster
            .nodes()
            .iter()
            .map(|n| {
                let (manager, reg_host) = (&manager, &reg_host);
                s.spawn(move || {
                    let ip = n.addr();
                    Arbord::start(&ArbordOptions {
                        bin: PathBuf::from(env!("CARGO_BIN_EXE_arbord")),
                        netns: Some((n.name().to_string(), ip)),
                        config: Some(format!(
                            "[registry]\nplain_http = [\"{reg_host}\"]\n\
                             [prefetch]\nrest_delay_secs = 600\n\
                             [fuse]\nthreads = 1\n\
                             [p2p]\nenabled = true\nnode_id = \"node{i}\"\nlisten = \"{ip}:7071\"\n\
                             manager = [{manager}]\nheartbeat_secs = 1\npeer_stall_ms = 1000\n",
                            i = n.index()
                        )),
                        ..Default::default()
                    })
                    .unwrap_or_else(|e| panic!("starting arbord on {}: {e:#}", n.name()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    Setup {
        cluster,
        _reg: reg,
        _tmp: tmp,
        sums,
        dst,
        layer,
        blob_size,
        manager_addrs: addrs,
        managers,
        nodes,
    }
}

impl Setup {
    /// Prepares the layer lazily on node `i` for [`FUNCTION`] and waits until the node knows
    /// its depth in the tree.
    async fn join(&self, i: usize, depth: u32) {
        let chain = "sha256:3333333333333333333333333333333333333333333333333333333333333333";
        let a = &self.nodes[i];
        prepare(a, &labels(a.root(), &self.dst, &self.layer, chain), chain).await;
        wait_metric(a, &depth_metric(), f64::from(depth));
    }

    fn registry_egress(&self) -> u64 {
        self.cluster
            .registry_ns()
            .unwrap()
            .link_bytes()
            .unwrap()
            .to_host
    }
}

fn depth_metric() -> String {
    format!("arbor_p2p_tree_depth{{function=\"{FUNCTION}\"}}")
}

fn route_metric(route: &str) -> String {
    format!("arbor_p2p_route_bytes_total{{function=\"{FUNCTION}\",route=\"{route}\"}}")
}

fn route_errors(route: &str, kind: &str) -> String {
    format!(
        "arbor_p2p_route_errors_total{{function=\"{FUNCTION}\",route=\"{route}\",kind=\"{kind}\"}}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_tree_streams_a_layer_node_to_node_and_routes_around_a_frozen_parent() {
    let test = "a_function_tree_streams_a_layer_node_to_node_and_routes_around_a_frozen_parent";
    if skip_unless_root(test) || skip_unless_tools(test, &["docker-registry", "skopeo", "ip", "tc"])
    {
        return;
    }
    // 3 nodes at 400 Mbit/s each way, the registry behind 100 Mbit/s.
    let s = setup(3, 400_000_000, 100_000_000, None);
    let (nodes, sums, blob_size) = (&s.nodes, &s.sums, s.blob_size);
    let registry_before = s.registry_egress();

    // Node 0 mounts first and becomes the root: it reads the registry.
    s.join(0, 0).await;
    read_all(&mount_dir(&nodes[0]), sums);
    // Node 1 joins under it and reads everything from its parent.
    s.join(1, 1).await;
    read_all(&mount_dir(&nodes[1]), sums);
    let served = s.registry_egress() - registry_before;
    let from_parent = metric(&nodes[1], &route_metric("parent"));
    let from_registry_1 = metric(&nodes[1], &route_metric("registry"));
    eprintln!(
        "blob {blob_size} B; registry served {served} B for two nodes; node1: {from_parent} B from its parent, {from_registry_1} B from the registry"
    );
    assert!(
        from_parent as u64 >= 19 * MIB,
        "node1 read {from_parent} B from its parent"
    );
    assert_eq!(
        from_registry_1, 0.0,
        "node1 must not read blob bytes from the registry"
    );
    assert!(
        served < blob_size + blob_size / 2,
        "the registry served {served} B for two nodes of a {blob_size} B blob"
    );
    assert!(
        metric(&nodes[0], "arbor_p2p_served_bytes_total{node=\"node1\"}") >= from_parent,
        "node0 counts what it served node1"
    );

    // Freeze node 0 (the parent of node 1 and, next, node 2); node 2 joins under it and reads:
    // the frozen parent is given up after the stall deadline, the registry serves the rest.
    let pid0 = nodes[0].pid().unwrap();
    // SAFETY: signalling a child process of this test.
    unsafe { libc::kill(pid0 as i32, libc::SIGSTOP) };
    s.join(2, 1).await;
    let t = Instant::now();
    read_all(&mount_dir(&nodes[2]), sums);
    let took = t.elapsed();
    let timeouts = metric(&nodes[2], &route_errors("parent", "timeout"));
    eprintln!("node2 read the layer past a frozen parent in {took:?} ({timeouts} parent timeouts)");
    assert!(timeouts >= 1.0, "node2 gave up its frozen parent");
    // The manager fails the frozen node out (5 s without heartbeats): a child takes its place.
    let t = Instant::now();
    loop {
        let d1 = metric(&nodes[1], &depth_metric());
        let d2 = metric(&nodes[2], &depth_metric());
        if d1 == 0.0 || d2 == 0.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no node became root: {d1} {d2}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid0 as i32, libc::SIGCONT) };
    // Thawed, node 0 re-joins (as a leaf now) and still serves its files.
    let t = Instant::now();
    while metric(&nodes[0], &depth_metric()) < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "node0 did not re-join"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    read_all(&mount_dir(&nodes[0]), sums);
}

/// A blob source that answers every range with zeros: a peer that lies.
struct Liar;

impl arbor_fetch::BlobSource for Liar {
    fn kind(&self) -> &'static str {
        "liar"
    }
    fn read_range<'a>(
        &'a self,
        _digest: &'a str,
        _offset: u64,
        len: u64,
    ) -> arbor_fetch::source::ReadFuture<'a> {
        Box::pin(async move { Ok(bytes::Bytes::from(vec![0u8; len as usize])) })
    }
}

/// Serves every blob of every function, all zeros.
struct LyingProvider {
    size: u64,
}

impl arbor_peer::server::Provider for LyingProvider {
    fn source(
        &self,
        _function: &str,
        _digest: &str,
    ) -> Option<(std::sync::Arc<dyn arbor_fetch::BlobSource>, u64)> {
        Some((std::sync::Arc::new(Liar), self.size))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_nodes_start_at_once_on_one_registry_copy_past_a_lying_peer() {
    let test = "eight_nodes_start_at_once_on_one_registry_copy_past_a_lying_peer";
    if skip_unless_root(test) || skip_unless_tools(test, &["docker-registry", "skopeo", "ip", "tc"])
    {
        return;
    }
    let s = setup(8, 400_000_000, 100_000_000, None);
    let before = s.registry_egress();

    // node0 is the root; then a lying peer (every byte it serves is zero) joins as its first
    // child; then the other nodes (node i at level-order slot i + 1).
    s.join(0, 0).await;
    let l = tokio::net::TcpListener::bind((s.cluster.host_addr(), 0))
        .await
        .unwrap();
    let liar_addr = l.local_addr().unwrap().to_string();
    let liar_service = arbor_peer::PeerService::new(
        std::sync::Arc::new(LyingProvider { size: s.blob_size }),
        Default::default(),
    );
    let liar_stats = liar_service.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(liar_service.into_server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    let liar = arbor_peer::Member::new(
        &s.manager_addrs[0],
        arbor_proto::arbor::Node {
            id: "liar".into(),
            addr: liar_addr,
        },
        Duration::from_secs(1),
    )
    .unwrap();
    let pos = liar.join(FUNCTION).await.unwrap();
    assert_eq!(pos.borrow().as_ref().map(|p| p.depth), Some(1));
    for i in 1..8 {
        s.join(i, (i as u32 + 2).ilog2()).await;
    }
    // All read at once: a burst of cold starts.
    let dirs: Vec<PathBuf> = s.nodes.iter().map(mount_dir).collect();
    std::thread::scope(|sc| {
        for d in &dirs {
            let sums = &s.sums;
            sc.spawn(move || read_all(d, sums));
        }
    });
    let served = s.registry_egress() - before;
    let mut table = String::new();
    for (i, a) in s.nodes.iter().enumerate() {
        let parent = metric(a, &route_metric("parent"));
        let grand = metric(a, &route_metric("grandparent"));
        let registry = metric(a, &route_metric("registry"));
        let bad = metric(a, &route_errors("parent", "bad"));
        table.push_str(&format!(
            "node{i}: parent {parent} B, grandparent {grand} B, registry {registry} B, parent reported bad {bad}x\n"
        ));
    }
    eprintln!(
        "registry served {served} B for 8 nodes of a {} B blob; the liar sent {} B\n{table}",
        s.blob_size,
        liar_stats.stats().bytes_sent
    );
    // The liar's children (node2, node3) caught it, reported it and read on from their
    // grandparent (node0), never from the registry.
    for i in [2, 3] {
        assert!(
            metric(&s.nodes[i], &route_errors("parent", "bad")) >= 1.0,
            "node{i} did not report its lying parent\n{table}"
        );
        assert!(
            metric(&s.nodes[i], "arbor_p2p_blocks_total{from=\"corrupt\"}") >= 1.0,
            "{table}"
        );
        assert!(
            metric(&s.nodes[i], &route_metric("grandparent")) >= 19.0 * MIB as f64,
            "node{i} did not read on from its grandparent\n{table}"
        );
    }
    assert!(liar_stats.stats().bytes_sent > 0, "the liar was asked");
    // The TOC too came through the tree: only the root read it from the registry; the liar's
    // children caught its zeros (the TOC digest) and read the registry instead.
    let toc = |route: &str| format!("arbor_p2p_tocs_total{{route=\"{route}\"}}");
    assert_eq!(metric(&s.nodes[0], &toc("registry")), 1.0, "{table}");
    for i in [1, 4, 5, 6, 7] {
        assert_eq!(
            metric(&s.nodes[i], &toc("parent")),
            1.0,
            "node{i} read its TOC elsewhere\n{table}"
        );
        assert_eq!(metric(&s.nodes[i], &toc("registry")), 0.0, "node{i}");
    }
    for i in [2, 3] {
        assert_eq!(
            metric(&s.nodes[i], &toc("parent")),
            0.0,
            "node{i} took the liar's TOC"
        );
    }
    // Every node but the root read from a peer and nothing from the registry.
    for i in 1..8 {
        assert_eq!(
            metric(&s.nodes[i], &route_metric("registry")),
            0.0,
            "node{i} read from the registry\n{table}"
        );
    }
    // One copy (plus the TOC reads).
    assert!(
        served < s.blob_size + s.blob_size / 4,
        "the registry served {served} B for 8 nodes of a {} B blob\n{table}",
        s.blob_size
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interior_node_killed_mid_transfer_leaves_its_subtree_whole() {
    let test = "an_interior_node_killed_mid_transfer_leaves_its_subtree_whole";
    if skip_unless_root(test) || skip_unless_tools(test, &["docker-registry", "skopeo", "ip", "tc"])
    {
        return;
    }
    // Slow links, so the transfer is still running when node 1 dies.
    let mut s = setup(4, 80_000_000, 400_000_000, None);
    // node0 root; node1, node2 its children; node3 under node1.
    s.join(0, 0).await;
    read_all(&mount_dir(&s.nodes[0]), &s.sums);
    s.join(1, 1).await;
    s.join(2, 1).await;
    s.join(3, 2).await;
    let (d1, d3) = (mount_dir(&s.nodes[1]), mount_dir(&s.nodes[3]));
    // node3 reads in 256 KiB steps, timing each; node1 reads too, and dies a moment later.
    let sums = s.sums.clone();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut worst = Duration::ZERO;
        for (name, want) in &sums {
            let mut f = std::fs::File::open(d3.join(name)).unwrap();
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let t = Instant::now();
                let n = f.read(&mut buf).unwrap_or_else(|e| panic!("{name}: {e}"));
                worst = worst.max(t.elapsed());
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            assert_eq!(&hex(&h.finalize()), want, "{name} differs");
        }
        worst
    });
    let d1_reader = std::thread::spawn(move || {
        let _ = std::fs::read(d1.join("data/f0.bin"));
    });
    std::thread::sleep(Duration::from_millis(700));
    // The node dies for good (its fd holder too): its own reader gets ENOTCONN.
    s.nodes[1].kill_node().unwrap();
    let worst = reader.join().unwrap();
    let _ = d1_reader.join();
    let from_parent = metric(&s.nodes[3], &route_metric("parent"));
    let from_grand = metric(&s.nodes[3], &route_metric("grandparent"));
    eprintln!(
        "node3 read its layer while its parent died: longest single read {worst:?}; {from_parent} B from its parent(s), {from_grand} B from its grandparent"
    );
    assert!(
        worst < Duration::from_secs(3),
        "a read waited {worst:?} for the dead parent"
    );
    // The manager fails node1 out; node3 (the last in level order) takes its place under node0.
    wait_metric(&s.nodes[3], &depth_metric(), 1.0);
    // The tree is balanced again: node0 root, node3 and node2 its children.
    assert_eq!(metric(&s.nodes[0], &depth_metric()), 0.0);
    assert_eq!(metric(&s.nodes[2], &depth_metric()), 1.0);
}

/// Which of the managers leads: the one whose `List` answers (a standby answers UNAVAILABLE).
async fn leader(addrs: &[String]) -> Option<usize> {
    for (i, a) in addrs.iter().enumerate() {
        let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{a}"))
            .unwrap()
            .connect()
            .await
        else {
            continue;
        };
        let mut c = arbor_proto::arbor::tree_client::TreeClient::new(ch);
        if c.list(arbor_proto::arbor::ListRequest {}).await.is_ok() {
            return Some(i);
        }
    }
    None
}

async fn members(addr: &str) -> usize {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let trees = arbor_proto::arbor::tree_client::TreeClient::new(ch)
        .list(arbor_proto::arbor::ListRequest {})
        .await
        .unwrap()
        .into_inner()
        .trees;
    trees
        .iter()
        .find(|t| t.function == FUNCTION)
        .map_or(0, |t| t.members.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_manager_takes_over_mid_burst_with_the_trees() {
    let test = "the_standby_manager_takes_over_mid_burst_with_the_trees";
    if skip_unless_root(test)
        || skip_unless_tools(test, &["docker-registry", "skopeo", "ip", "tc", "etcd"])
    {
        return;
    }
    let etcd = arbor_testkit::Etcd::start().expect("starting etcd");
    let mut s = setup(4, 80_000_000, 400_000_000, Some(&etcd));
    let lead = leader(&s.manager_addrs).await.expect("a leading manager");
    for (i, d) in [0, 1, 1, 2].into_iter().enumerate() {
        s.join(i, d).await;
    }
    assert_eq!(members(&s.manager_addrs[lead]).await, 4);
    // All four read at once; the leading manager dies a moment into the burst.
    let dirs: Vec<PathBuf> = s.nodes.iter().map(mount_dir).collect();
    let sums = s.sums.clone();
    let burst = std::thread::spawn(move || {
        std::thread::scope(|sc| {
            for d in &dirs {
                let sums = &sums;
                sc.spawn(move || read_all(d, sums));
            }
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    s.managers[lead].kill_node().unwrap();
    let killed = Instant::now();
    burst.join().expect("every node read every byte");
    eprintln!(
        "the burst finished {:?} after the leader died",
        killed.elapsed()
    );
    // The standby leads now, with the same tree (restored from etcd, not rebuilt).
    let other = 1 - lead;
    let t = Instant::now();
    while leader(&s.manager_addrs).await != Some(other) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the standby did not take over"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "the standby led {:?} after the leader died (or sooner)",
        killed.elapsed()
    );
    assert_eq!(members(&s.manager_addrs[other]).await, 4);
    // The nodes keep their places (heartbeats reach the new leader: nobody failed out).
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(members(&s.manager_addrs[other]).await, 4);
    for (i, d) in [0.0, 1.0, 1.0, 2.0].into_iter().enumerate() {
        assert_eq!(metric(&s.nodes[i], &depth_metric()), d, "node{i}");
    }
}
