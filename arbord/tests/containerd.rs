//! End-to-end tests of `arbord` as containerd's proxy snapshotter: a private containerd 1.6
//! (from Debian) with the proxy plugin configured, real runc, a real `docker-registry` on
//! 127.0.0.1, and the `arbor` CLI. They need root and the packages from `scripts/setup.sh`;
//! without them each test prints why it skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use arbor_testkit::{
    Arbord, ArbordOptions, Containerd, ContainerdOptions, Entry, Registry, SAMPLE_PROBE as PROBE,
    busybox_image, mounts_below, sample_image, skip_unless_root, skip_unless_tools, skopeo_push,
    write_oci_layout,
};
use serde_json::Value;

mod cri;
use cri::cri_pull;

const TOOLS: &[&str] = &["docker-registry", "skopeo", "containerd", "ctr", "runc"];

fn skip(test: &str) -> bool {
    skip_unless_root(test) || skip_unless_tools(test, TOOLS)
}

/// The `arbor` CLI, built next to `arbord` by `cargo test --workspace` / `cargo build`.
fn arbor_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_arbord")).with_file_name("arbor");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

fn arbor(args: &[&str]) -> Output {
    Command::new(arbor_bin())
        .args(args)
        .env_remove("CONTAINERD_ADDRESS")
        .env_remove("CONTAINERD_NAMESPACE")
        .env_remove("CONTAINERD_SNAPSHOTTER")
        .output()
        .expect("running arbor")
}

fn ok(out: Output, what: &str) -> String {
    arbor_testkit::ok(out, what)
}

/// A registry, arbord, and a containerd whose proxy plugin `arbor` points at it.
struct Node {
    arbord: Arbord,
    ctd: Containerd,
}

impl Node {
    fn start() -> Node {
        Self::start_with(|a| ContainerdOptions {
            extra_config: a.containerd_config(),
            cri: false,
        })
    }

    fn start_with(opts: impl FnOnce(&Arbord) -> ContainerdOptions) -> Node {
        let arbord = Arbord::start(&ArbordOptions {
            bin: PathBuf::from(env!("CARGO_BIN_EXE_arbord")),
            ..Default::default()
        })
        .expect("starting arbord");
        let o = opts(&arbord);
        let ctd = Containerd::start_with(&o).expect("starting containerd");
        Node { arbord, ctd }
    }

    fn ctd_args(&self) -> Vec<String> {
        vec![
            "--address".into(),
            self.ctd.socket().display().to_string(),
            "--namespace".into(),
            self.ctd.namespace().into(),
        ]
    }

    /// `arbor pull --json` of `reference`; the parsed report.
    fn pull(&self, reference: &str) -> Value {
        let mut args = vec!["pull".to_string(), "--plain-http".into(), "--json".into()];
        args.extend(self.ctd_args());
        args.push(reference.into());
        let out = ok(self.arbor_pull(&args), &format!("arbor pull {reference}"));
        serde_json::from_str(&out).expect("pull report is JSON")
    }

    /// `arbor ARGS` with this node's arbord root (where its pull key is).
    fn arbor_pull(&self, args: &[String]) -> Output {
        Command::new(arbor_bin())
            .args(args)
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE")
            .env_remove("CONTAINERD_SNAPSHOTTER")
            .env("ARBORD_ROOT", self.arbord.root())
            .output()
            .expect("running arbor")
    }

    fn run_arbor(&self, reference: &str, cmd: &[&str]) -> String {
        self.ctd
            .run(reference, &["--snapshotter", "arbor"], cmd)
            .unwrap_or_else(|e| {
                panic!(
                    "{e:#}\narbord log:\n{}\ncontainerd log:\n{}",
                    self.arbord.log_tail(30),
                    self.ctd.log_tail(30)
                )
            })
    }

    /// Waits (20 s) until containerd's connection to a restarted arbord works again (gRPC
    /// reconnects with backoff).
    fn wait_reconnected(&self) {
        for _ in 0..200 {
            // Listing stats every snapshot in the backend.
            if self
                .ctd
                .ctr(&["snapshot", "--snapshotter", "arbor", "ls"])
                .is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("containerd did not reconnect to arbord within 20 s");
    }

    fn metric(&self, sample: &str) -> f64 {
        self.arbord.metric(sample).expect("reading arbord metrics")
    }

    /// FUSE layer mounts below arbord's root.
    fn layer_mounts(&self) -> usize {
        mounts_below(self.arbord.root()).len()
    }

    fn snapshot_dirs(&self) -> usize {
        std::fs::read_dir(self.arbord.root().join("snapshots"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Pushes the sample image as `repo:v1` and its conversion as `repo:v1-arbor`.
fn push_sample(reg: &Registry, dir: &Path, repo: &str) -> (String, String) {
    let layout = dir.join("layout");
    write_oci_layout(&layout, "v1", &sample_image()).expect("writing layout");
    let src = reg.reference(&format!("{repo}:v1"));
    skopeo_push(&layout, "v1", &src, None).expect("skopeo push");
    let dst = reg.reference(&format!("{repo}:v1-arbor"));
    ok(
        arbor(&["convert", "--plain-http", &src, &dst]),
        "arbor convert",
    );
    (src, dst)
}

/// The sample image and its conversion in a fresh registry, a fresh node, and what the
/// original shows through stock containerd with overlayfs (the reference output).
struct Sample {
    _tmp: tempfile::TempDir,
    reg: Option<Registry>,
    src: String,
    dst: String,
    node: Node,
    want: String,
}

impl Sample {
    /// `None` (after printing why) when the test must skip.
    fn start(test: &str) -> Option<Sample> {
        if skip(test) {
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::start().unwrap();
        let (src, dst) = push_sample(&reg, tmp.path(), "fn/app");
        let node = Node::start();
        let want = node.ctd.pull_and_run(&src, PROBE).expect("stock run");
        assert!(want.starts_with("hello from arbor\n"), "{want}");
        assert!(!want.contains("REMOVED-VISIBLE"), "{want}");
        Some(Sample {
            _tmp: tmp,
            reg: Some(reg),
            src,
            dst,
            node,
            want,
        })
    }

    fn reg(&self) -> &Registry {
        self.reg.as_ref().expect("registry stopped")
    }
}

fn hows(report: &Value) -> Vec<String> {
    report["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["how"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn converted_image_pulled_lazily_runs_like_the_original() {
    let Some(sample) = Sample::start("converted_image_pulled_lazily_runs_like_the_original") else {
        return;
    };
    let (node, dst, want) = (&sample.node, &sample.dst, sample.want.as_str());

    let report = node.pull(dst);
    assert_eq!(hows(&report), ["lazy", "lazy", "lazy"], "{report}");
    assert_eq!(node.metric("arbor_snapshotter_remote_mounts_total"), 3.0);
    assert_eq!(node.layer_mounts(), 3, "one FUSE mount per layer");
    // The first Prepare started reading the other layers' TOCs; their Prepares took them
    // (one may have raced ahead of the manifest read and read its own).
    let ahead = node.metric("arbor_snapshotter_tocs_read_ahead_total");
    assert!(
        (1.0..=2.0).contains(&ahead),
        "TOCs read ahead and taken: {ahead}; arbord log:\n{}",
        node.arbord.log_tail(30)
    );
    // No layer blob went into containerd's content store.
    let content = node.ctd.ctr(&["content", "ls", "-q"]).unwrap();
    for l in report["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        assert!(!content.contains(d), "layer {d} was downloaded");
    }
    let got = node.run_arbor(dst, PROBE);
    assert_eq!(
        got, want,
        "the lazily mounted image differs from the original"
    );
    // `ctr snapshot` sees the committed remote snapshots with their labels.
    let info = node
        .ctd
        .ctr(&[
            "snapshot",
            "--snapshotter",
            "arbor",
            "info",
            report["layers"][2]["chain_id"].as_str().unwrap(),
        ])
        .unwrap();
    assert!(
        info.contains("containerd.io/snapshot/arbor.remote"),
        "{info}"
    );
    // Pulling again finds everything present.
    assert_eq!(hows(&node.pull(dst)), ["present", "present", "present"]);
    // `arbor run` runs it too (image present: no pull).
    let out = ok(
        arbor(&[
            "run",
            "--address",
            node.ctd.socket().to_str().unwrap(),
            "--namespace",
            node.ctd.namespace(),
            dst,
            "/app/run.sh",
        ]),
        "arbor run",
    );
    assert_eq!(out, "hello from arbor\n");
    assert_eq!(node.metric("arbor_read_errors_total"), 0.0);
}

#[test]
fn unconverted_and_unlabelled_images_fall_back_to_ordinary_snapshots() {
    let Some(sample) =
        Sample::start("unconverted_and_unlabelled_images_fall_back_to_ordinary_snapshots")
    else {
        return;
    };
    let (node, src, dst, want) = (&sample.node, &sample.src, &sample.dst, sample.want.as_str());

    // The converted image through `ctr image pull --snapshotter arbor`: containerd 1.6's ctr
    // passes no remote-snapshot labels, so containerd downloads and unpacks every layer into
    // ordinary arbord snapshots (a zstd:chunked layer is a valid tar+zstd layer).
    node.ctd
        .pull(dst, &["--snapshotter", "arbor"])
        .expect("ctr pull");
    assert_eq!(node.snapshot_dirs(), 3);
    assert_eq!(node.run_arbor(dst, PROBE), want);
    assert_eq!(node.layer_mounts(), 0, "no FUSE mounts for unpacked layers");

    // The unconverted image through `arbor pull` on a fresh node: downloaded, verified and
    // unpacked by containerd into ordinary arbord snapshots.
    let node2 = Node::start();
    let report = node2.pull(src);
    assert_eq!(
        hows(&report),
        ["unpacked", "unpacked", "unpacked"],
        "{report}"
    );
    assert_eq!(node2.run_arbor(src, PROBE), want);
    assert_eq!(node2.layer_mounts(), 0, "no FUSE mounts for plain layers");
    assert_eq!(node2.metric("arbor_snapshotter_remote_mounts_total"), 0.0);
    assert_eq!(
        node2.metric("arbor_snapshotter_fallbacks_total{reason=\"no_source\"}"),
        0.0,
        "plain layers are not fallbacks"
    );
}

#[test]
fn shared_layers_snapshot_removal_and_gc_leave_nothing_behind() {
    if skip("shared_layers_snapshot_removal_and_gc_leave_nothing_behind") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (_, dst) = push_sample(&reg, tmp.path(), "fn/app");
    let node = Node::start();
    let report = node.pull(&dst);
    let chains: Vec<String> = report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["chain_id"].as_str().unwrap().to_string())
        .collect();

    // Two long-running containers on the same layers.
    for id in ["c1", "c2"] {
        node.ctd
            .ctr(&[
                "run",
                "-d",
                "--snapshotter",
                "arbor",
                &dst,
                id,
                "/bin/sh",
                "-c",
                "cat /app/hello.txt > /tmp/out; sleep 300",
            ])
            .expect("ctr run -d");
    }
    for id in ["c1", "c2"] {
        let out = node
            .ctd
            .ctr(&[
                "task",
                "exec",
                "--exec-id",
                &format!("e-{id}"),
                id,
                "cat",
                "/tmp/out",
            ])
            .unwrap();
        assert_eq!(out, "hello from arbor\n");
    }
    assert_eq!(
        node.layer_mounts(),
        3,
        "layers are shared, not mounted twice"
    );
    // Each container's rw layer is an active snapshot on top of the shared top layer.
    let ls = node
        .ctd
        .ctr(&["snapshot", "--snapshotter", "arbor", "ls"])
        .unwrap();
    assert_eq!(
        ls.lines().filter(|l| l.contains("Active")).count(),
        2,
        "{ls}"
    );
    // A layer with children cannot be removed.
    let err = node
        .ctd
        .ctr(&["snapshot", "--snapshotter", "arbor", "rm", &chains[0]])
        .unwrap_err();
    assert!(format!("{err:#}").contains("child"), "{err:#}");

    for id in ["c1", "c2"] {
        let _ = node.ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let _ = arbor_testkit_wait(|| node.ctd.ctr(&["task", "delete", id]).is_ok());
        node.ctd.ctr(&["container", "rm", id]).unwrap();
    }
    // Removing the image lets containerd's GC remove the snapshots through arbord.
    node.ctd.ctr(&["image", "rm", "--sync", &dst]).unwrap();
    let gone = arbor_testkit_wait(|| {
        node.ctd
            .ctr(&["snapshot", "--snapshotter", "arbor", "ls"])
            .map(|s| s.lines().count() <= 1)
            .unwrap_or(false)
    });
    assert!(gone, "snapshots left after GC");
    assert!(
        arbor_testkit_wait(|| node.layer_mounts() == 0),
        "FUSE mounts left behind"
    );
    assert!(
        arbor_testkit_wait(|| node.snapshot_dirs() == 0),
        "snapshot directories left behind"
    );
    assert_eq!(node.metric("arbor_snapshotter_mounted_layers"), 0.0);
}

fn arbor_testkit_wait(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A node whose containerd runs CRI with the shipped 1.6/1.7 snippet (after `edit`), pointed at
/// this arbord, and plain HTTP to `reg` (CRI's `hosts.toml` under `tmp`).
fn cri_node(tmp: &Path, reg: &Registry, edit: impl FnOnce(String) -> String) -> Node {
    let certs = reg.write_cri_hosts(tmp).expect("writing hosts.toml");
    let snippet = include_str!("../../packaging/containerd/config-1.6-1.7.toml");
    Node::start_with(|a| ContainerdOptions {
        cri: true,
        extra_config: format!(
            "{}\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n",
            edit(
                snippet
                    .replace(
                        "/run/arbor/snapshotter.sock",
                        &a.socket().display().to_string()
                    )
                    .replace("/var/lib/arbor/", &a.root().display().to_string())
            ),
            certs.display()
        ),
    })
}

#[test]
fn cri_pull_gets_lazy_layers() {
    if skip("cri_pull_gets_lazy_layers") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (_, dst) = push_sample(&reg, tmp.path(), "fn/app");
    // The shipped containerd 1.6/1.7 snippet, as it is.
    let node = cri_node(tmp.path(), &reg, |snippet| snippet);
    let image_ref = cri_pull(node.ctd.socket(), &dst).unwrap_or_else(|e| {
        panic!(
            "CRI PullImage failed: {e}\ncontainerd log:\n{}",
            node.ctd.log_tail(40)
        )
    });
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    assert_eq!(
        node.metric("arbor_snapshotter_remote_mounts_total"),
        3.0,
        "CRI's pull did not get lazy layers; arbord log:\n{}",
        node.arbord.log_tail(30)
    );
    assert_eq!(node.layer_mounts(), 3);
    // CRI's labels name the manifest too: the other layers' TOCs were read ahead.
    assert!(node.metric("arbor_snapshotter_tocs_read_ahead_total") >= 1.0);
    // The snapshots carry CRI's labels, which told arbord where to fetch from.
    let ls = node
        .ctd
        .ctr_in("k8s.io", &["snapshot", "--snapshotter", "arbor", "ls"])
        .unwrap();
    let top = ls
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect::<Vec<_>>();
    assert_eq!(top.len(), 3, "{ls}");
    let labelled = top.iter().any(|k| {
        node.ctd
            .ctr_in("k8s.io", &["snapshot", "--snapshotter", "arbor", "info", k])
            .is_ok_and(|i| i.contains("containerd.io/snapshot/cri.layer-digest"))
    });
    assert!(labelled, "no snapshot carries CRI's layer-digest label");
    // And the image CRI pulled runs from them.
    let out = node
        .ctd
        .run_arbor_in("k8s.io", &dst, "cri-run", &["/app/run.sh"])
        .unwrap();
    assert_eq!(out, "hello from arbor\n");
    let _ = node.ctd.ctr_in("k8s.io", &["image", "rm", &dst]);
}

/// Waits until arbord has fetched nothing from the registry for a second (prefetch done).
fn wait_fetch_idle(node: &Node) {
    let sample = "arbor_fetch_bytes_total{source=\"registry\"}";
    let mut last = -1.0;
    for _ in 0..120 {
        let now = node.metric(sample);
        if now == last {
            return;
        }
        last = now;
        std::thread::sleep(Duration::from_secs(1));
    }
    panic!("arbord kept fetching for two minutes");
}

#[test]
fn restart_restores_mounts_without_the_registry() {
    let Some(sample) = Sample::start("restart_restores_mounts_without_the_registry") else {
        return;
    };
    let mut sample = sample;
    let (dst, want) = (sample.dst.clone(), sample.want.clone());
    let reg = sample.reg.take();
    let node = &mut sample.node;
    node.pull(&dst);
    assert_eq!(node.run_arbor(&dst, PROBE), want);
    // Background prefetch brings in the rest of every layer and the background proof reads
    // every layer through (a `Stat` of an unproved layer would wait for it, and without the
    // registry it could not be had); then the registry goes away.
    wait_fetch_idle(node);
    let t = std::time::Instant::now();
    while node.metric(r#"arbor_snapshotter_layer_verifications_total{result="proved"}"#) < 3.0 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the three lazy layers were not proved; log:\n{}",
            node.arbord.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = node.arbord.stop().expect("stopping arbord");
    assert!(status.success(), "arbord exited with {status}");
    // fuse.handover: the layers stay mounted, their connections in the fd holder.
    assert_eq!(
        node.layer_mounts(),
        3,
        "arbord must leave its layers mounted for its successor"
    );
    assert_eq!(node.arbord.fd_holders().len(), 1, "one fd holder runs");
    drop(reg);

    node.arbord.restart().expect("restarting arbord");
    node.wait_reconnected();
    assert_eq!(node.metric("arbor_snapshotter_restored_total"), 3.0);
    assert_eq!(node.metric("arbor_snapshotter_adopted_total"), 3.0);
    assert_eq!(node.layer_mounts(), 3);
    // No new pull: containerd still has the image and its snapshots.
    assert_eq!(node.run_arbor(&dst, PROBE), want);
    assert_eq!(node.metric("arbor_read_errors_total"), 0.0);
    assert_eq!(
        node.metric("arbor_fetch_requests_total{source=\"registry\"}"),
        0.0
    );

    // A crash (SIGKILL): the holder still keeps the connections; the next start adopts them.
    node.arbord.kill().unwrap();
    node.arbord
        .restart()
        .expect("restarting arbord after a crash");
    node.wait_reconnected();
    assert_eq!(node.metric("arbor_snapshotter_adopted_total"), 3.0);
    assert_eq!(node.run_arbor(&dst, PROBE), want);

    // arbord and its holder both gone: dead mounts ("transport endpoint is not connected")
    // that the next start replaces.
    node.arbord.kill_node().unwrap();
    node.arbord
        .restart()
        .expect("restarting arbord after it and its holder died");
    node.wait_reconnected();
    assert_eq!(node.metric("arbor_snapshotter_restored_total"), 3.0);
    assert_eq!(node.metric("arbor_snapshotter_adopted_total"), 0.0);
    assert_eq!(node.layer_mounts(), 3);
    assert_eq!(node.run_arbor(&dst, PROBE), want);
}

/// Rewrites `reference`'s manifest with `edit` and pushes it as `repo:tag`; returns the new
/// reference.
fn push_edited_manifest(
    reg: &Registry,
    repo: &str,
    from_tag: &str,
    tag: &str,
    edit: impl FnOnce(&mut Value),
) -> String {
    let accept = vec![(
        "Accept".to_string(),
        "application/vnd.oci.image.manifest.v1+json".to_string(),
    )];
    let (code, body) = arbor_testkit::http_request(
        &reg.addr(),
        "GET",
        &format!("/v2/{repo}/manifests/{from_tag}"),
        &accept,
        &[],
    )
    .unwrap();
    assert_eq!(code, 200);
    let mut m: Value = serde_json::from_slice(&body).unwrap();
    edit(&mut m);
    let (code, body) = arbor_testkit::http_request(
        &reg.addr(),
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        &[(
            "Content-Type".to_string(),
            "application/vnd.oci.image.manifest.v1+json".to_string(),
        )],
        &serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    reg.reference(&format!("{repo}:{tag}"))
}

#[test]
fn corrupt_toc_falls_back_to_a_normal_pull_and_is_counted() {
    let Some(sample) = Sample::start("corrupt_toc_falls_back_to_a_normal_pull_and_is_counted")
    else {
        return;
    };
    let (node, want) = (&sample.node, sample.want.as_str());
    // The middle layer's annotations claim another TOC digest: its TOC fails verification.
    let bad = push_edited_manifest(sample.reg(), "fn/app", "v1-arbor", "badtoc", |m| {
        m["layers"][1]["annotations"]["containerd.io/snapshot/arbor.toc-digest"] =
            Value::String(format!("sha256:{}", "0".repeat(64)));
    });
    let report = node.pull(&bad);
    assert_eq!(hows(&report), ["lazy", "unpacked", "lazy"], "{report}");
    assert_eq!(
        node.metric("arbor_snapshotter_fallbacks_total{reason=\"mount_failed\"}"),
        1.0
    );
    let log = std::fs::read_to_string(node.arbord.log_path()).unwrap();
    assert!(log.contains("lazy mount failed"), "fallback not logged");
    // A lazy layer on top of an unpacked one: the stack still reads right.
    assert_eq!(node.run_arbor(&bad, PROBE), want);
}

#[test]
fn registry_disappearing_mid_pull_fails_cleanly() {
    if skip("registry_disappearing_mid_pull_fails_cleanly")
        || skip_unless_tools(
            "registry_disappearing_mid_pull_fails_cleanly",
            &["tc", "ip"],
        )
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // 20 Mbit/s: a 24 MiB layer takes ~10 s, so the registry dies mid-download.
    let ns = arbor_testkit::netns::Namespace::new(20_000_000).unwrap();
    let reg = Registry::start_in_netns(&ns).unwrap();
    let big = arbor_testkit::pseudo_random_bytes(7, 24 << 20);
    let spec = busybox_image(
        vec![Entry::dir("data"), Entry::file("data/blob", big)],
        &["/bin/true"],
    );
    let layout = tmp.path().join("layout");
    write_oci_layout(&layout, "v1", &spec).unwrap();
    let reference = reg.reference("fn/big:v1");
    skopeo_push(&layout, "v1", &reference, None).expect("skopeo push");
    let node = Node::start();

    let mut args = vec![
        "pull".to_string(),
        "--plain-http".into(),
        "--retries".into(),
        "1".into(),
    ];
    args.extend(node.ctd_args());
    args.push(reference.clone());
    let child = Command::new(arbor_bin())
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    drop(reg);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pull succeeded without its registry");
    assert!(err.contains("error: pulling"), "{err}");
    assert!(
        err.contains("layer"),
        "the error does not name the layer: {err}"
    );
    // Nothing half-done is left: no image record, no active snapshot, arbord healthy.
    let images = node.ctd.ctr(&["image", "ls", "-q"]).unwrap();
    assert!(!images.contains("fn/big"), "{images}");
    let ls = node
        .ctd
        .ctr(&["snapshot", "--snapshotter", "arbor", "ls"])
        .unwrap();
    assert!(!ls.contains("Active"), "{ls}");
    node.arbord.metrics().expect("arbord still serving");
    drop(ns);
}

/// Hostile images (#9): an image whose layer annotations carry Arbor's source labels
/// (`containerd.io/snapshot/arbor.{layer-digest,image-ref}`; containerd's unpacker forwards
/// every `containerd.io/snapshot/*` layer annotation as a snapshot label) must not choose
/// what arbord fetches with the node's credentials. Pulled through CRI with containerd's
/// default `disable_snapshot_annotations = true` (so no `cri.*` labels), every layer is
/// refused as a lazy source, counted, and unpacked by containerd instead.
#[test]
fn image_annotations_cannot_choose_fetch_source() {
    let test = "image_annotations_cannot_choose_fetch_source";
    if skip(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (_, dst) = push_sample(&reg, tmp.path(), "fn/app");
    // The attacker names a blob and a repository of its choice (here its own, which mounts
    // fine if the labels are honoured: any lazy mount means they were), and a made-up MAC.
    let bad = push_edited_manifest(&reg, "fn/app", "v1-arbor", "forged", |m| {
        for l in m["layers"].as_array_mut().unwrap() {
            let digest = l["digest"].clone();
            let a = l["annotations"].as_object_mut().unwrap();
            a.insert("containerd.io/snapshot/arbor.layer-digest".into(), digest);
            a.insert(
                "containerd.io/snapshot/arbor.image-ref".into(),
                Value::String(dst.clone()),
            );
            a.insert(
                "containerd.io/snapshot/arbor.pull-mac".into(),
                Value::String("0".repeat(64)),
            );
        }
    });
    // containerd's default: CRI sets no labels, the image's own annotations pass through.
    let node = cri_node(tmp.path(), &reg, |snippet| {
        snippet.replace(
            "disable_snapshot_annotations = false",
            "disable_snapshot_annotations = true",
        )
    });
    cri_pull(node.ctd.socket(), &bad).unwrap_or_else(|e| {
        panic!(
            "CRI PullImage failed: {e}\ncontainerd log:\n{}",
            node.ctd.log_tail(40)
        )
    });
    assert_eq!(
        node.metric("arbor_snapshotter_remote_mounts_total"),
        0.0,
        "an image's annotations chose the fetch source; arbord log:\n{}",
        node.arbord.log_tail(30)
    );
    assert_eq!(
        node.metric("arbor_snapshotter_fallbacks_total{reason=\"unauthenticated\"}"),
        3.0,
        "arbord log:\n{}",
        node.arbord.log_tail(30)
    );
    assert_eq!(node.layer_mounts(), 0);
}

/// Hostile images (#9): a registry outside `registry.allow` is never fetched from lazily;
/// `arbor pull` still works (containerd downloads the layers).
#[test]
fn registry_outside_allowlist_is_refused() {
    let test = "registry_outside_allowlist_is_refused";
    if skip(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (_, dst) = push_sample(&reg, tmp.path(), "fn/app");
    let arbord = Arbord::start(&ArbordOptions {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_arbord")),
        config: Some("[registry]\nallow = [\"registry.example.com\"]\n".into()),
        ..Default::default()
    })
    .expect("starting arbord");
    let ctd = Containerd::start_with(&ContainerdOptions {
        extra_config: arbord.containerd_config(),
        cri: false,
    })
    .expect("starting containerd");
    let node = Node { arbord, ctd };
    let report = node.pull(&dst);
    assert_eq!(
        hows(&report),
        ["unpacked", "unpacked", "unpacked"],
        "{report}"
    );
    assert_eq!(
        node.metric("arbor_snapshotter_fallbacks_total{reason=\"registry_not_allowed\"}"),
        3.0
    );
    assert_eq!(node.layer_mounts(), 0);
}

/// Rewrites the config of the image tagged `tag` in an OCI layout so that its last diff ID
/// is a lie, and re-points the manifest and index at it. Returns the lying diff ID.
fn lie_about_last_diff_id(layout: &Path) -> String {
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let put = |bytes: &[u8]| -> (String, usize) {
        let tmp = layout.join("blob.tmp");
        std::fs::write(&tmp, bytes).unwrap();
        let out = Command::new("sha256sum").arg(&tmp).output().unwrap();
        let hex = String::from_utf8_lossy(&out.stdout)[..64].to_string();
        let d = format!("sha256:{hex}");
        std::fs::rename(&tmp, blob(&d)).unwrap();
        (d, bytes.len())
    };
    let index_path = layout.join("index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let md = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut m: Value = serde_json::from_slice(&std::fs::read(blob(&md)).unwrap()).unwrap();
    let cd = m["config"]["digest"].as_str().unwrap().to_string();
    let mut c: Value = serde_json::from_slice(&std::fs::read(blob(&cd)).unwrap()).unwrap();
    let lie = format!("sha256:{}", "5".repeat(64));
    let ids = c["rootfs"]["diff_ids"].as_array_mut().unwrap();
    let last = ids.len() - 1;
    ids[last] = Value::String(lie.clone());
    let (cd, cs) = put(&serde_json::to_vec(&c).unwrap());
    m["config"]["digest"] = Value::String(cd);
    m["config"]["size"] = cs.into();
    let (md, ms) = put(&serde_json::to_vec(&m).unwrap());
    index["manifests"][0]["digest"] = Value::String(md);
    index["manifests"][0]["size"] = ms.into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    lie
}

/// Hostile images (#9): a config whose diff ID does not match its layer's content would
/// commit that content under a chain ID every later image with the honest diff ID reuses.
/// `arbor pull` must refuse it like containerd's unpacker, naming the layer and both
/// digests, and leave no snapshot of it behind.
#[test]
fn lying_diff_id_fails_pull_and_cleans_up() {
    let test = "lying_diff_id_fails_pull_and_cleans_up";
    if skip(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let layout = tmp.path().join("layout");
    write_oci_layout(
        &layout,
        "v1",
        &busybox_image(
            vec![Entry::file("poison", b"not what the config says".to_vec())],
            &["/bin/true"],
        ),
    )
    .unwrap();
    let lie = lie_about_last_diff_id(&layout);
    let reference = reg.reference("fn/liar:v1");
    skopeo_push(&layout, "v1", &reference, None).expect("skopeo push");
    let node = Node::start();
    let mut args = vec!["pull".to_string(), "--plain-http".into()];
    args.extend(node.ctd_args());
    args.push(reference.clone());
    let out = node.arbor_pull(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a lying config was pulled: {err}");
    assert!(err.contains("wrong diff id"), "{err}");
    assert!(
        err.contains(&lie),
        "the error does not name the config's diff ID: {err}"
    );
    assert!(
        err.contains("layer 1"),
        "the error does not name the layer: {err}"
    );
    // No image, no active snapshot, and nothing committed under the lying chain ID.
    let images = node.ctd.ctr(&["image", "ls", "-q"]).unwrap();
    assert!(!images.contains("fn/liar"), "{images}");
    let ls = node
        .ctd
        .ctr(&["snapshot", "--snapshotter", "arbor", "ls"])
        .unwrap();
    assert!(!ls.contains("Active"), "{ls}");
    assert!(ls.lines().count() <= 2, "only the honest base layer: {ls}");
}

/// `arbor pull` without `ARBORD_ROOT` finds the pull key of the arbord behind the snapshotter
/// through the `root` its proxy plugin exports (containerd's introspection service), so the
/// labels it sets are authenticated and layers mount lazily.
#[test]
fn arbor_pull_finds_the_pull_key_through_containerd() {
    let test = "arbor_pull_finds_the_pull_key_through_containerd";
    if skip(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (_, dst) = push_sample(&reg, tmp.path(), "fn/app");
    let node = Node::start();
    let mut args = vec!["pull".to_string(), "--plain-http".into(), "--json".into()];
    args.extend(node.ctd_args());
    args.push(dst.clone());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = arbor(&a);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let report: Value = serde_json::from_str(&ok(out, "arbor pull")).unwrap();
    assert_eq!(hows(&report), ["lazy", "lazy", "lazy"], "{report}\n{err}");
}
