//! A cluster of N "nodes" on this one machine: network namespaces on one Linux bridge, each
//! behind a rate-shaped link, plus optionally a namespace for the registry. Tests and benchmarks
//! run one peer (arbord, a tree manager, a client) per node and measure what crosses the links.
//!
//! ```text
//!                         host network namespace
//! +------------------------------------------------------------------------+
//! |  bridge arbr<pid:x>-<seq:x>    10.213.S.1/24    (Cluster::host_addr)   |
//! |     |            |                 |                      |            |
//! |  arv..-0      arv..-1     ...   arv..-(N-1)        v<pid:x>-<k:x>h     |  host-side veths
//! +-----|------------|-----------------|----------------------|------------+
//!       |            |                 |                      |               tbf on each end
//! +-----|----+ +-----|----+     +------|-----+     +----------|--------+
//! | eth0     | | eth0     |     | eth0       |     | v<pid:x>-<k:x>n   |      node-side veths
//! | .10      | | .11      | ... | .(10+N-1)  |     | .2                |
//! | node 0   | | node 1   |     | node N-1   |     | registry          |
//! +----------+ +----------+     +------------+     +-------------------+
//!   node namespaces arbn-<pid>-<seq>-<i>             arbt-<pid>-<k>
//! ```
//!
//! All namespaces and the host share one /24 (`10.213.S.0/24`, `S` free on the host, chosen under
//! the same lock file and address scan as [`crate::netns`]), so nodes reach each other and the
//! registry directly over the bridge (L2; node ↔ node traffic does not go through the host's IP
//! stack, although with `br_netfilter` loaded bridged frames do pass the host's iptables FORWARD
//! chain, which must not drop them). The host is `.1` (the bridge: services on the host, e.g. a
//! tree manager, are reachable from every node at [`Cluster::host_addr`]), the registry namespace
//! `.2`, node `i` is `.(10 + i)`. Nodes have no default route: they only see this /24.
//!
//! Every link is shaped in both directions with a `tbf` qdisc on each veth's egress:
//!
//! ```text
//! # download (bridge -> node): egress of the host-side veth
//! tc qdisc add dev arv<pid:x>-<seq:x>-<i:x> root tbf rate <R>bit burst <B> latency 50ms
//! # upload (node -> bridge): egress of the node-side veth
//! tc -n arbn-<pid>-<seq>-<i> qdisc add dev eth0 root tbf rate <R>bit burst <B> latency 50ms
//! ```
//!
//! with `R` = [`ClusterSpec::node_rate`] (the registry namespace: [`ClusterSpec::registry_rate`])
//! and `B` = [`LinkShape::default_burst`]. `tbf` limits the rate only; it adds no delay (this
//! machine has no `netem`). The registry namespace is a plain [`Namespace`] (made by
//! [`Namespace::new`], then its host-side veth is moved into the bridge and its host address onto
//! the bridge), so [`crate::Registry::start_in_netns`] works with [`Cluster::registry_ns`].
//!
//! Bring-up uses batched commands: one `ip -batch` on the host for the bridge, one for the
//! namespaces and veth pairs, then one `ip -n NS -batch` (addresses, links up) and one
//! `tc -n NS -batch` per node (run by 4 threads), and one host `tc -batch` for the bridge-side
//! qdiscs: 32 nodes and the registry namespace take about 0.6 s on 2 busy cores. The harness
//! runs no processes of its own in the background. Dropping the [`Cluster`] kills the processes
//! still inside its namespaces (SIGTERM, 5 s grace, SIGKILL), deletes the namespaces and the
//! bridge (`ip -force -batch`), waits for the kernel to destroy the namespaces' veth pairs
//! (deleting them one by one would cost an RCU grace period each) and deletes explicitly those
//! still there after 3 s; about 0.25 s for 32 nodes. [`cleanup_stale`] (also run by
//! [`Cluster::new`]) removes what crashed test processes left: namespaces, veths and bridges
//! whose names embed a dead pid, and the registry namespace attached to such a bridge.
//!
//! Needs root (`ip netns add`, `ip link add`, `tc`) and iproute2.
//!
//! ```no_run
//! use arbor_testkit::cluster::{Cluster, ClusterSpec};
//!
//! # fn main() -> anyhow::Result<()> {
//! if arbor_testkit::skip_unless_root("my_test") {
//!     return Ok(());
//! }
//! // 8 nodes at 100 Mbit/s each way, the registry behind 400 Mbit/s.
//! let cluster = Cluster::new(&ClusterSpec::new(8, 100_000_000).with_registry(400_000_000))?;
//! let reg = arbor_testkit::Registry::start_in_netns(cluster.registry_ns().expect("registry"))?;
//! let mut peers = Vec::new();
//! for node in cluster.nodes() {
//!     // Runs inside the node's namespace; it reaches `reg.addr()`, the other nodes'
//!     // `addr()`s and services on the host at `cluster.host_addr()`.
//!     peers.push(node.exec("sleep").arg("1").spawn()?);
//! }
//! let before = cluster.nodes()[0].link_bytes()?;
//! // ... run the workload ...
//! let moved = cluster.nodes()[0].link_bytes()? - before;
//! println!("node 0: {} bytes down, {} bytes up", moved.to_ns, moved.to_host);
//! drop(reg);
//! drop(cluster); // kills what is still running inside, removes all links and namespaces
//! # Ok(())
//! # }
//! ```

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::netns::{self, LinkBytes, LinkShape, Namespace};
use crate::util;

/// Name prefix of the node namespaces (`arbn-<pid>-<seq>-<i>`, decimal).
const NS_PREFIX: &str = "arbn-";
/// Name prefix of the bridge (`arbr<pid:x>-<seq:x>`).
const BRIDGE_PREFIX: &str = "arbr";
/// Name prefix of the host-side veths (`arv<pid:x>-<seq:x>-<i:x>`).
const VETH_PREFIX: &str = "arv";
/// The name of a node's end of its veth pair, inside its namespace.
const NODE_IF: &str = "eth0";
/// Where `ip netns` keeps the namespace names.
const NETNS_DIR: &str = "/run/netns";
/// Host part of the first node's address.
const FIRST_NODE_HOST: usize = 10;
/// The most nodes one cluster can have (`.10` ..= `.254`).
pub const MAX_NODES: usize = 255 - FIRST_NODE_HOST;
const MIN_RATE: u64 = 8_000;
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// Threads configuring the node namespaces during bring-up.
const CONFIG_WORKERS: usize = 4;
/// How long Drop waits after SIGTERM before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// What [`Cluster::new`] builds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Number of node namespaces (at most [`MAX_NODES`]).
    pub nodes: usize,
    /// Rate of every node's link in bits per second, in each direction.
    pub node_rate: u64,
    /// `Some(rate)`: also a registry namespace behind a link of `rate` bits per second in each
    /// direction.
    pub registry_rate: Option<u64>,
}

impl ClusterSpec {
    /// `nodes` nodes at `node_rate` bits/s each way, no registry namespace.
    pub fn new(nodes: usize, node_rate: u64) -> ClusterSpec {
        ClusterSpec {
            nodes,
            node_rate,
            registry_rate: None,
        }
    }

    /// Adds a registry namespace behind `rate` bits/s each way.
    pub fn with_registry(mut self, rate: u64) -> ClusterSpec {
        self.registry_rate = Some(rate);
        self
    }
}

/// One node of a [`Cluster`]: a network namespace attached to the cluster's bridge.
#[derive(Clone, Debug)]
pub struct ClusterNode {
    index: usize,
    name: String,
    host_veth: String,
    addr: Ipv4Addr,
}

impl ClusterNode {
    /// Position in [`Cluster::nodes`].
    pub fn index(&self) -> usize {
        self.index
    }

    /// The namespace's name (`ip netns exec NAME`, `ip -n NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's address on the cluster's /24.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The host side of the node's veth pair (a port of the bridge).
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }

    /// The node's end of the veth pair, inside its namespace (`eth0`).
    pub fn ns_veth(&self) -> &str {
        NODE_IF
    }

    /// A command running `program` inside the node's namespace (`ip netns exec NAME program`);
    /// add arguments and spawn it as usual. `ip` execs the program, so the child's pid is the
    /// program's. The mount namespace is the host's (plus `ip`'s private /sys remount).
    pub fn exec(&self, program: impl AsRef<OsStr>) -> Command {
        crate::netns::exec_in(&self.name, program)
    }

    /// Bytes that crossed the node's link so far, from the host-side veth's counters:
    /// `to_host` is the node's upload (everything it sent: to other nodes, the registry, the
    /// host), `to_ns` its download.
    pub fn link_bytes(&self) -> Result<LinkBytes> {
        LinkBytes::of_host_veth(&self.host_veth)
    }

    /// Pids of the processes inside the node's namespace.
    pub fn pids(&self) -> Vec<u32> {
        pids_in(&netns_ids(&[self.name.as_str()]))
    }
}

/// N node namespaces and optionally a registry namespace on one bridge (see the module docs).
pub struct Cluster {
    spec: ClusterSpec,
    bridge: String,
    subnet: u8,
    nodes: Vec<ClusterNode>,
    registry: Option<Namespace>,
}

impl Cluster {
    /// Builds the cluster described by `spec` (first removing leftovers of dead test processes,
    /// see [`cleanup_stale`]). On error everything created so far is removed again.
    pub fn new(spec: &ClusterSpec) -> Result<Cluster> {
        ensure!(
            spec.node_rate >= MIN_RATE,
            "node rate {} bit/s is too low",
            spec.node_rate
        );
        if let Some(r) = spec.registry_rate {
            ensure!(r >= MIN_RATE, "registry rate {r} bit/s is too low");
        }
        ensure!(
            spec.nodes <= MAX_NODES,
            "{} nodes requested, a cluster has at most {MAX_NODES}",
            spec.nodes
        );
        ensure!(
            crate::is_root(),
            "a cluster needs root (ip netns add, ip link add, tc)"
        );
        util::require_tool("ip", "iproute2")?;
        util::require_tool("tc", "iproute2")?;
        cleanup_stale();

        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let bridge = format!("{BRIDGE_PREFIX}{pid:x}-{seq:x}");
        let last_veth = format!("{VETH_PREFIX}{pid:x}-{seq:x}-{:x}", spec.nodes);
        ensure!(
            last_veth.len() <= 15,
            "interface name {last_veth} is longer than 15 bytes (too many clusters in this process)"
        );

        // The registry namespace comes first: it allocates the subnet (under the netns lock,
        // which must not be held here: flock would block on it).
        let registry = spec
            .registry_rate
            .map(Namespace::new)
            .transpose()
            .context("creating the registry namespace")?;

        // Under the lock: choose the subnet (or take the registry's) and put its host address
        // on the bridge, so that concurrent allocations see it as used at every moment.
        let lock = netns::lock()?;
        let subnet = match &registry {
            Some(r) => r.host_addr().octets()[2],
            None => netns::free_subnet()?,
        };
        let addr = |host: usize| -> Ipv4Addr {
            // MAX_NODES keeps host <= 254.
            Ipv4Addr::new(netns::PREFIX[0], netns::PREFIX[1], subnet, host as u8)
        };
        let nodes = (0..spec.nodes)
            .map(|i| ClusterNode {
                index: i,
                name: format!("{NS_PREFIX}{pid}-{seq}-{i}"),
                host_veth: format!("{VETH_PREFIX}{pid:x}-{seq:x}-{i:x}"),
                addr: addr(FIRST_NODE_HOST + i),
            })
            .collect();
        // From here on, Drop undoes whatever was created.
        let cluster = Cluster {
            spec: spec.clone(),
            bridge,
            subnet,
            nodes,
            registry,
        };
        cluster
            .create_bridge(pid, seq)
            .with_context(|| format!("creating bridge {}", cluster.bridge))?;
        drop(lock);
        cluster
            .create_nodes()
            .with_context(|| format!("creating the nodes of cluster {}", cluster.bridge))?;
        Ok(cluster)
    }

    fn create_bridge(&self, pid: u32, seq: u32) -> Result<()> {
        let br = &self.bridge;
        let host = format!("{}/24", self.host_addr());
        // A fixed, locally administered MAC: otherwise the bridge takes its ports' lowest MAC,
        // which changes while ports are added.
        let mac = format!(
            "02:a7:{:02x}:{:02x}:{:02x}:{:02x}",
            (pid >> 16) & 0xff,
            (pid >> 8) & 0xff,
            pid & 0xff,
            seq & 0xff
        );
        let mut cmds = vec![
            format!(
                "link add {br} address {mac} type bridge stp_state 0 forward_delay 0 mcast_snooping 0"
            ),
            // No IPv6 link-local address: no router solicitations / MLD reports on the links.
            format!("link set {br} addrgenmode none"),
        ];
        if let Some(r) = &self.registry {
            cmds.push(format!("address del {host} dev {}", r.host_veth()));
        }
        cmds.push(format!("address add {host} dev {br}"));
        cmds.push(format!("link set {br} up"));
        if let Some(r) = &self.registry {
            cmds.push(format!("link set {} master {br}", r.host_veth()));
        }
        batch("ip", None, false, &cmds)
    }

    fn create_nodes(&self) -> Result<()> {
        if self.nodes.is_empty() {
            return Ok(());
        }
        let br = &self.bridge;
        let mut cmds = Vec::with_capacity(3 * self.nodes.len());
        for n in &self.nodes {
            cmds.push(format!("netns add {}", n.name));
            cmds.push(format!(
                "link add {} type veth peer name {NODE_IF} netns {}",
                n.host_veth, n.name
            ));
            cmds.push(format!(
                "link set {} addrgenmode none master {br} up",
                n.host_veth
            ));
        }
        batch("ip", None, false, &cmds)?;
        let tbf = tbf_args(self.spec.node_rate);
        let configure = |n: &ClusterNode| -> Result<()> {
            batch(
                "ip",
                Some(&n.name),
                false,
                &[
                    "link set lo up".to_string(),
                    format!("link set {NODE_IF} addrgenmode none"),
                    format!("address add {}/24 dev {NODE_IF}", n.addr),
                    format!("link set {NODE_IF} up"),
                ],
            )?;
            batch(
                "tc",
                Some(&n.name),
                false,
                &[format!("qdisc add dev {NODE_IF} root {tbf}")],
            )
        };
        // Two commands per namespace (`ip -n` cannot do qdiscs, `tc -n` cannot do addresses),
        // run by a few threads: the time goes into process start-up and `ip`'s namespace
        // switch, not into the kernel.
        let workers = CONFIG_WORKERS.min(self.nodes.len());
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let configure = &configure;
                    scope.spawn(move || {
                        self.nodes
                            .iter()
                            .skip(w)
                            .step_by(workers)
                            .try_for_each(configure)
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a node configuration thread panicked"))?
            })
        })?;
        let host_tbf: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("qdisc add dev {} root {tbf}", n.host_veth))
            .collect();
        batch("tc", None, false, &host_tbf)
    }

    /// The spec the cluster was built from.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// The nodes, in order (node `i` has address `.(10 + i)`).
    pub fn nodes(&self) -> &[ClusterNode] {
        &self.nodes
    }

    /// The registry's namespace (if [`ClusterSpec::registry_rate`] was set): pass it to
    /// [`crate::Registry::start_in_netns`]; its [`Namespace::ns_addr`] is `.2` on the cluster's
    /// /24, [`Namespace::exec`] runs programs inside, [`Namespace::link_bytes`] counts its link
    /// (`to_host`: what the registry served).
    pub fn registry_ns(&self) -> Option<&Namespace> {
        self.registry.as_ref()
    }

    /// The host's address on the bridge (`.1`): services on the host listening on it (or on
    /// 0.0.0.0) are reachable from every node.
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(netns::PREFIX[0], netns::PREFIX[1], self.subnet, 1)
    }

    /// The cluster's network address (`10.213.S.0`; the prefix length is 24).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::new(netns::PREFIX[0], netns::PREFIX[1], self.subnet, 0)
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// Pids of the processes inside any of the cluster's namespaces (nodes and registry).
    pub fn pids(&self) -> Vec<u32> {
        pids_in(&netns_ids(&self.ns_names()))
    }

    fn ns_names(&self) -> Vec<&str> {
        self.nodes
            .iter()
            .map(|n| n.name.as_str())
            .chain(self.registry.as_ref().map(|r| r.name()))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Everything inside was started through this cluster.
        kill_processes_in(&self.ns_names());
        let namespaces: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        let veths: Vec<&str> = self.nodes.iter().map(|n| n.host_veth.as_str()).collect();
        remove(
            &format!("cluster {}", self.bridge),
            &namespaces,
            &[self.bridge.as_str()],
            &veths,
        );
        // Deletes the registry namespace and its veth pair.
        drop(self.registry.take());
    }
}

/// How long [`remove`] waits for the kernel to destroy the veth pairs of deleted namespaces.
const VETH_WAIT: Duration = Duration::from_secs(3);

/// Deletes `namespaces` and `links` (those that exist, in one `ip -force -batch`), waits up to
/// [`VETH_WAIT`] for `veths` (host sides of pairs whose other end is in one of the namespaces)
/// to go with their namespaces, deletes those still there, and warns about anything left.
///
/// Deleting the namespaces is much faster than deleting 32 veths one by one (each `link del`
/// waits for an RCU grace period; the kernel's namespace cleanup batches them), but a namespace
/// that something else still holds (e.g. a copy of its /run/netns mount in another mount
/// namespace) keeps its veth: hence the explicit deletion after the wait.
fn remove(what: &str, namespaces: &[&str], links: &[&str], veths: &[&str]) {
    let mut cmds: Vec<String> = namespaces
        .iter()
        .filter(|n| netns_exists(n))
        .map(|n| format!("netns del {n}"))
        .chain(
            links
                .iter()
                .filter(|l| link_exists(l))
                .map(|l| format!("link del {l}")),
        )
        .collect();
    let mut errors = Vec::new();
    if !cmds.is_empty()
        && let Err(e) = batch("ip", None, true, &cmds)
    {
        errors.push(format!("{e:#}"));
    }
    let deadline = Instant::now() + VETH_WAIT;
    while veths.iter().any(|v| link_exists(v)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    cmds = veths
        .iter()
        .filter(|v| link_exists(v))
        .map(|v| format!("link del {v}"))
        .collect();
    if !cmds.is_empty()
        && let Err(e) = batch("ip", None, true, &cmds)
    {
        errors.push(format!("{e:#}"));
    }
    // Errors about things that are gone anyway (deleted concurrently, or a veth whose peer
    // went first) do not matter.
    let left: Vec<&str> = namespaces
        .iter()
        .filter(|n| netns_exists(n))
        .chain(links.iter().chain(veths).filter(|l| link_exists(l)))
        .copied()
        .collect();
    if !left.is_empty() {
        eprintln!(
            "arbor-testkit: warning: removing {what}: left behind: {}; {}",
            left.join(" "),
            errors.join("; ")
        );
    }
}

/// The `tbf ...` part of a `tc qdisc add` for `rate_bits` per second (default burst, 50 ms
/// queue, as [`Namespace::new`]).
fn tbf_args(rate_bits: u64) -> String {
    let shape = LinkShape::rate(rate_bits);
    let burst = shape
        .burst_bytes
        .unwrap_or_else(|| LinkShape::default_burst(rate_bits));
    format!(
        "tbf rate {rate_bits}bit burst {burst} latency {}ms",
        shape.latency.as_millis().max(1)
    )
}

/// Runs `tool [-n NETNS] [-force] -batch FILE` with `cmds` as FILE (one command a line). The
/// error names the command that failed. With `force`, continues after errors (and fails at
/// the end if any failed).
fn batch(tool: &str, netns: Option<&str>, force: bool, cmds: &[String]) -> Result<()> {
    let mut file = tempfile::Builder::new()
        .prefix("arbor-cluster-batch-")
        .tempfile_in(util::temp_base())
        .context("creating a temp file for a batch of commands")?;
    for c in cmds {
        writeln!(file, "{c}").context("writing a batch of commands")?;
    }
    file.flush().context("writing a batch of commands")?;
    let mut cmd = Command::new(tool);
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    if force {
        cmd.arg("-force");
    }
    cmd.arg("-batch").arg(file.path());
    util::run_checked(&mut cmd, CMD_TIMEOUT)
        .map(drop)
        .map_err(|e| {
            // iproute2 reports "Command failed FILE:LINE" for each failed line.
            let text = format!("{e:#}");
            let failed: Vec<&str> = text
                .match_indices("Command failed ")
                .filter_map(|(i, _)| {
                    let rest = &text[i..];
                    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                    let line: usize = rest[..end].rsplit(':').next()?.parse().ok()?;
                    cmds.get(line.checked_sub(1)?).map(String::as_str)
                })
                .collect();
            let where_ = netns.map(|n| format!(" -n {n}")).unwrap_or_default();
            if failed.is_empty() {
                e.context(format!("{tool}{where_} -batch ({} commands)", cmds.len()))
            } else {
                e.context(format!(
                    "{tool}{where_} -batch: failed: `{}`",
                    failed.join("`, `")
                ))
            }
        })
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// (device, inode) of the named namespaces' nsfs files (as `ip netns pids` compares them).
fn netns_ids(names: &[&str]) -> HashSet<(u64, u64)> {
    names
        .iter()
        .filter_map(|n| std::fs::metadata(Path::new(NETNS_DIR).join(n)).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect()
}

/// Live processes (not this one) whose network namespace is one of `ids`: one pass over /proc.
fn pids_in(ids: &HashSet<(u64, u64)>) -> Vec<u32> {
    let mut pids = Vec::new();
    if ids.is_empty() {
        return pids;
    }
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(m) = std::fs::metadata(e.path().join("ns/net"))
            && ids.contains(&(m.dev(), m.ino()))
            && util::pid_alive(pid)
        {
            pids.push(pid);
        }
    }
    pids
}

/// SIGTERM to every process inside the named namespaces, SIGKILL to those still there after
/// [`KILL_GRACE`].
fn kill_processes_in(names: &[&str]) {
    let ids = netns_ids(names);
    let pids = pids_in(&ids);
    if pids.is_empty() {
        return;
    }
    for &p in &pids {
        util::signal(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + KILL_GRACE;
    while !pids_in(&ids).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in pids_in(&ids) {
        util::signal(p, libc::SIGKILL);
    }
}

/// The creating pid in a node namespace name `arbn-<pid>-<seq>-<i>`.
fn ns_name_pid(name: &str) -> Option<u32> {
    let parts: Vec<&str> = name.strip_prefix(NS_PREFIX)?.split('-').collect();
    (parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok()))
        .then(|| parts[0].parse().ok())
        .flatten()
}

/// The creating pid in a link name `arbr<pid:x>-<seq:x>` or `arv<pid:x>-<seq:x>-<i:x>`.
fn link_name_pid(name: &str) -> Option<u32> {
    let (rest, n) = if let Some(r) = name.strip_prefix(BRIDGE_PREFIX) {
        (r, 2)
    } else {
        (name.strip_prefix(VETH_PREFIX)?, 3)
    };
    let parts: Vec<&str> = rest.split('-').collect();
    (parts.len() == n
        && parts
            .iter()
            .all(|p| !p.is_empty() && u32::from_str_radix(p, 16).is_ok()))
    .then(|| u32::from_str_radix(parts[0], 16).ok())
    .flatten()
}

/// The netns.rs namespace `arbt-<pid>-<seq>` whose host-side veth is `port`
/// (`v<pid:x>-<seq:x>h`).
fn registry_ns_of_port(port: &str) -> Option<String> {
    let (pid, seq) = port.strip_prefix('v')?.strip_suffix('h')?.split_once('-')?;
    let pid = u32::from_str_radix(pid, 16).ok()?;
    let seq = u32::from_str_radix(seq, 16).ok()?;
    Some(format!("arbt-{pid}-{seq}"))
}

/// The pid in `arbt-<pid>-<seq>`.
fn ns_pid(name: &str) -> Option<u32> {
    name.strip_prefix("arbt-")?.split('-').next()?.parse().ok()
}

/// Removes the namespaces (nodes and registry), veths and bridges of clusters whose creating
/// process is gone (their names embed its pid), killing what still runs inside those
/// namespaces. Names of live processes are left alone. Errors are printed, not returned.
/// [`Cluster::new`] calls it.
pub fn cleanup_stale() {
    // One cleaner at a time (concurrent `Cluster::new`s would find the same leftovers).
    let _lock = netns::lock()
        .inspect_err(|e| eprintln!("arbor-testkit: warning: cleaning up without the lock: {e:#}"));
    let me = std::process::id();
    let stale = |pid: Option<u32>| pid.is_some_and(|p| p != me && !util::pid_alive(p));
    let names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut namespaces: Vec<String> = names(NETNS_DIR)
        .into_iter()
        .filter(|n| stale(ns_name_pid(n)))
        .collect();
    let mut links: Vec<String> = names("/sys/class/net")
        .into_iter()
        .filter(|n| stale(link_name_pid(n)))
        .collect();
    // A stale bridge's registry namespace (a `Namespace`, named by netns.rs, whose host-side
    // veth is a port of the bridge) goes with it, even with processes inside (netns.rs's own
    // sweep leaves such namespaces alone).
    let bridges: Vec<String> = links
        .iter()
        .filter(|l| l.starts_with(BRIDGE_PREFIX))
        .cloned()
        .collect();
    for br in bridges {
        for port in names(&format!("/sys/class/net/{br}/brif")) {
            if let Some(ns) = registry_ns_of_port(&port)
                && link_name_pid(&br) == ns_pid(&ns)
            {
                namespaces.push(ns);
                links.push(port);
            }
        }
    }
    if namespaces.is_empty() && links.is_empty() {
        return;
    }
    eprintln!(
        "arbor-testkit: removing leftovers of dead test processes: {}",
        links
            .iter()
            .chain(namespaces.iter())
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let ns_refs: Vec<&str> = namespaces.iter().map(String::as_str).collect();
    kill_processes_in(&ns_refs);
    // After the namespaces: veths (in case their namespace is still held), then bridges.
    let mut link_refs: Vec<&str> = links.iter().map(String::as_str).collect();
    link_refs.sort_by_key(|l| l.starts_with(BRIDGE_PREFIX));
    remove("stale cluster leftovers", &ns_refs, &link_refs, &[]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_to_their_pid() {
        assert_eq!(ns_name_pid("arbn-1234-0-31"), Some(1234));
        assert_eq!(ns_name_pid("arbn-1234-0"), None);
        assert_eq!(ns_name_pid("arbt-1234-0"), None);
        assert_eq!(link_name_pid("arbr4d2-0"), Some(1234));
        assert_eq!(link_name_pid("arv4d2-1-1f"), Some(1234));
        assert_eq!(link_name_pid("arv4d2-1"), None);
        assert_eq!(link_name_pid("arbcri123"), None);
        assert_eq!(link_name_pid("arbr-0"), None);
        assert_eq!(
            registry_ns_of_port("v4d2-1fh").as_deref(),
            Some("arbt-1234-31")
        );
        assert_eq!(registry_ns_of_port("arv4d2-1-1f"), None);
        assert_eq!(ns_pid("arbt-1234-31"), Some(1234));
    }

    #[test]
    fn tbf_matches_netns_shaping() {
        assert_eq!(
            tbf_args(40_000_000),
            "tbf rate 40000000bit burst 65536 latency 50ms"
        );
    }
}
