//! `bench-lazy-start`: time to a started Python data-science function through Arbor, against
//! downloading and unpacking the whole image first, from a registry behind a shaped link.
//!
//! The image is built from Debian packages (cached with bench-convert's `.deb`s in
//! `target/bench-cache/debs`) into three layers: `base` (libc and the libraries Python links),
//! `python` (CPython 3.11 and pure-Python dependencies) and `scientific` (numpy, scipy, pandas,
//! OpenBLAS, and what Debian's python3-scipy depends on besides: pythran and the Boost
//! headers, which nothing imports). What the packages' maintainer scripts would have done is
//! done too, in the layer of the package: the BLAS/LAPACK alternatives symlinks, `ld.so.cache`
//! (`ldconfig -X -r`) and byte-compiled modules (`python3.11 -m compileall`, as `py3compile`
//! does; timestamp-checked `.pyc` files next to their sources).
//!
//! The start-up file set is found for real: Python runs chrooted into the image's root (with
//! `/proc` mounted) and imports the modules (`--imports`, default numpy, pandas, scipy.stats)
//! under an audit hook that records every `open` (`.pyc` files, data files) and, at each open
//! and import, any file newly mapped into the process (`/proc/self/maps`: the interpreter,
//! `ld.so`, shared libraries and extension modules); modules loaded before the hook come from
//! `sys.modules`. Paths are resolved inside the image, non-regular files dropped, duplicates
//! removed; the list (open order) is cached next to the image as `startup-files.txt`.
//!
//! Each run starts a `docker-registry` in a private network namespace behind a veth pair
//! shaped with `tbf` to `--rate` in both directions (default 1 Gbit/s; `tbf` adds no delay),
//! pushes the image, and converts it twice with `arbor convert` (plain, and with
//! `--prefetch-list startup-files.txt`). Then, per repetition, with page caches dropped and
//! fresh directories (and a fresh Arbor chunk cache) for every run:
//!
//! * **full pull**: what a node without Arbor does, implemented like containerd's pull with
//!   the overlayfs snapshotter: manifest, config, then up to 3 layer blobs downloaded at once
//!   into a content store (sha256-verified, fsynced), each layer unpacked (gzip → tar) into its
//!   own snapshot directory as soon as it and the layers below it are there, the snapshots
//!   stacked read-only with overlayfs;
//! * **containerd** (when containerd is installed; `--no-containerd` skips it): the real
//!   thing, `ctr image pull --snapshotter overlayfs` into a private containerd 1.6, then
//!   `ctr images mount`; this calibrates the full pull above;
//! * **arbor**: `arbor mount --no-prefetch-rest` of the plain converted image (on demand only);
//! * **arbor+prefetch**: the same with the prefetch-list image (its prefetch section is
//!   fetched in the background from the moment it is mounted);
//!
//! followed by one of two workloads: reading every file of the start-up set in order, fully
//! (an upper bound of what Python reads: it maps shared libraries and touches parts), or
//! actually running `python3.11 -c 'import ...'` chrooted into the mounted image (skipped with
//! `--no-python`). A run's time is from the start of the pull (or the spawn of `arbor mount`)
//! until the workload is done. Bytes from the registry are the blob, manifest and config sizes
//! for the pulls and Arbor's `arbor_fetch_bytes_total{source="registry"}` (metrics endpoint)
//! for Arbor; the bytes counted on the link (host veth, namespace → host) include everything
//! (TOC reads, HTTP).
//!
//! After each read run the start-up set is read again through the same mount and checked
//! against the image (size, sha256, mtime, and for `.pyc` files that the source's mtime and
//! size match what the `.pyc` records, or Python would recompile). A mismatch makes the exit
//! status non-zero; slow results never do; failing tools do.

use arbor_benches::{common, harness, pyimage};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use arbor_testkit::netns::Namespace;
use arbor_testkit::{Containerd, find_in_path};
use clap::Parser;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use common::{MB, Spread, describe, machine_info, preflight, run_quiet, target_dir};
use harness::{
    INTERRUPTED, LinkArgs, MountGuard, Remote, Startup, TAG_ARBOR, TAG_PREFETCH, TAG_SOURCE,
    WorkDir, check_interrupted, detach, drop_caches, fetch_image_manifest, http_get, layer_sizes,
    loadavg, run_checked, unmount_below, write_json,
};
use pyimage::{
    CacheArgs, Image, PYTHON, Recipe, StartupFile, chroot_python, hex, prepare_image, pyc_source,
};

/// Bump when the way the image or the start-up set is built changes.
const RECIPE_VERSION: u32 = 1;
const LAYOUT_TAG: &str = "lazy-start";
const REPO: &str = "bench/lazy-start";
/// What the Python workload prints when the imports succeeded.
const PY_OK: &str = "arbor-lazy-start-ok";
/// Longest wait for `arbor mount` to come up and to exit after `umount`.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(120);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Layer blobs downloaded at once by the full pull (containerd's default
/// `max_concurrent_downloads`).
const PULL_CONCURRENCY: usize = 3;

const AFTER_HELP: &str = "\
Times are wall seconds, medians over --reps (min-max in brackets). \"prepare\" is the pull
and unpack (full, containerd) or the time until `arbor mount` said it was mounted; the
workload (read or import) follows. MB are 10^6 bytes: \"registry MB\" is what the method asked
the registry for, \"link MB\" what crossed the shaped link (namespace to host). speed-up is
the full pull's median time over the row's; bytes/ is the full pull's registry bytes over
the row's.

Needs root (network namespaces, drop_caches, FUSE and overlay mounts, chroot, dpkg-deb
keeping owners), iproute2 (ip, tc with tbf), docker-registry, skopeo, dpkg-deb, apt-get,
ldconfig, chroot, mount, and release builds of arbor and this bench
(cargo build --release -p arbor-cli -p arbor-benches). containerd and ctr are optional.

Examples:
  benches/run-lazy-start.sh
  benches/run-lazy-start.sh --rate 100mbit --reps 5
  target/release/bench-lazy-start --no-python --no-containerd --reps 1";

#[derive(Parser)]
#[command(
    name = "bench-lazy-start",
    about = "Time to a started Python function: Arbor's lazy mount vs a full image pull",
    long_about = "Reads the files a Python interpreter opens to import numpy, pandas and \
                  scipy (and runs that import) through `arbor mount` from a registry behind a \
                  shaped link, against downloading and unpacking the whole image first \
                  (containerd-style, and real containerd when installed). Prints median times \
                  and bytes per method and writes JSON.",
    after_help = AFTER_HELP
)]
struct Args {
    #[command(flatten)]
    link: LinkArgs,
    /// Repetitions; each runs every method and workload once, rotating the order.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// The modules the function imports at start-up (Python syntax after `import`).
    #[arg(long, default_value = "numpy, pandas, scipy.stats")]
    imports: String,
    /// Skip the workload that runs the Python import itself.
    #[arg(long)]
    no_python: bool,
    /// Skip the real containerd pull even if containerd is installed.
    #[arg(long)]
    no_containerd: bool,
    #[command(flatten)]
    cache: CacheArgs,
    /// The arbor binary [default: <target dir>/release/arbor].
    #[arg(long, value_name = "PATH")]
    arbor: Option<PathBuf>,
    /// Extra argument for `arbor mount` (repeatable), e.g. --mount-arg=--fetch-unit=1MiB.
    #[arg(long = "mount-arg", value_name = "ARG", allow_hyphen_values = true)]
    mount_args: Vec<String>,
    /// Where to write the JSON results [default: <target dir>/bench/lazy_start.json].
    #[arg(long, value_name = "PATH")]
    json_out: Option<PathBuf>,
    /// Where runs put pulled layers, chunk caches and mount points [default: $TMPDIR].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Time limit of one tool run (push, convert, pull, workload), in seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

// ---------------------------------------------------------------------------------------------
// Main

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    Full,
    Containerd,
    Arbor,
    ArborPrefetch,
}

impl Method {
    fn key(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Containerd => "containerd",
            Method::Arbor => "arbor",
            Method::ArborPrefetch => "arbor+prefetch",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Method::Full => "full pull+unpack",
            Method::Containerd => "containerd pull",
            Method::Arbor => "arbor, on demand",
            Method::ArborPrefetch => "arbor, prefetch list",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Read,
    Python,
}

impl Workload {
    fn key(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Python => "python",
        }
    }
}

fn main() {
    harness::main_with(run);
}

/// Ok(false): everything ran but a verification failed.
fn run() -> Result<bool> {
    let args = Args::parse();
    let target = target_dir();
    let cache_dir = args
        .cache
        .dir
        .clone()
        .unwrap_or_else(|| target.join("bench-cache"));
    let arbor = args
        .arbor
        .clone()
        .unwrap_or_else(|| target.join("release/arbor"));
    let json_out = args
        .json_out
        .clone()
        .unwrap_or_else(|| target.join("bench/lazy_start.json"));
    let timeout = Duration::from_secs(args.timeout);

    preflight(
        &arbor,
        harness::TOOLS,
        "network namespaces, mounts, drop_caches, chroot",
    )?;
    let use_containerd = !args.no_containerd
        && ["containerd", "ctr", "runc"]
            .iter()
            .all(|t| find_in_path(t).is_some());

    let mut machine = machine_info(&arbor);
    machine["loadavg_at_start"] = json!(loadavg());
    println!(
        "machine: {} cores, {}, {:.1} GB RAM, kernel {}; {}",
        machine["nproc"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["mem_total_bytes"].as_f64().unwrap_or(0.0) / 1e9,
        machine["kernel"].as_str().unwrap_or("?"),
        machine["arbor_version"].as_str().unwrap_or("?"),
    );

    let recipe = Recipe {
        name: LAYOUT_TAG,
        version: RECIPE_VERSION,
        layers: pyimage::SCIENTIFIC_LAYERS.iter().collect(),
        wheels: None,
        app: Vec::new(),
        startup_code: format!("import {}", args.imports),
        startup_label: format!("`import {}`", args.imports),
        entrypoint: Vec::new(),
        cmd: vec![PYTHON.into()],
        env: vec![pyimage::PATH_ENV.into()],
    };
    let image = prepare_image(&cache_dir, &recipe, args.cache.rebuild)?;
    image.print();
    check_interrupted()?;

    let work_base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = WorkDir::create(&work_base, "arbor-lazy-start-")?;

    let remote = Remote::start(args.link.rate, args.link.tbf_latency_ms)?;
    let addr = remote.addr();
    let push_s = remote.push(&image.layout, LAYOUT_TAG, REPO, TAG_SOURCE)?;
    let mut converts = Vec::new();
    for (tag, prefetch) in [
        (TAG_ARBOR, Startup::None),
        (
            TAG_PREFETCH,
            Startup::List(image.prefetch_list.as_path(), image.startup.len()),
        ),
    ] {
        converts.push(remote.convert(&arbor, REPO, TAG_SOURCE, tag, prefetch, timeout)?);
    }
    let source_manifest = fetch_image_manifest(&addr, REPO, TAG_SOURCE)?;
    let source_sizes = layer_sizes(&source_manifest.0)?;

    let caches_dropped = drop_caches();
    if !caches_dropped {
        println!("warning: cannot write /proc/sys/vm/drop_caches; runs start with warm caches");
    }

    let mut methods = vec![Method::Full];
    if use_containerd {
        methods.push(Method::Containerd);
    }
    methods.extend([Method::Arbor, Method::ArborPrefetch]);
    let mut workloads = vec![Workload::Read];
    if !args.no_python {
        workloads.push(Workload::Python);
    }
    let ctx = Ctx {
        arbor: &arbor,
        mount_args: &args.mount_args,
        addr: &addr,
        ns: &remote.ns,
        image: &image,
        imports: &args.imports,
        timeout,
    };
    let mut runs: Vec<RunResult> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    println!();
    for rep in 0..args.reps {
        let mut order = methods.clone();
        order.rotate_left(rep as usize % methods.len());
        for &workload in &workloads {
            for &method in &order {
                check_interrupted()?;
                let dir = work
                    .path()
                    .join(format!("r{rep}-{}-{}", method.key(), workload.key()));
                fs::create_dir_all(&dir)?;
                let r = run_once(&ctx, method, workload, &dir).with_context(|| {
                    format!("rep {}: {} {}", rep + 1, method.key(), workload.key())
                })?;
                // Nothing is mounted below `dir` any more.
                fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
                println!(
                    "rep {}/{} {:<6} {:<15} {:>7.2} s (prepare {:>6.2} s, {} {:>6.2} s)  registry {:>7.1} MB  link {:>7.1} MB{}{}",
                    rep + 1,
                    args.reps,
                    workload.key(),
                    method.key(),
                    r.total_s,
                    r.prepare_s,
                    workload.key(),
                    r.work_s,
                    r.registry_bytes as f64 / MB,
                    r.link_bytes as f64 / MB,
                    r.arbor_cpu_s
                        .map(|(u, s)| format!("  arbor cpu {u:.2} s user {s:.2} s sys"))
                        .unwrap_or_default(),
                    if r.problems.is_empty() {
                        String::new()
                    } else {
                        format!("  VERIFY FAILED: {} problems", r.problems.len())
                    }
                );
                for p in r.problems.iter().take(10) {
                    println!("    {p}");
                    failures.push(format!(
                        "rep {} {} {}: {p}",
                        rep + 1,
                        method.key(),
                        workload.key()
                    ));
                }
                failures.extend(
                    r.problems.iter().skip(10).map(|p| {
                        format!("rep {} {} {}: {p}", rep + 1, method.key(), workload.key())
                    }),
                );
                runs.push(RunResult { rep: rep + 1, ..r });
            }
        }
    }
    drop(remote);
    drop(work);

    harness::print_load(&mut machine);
    println!();
    let summary = summarize(&runs, &methods, &workloads);
    print_summary(&summary, &image, &args, &methods, &workloads);

    let mount_args_json: Vec<String> = std::iter::once("--no-prefetch-rest".to_string())
        .chain(args.mount_args.iter().cloned())
        .collect();
    let fields = json!({
        "link": args.link.to_json(),
        "image": image.to_json(&source_sizes),
        "push_seconds": push_s,
        "converts": converts,
        "reps": args.reps,
        "caches_dropped": caches_dropped,
        "full_pull": "containerd-like: manifest, config, up to 3 layer blobs at once into a \
                      content store (sha256-verified, fsynced), each layer gunzipped and untarred \
                      into its own snapshot dir as soon as it and the layers below are there, \
                      snapshots stacked read-only with overlayfs",
        "arbor_mount_args": mount_args_json,
        "runs": runs.iter().map(RunResult::to_json).collect::<Vec<_>>(),
        "summary": summary,
        "failures": failures,
    });
    let report = harness::report("lazy_start", machine, fields);
    write_json(&json_out, &report)?;
    println!("\nJSON results: {}", json_out.display());

    if !failures.is_empty() {
        eprintln!(
            "error: {} verification problems (bytes or metadata read differ from the image)",
            failures.len()
        );
        return Ok(false);
    }
    Ok(true)
}

#[derive(Clone)]
struct Descriptor {
    digest: String,
    size: u64,
    media_type: String,
}

impl Descriptor {
    fn of(v: &Value) -> Result<Descriptor> {
        Ok(Descriptor {
            digest: v["digest"]
                .as_str()
                .context("descriptor without digest")?
                .into(),
            size: v["size"].as_u64().context("descriptor without size")?,
            media_type: v["mediaType"].as_str().unwrap_or("").into(),
        })
    }
}

/// Streams blob `d` into `out`, verifying size and sha256, then fsyncs it.
fn fetch_blob(
    addr: &str,
    repo: &str,
    d: &Descriptor,
    out: &Path,
    cancel: &AtomicBool,
) -> Result<()> {
    let mut r = http_get(addr, &format!("/v2/{repo}/blobs/{}", d.digest), "*/*")?;
    ensure!(r.status == 200, "GET blob {}: HTTP {}", d.digest, r.status);
    let mut f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        if cancel.load(Ordering::Relaxed) || INTERRUPTED.load(Ordering::Relaxed) {
            bail!("download of {} cancelled", d.digest);
        }
        let k = r
            .read(&mut buf)
            .with_context(|| format!("reading blob {}", d.digest))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        f.write_all(&buf[..k])?;
        n += k as u64;
    }
    ensure!(
        n == d.size,
        "blob {}: {n} bytes, expected {}",
        d.digest,
        d.size
    );
    let got = format!("sha256:{}", hex(&h.finalize()));
    ensure!(got == d.digest, "blob {} has digest {got}", d.digest);
    f.sync_all()?;
    Ok(())
}

/// Unpacks a (gzip) layer blob into `dir`, keeping owners, modes, mtimes and xattrs.
fn unpack_layer(blob: &Path, media_type: &str, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    let f = BufReader::with_capacity(1 << 20, File::open(blob)?);
    let r: Box<dyn Read> = if media_type.ends_with("gzip") {
        Box::new(flate2::read::GzDecoder::new(f))
    } else if media_type.ends_with(".tar") || media_type.ends_with("tar") {
        Box::new(f)
    } else {
        bail!("layer media type {media_type} is not supported by the full pull");
    };
    let mut a = tar::Archive::new(r);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    a.set_preserve_mtime(true);
    a.set_unpack_xattrs(true);
    a.set_overwrite(true);
    a.unpack(dir)
        .with_context(|| format!("unpacking {} into {}", blob.display(), dir.display()))
}

/// Bytes asked from the registry, when the last blob was there, the snapshot dirs (bottom
/// first).
struct Pulled {
    registry_bytes: u64,
    download_s: f64,
    snapshots: Vec<PathBuf>,
}

/// The containerd-like full pull (see the module docs).
fn full_pull(addr: &str, reference: &str, work: &Path, t0: Instant) -> Result<Pulled> {
    let (manifest, mut bytes) = fetch_image_manifest(addr, REPO, reference)?;
    let content = work.join("content");
    fs::create_dir_all(&content)?;
    let cancel = AtomicBool::new(false);
    let config = Descriptor::of(&manifest["config"])?;
    fetch_blob(addr, REPO, &config, &content.join("config"), &cancel)?;
    bytes += config.size;
    let layers: Vec<Descriptor> = manifest["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .map(Descriptor::of)
        .collect::<Result<_>>()?;
    bytes += layers.iter().map(|l| l.size).sum::<u64>();
    let blob_path = |i: usize| content.join(format!("layer-{i}"));
    let snapshots: Vec<PathBuf> = (0..layers.len())
        .map(|i| work.join(format!("snapshots/{i}")))
        .collect();
    let next = AtomicUsize::new(0);
    let download_s = thread::scope(|s| -> Result<f64> {
        let (tx, rx) = mpsc::channel::<(usize, Result<f64>)>();
        for _ in 0..PULL_CONCURRENCY.min(layers.len()) {
            let tx = tx.clone();
            let (layers, next, cancel, blob_path) = (&layers, &next, &cancel, &blob_path);
            s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= layers.len() {
                        break;
                    }
                    let r = fetch_blob(addr, REPO, &layers[i], &blob_path(i), cancel)
                        .map(|()| t0.elapsed().as_secs_f64());
                    let failed = r.is_err();
                    let _ = tx.send((i, r));
                    if failed {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let result = (|| -> Result<f64> {
            let mut done: Vec<Option<f64>> = vec![None; layers.len()];
            for i in 0..layers.len() {
                while done[i].is_none() {
                    check_interrupted()?;
                    match rx.recv_timeout(Duration::from_millis(100)) {
                        Ok((j, r)) => done[j] = Some(r?),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            bail!("downloads ended without layer {i}")
                        }
                    }
                }
                unpack_layer(&blob_path(i), &layers[i].media_type, &snapshots[i])?;
            }
            Ok(done.iter().flatten().copied().fold(0.0, f64::max))
        })();
        if result.is_err() {
            cancel.store(true, Ordering::SeqCst);
        }
        result
    })?;
    Ok(Pulled {
        registry_bytes: bytes,
        download_s,
        snapshots,
    })
}

/// Mounts the snapshots (bottom first) read-only with overlayfs at `mnt`.
fn mount_overlay(snapshots: &[PathBuf], mnt: &Path) -> Result<MountGuard> {
    let lower: Vec<String> = snapshots
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    run_quiet(
        Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("ro,lowerdir={}", lower.join(":")))
            .arg(mnt),
    )
    .context("mounting the unpacked layers with overlayfs")?;
    Ok(MountGuard(mnt.to_path_buf()))
}

// ---------------------------------------------------------------------------------------------
// arbor mount

/// A running `arbor mount`; on drop it is unmounted and stopped, whatever state it is in.
struct ArborMount {
    child: Option<Child>,
    mnt: PathBuf,
    state: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    metrics_addr: String,
}

impl ArborMount {
    fn start(ctx: &Ctx, reference: &str, dir: &Path, mnt: &Path) -> Result<ArborMount> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let metrics_addr = format!("127.0.0.1:{port}");
        let state = dir.join("state");
        let mut c = Command::new(ctx.arbor);
        c.args(["mount", "--plain-http", "--no-prefetch-rest"])
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .arg("--state-dir")
            .arg(&state)
            .args(["--metrics-addr", &metrics_addr])
            .args(ctx.mount_args)
            .arg(reference)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .with_context(|| format!("spawning {}", describe(&c)))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let log2 = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("mounted ") {
                    let _ = tx.send(());
                }
                let mut l = log2.lock().unwrap_or_else(|e| e.into_inner());
                l.push(line);
                if l.len() > 200 {
                    l.remove(0);
                }
            }
        });
        let m = ArborMount {
            child: Some(child),
            mnt: mnt.to_path_buf(),
            state,
            log,
            metrics_addr,
        };
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(1)) {
                Ok(()) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    thread::sleep(Duration::from_millis(50));
                    bail!("arbor mount exited before mounting:\n{}", m.log_tail(30));
                }
            }
            check_interrupted()?;
            ensure!(
                Instant::now() < deadline,
                "arbor mount did not mount within {MOUNT_TIMEOUT:?}:\n{}",
                m.log_tail(30)
            );
        }
        ensure!(
            arbor_testkit::is_mounted(mnt),
            "arbor said mounted but {} is not a mount point",
            mnt.display()
        );
        Ok(m)
    }

    fn log_tail(&self, n: usize) -> String {
        let l = self.log.lock().unwrap_or_else(|e| e.into_inner());
        l[l.len().saturating_sub(n)..].join("\n")
    }

    /// The metrics endpoint's samples: "name{labels}" → value.
    fn metrics(&self) -> Result<BTreeMap<String, f64>> {
        harness::metrics(&self.metrics_addr)
    }

    /// (user, system) CPU seconds the arbor process used so far.
    fn cpu_seconds(&self) -> Option<(f64, f64)> {
        harness::cpu_seconds(self.child.as_ref()?.id())
    }

    /// Unmounts the way a user would (`umount DIR`) and checks that arbor exits cleanly.
    fn stop(mut self) -> Result<()> {
        run_quiet(Command::new("umount").arg(&self.mnt)).context("umount of the arbor mount")?;
        let mut child = self.child.take().context("not running")?;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(st) = child.try_wait()? {
                ensure!(
                    st.success(),
                    "arbor mount exited with {st}:\n{}",
                    self.log_tail(30)
                );
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.child = Some(child);
                bail!("arbor mount did not exit within {EXIT_TIMEOUT:?} after umount");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ArborMount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if arbor_testkit::is_mounted(&self.mnt) {
                detach(&self.mnt);
            }
            harness::terminate(&mut c, Duration::from_secs(10));
        }
        unmount_below(&self.state);
        while arbor_testkit::is_mounted(&self.mnt) {
            detach(&self.mnt);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Runs

struct Ctx<'a> {
    arbor: &'a Path,
    mount_args: &'a [String],
    addr: &'a str,
    ns: &'a Namespace,
    image: &'a Image,
    imports: &'a str,
    timeout: Duration,
}

struct RunResult {
    rep: u32,
    method: Method,
    workload: Workload,
    total_s: f64,
    prepare_s: f64,
    /// Full pulls: when the last blob was downloaded.
    download_s: Option<f64>,
    work_s: f64,
    registry_bytes: u64,
    link_bytes: u64,
    link_bytes_to_ns: u64,
    read_bytes: Option<u64>,
    metrics: Option<BTreeMap<String, f64>>,
    /// (user, system) CPU seconds of the arbor process from its start to the end of the
    /// workload.
    arbor_cpu_s: Option<(f64, f64)>,
    problems: Vec<String>,
}

impl RunResult {
    fn to_json(&self) -> Value {
        json!({
            "rep": self.rep,
            "method": self.method.key(),
            "workload": self.workload.key(),
            "total_seconds": self.total_s,
            "prepare_seconds": self.prepare_s,
            "download_seconds": self.download_s,
            "workload_seconds": self.work_s,
            "registry_bytes": self.registry_bytes,
            "link_bytes_to_host": self.link_bytes,
            "link_bytes_to_ns": self.link_bytes_to_ns,
            "read_bytes": self.read_bytes,
            "arbor_cpu_seconds": self.arbor_cpu_s.map(|(u, s)| json!({"user": u, "system": s})),
            "arbor_metrics": self.metrics.as_ref().map(|m| m.iter()
                .filter(|(k, _)| !k.contains("_bucket"))
                .map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()),
            "problems": self.problems,
        })
    }
}

fn run_once(ctx: &Ctx, method: Method, workload: Workload, dir: &Path) -> Result<RunResult> {
    let mnt = dir.join("mnt");
    fs::create_dir_all(&mnt)?;
    let ctd = match method {
        Method::Containerd => Some(Containerd::start().context("starting containerd")?),
        _ => None,
    };
    drop_caches();
    let link0 = ctx.ns.link_bytes()?;
    let t0 = Instant::now();
    // Keep whatever must be undone alive until the workload and the checks are done.
    let mut overlay = None;
    let mut arbor = None;
    let mut ctr_mount = None;
    let mut download_s = None;
    let mut registry_bytes = 0;
    match method {
        Method::Full => {
            let p = full_pull(ctx.addr, TAG_SOURCE, dir, t0)?;
            download_s = Some(p.download_s);
            registry_bytes = p.registry_bytes;
            overlay = Some(mount_overlay(&p.snapshots, &mnt)?);
        }
        Method::Containerd => {
            let c = ctd.as_ref().expect("containerd");
            let reference = format!("{}/{REPO}:{TAG_SOURCE}", ctx.addr);
            c.pull(&reference, &["--plain-http"])
                .context("ctr image pull")?;
            download_s = None;
            let (m, n) = fetch_image_manifest(ctx.addr, REPO, TAG_SOURCE)?;
            registry_bytes = n
                + m["config"]["size"].as_u64().unwrap_or(0)
                + layer_sizes(&m)?.iter().sum::<u64>();
            let mnt_s = mnt.to_string_lossy().into_owned();
            c.ctr(&[
                "images",
                "mount",
                "--snapshotter",
                "overlayfs",
                &reference,
                &mnt_s,
            ])
            .context("ctr images mount")?;
            ctr_mount = Some(MountGuard(mnt.clone()));
        }
        Method::Arbor | Method::ArborPrefetch => {
            let tag = if method == Method::Arbor {
                TAG_ARBOR
            } else {
                TAG_PREFETCH
            };
            let reference = format!("{}/{REPO}:{tag}", ctx.addr);
            arbor = Some(ArborMount::start(ctx, &reference, dir, &mnt)?);
        }
    }
    let prepare_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let read_bytes = match workload {
        Workload::Read => Some(read_set(&mnt, &ctx.image.startup)?),
        Workload::Python => {
            run_python(&mnt, ctx.imports, ctx.timeout)?;
            None
        }
    };
    let work_s = t1.elapsed().as_secs_f64();
    let total_s = t0.elapsed().as_secs_f64();
    let link = ctx.ns.link_bytes()? - link0;
    let arbor_cpu_s = arbor.as_ref().and_then(ArborMount::cpu_seconds);
    let metrics = match &arbor {
        Some(a) => {
            let m = a.metrics()?;
            registry_bytes = m
                .get("arbor_fetch_bytes_total{source=\"registry\"}")
                .copied()
                .unwrap_or(0.0) as u64;
            Some(m)
        }
        None => None,
    };
    let mut problems = Vec::new();
    if let Some(n) = read_bytes {
        let want = ctx.image.startup_bytes();
        if n != want {
            problems.push(format!(
                "read {n} bytes of the start-up set, the image has {want}"
            ));
        }
        problems.extend(verify_set(&mnt, &ctx.image.startup));
    }
    if let Some(a) = arbor {
        a.stop()?;
    }
    if ctr_mount.is_some() {
        let c = ctd.as_ref().expect("containerd");
        c.ctr(&["images", "unmount", &mnt.to_string_lossy()])
            .context("ctr images unmount")?;
    }
    drop(ctr_mount);
    drop(overlay);
    drop(ctd);
    Ok(RunResult {
        rep: 0,
        method,
        workload,
        total_s,
        prepare_s,
        download_s,
        work_s,
        registry_bytes,
        link_bytes: link.to_host,
        link_bytes_to_ns: link.to_ns,
        read_bytes,
        metrics,
        arbor_cpu_s,
        problems,
    })
}

/// Reads every file of the set in order, fully; returns the bytes read.
fn read_set(root: &Path, files: &[StartupFile]) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    for f in files {
        check_interrupted()?;
        let p = root.join(f.rel());
        let mut h = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
        loop {
            let n = h
                .read(&mut buf)
                .with_context(|| format!("reading {}", p.display()))?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok(total)
}

/// Compares the set as seen below `root` with the image: size, sha256, mtime, and for
/// timestamp-checked `.pyc` files the source's mtime and size recorded in the header.
fn verify_set(root: &Path, files: &[StartupFile]) -> Vec<String> {
    let mut problems = Vec::new();
    for f in files {
        let p = root.join(f.rel());
        let check = || -> Result<Vec<String>> {
            let mut v = Vec::new();
            let m = fs::metadata(&p)?;
            if m.len() != f.size {
                v.push(format!("{}: size {} != {}", f.path, m.len(), f.size));
            }
            if m.mtime() != f.mtime {
                v.push(format!("{}: mtime {} != {}", f.path, m.mtime(), f.mtime));
            }
            let data = fs::read(&p)?;
            let got = hex(&Sha256::digest(&data));
            if got != f.sha256 {
                v.push(format!("{}: content differs (sha256 {got})", f.path));
            }
            if f.path.ends_with(".pyc") && data.len() >= 16 {
                let word = |i: usize| u32::from_le_bytes(data[i..i + 4].try_into().expect("4"));
                if word(4) == 0
                    && let Some(src) = pyc_source(Path::new(f.rel()))
                {
                    // Sources may be absolute symlinks (sitecustomize.py): resolve in the image.
                    let sm = fs::metadata(resolve_in(root, &src)?)?;
                    if sm.mtime() as u32 != word(8) || sm.len() as u32 != word(12) {
                        v.push(format!(
                            "/{}: mtime {} size {} do not match its .pyc ({} {}): Python \
                             would recompile it",
                            src.display(),
                            sm.mtime(),
                            sm.len(),
                            word(8),
                            word(12)
                        ));
                    }
                }
            }
            Ok(v)
        };
        match check() {
            Ok(v) => problems.extend(v),
            Err(e) => problems.push(format!("{}: {e:#}", f.path)),
        }
    }
    problems
}

/// `root/rel` with every symlink on the way resolved inside `root`, as in a chroot.
fn resolve_in(root: &Path, rel: &Path) -> Result<PathBuf> {
    use std::path::Component;
    let mut todo: Vec<std::ffi::OsString> = rel
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(name) = todo.pop() {
        if name == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&name);
        let full = root.join(&next);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                ensure!(hops <= 40, "too many symlinks resolving /{}", rel.display());
                let target = fs::read_link(&full)?;
                if target.is_absolute() {
                    cur = PathBuf::new();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => todo.push(n.to_os_string()),
                        Component::ParentDir => todo.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => cur = next,
        }
    }
    Ok(root.join(cur))
}

/// `python3.11 -c 'import ...'` chrooted into `root`; fails unless it succeeds.
fn run_python(root: &Path, imports: &str, timeout: Duration) -> Result<()> {
    let mut c = chroot_python(root);
    c.arg("-c")
        .arg(format!("import {imports}; print({PY_OK:?})"));
    let out = run_checked(&mut c, timeout).context("python import")?;
    ensure!(out.contains(PY_OK), "python printed {out:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Summary

fn summarize(runs: &[RunResult], methods: &[Method], workloads: &[Workload]) -> Value {
    let mut out = serde_json::Map::new();
    for &w in workloads {
        let mut per = serde_json::Map::new();
        let full = median_of(runs, Method::Full, w, |r| r.total_s);
        let full_bytes = median_of(runs, Method::Full, w, |r| r.registry_bytes as f64);
        for &m in methods {
            let sel: Vec<&RunResult> = runs
                .iter()
                .filter(|r| r.method == m && r.workload == w)
                .collect();
            let spread = |f: &dyn Fn(&RunResult) -> f64| {
                Spread::of(&sel.iter().map(|r| f(r)).collect::<Vec<_>>())
            };
            let total = spread(&|r| r.total_s);
            let bytes = spread(&|r| r.registry_bytes as f64);
            per.insert(
                m.key().to_string(),
                json!({
                    "total_seconds": total.to_json(),
                    "prepare_seconds": spread(&|r| r.prepare_s).to_json(),
                    "workload_seconds": spread(&|r| r.work_s).to_json(),
                    "registry_bytes": bytes.to_json(),
                    "link_bytes": spread(&|r| r.link_bytes as f64).to_json(),
                    "speedup_vs_full": full / total.median,
                    "bytes_ratio_full_over_this": full_bytes / bytes.median,
                }),
            );
        }
        out.insert(w.key().to_string(), Value::Object(per));
    }
    Value::Object(out)
}

fn median_of(runs: &[RunResult], m: Method, w: Workload, f: impl Fn(&RunResult) -> f64) -> f64 {
    Spread::of(
        &runs
            .iter()
            .filter(|r| r.method == m && r.workload == w)
            .map(f)
            .collect::<Vec<_>>(),
    )
    .median
}

fn print_summary(
    summary: &Value,
    image: &Image,
    args: &Args,
    methods: &[Method],
    workloads: &[Workload],
) {
    for &w in workloads {
        let what = match w {
            Workload::Read => format!(
                "read the start-up set ({} files, {:.1} MB) in open order",
                image.startup.len(),
                image.startup_bytes() as f64 / MB
            ),
            Workload::Python => format!("python3.11 -c 'import {}' (chroot)", args.imports),
        };
        println!(
            "{what}; image {:.1} MB uncompressed; link {} Mbit/s; {} reps",
            image.uncompressed_bytes as f64 / MB,
            args.link.rate as f64 / 1e6,
            args.reps
        );
        println!(
            "{:<22} {:>8} {:>17} {:>10} {:>10} {:>12} {:>9} {:>9} {:>7}",
            "method",
            "total s",
            "(min-max)",
            "prepare s",
            format!("{} s", w.key()),
            "registry MB",
            "link MB",
            "speed-up",
            "bytes/"
        );
        for &m in methods {
            let s = &summary[w.key()][m.key()];
            let f = |p: &str| s.pointer(p).and_then(Value::as_f64).unwrap_or(f64::NAN);
            println!(
                "{:<22} {:>8.2} {:>17} {:>10.2} {:>10.2} {:>12.1} {:>9.1} {:>8.2}x {:>6.1}x",
                m.label(),
                f("/total_seconds/median"),
                format!(
                    "({:.2}-{:.2})",
                    f("/total_seconds/min"),
                    f("/total_seconds/max")
                ),
                f("/prepare_seconds/median"),
                f("/workload_seconds/median"),
                f("/registry_bytes/median") / MB,
                f("/link_bytes/median") / MB,
                f("/speedup_vs_full"),
                f("/bytes_ratio_full_over_this"),
            );
        }
        println!();
    }
}
