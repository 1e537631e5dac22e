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

/// The converted image's only layer descriptor (from its manifest).
fn layer_of(reg: &Registry, repo: &str, tag: &str) -> serde_json::Value {
    let (code, body) = arbor_testkit::http_request(
        &reg.addr(),
        "GET",
        &format!("/v2/{repo}/manifests/{tag}"),
        &[(
            "Accept".into(),
            "application/vnd.oci.image.manifest.v1+json".into(),
        )],
        &[],
    )
    .unwrap();
    assert_eq!(code, 200);
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    m["layers"][0].clone()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_tree_streams_a_layer_node_to_node_and_routes_around_a_frozen_parent() {
    let test = "a_function_tree_streams_a_layer_node_to_node_and_routes_around_a_frozen_parent";
    if skip_unless_root(test) || skip_unless_tools(test, &["docker-registry", "skopeo", "ip", "tc"])
    {
        return;
    }
    // 3 nodes at 400 Mbit/s each way, the registry behind 100 Mbit/s.
    let cluster = Cluster::new(&ClusterSpec::new(3, 400_000_000).with_registry(100_000_000))
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
    let layer = layer_of(&reg, "p2p/app", "v1-arbor");
    let blob_size = layer["size"].as_u64().unwrap();
    let reg_host = reg.addr().rsplit_once(':').unwrap().0.to_string();

    // The tree manager, on the host's side of the bridge.
    let manager = format!("{}:{}", cluster.host_addr(), free_port());
    let _manager = Arbord::start(&ArbordOptions {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_arbord")),
        config: Some(format!(
            "[p2p]\nrun_manager = true\nmanager = \"{manager}\"\nheartbeat_timeout_secs = 5\n"
        )),
        ..Default::default()
    })
    .expect("starting the tree manager");

    let nodes: Vec<Arbord> = cluster
        .nodes()
        .iter()
        .map(|n| {
            let ip = n.addr();
            Arbord::start(&ArbordOptions {
                bin: PathBuf::from(env!("CARGO_BIN_EXE_arbord")),
                netns: Some((n.name().to_string(), ip)),
                config: Some(format!(
                    "[registry]\nplain_http = [\"{reg_host}\"]\n\
                     [prefetch]\nrest_delay_secs = 600\n\
                     [p2p]\nenabled = true\nnode_id = \"node{i}\"\nlisten = \"{ip}:7071\"\n\
                     manager = \"{manager}\"\nheartbeat_secs = 1\npeer_stall_ms = 1000\n",
                    i = n.index()
                )),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("starting arbord on {}: {e:#}", n.name()))
        })
        .collect();
    let depth = format!("arbor_p2p_tree_depth{{function=\"{FUNCTION}\"}}");
    let chain = "sha256:3333333333333333333333333333333333333333333333333333333333333333";
    let registry_before = cluster.registry_ns().unwrap().link_bytes().unwrap();

    // Node 0 mounts first and becomes the root: it reads the registry.
    prepare(
        &nodes[0],
        &labels(nodes[0].root(), &dst, &layer, chain),
        chain,
    )
    .await;
    wait_metric(&nodes[0], &depth, 0.0);
    read_all(&mount_dir(&nodes[0]), &sums);
    // Node 1 joins under it and reads everything from its parent.
    prepare(
        &nodes[1],
        &labels(nodes[1].root(), &dst, &layer, chain),
        chain,
    )
    .await;
    wait_metric(&nodes[1], &depth, 1.0);
    read_all(&mount_dir(&nodes[1]), &sums);
    let served = (cluster.registry_ns().unwrap().link_bytes().unwrap() - registry_before).to_host;
    let from_parent = metric(
        &nodes[1],
        &format!("arbor_p2p_route_bytes_total{{function=\"{FUNCTION}\",route=\"parent\"}}"),
    );
    let from_registry_1 = metric(
        &nodes[1],
        &format!("arbor_p2p_route_bytes_total{{function=\"{FUNCTION}\",route=\"registry\"}}"),
    );
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
    unsafe { libc::kill(pid0 as i32, libc::SIGSTOP) };
    prepare(
        &nodes[2],
        &labels(nodes[2].root(), &dst, &layer, chain),
        chain,
    )
    .await;
    wait_metric(&nodes[2], &depth, 1.0);
    let t = Instant::now();
    read_all(&mount_dir(&nodes[2]), &sums);
    let took = t.elapsed();
    let timeouts = metric(
        &nodes[2],
        &format!(
            "arbor_p2p_route_errors_total{{function=\"{FUNCTION}\",route=\"parent\",kind=\"timeout\"}}"
        ),
    );
    eprintln!("node2 read the layer past a frozen parent in {took:?} ({timeouts} parent timeouts)");
    assert!(timeouts >= 1.0, "node2 gave up its frozen parent");
    // The manager fails the frozen node out (5 s without heartbeats): a child takes its place.
    let t = Instant::now();
    loop {
        let d1 = metric(&nodes[1], &depth);
        let d2 = metric(&nodes[2], &depth);
        if d1 == 0.0 || d2 == 0.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no node became root: {d1} {d2}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    unsafe { libc::kill(pid0 as i32, libc::SIGCONT) };
    // Thawed, node 0 re-joins (as a leaf now) and still serves its files.
    let t = Instant::now();
    loop {
        if metric(&nodes[0], &depth) >= 1.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "node0 did not re-join"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    read_all(&mount_dir(&nodes[0]), &sums);
}
