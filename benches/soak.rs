//! `bench-soak`: a node under faults for a while, and nothing leaks.
//!
//! One `arbord` (its root on a small loop-mounted ext4, its chunk cache on a budget smaller than
//! the working set, `--cache-mib`, and 2 MiB in memory) and
//! one containerd, three converted images behind a fault proxy in front of a loopback
//! `docker-registry`. For `--minutes`, every `--step-ms` one random action:
//!
//! * start a container (`ctr run --rm --snapshotter arbor`) that checksums its image's files
//!   in a loop, or stop one;
//! * restart arbord with SIGTERM, or crash it (SIGKILL) and start it again (its layers are
//!   handed over / adopted through the fd holder);
//! * turn registry faults on (errors, resets, stalls, truncated, corrupt and wrong-range
//!   answers for a share of blob requests) or off;
//! * fill the loop filesystem to the last byte, or free it again;
//! * drop the page cache (so reads reach FUSE, and evicted chunks the registry).
//!
//! Checked throughout: no wrong byte (every checksum a container prints is its file's); every
//! running container keeps reading (a container silent for `--stall-limit-s` fails the run;
//! failed reads, EIO during faults or a full disk, are counted, not failures). Checked at the
//! end (containers stopped, arbord stopped with SIGTERM and started again): arbord's threads
//! and fds back near their level after the first start, exactly one fd holder keeping exactly
//! the mounted layers, no overlay or snapshot of a stopped container left, RSS bounded (its
//! curve is printed). Prints a table of samples and writes JSON (`--json`).
//!
//! Needs root, containerd, runc, docker-registry, skopeo, mkfs.ext4.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use arbor_benches::common::{self, MB, target_dir};
use arbor_benches::harness;
use arbor_testkit::{
    Arbord, ArbordOptions, Containerd, ContainerdOptions, Entry, FaultProxy, Registry, XorShift64,
    busybox_image, mounts_below, pseudo_random_bytes, skopeo_push, write_oci_layout,
};
use clap::Parser;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(name = "bench-soak", about, long_about = None)]
struct Args {
    /// How long to run.
    #[arg(long, default_value_t = 3.0)]
    minutes: f64,
    /// Time between two actions.
    #[arg(long, default_value_t = 2000)]
    step_ms: u64,
    /// arbord's chunk cache on disk, MiB (the working set, 3 x 4 MiB of files, does not fit
    /// the default: evicted chunks are fetched again, through the faults).
    #[arg(long, default_value_t = 6)]
    cache_mib: u64,
    /// Containers running at most.
    #[arg(long, default_value_t = 4)]
    max_containers: usize,
    /// A running container silent this long fails the run.
    #[arg(long, default_value_t = 90)]
    stall_limit_s: u64,
    /// Seed of the action sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// `arbord` [default: target/release/arbord].
    #[arg(long)]
    arbord: Option<PathBuf>,
    /// `arbor` [default: next to arbord].
    #[arg(long)]
    arbor: Option<PathBuf>,
    /// JSON report.
    #[arg(long, default_value = "target/bench-soak.json")]
    json: PathBuf,
}

const IMAGES: usize = 3;
const FILES: usize = 16;
const FILE_SIZE: usize = 256 << 10;
/// The container's loop: a line per file, its checksum or ERR.
const LOOP: &str = r#"while true; do for f in /data/*; do s=$(sha256sum $f 2>/dev/null) || s="ERR $f"; echo "$s"; done; done"#;

/// The small filesystem arbord's root lives on.
struct LoopFs {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl LoopFs {
    fn new(size_mb: u64) -> Result<LoopFs> {
        let tmp = tempfile::Builder::new()
            .prefix("bench-soak-fs-")
            .tempdir()?;
        let img = tmp.path().join("fs.img");
        std::fs::File::create(&img)?.set_len(size_mb << 20)?;
        common::run_quiet(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img))?;
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir)?;
        common::run_quiet(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&dir),
        )?;
        Ok(LoopFs { dir, _tmp: tmp })
    }
    fn filler(&self) -> PathBuf {
        self.dir.join("filler")
    }
    /// Fills the filesystem to the last block.
    fn fill(&self) {
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "status=none"])
            .arg(format!("of={}", self.filler().display()))
            .stderr(Stdio::null())
            .status();
    }
    fn free(&self) {
        let _ = std::fs::remove_file(self.filler());
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Everything below, the loop filesystem itself included (lazily).
        harness::unmount_below(&self.dir);
    }
}

/// One running container and what it printed.
struct Running {
    id: String,
    child: Child,
    reader: std::thread::JoinHandle<()>,
}

#[derive(Default)]
struct Seen {
    /// Per container id: when it last printed.
    last: BTreeMap<String, Instant>,
    good: u64,
    failed: u64,
    wrong: Vec<String>,
}

/// (threads, fds, RSS bytes) of `pid`.
fn usage(pid: u32) -> Option<(u64, u64, u64)> {
    harness::proc_usage(&pid.to_string())
}

fn main() {
    harness::main_with(run)
}

fn run() -> Result<bool> {
    let a = Args::parse();
    let arbord_bin = a
        .arbord
        .clone()
        .unwrap_or_else(|| target_dir().join("release/arbord"));
    let arbor = a
        .arbor
        .clone()
        .unwrap_or_else(|| arbord_bin.with_file_name("arbor"));
    common::preflight(
        &arbor,
        &[
            "docker-registry",
            "skopeo",
            "containerd",
            "ctr",
            "runc",
            "mkfs.ext4",
        ],
        "mounts FUSE and loop filesystems and runs containerd",
    )?;
    let work = tempfile::Builder::new().prefix("bench-soak-").tempdir()?;
    let reg = Registry::start()?;
    let proxy = FaultProxy::start(&reg.addr(), Duration::from_secs(2))?;

    // Three images: busybox and a data layer of random files each.
    let mut want: Vec<BTreeMap<String, String>> = Vec::new();
    let mut refs = Vec::new();
    for i in 0..IMAGES {
        let mut sums = BTreeMap::new();
        let mut app = vec![Entry::dir("data")];
        for f in 0..FILES {
            let data = pseudo_random_bytes((i * 100 + f) as u64 + 1, FILE_SIZE);
            sums.insert(format!("/data/f{f:02}"), hex::encode(Sha256::digest(&data)));
            app.push(Entry::file(format!("data/f{f:02}"), data));
        }
        want.push(sums);
        let layout = work.path().join(format!("layout{i}"));
        write_oci_layout(&layout, "v1", &busybox_image(app, &["sh"]))?;
        let src = reg.reference(&format!("soak/app{i}:v1"));
        skopeo_push(&layout, "v1", &src, None)?;
        let dst = reg.reference(&format!("soak/app{i}:arbor"));
        common::run_quiet(Command::new(&arbor).args(["convert", "--plain-http", &src, &dst]))?;
        // Pulled (and later fetched) through the fault proxy.
        refs.push(format!("{}/soak/app{i}:arbor", proxy.addr()));
    }

    let fs = LoopFs::new(192)?;
    let root = fs.dir.join("root");
    let mut arbord = Arbord::start(&ArbordOptions {
        bin: arbord_bin.clone(),
        root: Some(root.clone()),
        config: Some(format!(
            "[cache]\ndisk_size = \"{}MiB\"\nmemory_size = \"2MiB\"\n[fetch]\ntimeout_secs = 10\n",
            a.cache_mib
        )),
        ..Default::default()
    })?;
    let ctd = Containerd::start_with(&ContainerdOptions {
        extra_config: arbord.containerd_config(),
        cri: false,
    })?;
    for r in &refs {
        common::run_quiet(
            Command::new(&arbor)
                .args(["pull", "--plain-http", "--address"])
                .arg(ctd.socket())
                .args(["--namespace", ctd.namespace(), r])
                .env("ARBORD_ROOT", arbord.root()),
        )
        .with_context(|| format!("arbor pull {r}"))?;
    }
    let layer_mounts = mounts_below(&root).len();
    let base = usage(arbord.pid().context("arbord pid")?).context("arbord usage")?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let want = Arc::new(want);
    let mut running: Vec<Running> = Vec::new();
    let counter = AtomicU64::new(0);
    let start_one = |image: usize| -> Result<Running> {
        let id = format!("soak-{}", counter.fetch_add(1, Ordering::Relaxed));
        let mut child = ctd
            .arbor_run_command(&refs[image], &id, &["sh", "-c", LOOP])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = child.stdout.take().context("stdout")?;
        let (seen, want, cid) = (Arc::clone(&seen), Arc::clone(&want), id.clone());
        seen.lock()
            .unwrap()
            .last
            .insert(cid.clone(), Instant::now());
        let reader = std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let mut s = seen.lock().unwrap();
                s.last.insert(cid.clone(), Instant::now());
                let mut it = l.split_whitespace();
                match (it.next(), it.next()) {
                    (Some("ERR"), _) => s.failed += 1,
                    (Some(sum), Some(path))
                        if want[image].get(path).map(String::as_str) == Some(sum) =>
                    {
                        s.good += 1
                    }
                    _ => s.wrong.push(format!("{cid}: {l}")),
                }
            }
        });
        Ok(Running { id, child, reader })
    };
    let stop_one = |r: Running| {
        let _ = ctd.ctr(&["task", "kill", "-s", "KILL", &r.id]);
        let mut child = r.child;
        harness::terminate(&mut child, Duration::from_secs(20));
        let _ = r.reader.join();
        let _ = ctd.ctr(&["container", "rm", &r.id]);
        seen.lock().unwrap().last.remove(&r.id);
    };

    let mut rng = XorShift64::new(a.seed);
    let mut samples: Vec<Value> = Vec::new();
    let mut actions: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut chaos, mut full) = (false, false);
    let began = Instant::now();
    let until = Duration::from_secs_f64(a.minutes * 60.0);
    let mut problems = Vec::new();
    println!("| t (s) | action | containers | arbord threads | fds | RSS | reads ok | failed |");
    println!("|---|---|---|---|---|---|---|---|");
    while began.elapsed() < until {
        harness::check_interrupted()?;
        let action = match rng.next_u64() % 10 {
            0..=2 if running.len() < a.max_containers => "start",
            0..=3 if !running.is_empty() => "stop",
            4 => "restart",
            5 => "crash",
            6 => "faults",
            7 => "disk",
            _ => "drop-caches",
        };
        *actions.entry(action).or_default() += 1;
        match action {
            "start" => running.push(start_one((rng.next_u64() % IMAGES as u64) as usize)?),
            "stop" => {
                let i = (rng.next_u64() % running.len() as u64) as usize;
                stop_one(running.swap_remove(i));
            }
            "restart" => arbord.restart().context("arbord restart")?,
            "crash" => {
                arbord.kill()?;
                std::thread::sleep(Duration::from_millis(300));
                arbord.restart().context("arbord start after SIGKILL")?;
            }
            "faults" => {
                chaos = !chaos;
                if chaos {
                    proxy.chaos(60);
                } else {
                    proxy.heal();
                }
            }
            "disk" => {
                full = !full;
                if full {
                    fs.fill();
                } else {
                    fs.free();
                }
            }
            _ => {
                let _ = harness::drop_caches();
            }
        }
        std::thread::sleep(Duration::from_millis(a.step_ms));
        // Invariants.
        let s = seen.lock().unwrap();
        if !s.wrong.is_empty() {
            bail!("wrong bytes read: {:?}", &s.wrong[..s.wrong.len().min(5)]);
        }
        if let Some((id, t)) = s.last.iter().max_by_key(|(_, t)| t.elapsed())
            && t.elapsed() > Duration::from_secs(a.stall_limit_s)
        {
            problems.push(format!("container {id} silent for {:?}", t.elapsed()));
            break;
        }
        let u = arbord.pid().and_then(usage).unwrap_or((0, 0, 0));
        let t = began.elapsed().as_secs_f64();
        samples.push(
            json!({"t": t, "action": action, "containers": running.len(),
            "threads": u.0, "fds": u.1, "rss": u.2, "reads_ok": s.good, "reads_failed": s.failed,
            "chaos": chaos, "disk_full": full}),
        );
        println!(
            "| {t:.0} | {action} | {} | {} | {} | {:.1} MB | {} | {} |",
            running.len(),
            u.0,
            u.1,
            u.2 as f64 / MB,
            s.good,
            s.failed
        );
    }

    // The end: faults off, disk freed, containers stopped, arbord restarted once more.
    proxy.heal();
    fs.free();
    for r in running.drain(..) {
        stop_one(r);
    }
    arbord.restart().context("final arbord restart")?;
    std::thread::sleep(Duration::from_secs(2));
    let end = usage(arbord.pid().context("arbord pid")?).context("arbord usage")?;
    let holders = arbord.fd_holders();
    let holder_fd_kinds = holders.first().map(|&p| fd_kinds(p)).unwrap_or_default();
    let holder_fds: usize = holder_fd_kinds.values().sum();
    let mounts = mounts_below(&root).len();
    let overlays = mounts_below(ctd.base_dir()).len();
    let snapshots = ctd
        .ctr(&["snapshot", "--snapshotter", "arbor", "ls"])?
        .lines()
        .skip(1)
        .count();
    let s = seen.lock().unwrap();
    println!(
        "\n{:.1} min, actions {actions:?}: {} reads checked, {} failed (faults, full disk), 0 wrong",
        began.elapsed().as_secs_f64() / 60.0,
        s.good,
        s.failed
    );
    println!(
        "arbord after the first pulls: {} threads, {} fds, {:.1} MB; at the end (restarted): {} threads, {} fds, {:.1} MB",
        base.0,
        base.1,
        base.2 as f64 / MB,
        end.0,
        end.1,
        end.2 as f64 / MB
    );
    let rss: Vec<f64> = samples.iter().filter_map(|v| v["rss"].as_f64()).collect();
    let peak = rss.iter().cloned().fold(0.0, f64::max);
    println!(
        "RSS curve (MB): {}",
        rss.iter()
            .map(|r| format!("{:.0}", r / MB))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "fd holders {}, holding {} fds ({}); layer mounts {mounts} (after the pulls {layer_mounts}); mounts under containerd {overlays}; arbor snapshots {snapshots}",
        holders.len(),
        holder_fds,
        holder_fd_kinds
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    check(s.good > 0, "no read was checked".into());
    check(holders.len() == 1, format!("{} fd holders", holders.len()));
    check(
        mounts == layer_mounts,
        format!("{mounts} layer mounts, {layer_mounts} expected"),
    );
    check(
        overlays == 0,
        format!("{overlays} mounts left under containerd"),
    );
    check(
        end.0 <= base.0 + 4,
        format!("threads grew: {} -> {}", base.0, end.0),
    );
    check(
        end.1 <= base.1 + 8,
        format!("fds grew: {} -> {}", base.1, end.1),
    );
    // The holder keeps one fd per layer mount, plus its three stdio fds, its listener and
    // arbord's connection: nothing inherited, nothing of a connection that ended.
    let fuse_fds = holder_fd_kinds.get("/dev/fuse").copied().unwrap_or(0);
    check(
        fuse_fds == layer_mounts,
        format!("fd holder keeps {fuse_fds} FUSE connections for {layer_mounts} layer mounts"),
    );
    check(
        holder_fds - fuse_fds <= 5,
        format!("fd holder keeps {holder_fds} fds: {holder_fd_kinds:?}"),
    );
    check(
        peak < 512.0 * MB,
        format!("arbord RSS peaked at {:.0} MB", peak / MB),
    );
    for p in &problems {
        println!("PROBLEM: {p}");
    }
    let report = harness::report(
        "soak",
        common::machine_info(&arbor),
        json!({
            "minutes": a.minutes, "seed": a.seed, "actions": actions,
            "reads_ok": s.good, "reads_failed": s.failed, "problems": problems,
            "base": {"threads": base.0, "fds": base.1, "rss": base.2},
            "end": {"threads": end.0, "fds": end.1, "rss": end.2},
            "layer_mounts": mounts, "snapshots": snapshots, "samples": samples,
        }),
    );
    harness::write_json(&a.json, &report)?;
    drop(s);
    ensure!(
        problems.is_empty(),
        "{} invariant(s) broken",
        problems.len()
    );
    Ok(true)
}

/// What a process's fds are, counted by kind: `/dev/fuse` (kept connections), sockets, files
/// (their paths) and the rest by `readlink` target type.
fn fd_kinds(pid: u32) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for e in dir.flatten() {
        let target = std::fs::read_link(e.path())
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "?".into());
        let kind = if target.starts_with("socket:") {
            "socket".to_string()
        } else if let Some((k, _)) = target.split_once(":[") {
            k.to_string()
        } else {
            target
        };
        *out.entry(kind).or_insert(0) += 1;
    }
    out
}
