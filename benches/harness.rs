//! What the lazy-start and cold-start benches share besides their image: interruption by signals,
//! child processes with timeouts, mounts and the run's work dir, `drop_caches`, link rates, and a
//! minimal HTTP/1.1 client for the registry, metrics endpoints and the functions.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use arbor_testkit::netns::{LinkShape, Namespace};
use arbor_testkit::{Registry, skopeo_push};
use serde_json::{Value, json};

use crate::common::{MB, clock_ticks, describe, run_timed_until, tail};

/// The tags of the pushed image and of its conversions by `arbor convert` (plain, and with the
/// start-up set as prefetch list).
pub const TAG_SOURCE: &str = "v1";
pub const TAG_ARBOR: &str = "arbor";
pub const TAG_PREFETCH: &str = "arbor-prefetch";
/// The default conversion: the start-up set inferred from the entrypoint.
pub const TAG_INFERRED: &str = "arbor-inferred";

/// Which start-up files a conversion puts first ([`Remote::convert`]).
#[derive(Clone, Copy)]
pub enum Startup<'a> {
    /// None (`--no-infer`): every file on demand.
    None,
    /// Inferred from the entrypoint (what `arbor convert` does by default).
    Inferred,
    /// A prefetch list file with this many paths.
    List(&'a Path, usize),
}

/// The manifest media types asked for (Accept).
pub const MEDIA_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// Set by SIGINT/SIGTERM/SIGHUP: stop at the next check, cleaning up on the way out.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The shaped link's flags.
#[derive(clap::Args)]
pub struct LinkArgs {
    /// Link rate in each direction (tc units: 1gbit, 100mbit, 500kbit, or bits per second).
    #[arg(long, default_value = "1gbit", value_parser = parse_rate)]
    pub rate: u64,
    /// tbf queue length, as the longest time a packet may wait (milliseconds).
    #[arg(long, default_value_t = 50)]
    pub tbf_latency_ms: u64,
}

impl LinkArgs {
    /// The link, as reports describe it.
    pub fn to_json(&self) -> Value {
        json!({
            "rate_bits_per_s": self.rate,
            "tbf_burst_bytes": LinkShape::default_burst(self.rate),
            "tbf_latency_ms": self.tbf_latency_ms,
            "added_delay_ms": 0,
        })
    }
}

/// A bench's JSON report: its name, command line, time and `machine`, then `fields` (an object).
pub fn report(benchmark: &str, machine: Value, fields: Value) -> Value {
    let mut r = json!({
        "benchmark": benchmark,
        "command": std::env::args().collect::<Vec<_>>(),
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "machine": machine,
    });
    if let (Some(r), Value::Object(f)) = (r.as_object_mut(), fields) {
        r.extend(f);
    }
    r
}

/// Parses a tc-style rate into bits per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("bit").unwrap_or(&t);
    let t = t.strip_suffix("bps").unwrap_or(t);
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a rate"))?;
    let mult = match unit {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        _ => return Err(format!("{s:?}: unknown unit (use kbit, mbit or gbit)")),
    };
    let bits = (n * mult).round();
    if !(8e3..=1e11).contains(&bits) {
        return Err(format!("{s:?}: rate must be between 8kbit and 100gbit"));
    }
    Ok(bits as u64)
}

// ---------------------------------------------------------------------------------------------
// Signals and cleanup

/// Runs a bench: signal handlers, then `run`; exits 0 if it returned Ok(true), 1 if Ok(false)
/// (everything ran but a check failed), 2 with the error printed if it failed.
pub fn main_with(run: fn() -> Result<bool>) -> ! {
    install_signal_handlers();
    let code = match run() {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// The run's temp dir: on drop, unmounts whatever is left below it, then removes it.
pub struct WorkDir(pub Option<tempfile::TempDir>);

impl WorkDir {
    /// A new `<prefix>XXXXXX` directory in `base` (created if needed).
    pub fn create(base: &Path, prefix: &str) -> Result<WorkDir> {
        fs::create_dir_all(base)?;
        Ok(WorkDir(Some(
            tempfile::Builder::new()
                .prefix(prefix)
                .tempdir_in(base)
                .with_context(|| format!("creating a work dir in {}", base.display()))?,
        )))
    }

    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("work dir").path()
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            unmount_below(d.path());
            if !arbor_testkit::mounts_below(d.path()).is_empty() {
                // Never delete through a mount.
                eprintln!(
                    "warning: mounts left below {}; not removing it",
                    d.path().display()
                );
                let _ = d.keep();
                return;
            }
            let p = d.path().to_path_buf();
            if let Err(e) = d.close() {
                eprintln!("warning: removing {}: {e}", p.display());
            }
        }
    }
}

/// Lazily unmounts `p` (MNT_DETACH); errors ignored.
pub fn detach(p: &Path) {
    if let Ok(c) = CString::new(p.as_os_str().as_bytes()) {
        // SAFETY: a valid NUL-terminated path.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Lazily unmounts everything at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    for _ in 0..8 {
        let m = arbor_testkit::mounts_below(dir);
        if m.is_empty() {
            return;
        }
        m.iter().for_each(|p| detach(p));
    }
}

/// A mount made by this bench (overlay, proc): detached on drop.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        // /proc/mounts names absolute paths: a relative one (a relative --cache-dir) would
        // never be found mounted, and the mount would stay.
        let p = std::path::absolute(&self.0).unwrap_or_else(|_| self.0.clone());
        while arbor_testkit::is_mounted(&p) {
            detach(&p);
        }
    }
}

/// The tools the image build and the shaped registry need.
pub const TOOLS: &[&str] = &[
    "ip",
    "tc",
    "docker-registry",
    "skopeo",
    "dpkg-deb",
    "apt-get",
    "ldconfig",
    "chroot",
    "mount",
    "umount",
];

/// Records the load average at the end in `machine` and prints it with the one at the start.
pub fn print_load(machine: &mut Value) {
    machine["loadavg_at_end"] = json!(loadavg());
    println!(
        "\nload average (1, 5, 15 min) at start {} and end {}: other processes share the {} cores",
        machine["loadavg_at_start"].as_str().unwrap_or("?"),
        machine["loadavg_at_end"].as_str().unwrap_or("?"),
        machine["nproc"],
    );
}

/// (user, system) CPU seconds process `pid` used so far.
pub fn cpu_seconds(pid: u32) -> Option<(f64, f64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `f` starts at field 3.
    let ticks = |i: usize| Some(f.get(i)?.parse::<u64>().ok()? as f64 / clock_ticks());
    Some((ticks(11)?, ticks(12)?))
}

/// SIGTERM to our child `c`, SIGKILL if it is still there after `grace`; reaps it.
pub fn terminate(c: &mut Child, grace: Duration) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// The first three fields of /proc/loadavg.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `sync` and `echo 3 > /proc/sys/vm/drop_caches`; false if that is not allowed.
pub fn drop_caches() -> bool {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// Runs `cmd` (stdin null, output captured) with a timeout; stdout, or an error with stderr.
pub fn run_checked(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let desc = describe(cmd);
    let (status, out, err) = run_timed(cmd, timeout).with_context(|| desc.clone())?;
    if !status.success() {
        bail!(
            "`{desc}` failed ({status}):\n{}",
            tail(&format!("{out}\n{err}"), 30)
        );
    }
    Ok(out)
}

/// Like common's run_timed, but also stops on INTERRUPTED; kills the child on the way out.
pub fn run_timed(cmd: &mut Command, timeout: Duration) -> Result<(ExitStatus, String, String)> {
    run_timed_until(cmd, timeout, &|| INTERRUPTED.load(Ordering::SeqCst))
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client for the registry (plain HTTP, Content-Length bodies)

pub struct Response {
    pub status: u16,
    body: BufReader<TcpStream>,
    remaining: Option<u64>,
}

impl Read for Response {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let max = match self.remaining {
            Some(0) => return Ok(0),
            Some(r) => buf.len().min(r.try_into().unwrap_or(usize::MAX)),
            None => buf.len(),
        };
        let n = self.body.read(&mut buf[..max])?;
        if let Some(r) = self.remaining.as_mut() {
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("connection closed with {r} body bytes missing"),
                ));
            }
            *r -= n as u64;
        }
        Ok(n)
    }
}

pub fn http_get(addr: &str, path: &str, accept: &str) -> Result<Response> {
    let s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_nodelay(true)?;
    // One write: arbor's metrics endpoint answers (and closes) after its first read.
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    );
    (&s).write_all(req.as_bytes())?;
    let mut r = BufReader::with_capacity(1 << 20, s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {path}: bad status line {line:?}"))?;
    let mut remaining = None;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                remaining = Some(v.parse().context("Content-Length")?);
            } else if k == "transfer-encoding" && !v.eq_ignore_ascii_case("identity") {
                bail!("GET {path}: Transfer-Encoding {v} is not supported");
            }
        }
    }
    Ok(Response {
        status,
        body: r,
        remaining,
    })
}

pub fn http_get_all(addr: &str, path: &str, accept: &str) -> Result<(u16, Vec<u8>)> {
    let mut r = http_get(addr, path, accept)?;
    let mut v = Vec::new();
    r.read_to_end(&mut v)?;
    Ok((r.status, v))
}

/// The image manifest of `repo:reference` (following an index to its first linux manifest)
/// and the bytes fetched for it.
pub fn fetch_image_manifest(addr: &str, repo: &str, reference: &str) -> Result<(Value, u64)> {
    let (status, body) = http_get_all(
        addr,
        &format!("/v2/{repo}/manifests/{reference}"),
        MEDIA_TYPES,
    )?;
    ensure!(
        status == 200,
        "GET manifest {repo}:{reference}: HTTP {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let v: Value = serde_json::from_slice(&body).context("manifest is not JSON")?;
    let Some(children) = v["manifests"].as_array() else {
        return Ok((v, body.len() as u64));
    };
    let child = children
        .iter()
        .find(|m| m.pointer("/platform/os").and_then(Value::as_str) != Some("unknown"))
        .context("index without manifests")?;
    let digest = child["digest"]
        .as_str()
        .context("index entry without digest")?;
    let (m, n) = fetch_image_manifest(addr, repo, digest)?;
    Ok((m, n + body.len() as u64))
}

pub fn layer_sizes(manifest: &Value) -> Result<Vec<u64>> {
    manifest["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .map(|l| l["size"].as_u64().context("layer without size"))
        .collect()
}

/// The samples of the Prometheus metrics endpoint at `addr`: "name{labels}" → value.
pub fn metrics(addr: &str) -> Result<BTreeMap<String, f64>> {
    let (status, body) = http_get_all(addr, "/metrics", "text/plain")?;
    ensure!(status == 200, "GET http://{addr}/metrics: HTTP {status}");
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect())
}

/// Writes `value` as pretty JSON to `path` (parent directories created).
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = serde_json::to_vec_pretty(value)?;
    text.push(b'\n');
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// A registry behind a shaped link

/// A `docker-registry` in its own network namespace, behind a veth pair shaped with `tbf`.
/// Dropping it stops the registry and removes the namespace.
pub struct Remote {
    // Dropped in this order.
    pub registry: Registry,
    pub ns: Namespace,
    pub rate: u64,
}

impl Remote {
    /// Starts it with `rate` bits per second each way and a `latency_ms` tbf queue; prints
    /// the link.
    pub fn start(rate: u64, latency_ms: u64) -> Result<Remote> {
        let shape = LinkShape {
            latency: Duration::from_millis(latency_ms),
            ..LinkShape::rate(rate)
        };
        let ns = Namespace::with_shape(shape).context("creating the network namespace")?;
        let registry = Registry::start_in_netns(&ns).context("starting the registry")?;
        println!(
            "link: {} Mbit/s each way (tbf burst {} KiB, queue {latency_ms} ms), registry {} in \
             netns {}",
            rate as f64 / 1e6,
            LinkShape::default_burst(rate) >> 10,
            registry.addr(),
            ns.name()
        );
        Ok(Remote { registry, ns, rate })
    }

    /// `host:port` of the registry.
    pub fn addr(&self) -> String {
        self.registry.addr()
    }

    /// `<addr>/<repo>:<tag>`.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.addr())
    }

    /// Pushes `layout_tag` of the OCI layout to `repo:tag` with skopeo; returns the seconds.
    pub fn push(&self, layout: &Path, layout_tag: &str, repo: &str, tag: &str) -> Result<f64> {
        let dst = self.reference(repo, tag);
        let t = Instant::now();
        skopeo_push(layout, layout_tag, &dst, None).context("pushing the image")?;
        let secs = t.elapsed().as_secs_f64();
        println!("pushed {dst} in {secs:.1} s");
        Ok(secs)
    }

    /// `arbor convert --plain-http --json [--prefetch-list LIST] repo:src_tag repo:tag`; prints
    /// the layer sizes (and where the `startup_files` of the list went) and returns a JSON
    /// record of the conversion.
    pub fn convert(
        &self,
        arbor: &Path,
        repo: &str,
        src_tag: &str,
        tag: &str,
        startup: Startup<'_>,
        timeout: Duration,
    ) -> Result<Value> {
        check_interrupted()?;
        let dst = self.reference(repo, tag);
        let mut c = Command::new(arbor);
        c.args(["convert", "--plain-http", "--json"]);
        match startup {
            Startup::List(p, _) => {
                c.arg("--prefetch-list").arg(p);
            }
            Startup::None => {
                c.arg("--no-infer");
            }
            Startup::Inferred => {}
        }
        c.arg(self.reference(repo, src_tag)).arg(&dst);
        let desc = describe(&c);
        let t = Instant::now();
        let out = run_checked(&mut c, timeout)?;
        let secs = t.elapsed().as_secs_f64();
        let report: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let manifest = fetch_image_manifest(&self.addr(), repo, tag)?;
        let sizes = layer_sizes(&manifest.0)?;
        let missing = report
            .pointer("/images/0/prefetch_missing")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let placed: Vec<usize> = report
            .pointer("/images/0/layers")
            .and_then(Value::as_array)
            .map(|ls| {
                ls.iter()
                    .map(|l| l["prefetch"].as_array().map_or(0, Vec::len))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "converted to {dst} in {secs:.1} s: layers {} MB{}",
            sizes
                .iter()
                .map(|s| format!("{:.1}", *s as f64 / MB))
                .collect::<Vec<_>>()
                .join(" + "),
            match (startup, report.pointer("/images/0/inferred")) {
                (Startup::List(_, n), _) => format!(
                    "; prefetch files placed per layer {placed:?}, {missing} of {n} in no layer"
                ),
                (_, Some(i)) if !i.is_null() => format!(
                    "; start-up set inferred from the entrypoint: {} files, {:.1} MB, placed per layer {placed:?}",
                    i["files"],
                    i["bytes"].as_u64().unwrap_or(0) as f64 / MB
                ),
                _ => String::new(),
            }
        );
        if matches!(startup, Startup::List(..)) && missing > 0 {
            println!("  warning: {missing} start-up files were not placed in any layer");
        }
        Ok(json!({
            "tag": tag,
            "command": desc,
            "seconds": secs,
            "layer_sizes": sizes,
            "prefetch_placed_per_layer": placed,
            "prefetch_missing": missing,
        }))
    }
}

/// (threads, open fds, RSS bytes) of process `pid` ("self" for this one), from `/proc`.
pub fn proc_usage(pid: &str) -> Option<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((field("Threads:"), fds, field("VmRSS:") * 1024))
}
