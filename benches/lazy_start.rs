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

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use arbor_testkit::netns::{LinkShape, Namespace};
use arbor_testkit::{
    Containerd, ImageSpec, LayerSource, Registry, find_in_path, skopeo_push, tar_dir,
    write_oci_layout,
};
use clap::Parser;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

#[allow(dead_code)]
#[path = "common.rs"]
mod common;
use common::{
    MB, Spread, clock_ticks, describe, machine_info, preflight, resolve_debs, run_quiet, tail,
    target_dir,
};

/// Bump when the way the image or the start-up set is built changes.
const RECIPE_VERSION: u32 = 1;
const LAYOUT_TAG: &str = "lazy-start";
const REPO: &str = "bench/lazy-start";
const TAG_SOURCE: &str = "v1";
const TAG_ARBOR: &str = "arbor";
const TAG_PREFETCH: &str = "arbor-prefetch";
const PYTHON: &str = "/usr/bin/python3.11";
/// What the Python workload prints when the imports succeeded.
const PY_OK: &str = "arbor-lazy-start-ok";
/// Longest wait for `arbor mount` to come up and to exit after `umount`.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(120);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Layer blobs downloaded at once by the full pull (containerd's default
/// `max_concurrent_downloads`).
const PULL_CONCURRENCY: usize = 3;
const MEDIA_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// Set by SIGINT/SIGTERM/SIGHUP: stop at the next check, cleaning up on the way out.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

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
    /// Link rate in each direction (tc units: 1gbit, 100mbit, 500kbit, or bits per second).
    #[arg(long, default_value = "1gbit", value_parser = parse_rate)]
    rate: u64,
    /// tbf queue length, as the longest time a packet may wait (milliseconds).
    #[arg(long, default_value_t = 50)]
    tbf_latency_ms: u64,
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
    /// Where .debs, layer tars, the OCI layout and the start-up set are cached
    /// [default: <target dir>/bench-cache].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Rebuild the image and the start-up set even if the cache is up to date.
    #[arg(long)]
    rebuild: bool,
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

/// Parses a tc-style rate into bits per second.
fn parse_rate(s: &str) -> Result<u64, String> {
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

/// One layer of the image: the Debian packages extracted into it.
struct LayerDef {
    name: &'static str,
    packages: &'static [&'static str],
}

/// About 430 MB uncompressed: what `apt-get install python3-pandas python3-scipy` puts in a
/// Debian image (less the C++ compiler that pythran recommends).
const LAYERS: &[LayerDef] = &[
    LayerDef {
        name: "base",
        packages: &[
            "libc6",
            "libgcc-s1",
            "libstdc++6",
            "zlib1g",
            "libssl3",
            "ca-certificates",
            "tzdata",
            "coreutils",
            "bash",
            "libexpat1",
            "libffi8",
            "libbz2-1.0",
            "liblzma5",
            "libzstd1",
            "libsqlite3-0",
            "libuuid1",
            "libncursesw6",
            "libtinfo6",
            "libreadline8",
            "readline-common",
            "libcrypt1",
            "libdb5.3",
            "media-types",
        ],
    },
    LayerDef {
        name: "python",
        packages: &[
            "python3.11-minimal",
            "libpython3.11-minimal",
            "libpython3.11-stdlib",
            "python3.11",
            "python3-minimal",
            "libpython3-stdlib",
            "python3",
            "python3-pkg-resources",
            "python3-six",
            "python3-dateutil",
            "python3-tz",
            "python3-decorator",
            "python3-gast",
            "python3-beniget",
            "python3-ply",
        ],
    },
    LayerDef {
        name: "scientific",
        packages: &[
            "python3-numpy",
            "libopenblas0-pthread",
            "libgfortran5",
            "libquadmath0",
            "python3-scipy",
            "liblbfgsb0",
            "python3-pandas",
            "python3-pandas-lib",
            "python3-pythran",
            "libxsimd-dev",
            "libboost1.74-dev",
        ],
    },
];

/// The alternatives libopenblas0-pthread's postinst installs: (link, name, target).
const ALTERNATIVES: &[(&str, &str, &str)] = &[
    (
        "/usr/lib/x86_64-linux-gnu/libblas.so.3",
        "libblas.so.3-x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    ),
    (
        "/usr/lib/x86_64-linux-gnu/liblapack.so.3",
        "liblapack.so.3-x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/liblapack.so.3",
    ),
    (
        "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
        "libopenblas.so.0-x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    ),
];

/// Records what `import MODULES` opens (see the module docs). argv: output file, modules.
const TRACER: &str = r#"
import os, sys

def main():
    out_path, modules = sys.argv[1], sys.argv[2]
    order = []
    mapped = set()
    busy = False

    def scan_maps():
        fd = os.open("/proc/self/maps", os.O_RDONLY)
        chunks = []
        try:
            while True:
                b = os.read(fd, 1 << 16)
                if not b:
                    break
                chunks.append(b)
        finally:
            os.close(fd)
        for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/") and parts[5] not in mapped:
                mapped.add(parts[5])
                order.append(parts[5])

    def hook(event, args):
        nonlocal busy
        if busy or event not in ("open", "import"):
            return
        busy = True
        try:
            if event == "open" and args:
                p = args[0]
                if isinstance(p, bytes):
                    p = os.fsdecode(p)
                if isinstance(p, str):
                    order.append(os.path.abspath(p))
            scan_maps()
        finally:
            busy = False

    # Before this script: exec of the interpreter, ld.so and the libraries it mapped ...
    order.append(os.path.realpath(sys.executable))
    scan_maps()
    # ... the modules imported at start-up (their .pyc, or source without one) ...
    for name, m in list(sys.modules.items()):
        if name == "__main__":
            continue
        spec = getattr(m, "__spec__", None)
        if spec is not None and spec.origin in ("frozen", "built-in"):
            continue
        cached = getattr(m, "__cached__", None)
        f = getattr(m, "__file__", None)
        if cached and os.path.exists(cached):
            order.append(cached)
        elif f:
            order.append(f)
    # ... and the .pth files site.py read.
    import site
    for d in site.getsitepackages():
        try:
            names = sorted(n for n in os.listdir(d) if n.endswith(".pth"))
        except OSError:
            continue
        order.extend(os.path.join(d, n) for n in names)
    import stat
    sys.addaudithook(hook)
    exec("import " + modules, {})
    busy = True
    scan_maps()
    out, seen = [], set()
    for p in order:
        try:
            rp = os.path.realpath(p)
            st = os.stat(rp)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(st.st_mode) and rp not in seen and not rp.startswith(("/proc/", "/tmp/")):
            seen.add(rp)
            out.append(rp)
    with open(out_path, "w") as f:
        f.write("\n".join(out) + "\n")
    print(len(out), "files,", len(sys.modules), "modules")

main()
"#;

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

/// Ok(false): everything ran but a verification failed.
fn run() -> Result<bool> {
    let args = Args::parse();
    let target = target_dir();
    let cache_dir = args
        .cache_dir
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
        &[
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
        ],
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

    let image = prepare_image(&cache_dir, &args.imports, args.rebuild)?;
    image.print();
    check_interrupted()?;

    let work_base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    fs::create_dir_all(&work_base)?;
    let work = WorkDir(Some(
        tempfile::Builder::new()
            .prefix("arbor-lazy-start-")
            .tempdir_in(&work_base)
            .with_context(|| format!("creating a work dir in {}", work_base.display()))?,
    ));

    let shape = LinkShape {
        latency: Duration::from_millis(args.tbf_latency_ms),
        ..LinkShape::rate(args.rate)
    };
    let ns = Namespace::with_shape(shape).context("creating the network namespace")?;
    let registry = Registry::start_in_netns(&ns).context("starting the registry")?;
    let addr = registry.addr();
    println!(
        "link: {} Mbit/s each way (tbf burst {} KiB, queue {} ms), registry {} in netns {}",
        args.rate as f64 / 1e6,
        LinkShape::default_burst(args.rate) >> 10,
        args.tbf_latency_ms,
        addr,
        ns.name()
    );

    let src_ref = format!("{addr}/{REPO}:{TAG_SOURCE}");
    let t = Instant::now();
    skopeo_push(&image.layout, LAYOUT_TAG, &src_ref, None).context("pushing the image")?;
    let push_s = t.elapsed().as_secs_f64();
    println!("pushed {src_ref} in {push_s:.1} s");

    let mut converts = Vec::new();
    for (tag, prefetch) in [
        (TAG_ARBOR, None),
        (TAG_PREFETCH, Some(&image.prefetch_list)),
    ] {
        check_interrupted()?;
        let dst = format!("{addr}/{REPO}:{tag}");
        let mut c = Command::new(&arbor);
        c.args(["convert", "--plain-http", "--json"]);
        if let Some(p) = prefetch {
            c.arg("--prefetch-list").arg(p);
        }
        c.args([&src_ref, &dst]);
        let desc = describe(&c);
        let t = Instant::now();
        let out = run_checked(&mut c, timeout)?;
        let secs = t.elapsed().as_secs_f64();
        let report: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let manifest = fetch_image_manifest(&addr, REPO, tag)?;
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
            if prefetch.is_some() {
                format!(
                    "; prefetch files placed per layer {placed:?}, {missing} of {} in no layer",
                    image.startup.len()
                )
            } else {
                String::new()
            }
        );
        if prefetch.is_some() && missing > 0 {
            println!("  warning: {missing} start-up files were not placed in any layer");
        }
        converts.push(json!({
            "tag": tag,
            "command": desc,
            "seconds": secs,
            "layer_sizes": sizes,
            "prefetch_placed_per_layer": placed,
            "prefetch_missing": missing,
        }));
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
        ns: &ns,
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
    drop(registry);
    drop(ns);
    drop(work);

    machine["loadavg_at_end"] = json!(loadavg());
    println!(
        "\nload average (1, 5, 15 min) at start {} and end {}: other processes share the {} cores",
        machine["loadavg_at_start"].as_str().unwrap_or("?"),
        machine["loadavg_at_end"].as_str().unwrap_or("?"),
        machine["nproc"],
    );
    println!();
    let summary = summarize(&runs, &methods, &workloads);
    print_summary(&summary, &image, &args, &methods, &workloads);

    let mount_args_json: Vec<String> = std::iter::once("--no-prefetch-rest".to_string())
        .chain(args.mount_args.iter().cloned())
        .collect();
    let report = json!({
        "benchmark": "lazy_start",
        "command": std::env::args().collect::<Vec<_>>(),
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "machine": machine,
        "link": {
            "rate_bits_per_s": args.rate,
            "tbf_burst_bytes": LinkShape::default_burst(args.rate),
            "tbf_latency_ms": args.tbf_latency_ms,
            "added_delay_ms": 0,
        },
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
    if let Some(dir) = json_out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = serde_json::to_vec_pretty(&report)?;
    text.push(b'\n');
    fs::write(&json_out, text).with_context(|| format!("writing {}", json_out.display()))?;
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

// ---------------------------------------------------------------------------------------------
// Signals and cleanup

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
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

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// The run's temp dir: on drop, unmounts whatever is left below it, then removes it.
struct WorkDir(Option<tempfile::TempDir>);

impl WorkDir {
    fn path(&self) -> &Path {
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
fn detach(p: &Path) {
    if let Ok(c) = CString::new(p.as_os_str().as_bytes()) {
        // SAFETY: a valid NUL-terminated path.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Lazily unmounts everything at or below `dir`, deepest first.
fn unmount_below(dir: &Path) {
    for _ in 0..8 {
        let m = arbor_testkit::mounts_below(dir);
        if m.is_empty() {
            return;
        }
        m.iter().for_each(|p| detach(p));
    }
}

/// A mount made by this bench (overlay, proc): detached on drop.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        while arbor_testkit::is_mounted(&self.0) {
            detach(&self.0);
        }
    }
}

/// The first three fields of /proc/loadavg.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `sync` and `echo 3 > /proc/sys/vm/drop_caches`; false if that is not allowed.
fn drop_caches() -> bool {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// Runs `cmd` (stdin null, output captured) with a timeout; stdout, or an error with stderr.
fn run_checked(cmd: &mut Command, timeout: Duration) -> Result<String> {
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
fn run_timed(
    cmd: &mut Command,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, String, String)> {
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
        let stop = if INTERRUPTED.load(Ordering::SeqCst) {
            Some("interrupted".to_string())
        } else if Instant::now() >= deadline {
            Some(format!("timed out after {timeout:?}"))
        } else {
            None
        };
        if let Some(why) = stop {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{why}; stderr: {}",
                tail(&err.join().unwrap_or_default(), 20)
            );
        }
        thread::sleep(Duration::from_millis(2));
    };
    Ok((
        status,
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    ))
}

// ---------------------------------------------------------------------------------------------
// The image and the start-up set

/// One file of the start-up set, as in the image.
struct StartupFile {
    /// Absolute image path.
    path: String,
    size: u64,
    mtime: i64,
    sha256: String,
    /// Index of the layer holding it.
    layer: usize,
}

impl StartupFile {
    fn rel(&self) -> &str {
        self.path.trim_start_matches('/')
    }
}

struct Image {
    layout: PathBuf,
    manifest_digest: String,
    layers: Vec<Value>,
    uncompressed_bytes: u64,
    regular_files: u64,
    regular_bytes: u64,
    startup: Vec<StartupFile>,
    prefetch_list: PathBuf,
    trace_output: String,
}

impl Image {
    fn startup_bytes(&self) -> u64 {
        self.startup.iter().map(|f| f.size).sum()
    }

    fn print(&self) {
        println!(
            "image: {} layers, {:.1} MB uncompressed ({} regular files, {:.1} MB of file content), \
             manifest {}",
            self.layers.len(),
            self.uncompressed_bytes as f64 / MB,
            self.regular_files,
            self.regular_bytes as f64 / MB,
            self.manifest_digest
        );
        for (i, l) in self.layers.iter().enumerate() {
            println!(
                "  layer {} {:<11} {:>7.1} MB tar {:>7.1} MB gzip {:>6} files; start-up set: {} files, {:.1} MB",
                i + 1,
                l["name"].as_str().unwrap_or("?"),
                l["uncompressed_bytes"].as_f64().unwrap_or(0.0) / MB,
                l["gzip_bytes"].as_f64().unwrap_or(0.0) / MB,
                l["regular_files"],
                self.startup.iter().filter(|f| f.layer == i).count(),
                self.startup
                    .iter()
                    .filter(|f| f.layer == i)
                    .map(|f| f.size)
                    .sum::<u64>() as f64
                    / MB,
            );
        }
        println!(
            "start-up set ({}): {} files, {:.1} MB = {:.1}% of the image's file content \
             ({:.1}% of its files); list: {}",
            self.trace_output.trim(),
            self.startup.len(),
            self.startup_bytes() as f64 / MB,
            100.0 * self.startup_bytes() as f64 / self.regular_bytes.max(1) as f64,
            100.0 * self.startup.len() as f64 / self.regular_files.max(1) as f64,
            self.prefetch_list.display()
        );
    }

    fn to_json(&self, gzip_sizes: &[u64]) -> Value {
        let kinds = |ext: &str| {
            let fs: Vec<&StartupFile> = self
                .startup
                .iter()
                .filter(|f| f.path.ends_with(ext))
                .collect();
            json!({"files": fs.len(), "bytes": fs.iter().map(|f| f.size).sum::<u64>()})
        };
        let so: Vec<&StartupFile> = self
            .startup
            .iter()
            .filter(|f| f.path.ends_with(".so") || f.path.contains(".so."))
            .collect();
        json!({
            "manifest_digest": self.manifest_digest,
            "layers": self.layers,
            "pushed_layer_sizes": gzip_sizes,
            "uncompressed_bytes": self.uncompressed_bytes,
            "regular_files": self.regular_files,
            "regular_bytes": self.regular_bytes,
            "startup_set": {
                "files": self.startup.len(),
                "bytes": self.startup_bytes(),
                "fraction_of_file_bytes": self.startup_bytes() as f64 / self.regular_bytes.max(1) as f64,
                "pyc": kinds(".pyc"),
                "shared_objects": {"files": so.len(), "bytes": so.iter().map(|f| f.size).sum::<u64>()},
                "per_layer": (0..self.layers.len()).map(|i| json!({
                    "files": self.startup.iter().filter(|f| f.layer == i).count(),
                    "bytes": self.startup.iter().filter(|f| f.layer == i).map(|f| f.size).sum::<u64>(),
                })).collect::<Vec<_>>(),
                "list": self.prefetch_list,
                "tracer": self.trace_output.trim(),
            },
        })
    }
}

/// The cached image and start-up set for `imports`, building them if missing or stale.
fn prepare_image(cache: &Path, imports: &str, rebuild: bool) -> Result<Image> {
    let debs_dir = cache.join("debs");
    fs::create_dir_all(&debs_dir)?;
    let all: Vec<&str> = LAYERS
        .iter()
        .flat_map(|l| l.packages.iter().copied())
        .collect();
    let debs = resolve_debs(&debs_dir, &all)?;
    let dir = cache.join("lazy-start");
    let stamp_path = dir.join("image.json");
    let key = json!({
        "recipe": RECIPE_VERSION,
        "imports": imports,
        "layers": LAYERS.iter().map(|l| json!({
            "name": l.name,
            "debs": l.packages.iter().map(|p| &debs[*p]).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    if !rebuild && let Some(img) = load_cached(&dir, &stamp_path, &key) {
        println!("image: cached in {}", dir.display());
        return Ok(img);
    }
    println!("image: building in {}", dir.display());
    let t_all = Instant::now();
    if dir.exists() {
        unmount_below(&dir);
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir)?;
    let root = dir.join("rootfs");
    let layer_dirs: Vec<PathBuf> = (0..LAYERS.len())
        .map(|i| dir.join(format!("layer-{i}")))
        .collect();

    // Extract every package into its layer and into the merged root.
    let t = Instant::now();
    for (def, ldir) in LAYERS.iter().zip(&layer_dirs) {
        for target in [ldir, &root] {
            fs::create_dir_all(target)?;
            for pkg in def.packages {
                let deb = debs_dir.join(&debs[*pkg]);
                check_interrupted()?;
                run_quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(target))
                    .with_context(|| format!("extracting {}", deb.display()))?;
            }
        }
    }
    println!(
        "  extracted {} packages in {:.1} s",
        all.len(),
        t.elapsed().as_secs_f64()
    );

    // What maintainer scripts and the base system would have done.
    for target in [&layer_dirs[0], &root] {
        for (d, mode) in [
            ("proc", 0o555),
            ("dev", 0o755),
            ("tmp", 0o1777),
            ("root", 0o700),
        ] {
            let p = target.join(d);
            fs::create_dir_all(&p)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        }
    }
    let top = layer_dirs.last().expect("layers");
    for target in [top, &root] {
        fs::create_dir_all(target.join("etc/alternatives"))?;
        for (link, name, dest) in ALTERNATIVES {
            let alt = format!("/etc/alternatives/{name}");
            symlink_force(dest, &target.join(alt.trim_start_matches('/')))?;
            symlink_force(&alt, &target.join(link.trim_start_matches('/')))?;
        }
    }
    run_quiet(Command::new("ldconfig").arg("-X").arg("-r").arg(&root)).context("ldconfig -r")?;
    fs::copy(root.join("etc/ld.so.cache"), top.join("etc/ld.so.cache"))?;

    // Byte-compile like py3compile, then give each .pyc to its source's layer.
    let t = Instant::now();
    let mut c = chroot_python(&root);
    c.args([
        "-m",
        "compileall",
        "-q",
        "/usr/lib/python3.11",
        "/usr/lib/python3/dist-packages",
    ]);
    // Exits 1 because a few test files in the packages are not valid Python 3: ignore that.
    let (_, _, err) = run_timed(&mut c, Duration::from_secs(1800)).context("compileall")?;
    let mut pycs = Vec::new();
    find_pycs(&root, Path::new(""), &mut pycs)?;
    ensure!(
        pycs.len() > 1000,
        "compileall made only {} .pyc files: {}",
        pycs.len(),
        tail(&err, 20)
    );
    for rel in &pycs {
        let src = pyc_source(rel).context("pyc name")?;
        let layer = layer_dirs
            .iter()
            .position(|d| fs::symlink_metadata(d.join(&src)).is_ok())
            .unwrap_or(layer_dirs.len() - 1);
        let dst = layer_dirs[layer].join(rel);
        let parent = dst.parent().context("pyc without parent")?;
        if !parent.exists() {
            fs::create_dir_all(parent)?;
            fs::set_permissions(parent, fs::Permissions::from_mode(0o755))?;
        }
        fs::copy(root.join(rel), &dst)?;
        let m = fs::metadata(root.join(rel))?;
        set_mtime(&dst, m.mtime())?;
    }
    println!(
        "  byte-compiled {} modules in {:.1} s",
        pycs.len(),
        t.elapsed().as_secs_f64()
    );

    // The start-up set.
    let trace_output = trace_startup(&root, imports, &dir.join("startup-files.txt"))?;
    let list = fs::read_to_string(dir.join("startup-files.txt"))?;
    let mut startup = Vec::new();
    for path in list.lines().filter(|l| !l.is_empty()) {
        let rel = path.trim_start_matches('/');
        let full = root.join(rel);
        let m = fs::metadata(&full).with_context(|| format!("start-up file {path}"))?;
        let layer = layer_dirs
            .iter()
            .rposition(|d| fs::symlink_metadata(d.join(rel)).is_ok_and(|m| m.is_file()))
            .with_context(|| format!("start-up file {path} is in no layer"))?;
        startup.push(json!({
            "path": path,
            "size": m.len(),
            "mtime": m.mtime(),
            "sha256": sha256_file(&full)?,
            "layer": layer,
        }));
    }

    // Layer tars and the OCI layout.
    let mut layers = Vec::new();
    let mut tars = Vec::new();
    for (i, (def, ldir)) in LAYERS.iter().zip(&layer_dirs).enumerate() {
        check_interrupted()?;
        let (files, bytes) = tree_stats(ldir)?;
        let tar_path = dir.join(format!("layer-{i}.tar"));
        {
            let mut out = BufWriter::with_capacity(1 << 20, File::create(&tar_path)?);
            tar_dir(ldir, &mut out).with_context(|| format!("tarring {}", ldir.display()))?;
            out.flush()?;
        }
        layers.push(json!({
            "name": def.name,
            "packages": def.packages,
            "debs": def.packages.iter().map(|p| &debs[*p]).collect::<Vec<_>>(),
            "tar": tar_path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "uncompressed_bytes": fs::metadata(&tar_path)?.len(),
            "regular_files": files,
            "regular_bytes": bytes,
        }));
        tars.push(tar_path);
    }
    let layout = dir.join("oci");
    let spec = ImageSpec {
        layers: tars.iter().cloned().map(LayerSource::TarFile).collect(),
        cmd: vec![PYTHON.into()],
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        ..ImageSpec::default()
    };
    let manifest_digest = write_oci_layout(&layout, LAYOUT_TAG, &spec)?;
    let manifest: Value =
        serde_json::from_slice(&fs::read(layout_blob(&layout, &manifest_digest))?)?;
    for (l, size) in layers.iter_mut().zip(layer_sizes(&manifest)?) {
        l["gzip_bytes"] = json!(size);
    }
    for d in &layer_dirs {
        fs::remove_dir_all(d)?;
    }
    fs::remove_dir_all(&root)?;
    let stamp = json!({
        "key": key,
        "manifest_digest": manifest_digest,
        "layers": layers,
        "startup": startup,
        "trace_output": trace_output,
    });
    fs::write(&stamp_path, serde_json::to_vec_pretty(&stamp)?)?;
    println!("  image built in {:.1} s", t_all.elapsed().as_secs_f64());
    load_cached(&dir, &stamp_path, &key).context("the image just built does not read back")
}

fn load_cached(dir: &Path, stamp_path: &Path, key: &Value) -> Option<Image> {
    let stamp: Value = serde_json::from_slice(&fs::read(stamp_path).ok()?).ok()?;
    if &stamp["key"] != key {
        return None;
    }
    let layers = stamp["layers"].as_array()?.clone();
    let layout = dir.join("oci");
    let manifest_digest = stamp["manifest_digest"].as_str()?.to_string();
    let manifest: Value =
        serde_json::from_slice(&fs::read(layout_blob(&layout, &manifest_digest)).ok()?).ok()?;
    for (l, d) in layers.iter().zip(manifest["layers"].as_array()?) {
        let blob = layout_blob(&layout, d["digest"].as_str()?);
        if fs::metadata(blob).ok()?.len() != l["gzip_bytes"].as_u64()? {
            return None;
        }
    }
    let startup: Vec<StartupFile> = stamp["startup"]
        .as_array()?
        .iter()
        .map(|f| {
            Some(StartupFile {
                path: f["path"].as_str()?.to_string(),
                size: f["size"].as_u64()?,
                mtime: f["mtime"].as_i64()?,
                sha256: f["sha256"].as_str()?.to_string(),
                layer: f["layer"].as_u64()? as usize,
            })
        })
        .collect::<Option<_>>()?;
    let prefetch_list = dir.join("startup-files.txt");
    if !prefetch_list.is_file() || startup.is_empty() {
        return None;
    }
    let sum = |k: &str| layers.iter().filter_map(|l| l[k].as_u64()).sum::<u64>();
    Some(Image {
        layout,
        manifest_digest,
        uncompressed_bytes: sum("uncompressed_bytes"),
        regular_files: sum("regular_files"),
        regular_bytes: sum("regular_bytes"),
        layers,
        startup,
        prefetch_list,
        trace_output: stamp["trace_output"].as_str().unwrap_or("").to_string(),
    })
}

fn layout_blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// `python3.11` chrooted into `root`, with a clean environment and no bytecode writing.
fn chroot_python(root: &Path) -> Command {
    // Absolute: the cleared environment's PATH is the image's, used to find the program.
    let chroot = find_in_path("chroot").unwrap_or_else(|| PathBuf::from("/usr/sbin/chroot"));
    let mut c = Command::new(chroot);
    c.arg(root)
        .arg(PYTHON)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

/// Runs the tracer in `root` (with /proc mounted) and writes the start-up list to `out`.
fn trace_startup(root: &Path, imports: &str, out: &Path) -> Result<String> {
    let proc_dir = root.join("proc");
    run_quiet(
        Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(&proc_dir),
    )
    .context("mounting /proc in the image root")?;
    let guard = MountGuard(proc_dir);
    let script = root.join("tmp/arbor-trace.py");
    fs::write(&script, TRACER)?;
    let mut c = chroot_python(root);
    c.args(["/tmp/arbor-trace.py", "/tmp/arbor-startup.txt", imports]);
    let stdout = run_checked(&mut c, Duration::from_secs(300)).context("tracing the imports")?;
    drop(guard);
    fs::remove_file(&script)?;
    fs::rename(root.join("tmp/arbor-startup.txt"), out)?;
    println!("  traced `import {imports}`: {}", stdout.trim());
    Ok(stdout)
}

fn symlink_force(target: &str, link: &Path) -> Result<()> {
    if let Some(p) = link.parent() {
        fs::create_dir_all(p)?;
    }
    if fs::symlink_metadata(link).is_ok() {
        fs::remove_file(link)?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("symlink {} -> {target}", link.display()))
}

fn set_mtime(p: &Path, mtime: i64) -> Result<()> {
    let f = File::options().write(true).open(p)?;
    f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime.max(0) as u64))?;
    Ok(())
}

/// Relative paths of the `.pyc` files in `__pycache__` dirs below `root/rel`.
fn find_pycs(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(root.join(rel))? {
        let e = e?;
        let r = rel.join(e.file_name());
        let ft = e.file_type()?;
        if ft.is_dir() {
            find_pycs(root, &r, out)?;
        } else if ft.is_file()
            && r.extension().is_some_and(|x| x == "pyc")
            && rel.file_name().is_some_and(|n| n == "__pycache__")
        {
            out.push(r);
        }
    }
    Ok(())
}

/// `a/b/__pycache__/mod.cpython-311.pyc` → `a/b/mod.py`.
fn pyc_source(pyc: &Path) -> Option<PathBuf> {
    let name = pyc.file_name()?.to_str()?;
    let module = name.split('.').next()?;
    Some(pyc.parent()?.parent()?.join(format!("{module}.py")))
}

/// (regular files, their bytes) below `dir` (hard links counted once).
fn tree_stats(dir: &Path) -> Result<(u64, u64)> {
    let mut files = 0;
    let mut bytes = 0;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = fs::symlink_metadata(e.path())?;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() && seen.insert((m.dev(), m.ino())) {
                files += 1;
                bytes += m.len();
            }
        }
    }
    Ok((files, bytes))
}

fn sha256_file(p: &Path) -> Result<String> {
    let mut f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client for the registry (plain HTTP, Content-Length bodies)

struct Response {
    status: u16,
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

fn http_get(addr: &str, path: &str, accept: &str) -> Result<Response> {
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

fn http_get_all(addr: &str, path: &str, accept: &str) -> Result<(u16, Vec<u8>)> {
    let mut r = http_get(addr, path, accept)?;
    let mut v = Vec::new();
    r.read_to_end(&mut v)?;
    Ok((r.status, v))
}

/// The image manifest of `repo:reference` (following an index to its first linux manifest)
/// and the bytes fetched for it.
fn fetch_image_manifest(addr: &str, repo: &str, reference: &str) -> Result<(Value, u64)> {
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

fn layer_sizes(manifest: &Value) -> Result<Vec<u64>> {
    manifest["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .map(|l| l["size"].as_u64().context("layer without size"))
        .collect()
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
        let (status, body) = http_get_all(&self.metrics_addr, "/metrics", "text/plain")?;
        ensure!(status == 200, "GET /metrics: HTTP {status}");
        Ok(String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    /// (user, system) CPU seconds the arbor process used so far.
    fn cpu_seconds(&self) -> Option<(f64, f64)> {
        let pid = self.child.as_ref()?.id();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat(5); `f` starts at field 3.
        let ticks = |i: usize| Some(f.get(i)?.parse::<u64>().ok()? as f64 / clock_ticks());
        Some((ticks(11)?, ticks(12)?))
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
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
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
            args.rate as f64 / 1e6,
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
