//! End-to-end tests of learned start-up sets: arbord learns an image's set from a start
//! reported ready (as containerd-shim-arbor-v1 and `arbor run --wait-ready` report it, over
//! `arbor.v1.Starts`), `arbor trace push` attaches it to the image in a real
//! `docker-registry` (2.8: no referrers API, so the tag schema), and on a fresh node `arbor
//! pull` finds it and arbord fetches it first. Bad sets (files that do not exist, another
//! image's, too large) are ignored with a reason and the start still works. Real containerd
//! 1.6, runc, FUSE; root needed (each test prints why it skips otherwise).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use arbor_format::startup::{ARTIFACT_TYPE, MEDIA_TYPE, SCHEMA_VERSION, StartupSet};
use arbor_proto::arbor::starts_client::StartsClient;
use arbor_proto::arbor::{GetStartupSetRequest, ReadyRequest};
use arbor_proto::snapshots::MountsRequest;
use arbor_proto::snapshots::snapshots_client::SnapshotsClient;
use arbor_testkit::{
    Arbord, ArbordOptions, Containerd, ContainerdOptions, Entry, Registry, busybox_image,
    skip_unless_root, skip_unless_tools, skopeo_push, write_oci_layout,
};
use serde_json::Value;

const TOOLS: &[&str] = &["docker-registry", "skopeo", "containerd", "ctr", "runc"];

fn arbor_bin() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_arbord")).with_file_name("arbor")
}

fn ok(out: Output, what: &str) -> String {
    arbor_testkit::ok(out, what)
}

struct Node {
    arbord: Arbord,
    ctd: Containerd,
}

impl Node {
    fn start() -> Node {
        let arbord = Arbord::start(&ArbordOptions {
            bin: PathBuf::from(env!("CARGO_BIN_EXE_arbord")),
            // Learn at ready: no grace period, so the test need not wait for one.
            config: Some("[learn]\ngrace_secs = 0\n".into()),
            ..Default::default()
        })
        .expect("starting arbord");
        let ctd = Containerd::start_with(&ContainerdOptions {
            extra_config: arbord.containerd_config(),
            cri: false,
        })
        .expect("starting containerd");
        Node { arbord, ctd }
    }

    fn arbor(&self, args: &[&str]) -> Output {
        let sock = self.ctd.socket().display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--address", &sock, "--namespace", self.ctd.namespace()]);
        Command::new(arbor_bin())
            .args(&all)
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE")
            .env_remove("CONTAINERD_SNAPSHOTTER")
            .env("ARBORD_ROOT", self.arbord.root())
            .output()
            .expect("running arbor")
    }

    fn pull(&self, image: &str) -> Value {
        let out = ok(
            self.arbor(&["pull", "--plain-http", "--json", image]),
            "arbor pull",
        );
        serde_json::from_str(&out).expect("pull report")
    }

    fn metric(&self, sample: &str) -> f64 {
        self.arbord.metric(sample).unwrap_or(0.0)
    }

    /// Waits until `sample` reaches `at_least` (20 s at most); its last value.
    fn wait_metric(&self, sample: &str, at_least: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.metric(sample);
            if v >= at_least || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn nanos(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as i64
}

/// Reports container `id` ready to the node's arbord, as the runtime shim does: its rootfs
/// mounts (from containerd), when its start began and now. Returns the manifest arbord will
/// learn for.
fn report_ready(node: &Node, id: &str, started: SystemTime) -> String {
    rt().block_on(async {
        let ch = arbor_proto::connect(node.ctd.socket()).await.unwrap();
        let mut req = tonic::Request::new(MountsRequest {
            snapshotter: "arbor".into(),
            key: id.into(),
        });
        req.metadata_mut().insert(
            arbor_proto::NAMESPACE_HEADER,
            node.ctd.namespace().parse().unwrap(),
        );
        let mounts = SnapshotsClient::new(ch)
            .mounts(req)
            .await
            .expect("containerd: snapshot mounts")
            .into_inner()
            .mounts;
        let ch = arbor_proto::connect(node.arbord.socket()).await.unwrap();
        StartsClient::new(ch)
            .ready(ReadyRequest {
                namespace: node.ctd.namespace().into(),
                container_id: id.into(),
                function: "learn-test".into(),
                rootfs: mounts,
                manifest: String::new(),
                started_unix_nano: nanos(started),
                ready_unix_nano: nanos(SystemTime::now()),
                phases: vec![],
            })
            .await
            .expect("arbord: Ready")
            .into_inner()
            .manifest
    })
}

fn get_set(node: &Node, manifest: &str) -> Option<StartupSet> {
    rt().block_on(async {
        let ch = arbor_proto::connect(node.arbord.socket()).await.unwrap();
        let set = StartsClient::new(ch)
            .get_startup_set(GetStartupSetRequest {
                manifest: manifest.into(),
            })
            .await
            .expect("arbord: GetStartupSet")
            .into_inner()
            .set;
        (!set.is_empty()).then(|| StartupSet::parse(&set).expect("arbord's set parses"))
    })
}

/// A busybox image with two app files, converted without a prefetch list.
fn push_image(reg: &Registry, dir: &Path) -> String {
    let spec = busybox_image(
        vec![
            Entry::dir("app"),
            Entry::file("app/first.txt", "read first\n"),
            Entry::file("app/second.txt", "read second\n"),
            Entry::file("app/unread.txt", "never read\n"),
        ],
        &["/bin/sh", "-c", "cat /app/first.txt /app/second.txt"],
    );
    let layout = dir.join("layout");
    write_oci_layout(&layout, "v1", &spec).expect("layout");
    let src = reg.reference("fn/learn:v1");
    skopeo_push(&layout, "v1", &src, None).expect("skopeo push");
    let dst = reg.reference("fn/learn:v1-arbor");
    ok(
        Command::new(arbor_bin())
            .args(["convert", "--plain-http", &src, &dst])
            .output()
            .unwrap(),
        "arbor convert",
    );
    dst
}

/// Runs the image's command on `node`, reporting it ready after it printed; the output.
fn start_and_report(node: &Node, image: &str, id: &str) -> (String, String) {
    let started = SystemTime::now();
    node.ctd
        .ctr(&[
            "run",
            "-d",
            "--snapshotter",
            "arbor",
            image,
            id,
            "/bin/sh",
            "-c",
            "cat /app/first.txt /app/second.txt > /tmp/out; sleep 600",
        ])
        .expect("ctr run -d");
    // Ready: what the command wrote is there (read through the task, as a probe would).
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        if let Ok(o) = node.ctd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "probe",
            id,
            "/bin/cat",
            "/tmp/out",
        ]) && o.contains("read second")
        {
            break o;
        }
        assert!(Instant::now() < deadline, "the container never got ready");
        std::thread::sleep(Duration::from_millis(200));
    };
    let manifest = report_ready(node, id, started);
    let _ = node.ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    for _ in 0..50 {
        if node.ctd.ctr(&["task", "rm", id]).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = node.ctd.ctr(&["container", "rm", id]);
    (out, manifest)
}

#[test]
fn a_set_learned_on_one_node_is_fetched_first_on_another_through_the_registry() {
    let test = "a_set_learned_on_one_node_is_fetched_first_on_another_through_the_registry";
    if skip_unless_root(test) || skip_unless_tools(test, TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let image = push_image(&reg, tmp.path());

    // Node A learns the set from a start reported ready.
    let a = Node::start();
    let report = a.pull(&image);
    assert_eq!(report["startup_set"], "none", "{report}");
    let manifest = report["manifest_digest"].as_str().unwrap().to_string();
    let (out, learned_for) = start_and_report(&a, &image, "learn-a");
    assert_eq!(out, "read first\nread second\n");
    assert_eq!(learned_for, manifest);
    let set = (0..100)
        .find_map(|_| {
            let s = get_set(&a, &manifest);
            if s.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            s
        })
        .unwrap_or_else(|| panic!("no set learned; arbord log:\n{}", a.arbord.log_tail(40)));
    let paths = set.paths();
    let pos = |p: &str| paths.iter().position(|x| x.trim_start_matches("./") == p);
    let (first, second) = (pos("app/first.txt"), pos("app/second.txt"));
    assert!(
        first.is_some() && second.is_some() && first < second,
        "the set must hold both files in read order: {paths:?}"
    );
    assert!(pos("app/unread.txt").is_none(), "{paths:?}");
    assert!(
        paths.iter().any(|p| p.ends_with("bin/busybox")),
        "exec'd binaries are read through the mount too: {paths:?}"
    );
    assert_eq!(set.function.as_deref(), Some("learn-test"));
    assert_eq!(a.metric("arbor_startup_sets_learned_total"), 1.0);

    // Published beside the image (docker-registry 2.8: the referrers tag schema).
    let pushed = ok(
        a.arbor(&["trace", "push", "--plain-http", &image]),
        "arbor trace push",
    );
    assert!(pushed.contains("attached to"), "{pushed}");
    let shown = ok(
        a.arbor(&["trace", "show", "--plain-http", "--registry", &image]),
        "arbor trace show --registry",
    );
    assert!(shown.contains("app/first.txt"), "{shown}");

    // Node B (empty cache) finds it at pull and fetches it first at mount.
    let b = Node::start();
    let report = b.pull(&image);
    let how = report["startup_set"].as_str().unwrap_or_default();
    assert!(how.starts_with("registry sha256:"), "{report}");
    assert_eq!(b.metric("arbor_startup_sets_imported_total"), 1.0);
    assert!(
        b.wait_metric("arbor_learned_prefetch_bytes_total", 1.0) > 0.0,
        "the learned set was not fetched at mount; arbord log:\n{}",
        b.arbord.log_tail(40)
    );
    let out = b
        .ctd
        .run(
            &image,
            &["--snapshotter", "arbor"],
            &["/bin/cat", "/app/second.txt"],
        )
        .expect("run on node B");
    assert_eq!(out, "read second\n");
    // A second pull uses the node's copy, not the registry.
    let report = b.pull(&image);
    assert_eq!(report["startup_set"], "node", "{report}");
}

fn bogus_set(manifest: &str, layer: &str) -> StartupSet {
    let mut s = StartupSet {
        schema_version: SCHEMA_VERSION,
        manifest: manifest.into(),
        function: None,
        learned: String::new(),
        ready_ms: None,
        layers: vec![layer.into()],
        reads: Vec::new(),
    };
    s.push(0, "no/such/file", 0);
    s.push(0, "app/first.txt", 999);
    s.push(0, "app/first.txt", 0);
    s
}

#[test]
fn wrong_stale_foreign_and_huge_sets_are_ignored_and_the_start_still_works() {
    let test = "wrong_stale_foreign_and_huge_sets_are_ignored_and_the_start_still_works";
    if skip_unless_root(test) || skip_unless_tools(test, TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let image = push_image(&reg, tmp.path());
    let probe = Node::start();
    let report = probe.pull(&image);
    let manifest = report["manifest_digest"].as_str().unwrap().to_string();
    let layer = report["layers"][0]["digest"].as_str().unwrap().to_string();
    drop(probe);

    // Names that do not exist in the layer, and chunks past a file's end: the set is kept
    // (it is well formed), those reads are ignored at mount, the rest is fetched.
    let file = tmp.path().join("stale.json");
    std::fs::write(&file, bogus_set(&manifest, &layer).to_json()).unwrap();
    let n = Node::start();
    ok(
        n.arbor(&[
            "trace",
            "push",
            "--plain-http",
            "--file",
            file.to_str().unwrap(),
            &image,
        ]),
        "arbor trace push --file",
    );
    let report = n.pull(&image);
    assert!(
        report["startup_set"]
            .as_str()
            .unwrap_or_default()
            .starts_with("registry"),
        "{report}"
    );
    assert!(
        n.wait_metric(
            "arbor_startup_sets_ignored_total{reason=\"stale_reads\"}",
            2.0
        ) >= 2.0,
        "{}",
        n.arbord.log_tail(30)
    );
    let out = n
        .ctd
        .run(
            &image,
            &["--snapshotter", "arbor"],
            &["/bin/cat", "/app/first.txt"],
        )
        .expect("run with a stale set");
    assert_eq!(out, "read first\n");
    drop(n);

    // Another image's set: `arbor trace push` refuses it; put in the registry anyway, arbord
    // files it under the manifest it names, where this image never looks.
    let other = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    std::fs::write(&file, bogus_set(other, &layer).to_json()).unwrap();
    let n = Node::start();
    let refused = n.arbor(&[
        "trace",
        "push",
        "--plain-http",
        "--file",
        file.to_str().unwrap(),
        &image,
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("would never be used"),
        "{refused:?}"
    );
    push_raw(&image, &manifest, bogus_set(other, &layer).to_json());
    let report = n.pull(&image);
    assert!(
        report["startup_set"]
            .as_str()
            .unwrap_or_default()
            .starts_with("ignored (learned on another image"),
        "{report}"
    );
    assert_eq!(n.metric("arbor_learned_prefetch_bytes_total"), 0.0);
    drop(n);

    // A document past the size limit: not even downloaded.
    let huge = vec![b' '; arbor_format::startup::MAX_DOCUMENT + 10];
    push_raw(&image, &manifest, huge);
    let n = Node::start();
    let report = n.pull(&image);
    assert!(
        report["startup_set"]
            .as_str()
            .unwrap_or_default()
            .starts_with("none (registry"),
        "{report}"
    );
    let out = n
        .ctd
        .run(
            &image,
            &["--snapshotter", "arbor"],
            &["/bin/cat", "/app/first.txt"],
        )
        .expect("run after a huge set");
    assert_eq!(out, "read first\n");
}

/// Attaches `body` as a start-up set artifact to `manifest` of `image`, unchecked.
fn push_raw(image: &str, manifest: &str, body: Vec<u8>) {
    rt().block_on(async {
        let client = arbor_oci::registry::RegistryClient::new(
            arbor_oci::registry::ClientOptions {
                plain_http: true,
                ..Default::default()
            },
            Default::default(),
        )
        .unwrap();
        let store = arbor_oci::Store::open(
            &arbor_oci::ImageLocation::parse(image).unwrap(),
            &client,
            false,
        )
        .unwrap();
        let (bytes, media_type) = store.manifest(manifest).await.unwrap();
        let subject = arbor_oci::manifest::Descriptor {
            media_type,
            digest: manifest.to_string(),
            size: bytes.len() as u64,
            ..Default::default()
        };
        arbor_oci::referrers::push_artifact(
            &store,
            &subject,
            ARTIFACT_TYPE,
            MEDIA_TYPE,
            bytes::Bytes::from(body),
            BTreeMap::new(),
        )
        .await
        .unwrap();
    });
}
