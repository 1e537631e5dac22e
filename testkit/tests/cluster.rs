//! The multi-node network harness ([`arbor_testkit::cluster`]): bring-up of 32 nodes and a
//! registry namespace, reachability, shaping, parallel clusters, cleanup. Needs root.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use arbor_testkit::cluster::{self, Cluster, ClusterSpec};

/// One small Python program for every role (servers print `ready` once listening).
const PY: &str = r#"
import socket, sys, threading, time
mode = sys.argv[1]
def listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)
    print("ready", flush=True)
    return s
def serve_names(srv, name):
    while True:
        c, _ = srv.accept()
        c.sendall((name + "\n").encode())
        c.close()
def ask(addr, port, retry):
    deadline = time.time() + retry
    while True:
        try:
            s = socket.create_connection((addr, port), timeout=5)
            data = b""
            while not data.endswith(b"\n"):
                d = s.recv(100)
                if not d:
                    break
                data += d
            s.close()
            return data.decode().strip()
        except OSError as e:
            if time.time() >= deadline:
                return "error:" + type(e).__name__
            time.sleep(0.05)
if mode == "serve":
    serve_names(listen(7000), sys.argv[2])
elif mode == "node":
    name, peer, reg, host, hport = sys.argv[2:7]
    srv = listen(7000)
    threading.Thread(target=serve_names, args=(srv, name), daemon=True).start()
    p = ask(peer, 7000, 20)
    r = ask(reg, 7000, 20)
    try:
        s = socket.create_connection((host, int(hport)), timeout=10)
        s.sendall(name.encode())
        s.close()
        h = "host"
    except OSError as e:
        h = "error:" + type(e).__name__
    print("ok", p, r, h, flush=True)
    time.sleep(3600)
elif mode == "ask":
    print(ask(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])), flush=True)
elif mode == "sink":
    c, _ = listen(int(sys.argv[2])).accept()
    n = 0
    while True:
        d = c.recv(1 << 20)
        if not d:
            break
        n += len(d)
    c.sendall(("%d\n" % n).encode())
    c.close()
elif mode == "source":
    c, _ = listen(int(sys.argv[2])).accept()
    c.sendall(bytes(int(sys.argv[3])))
    c.close()
elif mode == "push":
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=30)
    t = time.monotonic()
    s.sendall(bytes(int(sys.argv[4])))
    s.shutdown(socket.SHUT_WR)
    reply = s.makefile().readline().strip()
    print(reply, time.monotonic() - t, flush=True)
elif mode == "pull":
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=30)
    t = time.monotonic()
    n = 0
    while True:
        d = s.recv(1 << 20)
        if not d:
            break
        n += len(d)
    print(n, time.monotonic() - t, flush=True)
elif mode == "http":
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10)
    s.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" % (sys.argv[4], sys.argv[2])).encode())
    print(s.makefile().readline().strip(), flush=True)
"#;

fn skip(t: &str) -> bool {
    arbor_testkit::skip_unless_root(t)
        || arbor_testkit::skip_unless_tools(t, &["ip", "tc", "python3"])
}

/// The system python (the pyenv shim on PATH costs ~100 ms per start).
fn python() -> String {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3".into()
    } else {
        arbor_testkit::find_in_path("python3")
            .expect("python3")
            .display()
            .to_string()
    }
}

/// A running helper and its stdout, line by line.
struct Helper {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Helper {
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out
            .read_line(&mut l)
            .expect("reading a helper's output");
        l.trim().to_string()
    }

    fn ready(mut self) -> Helper {
        let l = self.line();
        assert_eq!(l, "ready", "helper {} did not start", self.child.id());
        self
    }

    /// Waits (up to 10 s) for the process to exit.
    fn exited(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().expect("try_wait").is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the Python helper `args` through `cmd` (a `exec(python)` of a node or namespace).
fn helper(mut cmd: Command, args: &[&str]) -> Helper {
    let mut child = cmd
        .arg("-c")
        .arg(PY)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning the python helper");
    let out = BufReader::new(child.stdout.take().expect("piped stdout"));
    Helper { child, out }
}

fn netns_list() -> String {
    arbor_testkit::ok(
        Command::new("ip").args(["netns", "list"]).output().unwrap(),
        "ip netns list",
    )
}

fn link_names() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Names (namespaces, links) a cluster owns, to check they are gone after Drop.
fn owned_names(c: &Cluster) -> (Vec<String>, Vec<String>) {
    let mut ns: Vec<String> = c.nodes().iter().map(|n| n.name().to_string()).collect();
    let mut links: Vec<String> = c
        .nodes()
        .iter()
        .map(|n| n.host_veth().to_string())
        .collect();
    links.push(c.bridge().to_string());
    if let Some(r) = c.registry_ns() {
        ns.push(r.name().to_string());
        links.push(r.host_veth().to_string());
    }
    (ns, links)
}

fn assert_gone(ns: &[String], links: &[String]) {
    let list = netns_list();
    let listed: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for n in ns {
        assert!(!listed.contains(&n.as_str()), "namespace {n} left behind");
    }
    let present = link_names();
    for l in links {
        assert!(!present.contains(l), "link {l} left behind");
    }
}

#[test]
fn thirty_two_nodes_reach_each_other_the_registry_and_the_host() {
    let t = "thirty_two_nodes_reach_each_other_the_registry_and_the_host";
    if skip(t) {
        return;
    }
    const N: usize = 32;
    let start = Instant::now();
    let c = Cluster::new(&ClusterSpec::new(N, 1_000_000_000).with_registry(1_000_000_000))
        .expect("creating the cluster");
    let up = start.elapsed();
    eprintln!("{t}: {N} nodes + registry up in {:.3} s", up.as_secs_f64());
    assert_eq!(c.nodes().len(), N);
    let reg_ns = c.registry_ns().expect("registry namespace");
    let net = c.network().octets();
    let mut addrs: Vec<Ipv4Addr> = c.nodes().iter().map(|n| n.addr()).collect();
    addrs.push(reg_ns.ns_addr());
    addrs.push(c.host_addr());
    for a in &addrs {
        assert_eq!(a.octets()[..3], net[..3], "{a} is not on the cluster's /24");
    }
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), N + 2, "addresses are not unique");
    assert_eq!(reg_ns.host_addr(), c.host_addr());
    let names: std::collections::HashSet<&str> = c.nodes().iter().map(|n| n.name()).collect();
    assert_eq!(names.len(), N);

    let host = TcpListener::bind((c.host_addr(), 0)).expect("listening on the bridge address");
    let host_port = host.local_addr().unwrap().port().to_string();
    let py = python();
    let _registry = helper(reg_ns.exec(&py), &["serve", "registry"]).ready();
    let reg_addr = reg_ns.ns_addr().to_string();
    let host_addr = c.host_addr().to_string();
    let mut helpers: Vec<Helper> = (0..N)
        .map(|i| {
            let peer = c.nodes()[(i + 1) % N].addr().to_string();
            helper(
                c.nodes()[i].exec(&py),
                &[
                    "node",
                    &format!("node{i}"),
                    &peer,
                    &reg_addr,
                    &host_addr,
                    &host_port,
                ],
            )
        })
        .collect();
    // The nodes' host connections, accepted meanwhile.
    host.set_nonblocking(true).unwrap();
    let acceptor = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(40);
        while seen.len() < N && Instant::now() < deadline {
            match host.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut name = String::new();
                    std::io::Read::read_to_string(&mut s, &mut name).unwrap();
                    seen.push(name);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        seen
    });
    for (i, h) in helpers.iter_mut().enumerate() {
        assert_eq!(h.line(), "ready", "node {i}: helper did not start");
    }
    for (i, h) in helpers.iter_mut().enumerate() {
        let want = format!("ok node{} registry host", (i + 1) % N);
        assert_eq!(h.line(), want, "node {i} ({})", c.nodes()[i].addr());
    }
    let mut seen = acceptor.join().unwrap();
    seen.sort();
    let mut want: Vec<String> = (0..N).map(|i| format!("node{i}")).collect();
    want.sort();
    assert_eq!(seen, want, "connections to the host");
    eprintln!(
        "{t}: every node reached its neighbour, the registry namespace and the host ({:.3} s)",
        start.elapsed().as_secs_f64()
    );
    for (i, h) in helpers.iter().enumerate() {
        assert!(
            c.nodes()[i].pids().contains(&h.child.id()),
            "node {i}'s helper is not inside its namespace"
        );
    }
    assert!(c.pids().len() > N, "{:?}", c.pids());

    let (ns, links) = owned_names(&c);
    let start = Instant::now();
    drop(c);
    eprintln!(
        "{t}: teardown (killing {} processes) in {:.3} s",
        N + 1,
        start.elapsed().as_secs_f64()
    );
    for (i, h) in helpers.iter_mut().enumerate() {
        assert!(h.exited(), "node {i}'s helper survived the drop");
    }
    assert_gone(&ns, &links);
}

#[test]
fn links_are_shaped_to_the_node_and_registry_rates() {
    let t = "links_are_shaped_to_the_node_and_registry_rates";
    if skip(t) {
        return;
    }
    const NODE_RATE: u64 = 40_000_000;
    const REGISTRY_RATE: u64 = 16_000_000;
    let c = Cluster::new(&ClusterSpec::new(2, NODE_RATE).with_registry(REGISTRY_RATE))
        .expect("creating the cluster");
    let (a, b) = (&c.nodes()[0], &c.nodes()[1]);
    let reg = c.registry_ns().expect("registry namespace");
    let py = python();

    // Node A uploads 4 MB to node B: 0.8 s at 40 Mbit/s.
    const N: u64 = 4_000_000;
    let _sink = helper(b.exec(&py), &["sink", "7001"]).ready();
    let (a0, b0) = (a.link_bytes().unwrap(), b.link_bytes().unwrap());
    let mut push = helper(
        a.exec(&py),
        &["push", &b.addr().to_string(), "7001", &N.to_string()],
    );
    let l = push.line();
    let (got, secs) = l.split_once(' ').expect("push output");
    let (got, secs): (u64, f64) = (got.parse().unwrap(), secs.parse().unwrap());
    let (up, down) = (a.link_bytes().unwrap() - a0, b.link_bytes().unwrap() - b0);
    eprintln!(
        "{t}: node→node {got} bytes in {secs:.3} s = {:.1} Mbit/s at {} Mbit/s; A upload {} B download {}",
        got as f64 * 8.0 / secs / 1e6,
        NODE_RATE / 1_000_000,
        up.to_host,
        down.to_ns
    );
    assert_eq!(got, N, "bytes received by B");
    assert!(
        (0.6..3.0).contains(&secs),
        "{secs:.3} s for 4 MB at 40 Mbit/s"
    );
    assert!(up.to_host >= N, "A's upload counter: {up:?}");
    assert!(down.to_ns >= N, "B's download counter: {down:?}");

    // Node A downloads 1.6 MB from the registry namespace: 0.8 s at 16 Mbit/s (0.32 s if only
    // the node's 40 Mbit/s applied).
    const M: u64 = 1_600_000;
    let _source = helper(reg.exec(&py), &["source", "7002", &M.to_string()]).ready();
    let (a0, r0) = (a.link_bytes().unwrap(), reg.link_bytes().unwrap());
    let mut pull = helper(a.exec(&py), &["pull", &reg.ns_addr().to_string(), "7002"]);
    let l = pull.line();
    let (got, secs) = l.split_once(' ').expect("pull output");
    let (got, secs): (u64, f64) = (got.parse().unwrap(), secs.parse().unwrap());
    let (down, served) = (a.link_bytes().unwrap() - a0, reg.link_bytes().unwrap() - r0);
    eprintln!(
        "{t}: registry→node {got} bytes in {secs:.3} s = {:.1} Mbit/s at {} Mbit/s; registry served {} A download {}",
        got as f64 * 8.0 / secs / 1e6,
        REGISTRY_RATE / 1_000_000,
        served.to_host,
        down.to_ns
    );
    assert_eq!(got, M, "bytes received from the registry namespace");
    assert!(
        (0.6..3.0).contains(&secs),
        "{secs:.3} s for 1.6 MB at 16 Mbit/s"
    );
    assert!(served.to_host >= M, "registry link counter: {served:?}");
    assert!(down.to_ns >= M, "A's download counter: {down:?}");
}

#[test]
fn two_clusters_in_parallel_do_not_collide() {
    let t = "two_clusters_in_parallel_do_not_collide";
    if skip(t) {
        return;
    }
    let with_reg = std::thread::spawn(|| {
        Cluster::new(&ClusterSpec::new(4, 100_000_000).with_registry(100_000_000))
    });
    let without = std::thread::spawn(|| Cluster::new(&ClusterSpec::new(4, 100_000_000)));
    let x = with_reg.join().unwrap().expect("creating cluster x");
    let y = without.join().unwrap().expect("creating cluster y");
    assert!(y.registry_ns().is_none());
    assert_ne!(x.bridge(), y.bridge());
    assert_ne!(x.network(), y.network(), "both clusters on one subnet");
    let (xn, xl) = owned_names(&x);
    let (yn, yl) = owned_names(&y);
    assert!(xn.iter().all(|n| !yn.contains(n)), "{xn:?} {yn:?}");
    assert!(xl.iter().all(|n| !yl.contains(n)), "{xl:?} {yl:?}");

    let py = python();
    let mut servers = Vec::new();
    for c in [&x, &y] {
        servers.push(helper(c.nodes()[3].exec(&py), &["serve", "three"]).ready());
    }
    if let Some(r) = x.registry_ns() {
        servers.push(helper(r.exec(&py), &["serve", "registry"]).ready());
    }
    for (c, other) in [(&x, &y), (&y, &x)] {
        let ask = |to: Ipv4Addr, retry: &str| {
            helper(
                c.nodes()[0].exec(&py),
                &["ask", &to.to_string(), "7000", retry],
            )
            .line()
        };
        assert_eq!(
            ask(c.nodes()[3].addr(), "10"),
            "three",
            "within {}",
            c.bridge()
        );
        // No route between the clusters' subnets.
        let cross = ask(other.nodes()[3].addr(), "0");
        assert!(
            cross.starts_with("error:"),
            "{} reached the other cluster: {cross}",
            c.bridge()
        );
    }
    let to_reg = helper(
        x.nodes()[1].exec(&py),
        &[
            "ask",
            &x.registry_ns().unwrap().ns_addr().to_string(),
            "7000",
            "10",
        ],
    )
    .line();
    assert_eq!(to_reg, "registry");

    let dx = std::thread::spawn(move || drop(x));
    let dy = std::thread::spawn(move || drop(y));
    dx.join().unwrap();
    dy.join().unwrap();
    assert_gone(&xn, &xl);
    assert_gone(&yn, &yl);
}

#[test]
fn registry_runs_in_the_registry_namespace() {
    let t = "registry_runs_in_the_registry_namespace";
    if skip(t) || arbor_testkit::skip_unless_tools(t, &["/usr/bin/docker-registry"]) {
        return;
    }
    let c = Cluster::new(&ClusterSpec::new(2, 200_000_000).with_registry(200_000_000))
        .expect("creating the cluster");
    let ns = c.registry_ns().expect("registry namespace");
    let reg = arbor_testkit::Registry::start_in_netns(ns).expect("starting the registry");
    assert_eq!(reg.addr(), format!("{}:5000", ns.ns_addr()));
    assert!(
        ns.pids().contains(&reg.pid()),
        "registry not in its namespace"
    );
    let status = helper(
        c.nodes()[1].exec(python()),
        &["http", &ns.ns_addr().to_string(), "5000", "/v2/"],
    )
    .line();
    assert!(status.contains(" 200 "), "GET /v2/ from a node: {status}");
    // Dropping the cluster first kills the registry too.
    drop(c);
    drop(reg);
}

#[test]
fn cleanup_stale_removes_only_dead_processes_leftovers() {
    let t = "cleanup_stale_removes_only_dead_processes_leftovers";
    if skip(t) {
        return;
    }
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let ip = |args: &[&str]| {
        arbor_testkit::ok(
            Command::new("ip").args(args).output().unwrap(),
            &format!("ip {}", args.join(" ")),
        );
    };
    let dead_ns = format!("arbn-{dead}-0-0");
    let dead_bridge = format!("arbr{dead:x}-0");
    let dead_veth = format!("arv{dead:x}-0-0");
    let dead_peer = format!("arv{dead:x}-0-1");
    // pid 1 is alive: its names must survive (this process's pid as the sequence number keeps
    // concurrent runs apart).
    let live_ns = format!("arbn-1-{}-0", std::process::id());
    ip(&["netns", "add", &dead_ns]);
    ip(&["link", "add", &dead_bridge, "type", "bridge"]);
    ip(&[
        "link", "add", &dead_veth, "type", "veth", "peer", "name", &dead_peer,
    ]);
    ip(&["netns", "add", &live_ns]);
    cluster::cleanup_stale();
    let list = netns_list();
    let survived = list
        .lines()
        .any(|l| l.split_whitespace().next() == Some(live_ns.as_str()));
    ip(&["netns", "del", &live_ns]);
    assert!(survived, "{live_ns} (pid 1 is alive) was removed");
    assert_gone(&[dead_ns], &[dead_bridge, dead_veth, dead_peer]);
}
