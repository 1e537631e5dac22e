//! Functions end to end: arbord's function gateway with a real containerd 1.6, runc, the
//! `containerd-shim-arbor-v1` runtime, the CNI bridge plugins and a registry. A converted
//! echo function (busybox `nc`, `POST /invoke` on port 9000) is deployed, invoked cold and
//! warm, scaled to zero and started again, kept warm with `min_instances`, killed from outside
//! and replaced, and survives an arbord restart as a definition; bad input gets clear errors;
//! a burst of 32 requests against 4 instances is answered exactly once each.
//!
//! Needs root, the packages of `scripts/setup.sh` and the workspace's binaries
//! (`cargo build --workspace --bins`); without them each test says why it skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use arbor_testkit::functions::{
    FnNode, FnNodeOptions, FnSnapshotter, HttpResponse as Resp, http_exchange,
};
use arbor_testkit::{
    Registry, echo_function_image, skip_unless_root, skip_unless_tools, skopeo_push,
    write_oci_layout,
};
use serde_json::{Value, json};

const TOOLS: &[&str] = &[
    "docker-registry",
    "skopeo",
    "containerd",
    "ctr",
    "runc",
    "/bin/busybox",
    "/usr/lib/cni/bridge",
    "/usr/lib/cni/host-local",
    "/usr/lib/cni/loopback",
];
const NS: &str = "fn-test";

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Resp {
    http_exchange(addr, method, path, headers, body, timeout).unwrap()
}

trait Text {
    fn body_text(&self) -> String;
    fn error(&self) -> String;
}

impl Text for Resp {
    fn body_text(&self) -> String {
        self.text()
    }
    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

struct Scene {
    node: FnNode,
    _tmp: tempfile::TempDir,
    _reg: Registry,
    image: String,
    api: String,
    bins: PathBuf,
}

impl Scene {
    /// A registry with the converted echo function and a node whose gateway puts instances on
    /// `bridge` and `subnet`.
    fn start(test: &str, bridge: &str, subnet: &str) -> Option<Scene> {
        if skip_unless_root(test) || skip_unless_tools(test, TOOLS) {
            return None;
        }
        let bins = Path::new(env!("CARGO_BIN_EXE_arbord"))
            .parent()
            .unwrap()
            .to_path_buf();
        for b in ["arbor", "containerd-shim-arbor-v1"] {
            if !bins.join(b).exists() {
                arbor_testkit::skip(
                    test,
                    &format!(
                        "{} is missing: cargo build --workspace --bins",
                        bins.join(b).display()
                    ),
                );
                return None;
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::start().unwrap();
        let layout = tmp.path().join("layout");
        write_oci_layout(&layout, "v1", &echo_function_image(4 << 20)).unwrap();
        let src = reg.reference("fn/echo:v1");
        skopeo_push(&layout, "v1", &src, None).unwrap();
        let image = reg.reference("fn/echo:v1-arbor");
        arbor_testkit::ok(
            Command::new(bins.join("arbor"))
                .args(["convert", "--plain-http", &src, &image])
                .output()
                .unwrap(),
            "arbor convert",
        );
        let mut o = FnNodeOptions::new(env!("CARGO_BIN_EXE_arbord"), FnSnapshotter::Arbor);
        o.bridge = bridge.into();
        o.subnet = subnet.into();
        o.namespace = NS.into();
        o.functions_extra = "max_body = \"64KiB\"\n".into();
        let node = FnNode::start(&o).unwrap();
        let api = node.api.clone();
        Some(Scene {
            node,
            _tmp: tmp,
            _reg: reg,
            image,
            api,
            bins,
        })
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Resp {
        let b = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        http(
            &self.api,
            method,
            path,
            &[("content-type", "application/json")],
            &b,
            Duration::from_secs(60),
        )
    }

    fn deploy(&self, name: &str, spec: Value) -> Resp {
        self.call("PUT", &format!("/v1/functions/{name}"), spec)
    }

    fn invoke(&self, name: &str, body: &str) -> Resp {
        self.node.invoke(name, body.as_bytes()).unwrap()
    }

    fn function(&self, name: &str) -> Value {
        self.node.function(name).unwrap()
    }

    fn instances(&self, name: &str) -> Vec<Value> {
        self.function(name)["instances"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// After arbord came back from `what`: its API answers, the reserved instance of "warm"
    /// is still `id` (adopted, not restarted), and it serves warm.
    fn assert_adopted(&self, id: &str, what: &str) {
        wait_for(
            &format!("the API after the {what}"),
            Duration::from_secs(30),
            || TcpStream::connect(&self.api).is_ok(),
        );
        assert_eq!(
            self.ready_ids("warm"),
            [id],
            "the reserved instance was not adopted after the {what}"
        );
        let r = self.invoke("warm", &format!("after the {what}"));
        assert_eq!(r.status, 200, "{}", r.body_text());
        assert_eq!(
            (r.header("x-arbor-start"), r.header("x-arbor-instance")),
            ("warm", id)
        );
    }

    fn ready_ids(&self, name: &str) -> Vec<String> {
        self.instances(name)
            .iter()
            .filter(|i| i["state"] == "ready")
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    }

    fn containers(&self) -> Vec<String> {
        self.node.containers()
    }

    fn netns_files(&self) -> usize {
        std::fs::read_dir(self.node.root().join("functions/netns")).map_or(0, |d| d.count())
    }

    fn mounts_of(&self, id: &str) -> usize {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(id))
            .count()
    }

    fn arbor(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.bins.join("arbor"))
            .arg("fn")
            .args(args)
            .env("ARBOR_FN_API", format!("http://{}", self.api))
            .output()
            .unwrap()
    }
}

#[test]
fn deploy_invoke_scale_to_zero_replace_and_restart() {
    let test = "deploy_invoke_scale_to_zero_replace_and_restart";
    let Some(mut s) = Scene::start(test, "arbt-life", "10.201.1.0/24") else {
        return;
    };

    // Deploy (with the CLI), then the same definition again: unchanged.
    let out = s.arbor(&[
        "deploy",
        "hello",
        &s.image,
        "--idle-timeout",
        "3",
        "--max",
        "2",
    ]);
    arbor_testkit::ok(out.clone(), "arbor fn deploy");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("created"),
        "{out:?}"
    );
    let again = s.arbor(&[
        "deploy",
        "hello",
        &s.image,
        "--idle-timeout",
        "3",
        "--max",
        "2",
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(v["result"], "unchanged");
    assert_eq!(v["function"]["version"], 1);

    // Cold, then warm, on the same instance; the request id travels there and back.
    let t0 = Instant::now();
    let cold = http(
        &s.api,
        "POST",
        "/v1/functions/hello/invoke",
        &[("x-request-id", "req-1")],
        b"abc",
        Duration::from_secs(90),
    );
    let cold_secs = t0.elapsed().as_secs_f64();
    assert_eq!(cold.status, 200, "{}", cold.body_text());
    assert!(
        cold.body_text().starts_with("hello abc from ") && cold.body_text().ends_with("rid=req-1"),
        "{}",
        cold.body_text()
    );
    assert_eq!(cold.header("x-arbor-start"), "cold");
    assert_eq!(cold.header("x-arbor-request-id"), "req-1");
    // The instance that answered is the one named (its hostname is its id).
    assert!(
        cold.body_text()
            .contains(&format!("from {} ", cold.header("x-arbor-instance"))),
        "{} vs {}",
        cold.body_text(),
        cold.header("x-arbor-instance")
    );
    let t1 = Instant::now();
    let warm = s.invoke("hello", "def");
    let warm_secs = t1.elapsed().as_secs_f64();
    assert_eq!(warm.status, 200, "{}", warm.body_text());
    assert_eq!(warm.header("x-arbor-start"), "warm");
    assert_eq!(
        warm.header("x-arbor-instance"),
        cold.header("x-arbor-instance")
    );
    println!("cold invoke {cold_secs:.3} s, warm invoke {warm_secs:.3} s");

    // The instance, its phases (contiguous, network first, port last) and its log.
    let inst = s.instances("hello");
    assert_eq!(inst.len(), 1, "{inst:?}");
    let phases: Vec<&str> = inst[0]["cold_start"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        ["network", "pull", "create", "task", "start", "port"],
        "{inst:?}"
    );
    assert_eq!(inst[0]["served"], 2);
    let id = inst[0]["id"].as_str().unwrap().to_string();
    let logs = s.arbor(&["logs", "hello"]);
    let logs = String::from_utf8_lossy(&logs.stdout).to_string();
    assert!(
        logs.contains("echo function listening on 9000") && logs.contains("served req-1"),
        "{logs}"
    );
    let ls = s.arbor(&["ls"]);
    assert!(
        String::from_utf8_lossy(&ls.stdout).contains("hello"),
        "{ls:?}"
    );

    // Idle past its timeout: scaled to zero, nothing left (container, netns, mounts).
    wait_for("scale to zero", Duration::from_secs(30), || {
        s.instances("hello").is_empty()
    });
    wait_for("the container to go", Duration::from_secs(15), || {
        s.containers().is_empty()
    });
    wait_for(
        "the network namespace to go",
        Duration::from_secs(15),
        || s.netns_files() == 0,
    );
    assert_eq!(s.mounts_of(&id), 0, "mounts of {id} left");

    // Cold again: served from the node (image in containerd, layers mounted by arbord, chunks
    // in its cache): nothing more from the registry.
    let fetched = || {
        s.node
            .arbord
            .metric("arbor_fetch_bytes_total{source=\"registry\"}")
            .unwrap_or(0.0)
    };
    let before = fetched();
    let again = s.invoke("hello", "again");
    assert_eq!(again.status, 200, "{}", again.body_text());
    assert_eq!(again.header("x-arbor-start"), "cold");
    assert_ne!(again.header("x-arbor-instance"), id);
    let pull = s.instances("hello")[0]["cold_start"][1][1]
        .as_f64()
        .unwrap();
    assert!(pull < 0.5, "the second cold start pulled for {pull} s");
    assert_eq!(fetched(), before, "the second cold start read the registry");

    // Reserved instances: kept warm without requests, replaced when killed from outside.
    let r = s.deploy(
        "warm",
        json!({"image": s.image, "min_instances": 1, "idle_timeout_secs": 1,
               "memory_mib": 64, "cpus": 0.5}),
    );
    assert_eq!(r.status, 201, "{}", r.body_text());
    wait_for("the reserved instance", Duration::from_secs(60), || {
        s.ready_ids("warm").len() == 1
    });
    let first = s.ready_ids("warm")[0].clone();
    // Its limits are applied (cgroup v1 or v2).
    let cg = |v1: &str, v2: &str| {
        let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let p = if unified {
            format!("/sys/fs/cgroup/{NS}/{first}/{v2}")
        } else {
            let (controller, file) = v1.split_once('/').unwrap();
            format!("/sys/fs/cgroup/{controller}/{NS}/{first}/{file}")
        };
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .trim()
            .to_string()
    };
    assert_eq!(cg("memory/memory.limit_in_bytes", "memory.max"), "67108864");
    let quota = cg("cpu/cpu.cfs_quota_us", "cpu.max");
    assert!(
        quota == "50000" || quota == "50000 100000",
        "cpu quota {quota}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        s.ready_ids("warm"),
        std::slice::from_ref(&first),
        "a reserved instance went idle-stopped"
    );
    s.node
        .ctd
        .ctr_in(NS, &["tasks", "kill", "-s", "SIGKILL", &first])
        .unwrap();
    wait_for("a replacement", Duration::from_secs(60), || {
        let ids = s.ready_ids("warm");
        ids.len() == 1 && ids[0] != first
    });
    let metrics = s.node.arbord.metrics().unwrap();
    assert!(
        metrics.contains("arbor_fn_instance_exits_total{function=\"warm\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("arbor_fn_invocation_seconds_count{function=\"hello\",outcome=\"cold\"} 2"),
        "{metrics}"
    );

    // A new version drains the old instance and serves from a new one.
    let r = s.deploy(
        "hello",
        json!({"image": s.image, "idle_timeout_secs": 3, "max_instances": 2, "env": ["V=2"]}),
    );
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.json()["function"]["version"], 2);
    let v2 = s.invoke("hello", "v2");
    assert_eq!(v2.status, 200);
    wait_for("the old version to drain", Duration::from_secs(20), || {
        s.instances("hello").iter().all(|i| i["version"] == 2)
    });

    // arbord restarted (SIGTERM; FUSE hand-over is on): definitions kept, and the running
    // instances adopted, not restarted: the same reserved instance serves warm.
    let reserved = s.ready_ids("warm");
    assert_eq!(reserved.len(), 1);
    s.node.arbord.restart().unwrap();
    s.assert_adopted(&reserved[0], "restart");
    let all = s.call("GET", "/v1/functions", Value::Null).json();
    let names: BTreeSet<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, BTreeSet::from(["hello", "warm"]));
    assert_eq!(s.function("hello")["version"], 2);
    assert!(s.node.arbord.log_tail(200).contains("instance adopted"));
    assert_eq!(s.invoke("hello", "after").status, 200);
    // A crash (SIGKILL) too: the fd holder kept the layers, the records are on disk.
    s.node.arbord.kill().unwrap();
    s.node.arbord.restart().unwrap();
    s.assert_adopted(&reserved[0], "crash");
    // An adopted instance is still watched: killed from outside, it is replaced.
    s.node
        .ctd
        .ctr_in(NS, &["tasks", "kill", "-s", "SIGKILL", &reserved[0]])
        .unwrap();
    wait_for(
        "a replacement of the adopted instance",
        Duration::from_secs(60),
        || {
            let ids = s.ready_ids("warm");
            ids.len() == 1 && ids[0] != reserved[0]
        },
    );

    // Removed: drained, gone, 404.
    for f in ["hello", "warm"] {
        let out = s.arbor(&["rm", f]);
        arbor_testkit::ok(out, "arbor fn rm");
    }
    wait_for("every container to go", Duration::from_secs(30), || {
        s.containers().is_empty()
    });
    assert_eq!(
        s.call("GET", "/v1/functions/hello", Value::Null).status,
        404
    );
    wait_for(
        "the network namespaces to go",
        Duration::from_secs(15),
        || s.netns_files() == 0,
    );
}

#[test]
fn bad_input_and_a_burst_of_32() {
    let test = "bad_input_and_a_burst_of_32";
    let Some(s) = Scene::start(test, "arbt-bad", "10.201.2.0/24") else {
        return;
    };
    let err = |r: &Resp| r.error();

    // Unknown function, invalid definitions.
    let r = s.invoke("nope", "x");
    assert_eq!(r.status, 404, "{}", r.body_text());
    assert!(err(&r).contains("nope"));
    for (name, spec, what) in [
        ("Bad_Name", json!({"image": s.image}), "function name"),
        (
            "ok",
            json!({"image": s.image, "max_instances": 0}),
            "max_instances",
        ),
        (
            "ok",
            json!({"image": s.image, "min_instances": 3, "max_instances": 2}),
            "min_instances",
        ),
        ("ok", json!({"image": s.image, "port": 70000}), "port"),
        ("ok", json!({"image": s.image, "bogus": 1}), "bogus"),
        ("ok", json!({"port": 9000}), "image"),
    ] {
        let r = s.deploy(name, spec);
        assert_eq!(r.status, 400, "{what}: {}", r.body_text());
        assert!(err(&r).contains(what), "{what}: {}", r.body_text());
    }
    let r = http(
        &s.api,
        "PUT",
        "/v1/functions/ok",
        &[],
        b"{not json",
        Duration::from_secs(10),
    );
    assert_eq!(r.status, 400);

    // An image that does not exist; one that never opens its port; one that exits.
    let missing = s.image.replace("fn/echo", "fn/missing");
    s.deploy("missing", json!({"image": missing}));
    let r = s.invoke("missing", "x");
    assert_eq!(r.status, 502, "{}", r.body_text());
    assert!(err(&r).contains("fn/missing"), "{}", r.body_text());
    s.deploy("mute", json!({"image": s.image, "command": ["sleep", "60"], "entrypoint": [], "start_timeout_secs": 3}));
    let r = s.invoke("mute", "x");
    assert_eq!(r.status, 502, "{}", r.body_text());
    assert!(
        err(&r).contains("port 9000 never opened"),
        "{}",
        r.body_text()
    );
    s.deploy("exits", json!({"image": s.image, "entrypoint": ["/bin/sh", "-c", "echo broken config >&2; exit 3"]}));
    let r = s.invoke("exits", "x");
    assert_eq!(r.status, 502, "{}", r.body_text());
    assert!(
        err(&r).contains("exited with status 3") && err(&r).contains("broken config"),
        "{}",
        r.body_text()
    );

    // Too large a body; a crash mid-request; the gateway stays healthy and serves on.
    s.deploy(
        "echo",
        json!({"image": s.image, "max_instances": 4, "queue_limit": 20, "idle_timeout_secs": 120}),
    );
    let big = vec![b'x'; 65 << 10];
    let r = http(
        &s.api,
        "POST",
        "/v1/functions/echo/invoke",
        &[],
        &big,
        Duration::from_secs(30),
    );
    assert_eq!(r.status, 413, "{}", r.body_text());
    let r = s.invoke("echo", "crash");
    assert_eq!(r.status, 502, "{}", r.body_text());
    assert!(
        err(&r).contains("failed while serving"),
        "{}",
        r.body_text()
    );
    assert_eq!(
        http(&s.api, "GET", "/healthz", &[], b"", Duration::from_secs(5)).status,
        200
    );
    let r = s.invoke("echo", "after the crash");
    assert_eq!(r.status, 200, "{}", r.body_text());
    wait_for(
        "the crashed instance to go",
        Duration::from_secs(20),
        || s.instances("echo").len() == 1,
    );

    // 32 at once against a function scaled to zero: max 4 instances, 1 request each, a
    // queue of 20. Every request answered once, by its own id; the rest 429.
    let r = s.call("DELETE", "/v1/functions/echo", Value::Null);
    assert_eq!(r.status, 200, "{}", r.body_text());
    s.deploy("burst", json!({"image": s.image, "max_instances": 4, "concurrency": 1, "queue_limit": 20, "idle_timeout_secs": 120}));
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (api, peak, done) = (s.api.clone(), peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let v = http(
                    &api,
                    "GET",
                    "/v1/functions/burst",
                    &[],
                    b"",
                    Duration::from_secs(10),
                )
                .json();
                let n = v["instances"].as_array().map_or(0, Vec::len);
                peak.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let api = s.api.clone();
    let handles: Vec<_> = (0..32)
        .map(|i| {
            let api = api.clone();
            std::thread::spawn(move || {
                let rid = format!("burst-{i}");
                let r = http(
                    &api,
                    "POST",
                    "/v1/functions/burst/invoke",
                    &[("x-request-id", &rid)],
                    b"sleep 1",
                    Duration::from_secs(120),
                );
                (rid, r)
            })
        })
        .collect();
    let results: Vec<(String, Resp)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watcher.join().unwrap();
    let mut served = BTreeSet::new();
    let mut refused = 0;
    for (rid, r) in &results {
        match r.status {
            200 => {
                assert!(
                    r.body_text().ends_with(&format!("rid={rid}")),
                    "{rid} got {}",
                    r.body_text()
                );
                assert!(served.insert(rid.clone()));
            }
            429 => refused += 1,
            other => panic!("{rid}: unexpected {other}: {}", r.body_text()),
        }
    }
    println!(
        "burst: {} served, {refused} refused (429), peak {} instances",
        served.len(),
        peak.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert_eq!(served.len() + refused, 32);
    assert!(refused >= 1, "the queue of 20 never overflowed");
    assert!(served.len() >= 20, "only {} served", served.len());
    assert!(peak.load(std::sync::atomic::Ordering::SeqCst) <= 4);
    let m = s.node.arbord.metrics().unwrap();
    let starts: f64 = m
        .lines()
        .find(|l| {
            l.starts_with("arbor_fn_instance_starts_total{function=\"burst\",outcome=\"ok\"}")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!((1.0..=4.0).contains(&starts), "{starts} starts");
    // Exactly once on the instances' side too: each served id logged once. (The shim copies
    // an instance's stderr to its log in the background: the last lines may land a moment
    // after the answers.)
    let logged = || {
        let logs = s
            .call("GET", "/v1/functions/burst/logs", Value::Null)
            .json();
        let mut logged = BTreeMap::<String, usize>::new();
        for l in logs.as_array().unwrap() {
            for line in l["log"].as_str().unwrap().lines() {
                if let Some(rid) = line.strip_prefix("served ") {
                    *logged.entry(rid.to_string()).or_default() += 1;
                }
            }
        }
        logged
    };
    wait_for(
        "every served request in the logs",
        Duration::from_secs(10),
        || logged().keys().cloned().collect::<BTreeSet<_>>() == served,
    );
    let logged = logged();
    assert!(logged.values().all(|n| *n == 1), "{logged:?}");
}
