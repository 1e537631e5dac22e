//! A private network namespace joined to the host by a rate-shaped veth pair: a remote test host
//! (registry, peer) behind a link of known bandwidth, without leaving the machine.
//!
//! [`Namespace::new`] creates a uniquely named netns `arbt-<pid>-<seq>` and a veth pair (host
//! side `v<pid>-<seq>h`, namespace side `...n`, hex), assigns `10.213.N.1/24` (host) and
//! `10.213.N.2/24` (namespace) with `N` unique among the addresses on the host, brings the links
//! and the namespace's `lo` up, and shapes both directions with a `tbf` qdisc on each veth's
//! egress:
//!
//! ```text
//! tc qdisc add dev <veth> root tbf rate <R>bit burst <B> latency <L>ms
//! ```
//!
//! (host side: host → namespace traffic; namespace side: namespace → host traffic). `tbf` only
//! limits the rate; it adds no delay (this machine has no `netem`). Programs run inside with
//! [`Namespace::exec`] (`ip netns exec`); [`crate::Registry::start_in_netns`] starts a registry
//! there. Dropping the guard kills every process still inside the namespace (only processes
//! started there, i.e. by its user), deletes the namespace and the veth pair.
//!
//! Needs root and iproute2 (`ip`, `tc`).

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::util;

/// The /16 the namespaces' /24s are taken from.
pub(crate) const PREFIX: [u8; 2] = [10, 213];
/// Name prefix of the namespaces (followed by `<pid>-<seq>`).
const NS_PREFIX: &str = "arbt-";
const CMD_TIMEOUT: Duration = Duration::from_secs(20);
/// Serializes address allocation and creation across threads and processes.
const LOCK_FILE: &str = "arbor-testkit-netns.lock";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// How the veth link is shaped (both directions alike).
#[derive(Clone, Copy, Debug)]
pub struct LinkShape {
    /// Rate in bits per second.
    pub rate_bits: u64,
    /// `tbf` bucket size in bytes; `None`: [`LinkShape::default_burst`].
    pub burst_bytes: Option<u64>,
    /// `tbf` latency: the longest a packet may wait in the queue (sets the queue length).
    pub latency: Duration,
}

impl LinkShape {
    /// `rate_bits` per second with the default burst and a 50 ms queue.
    pub fn rate(rate_bits: u64) -> LinkShape {
        LinkShape {
            rate_bits,
            burst_bytes: None,
            latency: Duration::from_millis(50),
        }
    }

    /// max(rate/250 s, 64 KiB) in bytes: at least one timer tick's worth of bytes at HZ=250
    /// (`tbf` cannot send faster than burst per tick) and at least one 64 KiB GSO packet
    /// (bigger packets are segmented by `tbf`, costing CPU).
    pub fn default_burst(rate_bits: u64) -> u64 {
        (rate_bits / 8 / 250).max(64 << 10)
    }

    fn burst(&self) -> u64 {
        self.burst_bytes
            .unwrap_or_else(|| Self::default_burst(self.rate_bits))
    }
}

/// Bytes that crossed the veth link (Ethernet frames, as the host side's counters see them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkBytes {
    /// Namespace → host (e.g. blobs served by a registry inside).
    pub to_host: u64,
    /// Host → namespace (requests, uploads).
    pub to_ns: u64,
}

impl LinkBytes {
    /// The counters of a namespace's link, read on its host-side veth: what the host side
    /// received came from the namespace (`to_host`), what it sent went in (`to_ns`).
    pub(crate) fn of_host_veth(veth: &str) -> Result<LinkBytes> {
        let read = |what: &str| -> Result<u64> {
            let p = format!("/sys/class/net/{veth}/statistics/{what}");
            let s = std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
            s.trim().parse().with_context(|| format!("parsing {p}"))
        };
        Ok(LinkBytes {
            to_host: read("rx_bytes")?,
            to_ns: read("tx_bytes")?,
        })
    }
}

/// A command running `program` inside network namespace `ns` (`ip netns exec NS program`; `ip`
/// execs it, so the child's pid is the program's).
pub(crate) fn exec_in(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

impl std::ops::Sub for LinkBytes {
    type Output = LinkBytes;
    fn sub(self, o: LinkBytes) -> LinkBytes {
        LinkBytes {
            to_host: self.to_host.saturating_sub(o.to_host),
            to_ns: self.to_ns.saturating_sub(o.to_ns),
        }
    }
}

/// A network namespace with a shaped veth link to the host (see the module docs).
pub struct Namespace {
    name: String,
    host_veth: String,
    ns_veth: String,
    subnet: u8,
    shape: LinkShape,
}

impl Namespace {
    /// A namespace behind a link of `rate_bits` per second in each direction (default burst,
    /// 50 ms queue).
    pub fn new(rate_bits: u64) -> Result<Namespace> {
        Self::with_shape(LinkShape::rate(rate_bits))
    }

    /// A namespace behind a link shaped as `shape` in each direction.
    pub fn with_shape(shape: LinkShape) -> Result<Namespace> {
        ensure!(
            shape.rate_bits >= 8_000,
            "rate {} bit/s is too low",
            shape.rate_bits
        );
        ensure!(
            crate::is_root(),
            "network namespaces need root (ip netns add)"
        );
        util::require_tool("ip", "iproute2")?;
        util::require_tool("tc", "iproute2")?;
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let name = format!("{NS_PREFIX}{pid}-{seq}");
        let host_veth = format!("v{pid:x}-{seq:x}h");
        let ns_veth = format!("v{pid:x}-{seq:x}n");
        ensure!(
            host_veth.len() <= 15,
            "interface name {host_veth} is longer than 15 bytes"
        );

        let _lock = lock()?;
        sweep_stale();
        let subnet = free_subnet()?;
        // From here on, Drop undoes whatever was created.
        let ns = Namespace {
            name,
            host_veth,
            ns_veth,
            subnet,
            shape,
        };
        ns.setup()
            .with_context(|| format!("setting up network namespace {}", ns.name))?;
        Ok(ns)
    }

    fn setup(&self) -> Result<()> {
        let (n, h, v) = (&self.name, &self.host_veth, &self.ns_veth);
        ip(&["netns", "add", n])?;
        ip(&[
            "link", "add", h, "type", "veth", "peer", "name", v, "netns", n,
        ])?;
        ip(&["addr", "add", &format!("{}/24", self.host_addr()), "dev", h])?;
        ip(&["link", "set", h, "up"])?;
        ip(&[
            "netns",
            "exec",
            n,
            "ip",
            "addr",
            "add",
            &format!("{}/24", self.ns_addr()),
            "dev",
            v,
        ])?;
        ip(&["netns", "exec", n, "ip", "link", "set", v, "up"])?;
        ip(&["netns", "exec", n, "ip", "link", "set", "lo", "up"])?;
        let tbf = |dev: &str| -> Vec<String> {
            vec![
                "qdisc".into(),
                "add".into(),
                "dev".into(),
                dev.into(),
                "root".into(),
                "tbf".into(),
                "rate".into(),
                format!("{}bit", self.shape.rate_bits),
                "burst".into(),
                self.shape.burst().to_string(),
                "latency".into(),
                format!("{}ms", self.shape.latency.as_millis().max(1)),
            ]
        };
        run(Command::new("tc").args(tbf(h)))?;
        run(self.exec("tc").args(tbf(v)))?;
        Ok(())
    }

    /// The namespace's name (for `ip netns exec NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host side of the veth pair.
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }

    /// The namespace side of the veth pair.
    pub fn ns_veth(&self) -> &str {
        &self.ns_veth
    }

    /// The namespace's address, `10.213.N.2`.
    pub fn ns_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(PREFIX[0], PREFIX[1], self.subnet, 2)
    }

    /// The host's address on the link, `10.213.N.1`.
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(PREFIX[0], PREFIX[1], self.subnet, 1)
    }

    /// The shape of the link.
    pub fn shape(&self) -> LinkShape {
        self.shape
    }

    /// A command running `program` inside the namespace (`ip netns exec NAME program`); add
    /// arguments and spawn it as usual. `ip` execs the program, so the child's pid is the
    /// program's. The mount namespace is the host's (plus `ip`'s private /sys remount).
    pub fn exec(&self, program: impl AsRef<OsStr>) -> Command {
        exec_in(&self.name, program)
    }

    /// Bytes that crossed the link so far (from the host veth's counters).
    pub fn link_bytes(&self) -> Result<LinkBytes> {
        LinkBytes::of_host_veth(&self.host_veth)
    }

    /// Pids of the processes inside the namespace.
    pub fn pids(&self) -> Vec<u32> {
        ns_pids(&self.name)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Everything inside was started through this guard: SIGTERM, then SIGKILL.
        let pids = self.pids();
        for &p in &pids {
            util::signal(p, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.pids().iter().any(|&p| util::pid_alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in self.pids() {
            util::signal(p, libc::SIGKILL);
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("arbor-testkit: warning: {e:#}");
        }
        // Deleting the namespace destroys its veth end and with it the peer; make sure.
        if std::path::Path::new("/sys/class/net")
            .join(&self.host_veth)
            .exists()
        {
            let _ = ip(&["link", "del", &self.host_veth]);
        }
    }
}

/// Runs `ip ARGS`.
fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

fn run(cmd: &mut Command) -> Result<String> {
    util::run_checked(cmd, CMD_TIMEOUT)
}

fn ns_pids(name: &str) -> Vec<u32> {
    util::output_with_timeout(
        Command::new("ip").args(["netns", "pids", name]),
        CMD_TIMEOUT,
    )
    .map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    })
    .unwrap_or_default()
}

/// An exclusive lock (flock) held while choosing a subnet and creating the links.
pub(crate) struct Lock(File);

pub(crate) fn lock() -> Result<Lock> {
    let dir = if std::path::Path::new("/run/lock").is_dir() {
        std::path::PathBuf::from("/run/lock")
    } else {
        util::temp_base()
    };
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a valid, open file descriptor.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        bail!(
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(Lock(f))
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: as above; closing the file would release it too.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// Deletes namespaces of this harness whose creating process is gone and which hold no
/// process (left by a crashed run). Their veth pairs go with them.
fn sweep_stale() {
    let Ok(out) = run(Command::new("ip").args(["netns", "list"])) else {
        return;
    };
    for line in out.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !util::pid_alive(pid) && ns_pids(name).is_empty() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// The lowest N in 1..=254 such that no host interface has an address in 10.213.N.0/24.
pub(crate) fn free_subnet() -> Result<u8> {
    let out = ip(&["-o", "-4", "addr", "show"])?;
    let used: Vec<u8> = out
        .split_whitespace()
        .filter_map(|w| w.split('/').next()?.parse::<Ipv4Addr>().ok())
        .filter(|a| a.octets()[..2] == PREFIX)
        .map(|a| a.octets()[2])
        .collect();
    (1..=254u8)
        .find(|n| !used.contains(n))
        .context("no free /24 left in 10.213.0.0/16")
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;

    use super::*;
    use crate::{ImageSpec, LayerSource, Registry, skip_unless_root, skip_unless_tools};

    /// GETs `path` from `addr` and returns (bytes of the body, seconds from the request to
    /// the last byte).
    fn timed_get(addr: &str, path: &str) -> (u64, f64) {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut r = BufReader::with_capacity(1 << 20, s);
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        assert!(status.contains(" 200 "), "GET {path}: {status}");
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            if h.trim().is_empty() {
                break;
            }
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = r.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        (n, t.elapsed().as_secs_f64())
    }

    #[test]
    fn shaped_registry_in_namespace() {
        let t = "shaped_registry_in_namespace";
        if skip_unless_root(t)
            || skip_unless_tools(t, &["ip", "tc", "/usr/bin/docker-registry", "skopeo"])
        {
            return;
        }
        let ns = Namespace::new(100_000_000).expect("creating the namespace");
        let (name, veth) = (ns.name().to_string(), ns.host_veth().to_string());
        assert!(ns.ns_addr().octets()[..3] == ns.host_addr().octets()[..3]);
        let reg = Registry::start_in_netns(&ns).expect("starting the registry in the namespace");
        assert_eq!(reg.addr(), format!("{}:5000", ns.ns_addr()));
        assert!(
            ns.pids().contains(&reg.pid()),
            "registry not inside the namespace"
        );

        // A 20 MB incompressible layer, pushed through the link.
        let data = crate::pseudo_random_bytes(7, 20_000_000);
        let tar = crate::layer_tar(&[crate::Entry::file("blob.bin", data)]);
        let layout = tempfile::tempdir().unwrap();
        let spec = ImageSpec {
            layers: vec![LayerSource::Tar(tar)],
            ..ImageSpec::default()
        };
        let manifest = crate::write_oci_layout(layout.path(), "v1", &spec).unwrap();
        crate::skopeo_push(layout.path(), "v1", &reg.reference("netns/blob:v1"), None)
            .expect("pushing through the shaped link");
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                layout
                    .path()
                    .join("blobs/sha256")
                    .join(manifest.trim_start_matches("sha256:")),
            )
            .unwrap(),
        )
        .unwrap();
        let layer = m["layers"][0]["digest"].as_str().unwrap().to_string();
        let size = m["layers"][0]["size"].as_u64().unwrap();
        assert!(size > 19_000_000, "layer is only {size} bytes");

        let before = ns.link_bytes().unwrap();
        let (n, secs) = timed_get(&reg.addr(), &format!("/v2/netns/blob/blobs/{layer}"));
        let link = ns.link_bytes().unwrap() - before;
        assert_eq!(n, size);
        let mbit = n as f64 * 8.0 / secs / 1e6;
        eprintln!(
            "{t}: {n} bytes in {secs:.2} s = {mbit:.1} Mbit/s through a 100 Mbit/s link \
             ({} bytes counted on the link)",
            link.to_host
        );
        assert!(mbit <= 110.0, "{mbit:.1} Mbit/s: the link is not shaped");
        assert!(mbit >= 50.0, "{mbit:.1} Mbit/s: far below the shaped rate");
        assert!(link.to_host >= n, "link counters missed bytes: {link:?}");

        drop(reg);
        drop(ns);
        let list = run(Command::new("ip").args(["netns", "list"])).unwrap();
        assert!(
            !list.split_whitespace().any(|w| w == name),
            "namespace {name} left behind: {list}"
        );
        assert!(
            !std::path::Path::new("/sys/class/net").join(&veth).exists(),
            "veth {veth} left behind"
        );
    }

    #[test]
    fn default_burst_is_sized_for_the_rate() {
        assert_eq!(LinkShape::default_burst(1_000_000), 64 << 10);
        assert_eq!(LinkShape::default_burst(1_000_000_000), 500_000);
    }
}
