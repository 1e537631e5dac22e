//! End-to-end tests of `arbor run` (the library in `arbor-client`, no `ctr`): a converted image
//! in a private `docker-registry`, a private `arbord` and a private containerd 1.6 whose proxy
//! snapshotter `arbor` is that arbord, real runc. They need root and the packages from
//! `scripts/setup.sh`; without them each test prints why it skipped. `arbord` is the one built
//! next to `arbor` (`cargo build --workspace --bins`, which `cargo test --workspace` does).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use arbor_testkit::{
    Arbord, ArbordOptions, Containerd, ContainerdOptions, Entry, Registry, busybox_image,
    skip_unless_root, skip_unless_tools, skopeo_push, write_oci_layout_with_config,
};
use serde_json::json;

const TOOLS: &[&str] = &["docker-registry", "skopeo", "containerd", "ctr", "runc"];

fn arbord_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_arbor")).with_file_name("arbord");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// A registry with one converted image, arbord, and a containerd using it as `arbor`.
struct Node {
    _tmp: tempfile::TempDir,
    /// The TMPDIR `arbor run` gets: its FIFO and rootfs directories go there.
    run_tmp: tempfile::TempDir,
    _reg: Registry,
    arbord: Arbord,
    ctd: Containerd,
    image: String,
}

impl Node {
    fn start() -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::start().unwrap();
        let spec = busybox_image(
            vec![
                Entry::dir("app"),
                Entry::file("app/hello.txt", "hello from arbor\n"),
            ],
            &["/bin/sh", "-c", "echo default-cmd; pwd"],
        );
        let mut spec = spec;
        spec.env.push("GREETING=hello".into());
        spec.env.push("FOO=image".into());
        let extra = json!({"WorkingDir": "/app"});
        let layout = tmp.path().join("layout");
        write_oci_layout_with_config(&layout, "v1", &spec, extra.as_object().unwrap())
            .expect("writing the layout");
        let src = reg.reference("fn/run:v1");
        skopeo_push(&layout, "v1", &src, None).expect("skopeo push");
        let image = reg.reference("fn/run:v1-arbor");
        let out = Command::new(env!("CARGO_BIN_EXE_arbor"))
            .args(["convert", "--plain-http", &src, &image])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "convert: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let arbord = Arbord::start(&ArbordOptions {
            bin: arbord_bin(),
            ..Default::default()
        })
        .expect("starting arbord");
        let ctd = Containerd::start_with(&ContainerdOptions {
            extra_config: arbord.containerd_config(),
            cri: false,
        })
        .expect("starting containerd");
        Node {
            _tmp: tmp,
            run_tmp: tempfile::tempdir().unwrap(),
            _reg: reg,
            arbord,
            ctd,
            image,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_arbor"));
        c.arg("run")
            .arg("--plain-http")
            .arg("--address")
            .arg(self.ctd.socket())
            .arg("--namespace")
            .arg(self.ctd.namespace())
            .args(args)
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE")
            .env_remove("CONTAINERD_SNAPSHOTTER")
            .env("ARBORD_ROOT", self.arbord.root())
            .env("TMPDIR", self.run_tmp.path());
        c
    }

    /// `arbor run FLAGS IMAGE CMD...`.
    fn run(&self, flags: &[&str], cmd: &[&str]) -> Output {
        let mut args = flags.to_vec();
        args.push(&self.image);
        args.extend(cmd);
        self.command(&args).output().expect("running arbor")
    }

    /// `arbor run`, which must succeed; its stdout.
    fn ok(&self, flags: &[&str], cmd: &[&str]) -> String {
        let out = self.run(flags, cmd);
        assert!(
            out.status.success(),
            "arbor run {flags:?} {cmd:?}: {}\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.ctd.log_tail(20)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ctr(&self, args: &[&str]) -> String {
        self.ctd
            .ctr(args)
            .unwrap_or_else(|e| panic!("ctr {args:?}: {e:#}"))
    }

    /// No container, task, container snapshot, FIFO directory or mount is left behind.
    fn assert_clean(&self, ids: &[&str]) {
        assert_eq!(
            self.ctr(&["container", "ls", "-q"]).trim(),
            "",
            "containers left"
        );
        assert_eq!(self.ctr(&["task", "ls", "-q"]).trim(), "", "tasks left");
        let snaps = self.ctr(&["snapshot", "--snapshotter", "arbor", "ls"]);
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        for id in ids {
            assert!(
                !snaps
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(id)),
                "snapshot {id} left:\n{snaps}"
            );
            assert!(
                !mounts.contains(&format!("/{id}/rootfs")),
                "rootfs of {id} still mounted"
            );
        }
        let left: Vec<_> = std::fs::read_dir(self.run_tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "left in arbor run's TMPDIR: {left:?}");
        assert!(
            !mounts.contains(&self.run_tmp.path().display().to_string()),
            "a temporary rootfs is still mounted"
        );
    }
}

fn skip(test: &str) -> bool {
    skip_unless_root(test) || skip_unless_tools(test, TOOLS)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn arbor_run_without_ctr() {
    if skip("arbor_run_without_ctr") {
        return;
    }
    let node = Node::start();

    // First run pulls (report on stderr) and runs the image's Cmd in its WorkingDir.
    let out = node.run(&["--name", "r1"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "default-cmd\n/app\n");
    assert!(stderr(&out).contains("mounted lazily"), "{}", stderr(&out));

    // Output separated, exit code propagated.
    let out = node.run(
        &["--name", "r2"],
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), "out\n");
    assert!(stderr(&out).ends_with("err\n"), "{:?}", stderr(&out));

    // Env from the image (PATH too), --env overrides, --cwd.
    assert_eq!(
        node.ok(&[], &["sh", "-c", "echo $GREETING $FOO; echo $PATH; pwd"]),
        "hello image\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n/app\n"
    );
    assert_eq!(
        node.ok(
            &["--env", "FOO=cli", "-e", "NEW=1", "--cwd", "/tmp"],
            &["sh", "-c", "echo $GREETING $FOO $NEW; pwd"]
        ),
        "hello cli 1\n/tmp\n"
    );

    // stdin is piped through, and its end reaches the process.
    let mut child = node
        .command(&[&node.image, "sh", "-c", "cat; echo done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"line one\nline two\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "line one\nline two\ndone\n");

    // User: numeric, and a name from the image's /etc/passwd.
    assert_eq!(
        node.ok(&["--user", "1234:5678"], &["sh", "-c", "id -u; id -g"]),
        "1234\n5678\n"
    );
    assert_eq!(node.ok(&["-u", "nobody"], &["id", "-u"]), "65534\n");

    // --net-host: the host's network namespace; otherwise a new one.
    let host_net = std::fs::read_link("/proc/self/ns/net").unwrap();
    let host_net = host_net.to_string_lossy();
    assert_eq!(
        node.ok(&["--net-host"], &["readlink", "/proc/self/ns/net"])
            .trim(),
        host_net
    );
    assert_ne!(
        node.ok(&[], &["readlink", "/proc/self/ns/net"]).trim(),
        host_net
    );

    // --memory-limit and --cpus in the container's cgroup (mounted read-only at
    // /sys/fs/cgroup: its own cgroup, v2 through a cgroup namespace, v1 per controller).
    let limits = ["--memory-limit", "64MiB", "--cpus", "0.5"];
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        let cat = "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max";
        assert_eq!(
            node.ok(&limits, &["sh", "-c", cat]),
            "67108864\n50000 100000\n"
        );
    } else {
        let cat = "cat /sys/fs/cgroup/memory/memory.limit_in_bytes \
                   /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us";
        assert_eq!(
            node.ok(&limits, &["sh", "-c", cat]),
            "67108864\n50000\n100000\n"
        );
    }

    // --mount: a bind, read-only with ro.
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("x"), "bound\n").unwrap();
    let bind = format!(
        "type=bind,src={},dst=/data,options=rbind:ro",
        data.path().display()
    );
    assert_eq!(
        node.ok(
            &["--mount", &bind],
            &[
                "sh",
                "-c",
                "cat /data/x; touch /data/y 2>/dev/null || echo read-only"
            ]
        ),
        "bound\nread-only\n"
    );
    assert!(!data.path().join("y").exists());

    // --read-only root, annotations and labels reach the spec and the container record.
    assert_eq!(
        node.ok(
            &["--read-only"],
            &["sh", "-c", "touch /x 2>/dev/null || echo ro"]
        ),
        "ro\n"
    );
    node.ok(
        &[
            "--keep",
            "--name",
            "kept",
            "--annotation",
            "io.arbor/fn=hello",
            "--label",
            "team=fns",
        ],
        &["true"],
    );
    let info: serde_json::Value =
        serde_json::from_str(&node.ctr(&["container", "info", "kept"])).unwrap();
    assert_eq!(info["Labels"]["team"], "fns", "{info}");
    assert_eq!(info["Runtime"]["Name"], "io.containerd.runc.v2");
    assert_eq!(info["Snapshotter"], "arbor");
    assert_eq!(info["SnapshotKey"], "kept");
    assert_eq!(info["Image"], node.image.as_str());
    assert_eq!(
        info["Spec"]["annotations"]["io.arbor/fn"], "hello",
        "{info}"
    );
    assert_eq!(info["Spec"]["process"]["cwd"], "/app");
    let snaps = node.ctr(&["snapshot", "--snapshotter", "arbor", "ls"]);
    assert!(snaps.lines().any(|l| l.starts_with("kept ")), "{snaps}");
    // ctr removes the container's snapshot with it.
    node.ctr(&["container", "rm", "kept"]);

    // -t: the process gets a terminal (through `script`, which gives arbor one), TERM=xterm,
    // the exit code still comes through; no stderr FIFO.
    if arbor_testkit::find_in_path("script").is_some() {
        let cmd = node.command(&["-t", "--name", "tty1", &node.image]);
        let mut line: Vec<String> = vec![cmd.get_program().to_string_lossy().into_owned()];
        line.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
        line.extend(["sh", "-c", "tty; echo $TERM; exit 5"].map(String::from));
        let line = line
            .iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut script = Command::new("script");
        script.args(["-qec", &line, "/dev/null"]);
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => script.env(k, v),
                None => script.env_remove(k),
            };
        }
        let mut child = script
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Held open until the end: a terminal's input does not end.
        let _stdin = child.stdin.take();
        let out = child.wait_with_output().unwrap();
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(5), "{text}\n{}", stderr(&out));
        assert!(text.contains("/dev/pts/"), "{text:?}");
        assert!(text.contains("xterm"), "{text:?}");
    } else {
        eprintln!("no `script` (bsdutils): --tty not checked end to end");
    }

    // Nothing left by any of these runs.
    node.assert_clean(&["r1", "r2", "kept", "tty1"]);
}

#[test]
fn arbor_run_detach_and_signals() {
    if skip("arbor_run_detach_and_signals") {
        return;
    }
    let node = Node::start();
    let waiter = "trap 'echo got-term; exit 7' TERM; echo started; sleep 300 & wait";

    // -d returns at once, the container keeps running (output to --log-file), `ctr task
    // kill` ends it.
    let log = node.run_tmp.path().join("bg.log");
    let log_arg = log.display().to_string();
    let t = Instant::now();
    let out = node.run(
        &["-d", "--name", "bg", "--log-file", &log_arg],
        &["sh", "-c", waiter],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(60));
    let tasks = node.ctr(&["task", "ls"]);
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with("bg ") && l.contains("RUNNING")),
        "{tasks}"
    );
    // Its trap is set once it has said so (a signal before would hit PID 1 without a handler,
    // which ignores it).
    let said = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("started"))
    });
    assert!(
        said,
        "the detached container wrote nothing to {}",
        log.display()
    );
    node.ctr(&["task", "kill", "bg"]);
    let stopped = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        node.ctr(&["task", "ls"])
            .lines()
            .any(|l| l.starts_with("bg ") && l.contains("STOPPED"))
    });
    assert!(stopped, "{}", node.ctr(&["task", "ls"]));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("got-term"), "{logged}");
    std::fs::remove_file(&log).unwrap();
    node.ctr(&["task", "rm", "bg"]);
    node.ctr(&["container", "rm", "bg"]);

    // SIGTERM to `arbor run` is passed to the container, whose exit code is arbor's.
    let child = node
        .command(&["--name", "fg", &node.image, "sh", "-c", waiter])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let running = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        node.ctr(&["task", "ls"])
            .lines()
            .any(|l| l.starts_with("fg ") && l.contains("RUNNING"))
    });
    assert!(running, "the foreground task did not start");
    // The shell has to reach its `wait` with the trap set.
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) of our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(stdout(&out), "started\ngot-term\n");

    node.assert_clean(&["bg", "fg"]);
}

/// `arbor run -d --wait-ready`: waits for the function's port inside the container's own
/// network namespace, prints the phases of the cold start, which add up to the time the
/// command took (within 10%), and reports the start to arbord, which learns the image's
/// start-up set from it (`arbor trace show`).
#[test]
fn wait_ready_prints_phases_that_add_up_and_arbord_learns_the_start() {
    if skip("wait_ready_prints_phases_that_add_up_and_arbord_learns_the_start") {
        return;
    }
    let node = Node::start();
    let t0 = Instant::now();
    let out = node.ok(
        &[
            "-d",
            "--json",
            "--wait-ready",
            "--name",
            "ready1",
            "--annotation",
            "arbor.io/function=hello",
            "--annotation",
            "arbor.io/port=9000",
        ],
        &[
            "/bin/sh",
            "-c",
            "cat /app/hello.txt >/dev/null; sleep 1; exec httpd -f -p 9000 -h /app",
        ],
    );
    let wall = t0.elapsed().as_secs_f64();
    let outcome: serde_json::Value = serde_json::from_str(&out).expect("run outcome is JSON");
    let ready = &outcome["ready"];
    let seconds = ready["seconds"].as_f64().expect("ready seconds");
    let phases = ready["phases"].as_array().expect("phases");
    let names: Vec<&str> = phases.iter().filter_map(|p| p[0].as_str()).collect();
    assert_eq!(names, ["pull", "create", "start", "port"], "{ready}");
    let sum: f64 = phases.iter().filter_map(|p| p[1].as_f64()).sum();
    assert!((sum - seconds).abs() < 0.01, "{ready}");
    assert!(
        (sum - wall).abs() <= 0.1 * wall,
        "phases add up to {sum:.2} s, the command took {wall:.2} s"
    );
    // The port opened after the `sleep 1` in the container, not before.
    let port = phases[3][1].as_f64().unwrap();
    assert!(port >= 0.9, "{ready}");
    let manifest = ready["learning"].as_str().unwrap_or_default().to_string();
    assert!(manifest.starts_with("sha256:"), "{ready}");
    assert!(ready["lazy_layers"].as_u64().unwrap_or(0) >= 1, "{ready}");
    // arbord learned the set (after its grace period) from what the start read.
    let mut shown = String::new();
    for _ in 0..100 {
        let o = Command::new(env!("CARGO_BIN_EXE_arbor"))
            .args(["trace", "show", "--plain-http", "--address"])
            .arg(node.ctd.socket())
            .args(["--namespace", node.ctd.namespace(), &node.image])
            .env("ARBORD_ROOT", node.arbord.root())
            .output()
            .unwrap();
        shown = String::from_utf8_lossy(&o.stdout).into_owned();
        if o.status.success() && shown.contains("from arbord") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(shown.contains("app/hello.txt"), "{shown}");
    assert!(shown.contains("function hello"), "{shown}");
    assert_eq!(
        node.arbord
            .metric("arbor_starts_ready_total")
            .expect("metrics"),
        1.0
    );
    let _ = node.ctd.ctr(&["task", "kill", "-s", "SIGKILL", "ready1"]);
}

/// A function whose port never opens: `--wait-ready` gives up after --ready-timeout with a
/// clear error, leaving the detached container to its owner.
#[test]
fn wait_ready_times_out_clearly() {
    if skip("wait_ready_times_out_clearly") {
        return;
    }
    let node = Node::start();
    let out = node.run(
        &[
            "-d",
            "--wait-ready",
            "--port",
            "9000",
            "--ready-timeout",
            "2",
            "--name",
            "never",
        ],
        &["/bin/sleep", "60"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("port 9000 did not open within 2 s"), "{err}");
    let _ = node.ctd.ctr(&["task", "kill", "-s", "SIGKILL", "never"]);
}
