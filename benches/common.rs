//! Helpers shared by the benchmark binaries (`arbor_benches::common`):
//! the cargo target directory, the Debian-package cache, running commands, machine facts and
//! median/min/max summaries.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

/// Sizes are reported in MB (10^6 bytes).
pub const MB: f64 = 1e6;

/// The cargo target directory: `$CARGO_TARGET_DIR`, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new("."))
            .join("target"),
    }
}

/// Maps each package to its `.deb` file name in `dir`, downloading the missing ones with
/// `apt-get download` (after `apt-get update` if the first attempt fails).
pub fn resolve_debs(dir: &Path, packages: &[&str]) -> Result<BTreeMap<String, String>> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| find_deb(dir, p).is_none())
        .collect();
    if !missing.is_empty() {
        println!("apt-get download {}", missing.join(" "));
        let download = || {
            run_quiet(
                Command::new("apt-get")
                    .arg("download")
                    .args(&missing)
                    .current_dir(dir),
            )
        };
        if let Err(e) = download() {
            println!("apt-get download failed ({e:#}); running apt-get update and retrying");
            run_quiet(Command::new("apt-get").arg("update"))?;
            download()?;
        }
    }
    packages
        .iter()
        .map(|p| {
            let f = find_deb(dir, p)
                .with_context(|| format!("no .deb for {p} in {} after download", dir.display()))?;
            Ok((p.to_string(), f))
        })
        .collect()
}

/// The newest `PKG_*.deb` in `dir` (package names cannot contain `_`).
pub fn find_deb(dir: &Path, package: &str) -> Option<String> {
    let prefix = format!("{package}_");
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let mtime = e.metadata().ok()?.modified().ok()?;
            (name.starts_with(&prefix) && name.ends_with(".deb")).then_some((mtime, name))
        })
        .max()
        .map(|(_, name)| name)
}

/// A command line as text.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The raw manifest (or index) of `reference`, via `skopeo inspect --raw` (plain HTTP, no
/// credentials).
pub fn inspect_raw(reference: &str) -> Result<Value> {
    let mut c = Command::new("skopeo");
    c.args(["inspect", "--raw", "--tls-verify=false", "--no-creds"])
        .arg(format!("docker://{reference}"));
    let out = run_quiet(&mut c)?;
    serde_json::from_str(&out).with_context(|| format!("manifest of {reference} is not JSON"))
}

/// Runs `cmd` to completion (stdout and stderr captured); an error with stderr if it fails.
pub fn run_quiet(cmd: &mut Command) -> Result<String> {
    let text = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {text}"))?;
    if !out.status.success() {
        bail!(
            "`{text}` failed ({}): {}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 20)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd`, killing it after `timeout`; returns (status, stdout, stderr).
pub fn run_timed(cmd: &mut Command, timeout: Duration) -> Result<(ExitStatus, String, String)> {
    run_timed_until(cmd, timeout, &|| false)
}

/// Like [`run_timed`], also killing the child (with an "interrupted" error) as soon as `stop`
/// returns true.
pub fn run_timed_until(
    cmd: &mut Command,
    timeout: Duration,
    stop: &dyn Fn() -> bool,
) -> Result<(ExitStatus, String, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning")?;
    let reader = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().context("no stdout pipe")?));
    let err = reader(Box::new(child.stderr.take().context("no stderr pipe")?));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        let why = if stop() {
            "interrupted".to_string()
        } else if Instant::now() >= deadline {
            format!("timed out after {timeout:?}")
        } else {
            thread::sleep(Duration::from_millis(2));
            continue;
        };
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "{why}; stderr: {}",
            tail(&err.join().unwrap_or_default(), 20)
        );
    };
    Ok((
        status,
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    ))
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn machine_info(arbor: &Path) -> Value {
    let version = |prog: &Path, arg: &str| {
        Command::new(prog)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                let s = String::from_utf8_lossy(&o.stdout);
                let e = String::from_utf8_lossy(&o.stderr);
                let v = if s.trim().is_empty() { e } else { s };
                v.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_else(|| "unknown".into())
    };
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let mem_total = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024);
    json!({
        "nproc": thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_model": cpu_model,
        "mem_total_bytes": mem_total,
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "os": fs::read_to_string("/etc/os-release").unwrap_or_default().lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME=")).map(|v| v.trim_matches('"').to_string()),
        "arbor_version": version(arbor, "--version"),
        "skopeo_version": version(Path::new("skopeo"), "--version"),
        "registry_version": version(Path::new("docker-registry"), "--version"),
    })
}

/// Median, minimum and maximum.
#[derive(Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }

    pub fn to_json(self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max})
    }
}

/// Checks what every bench needs before it starts: the arbor binary, the external `tools`,
/// and root (`why_root` says what for).
pub fn preflight(arbor: &Path, tools: &[&str], why_root: &str) -> Result<()> {
    ensure!(
        arbor.is_file(),
        "arbor binary {} not found (cargo build --release -p arbor-cli, or --arbor PATH)",
        arbor.display()
    );
    for tool in tools {
        ensure!(
            arbor_testkit::find_in_path(tool).is_some(),
            "`{tool}` not found (run scripts/setup.sh)"
        );
    }
    ensure!(arbor_testkit::is_root(), "must run as root: {why_root}");
    Ok(())
}

/// Prints the machine and tool versions of [`machine_info`].
pub fn print_machine(machine: &Value) {
    println!(
        "machine: {} cores, {}, {:.1} GB RAM, kernel {}",
        machine["nproc"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["mem_total_bytes"].as_f64().unwrap_or(0.0) / 1e9,
        machine["kernel"].as_str().unwrap_or("?"),
    );
    println!(
        "tools: {} | {} | {}",
        machine["arbor_version"].as_str().unwrap_or("?"),
        machine["skopeo_version"].as_str().unwrap_or("?"),
        machine["registry_version"].as_str().unwrap_or("?"),
    );
}

/// The first line `cmd` prints (a version banner), trimmed; "unknown" if it cannot run.
pub fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A registry client speaking plain HTTP (the benches' loopback registries), no credentials.
pub fn plain_http_client() -> Result<arbor_oci::registry::RegistryClient> {
    Ok(arbor_oci::registry::RegistryClient::new(
        arbor_oci::registry::ClientOptions {
            plain_http: true,
            ..Default::default()
        },
        arbor_oci::auth::CredentialStore::default(),
    )?)
}
