//! `bench-fuse-read`: reading a directory tree through `arbor mount` (FUSE) against reading the
//! same tree from a plain local directory.
//!
//! The tree is `/usr/lib/python3.11` from Debian's `libpython3.11-stdlib` and
//! `libpython3.11-minimal` packages (optionally also `libpython3.11-testsuite`; with `--large`
//! all of `/usr/lib` with numpy, scipy and pandas; with `--pypi` a site-packages directory
//! built from PyPI wheels, bench-cold-start's PyPI layer, see `pyimage`). The `.deb`
//! files are cached with bench-convert's (`target/bench-cache/debs`), extracted once with
//! `dpkg-deb -x` into `target/bench-cache/fuse-read-<set>/root` (that extracted tree, on local
//! disk, is the plain directory), tarred deterministically and written as a one-layer OCI layout.
//! Each run pushes the image to a private `docker-registry` on loopback, converts it with
//! `arbor convert`, and then measures, per repetition:
//!
//! * reads of every regular file (walk the tree in name order, read each file fully, checksum
//!   the content) from the plain directory, cold (after `drop_caches`) and warm;
//! * the same through `arbor mount`: cold with a fresh chunk cache, both `--no-prefetch` and
//!   with the default background prefetch (each on a fresh mount); warm (page cache) on the
//!   same mount; again after `drop_caches` on the same mount (served from arbor's in-memory
//!   chunk cache); and on a fresh mount over the chunk cache the cold read filled (served
//!   from the disk chunk cache);
//! * `lstat` of every entry: plain directory cold and warm, arbor on a fresh mount and again;
//! * the reads with several threads (`--threads`, default 4; 1 skips these);
//! * the anchor, when installed (`benches/install-nydus.sh`): the same tree converted by
//!   `nydus-image create` (its defaults), the blob pushed to the same registry, served by
//!   `nydusd` with nydus-snapshotter's default configuration: cold on demand, cold with its
//!   whole-blob `fs_prefetch`, warm, and after `drop_caches` (its blob cache).
//!
//! A cold pass over a fresh mount (arbor's or nydusd's) drops the page cache before the daemon
//! starts and begins the moment the mount is ready: a daemon that prefetches at mount gets no
//! head start beyond its own start-up (dropping caches takes tens of milliseconds, which it
//! used to get for free). The table also gives mount time plus pass time for those passes.
//!
//! Every read's checksum (and every stat's metadata digest) must equal the plain directory's,
//! or the bench fails. Missed targets never change the exit status; failing tools do.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read};
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use arbor_testkit::{
    ImageSpec, LayerSource, Registry, http_get, skopeo_push, tar_dir, write_oci_layout,
};
use clap::Parser;
use serde_json::{Value, json};
use sha2::Digest as _;

use arbor_benches::{common, pyimage};
use common::{
    MB, Spread, clock_ticks, describe, first_line, inspect_raw, machine_info, preflight,
    print_machine, resolve_debs, run_quiet, run_timed, tail, target_dir,
};

/// Tag of the image in the cached OCI layout.
const LAYOUT_TAG: &str = "fuse-read";
/// Repository and tags used in the registry.
const SOURCE_REPO: &str = "bench/python:v1";
const ARBOR_REPO: &str = "bench/python:arbor";
/// Where the tree lives, in the image and below the extraction root.
/// The directory of the packages' contents that is measured (`usr/lib/python3.11`, or
/// `usr/lib` with `--large`).
static TREE: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

fn tree() -> &'static str {
    TREE.get().copied().unwrap_or("usr/lib/python3.11")
}

/// Packages `--large` adds: Python's test suite and the scientific stack's dist-packages,
/// for a tree of well over 100 MB and 4,500 files under usr/lib.
const LARGE: &[&str] = &[
    "libpython3.11-testsuite",
    "python3-numpy",
    "python3-scipy",
    "python3-pandas",
    "python3-pandas-lib",
];
const PACKAGES: &[&str] = &["libpython3.11-stdlib", "libpython3.11-minimal"];
const TESTSUITE: &str = "libpython3.11-testsuite";
/// Bump when the layout of the cached dataset changes.
const DATASET_VERSION: u32 = 1;
/// The targets: warm reads within this multiple of the plain directory's ...
const TARGET_WARM: f64 = 1.1;
/// ... and a cold read of everything within this multiple of the plain directory's cold read.
const TARGET_COLD: f64 = 2.0;
/// Longest wait for `arbor mount` to come up, to exit after `umount`, and for prefetch to end.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
const PREFETCH_TIMEOUT: Duration = Duration::from_secs(300);

const AFTER_HELP: &str = "\
Times are wall seconds of one pass (walk + read, or walk + lstat), medians over --reps.
MB/s is the tree's content (uncompressed, 10^6 bytes) over the median time; files/s counts
regular files read (entries for stat rows). The ratio is arbor's time over the plain
directory's counterpart (lower is better; 1.00x = as fast).

Needs root (drop_caches, FUSE and overlay mounts, dpkg-deb keeping owners), skopeo,
docker-registry, dpkg-deb, apt-get, umount, and a release build of arbor
(cargo build --release -p arbor-cli -p arbor-benches).

Examples:
  benches/run-fuse-read.sh
  target/release/bench-fuse-read --reps 5 --threads 4
  target/release/bench-fuse-read --testsuite --arbor-arg=--fetch-unit=1MiB";

#[derive(Parser)]
#[command(
    name = "bench-fuse-read",
    about = "Benchmark reads through `arbor mount` against a plain local directory",
    long_about = "Benchmarks reading /usr/lib/python3.11 (Debian's libpython3.11-stdlib and \
                  libpython3.11-minimal) through `arbor mount` against the same tree in a plain \
                  local directory and against nydusd (when installed): cold reads (fresh chunk cache, with and without prefetch), \
                  warm reads, re-reads from arbor's caches, and lstat of every entry. Prints a \
                  table of medians with MB/s, files/s and the ratio to the plain directory, \
                  whether the targets (warm <= 1.1x, cold <= 2x, no slower than nydusd) are met, the registry traffic \
                  of each cold run, and writes the same as JSON.",
    after_help = AFTER_HELP
)]
struct Args {
    /// Repetitions; each takes every measurement once (with fresh mounts and caches).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// Also read with this many threads (1: only the single-threaded reads).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: u32,
    /// Measure usr/lib of the stdlib, its test suite, numpy, scipy and pandas (well over
    /// 100 MB and 4,500 files) instead of usr/lib/python3.11 alone.
    #[arg(long, conflicts_with = "testsuite")]
    large: bool,
    /// Add libpython3.11-testsuite to the tree (about 3x the files).
    #[arg(long)]
    testsuite: bool,
    /// Measure a PyPI-built site-packages tree instead (numpy, scipy, scikit-learn, pandas,
    /// flask and their dependencies, installed from manylinux wheels with pip and
    /// byte-compiled: about 350 MB and 10,000 files); builds bench-cold-start's PyPI layer.
    #[arg(long, conflicts_with_all = ["large", "testsuite"])]
    pypi: bool,
    /// Where downloaded .debs, the extracted tree and the OCI layout are cached
    /// [default: <target dir>/bench-cache].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Extract the tree and rebuild the OCI layout even if the cache is up to date.
    #[arg(long)]
    rebuild: bool,
    /// The arbor binary [default: <target dir>/release/arbor].
    #[arg(long, value_name = "PATH")]
    arbor: Option<PathBuf>,
    /// Extra argument for `arbor mount` (repeatable), e.g. --arbor-arg=--fetch-unit=1MiB.
    #[arg(long = "arbor-arg", value_name = "ARG", allow_hyphen_values = true)]
    arbor_args: Vec<String>,
    /// Where mount points, state and chunk caches are created [default: the system temp dir].
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,
    /// Where to write the JSON results [default: <target dir>/bench/fuse_read.json].
    #[arg(long, value_name = "PATH")]
    json_out: Option<PathBuf>,
    /// Time limit of one measurement (and of `arbor convert`), in seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// nydusd, measured side by side as the anchor [default: <target dir>/tools/nydus/bin/
    /// nydusd (benches/install-nydus.sh installs it), else from PATH; absent: skipped].
    #[arg(long, value_name = "PATH")]
    nydusd: Option<PathBuf>,
    /// nydus-image, which converts the tree for nydusd [default: beside nydusd, else PATH].
    #[arg(long, value_name = "PATH")]
    nydus_image: Option<PathBuf>,
    /// Leave nydusd out even if it is installed.
    #[arg(long)]
    no_nydus: bool,
}

/// Set by SIGINT/SIGTERM: the bench stops at the next check and cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let handler = on_signal as extern "C" fn(libc::c_int);
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    let target_dir = target_dir();
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| target_dir.join("bench-cache"));
    let arbor = args
        .arbor
        .clone()
        .unwrap_or_else(|| target_dir.join("release/arbor"));
    let json_out = args
        .json_out
        .clone()
        .unwrap_or_else(|| target_dir.join("bench/fuse_read.json"));
    preflight(
        &arbor,
        &["skopeo", "docker-registry", "dpkg-deb", "apt-get", "umount"],
        "drop_caches, FUSE and overlay mounts, and dpkg-deb -x keeping owners",
    )?;

    let machine = machine_info(&arbor);
    print_machine(&machine);

    let mut packages = PACKAGES.to_vec();
    if args.testsuite {
        packages.push(TESTSUITE);
    }
    if args.large {
        packages.extend_from_slice(LARGE);
        let _ = TREE.set("usr/lib");
    }
    let set_name = if args.large {
        "large"
    } else if args.testsuite {
        "testsuite"
    } else if args.pypi {
        "pypi"
    } else {
        "stdlib"
    };
    let source = if args.pypi {
        let w = &pyimage::SCIENTIFIC_WHEELS;
        let _ = TREE.set(w.site_packages.trim_start_matches('/'));
        let recipe = pyimage::Recipe {
            name: "fuse-read-pypi-image",
            version: 1,
            layers: pyimage::SCIENTIFIC_LAYERS
                .iter()
                .filter(|l| l.name == "base" || l.name == "python")
                .collect(),
            wheels: Some(w),
            app: Vec::new(),
            startup_code: "import numpy, scipy.stats, pandas, sklearn, flask".into(),
            startup_label: "importing the packages".into(),
            entrypoint: Vec::new(),
            cmd: vec![pyimage::PYTHON.into()],
            env: vec![pyimage::PATH_ENV.into()],
        };
        let image = pyimage::prepare_image(&cache_dir, &recipe, args.rebuild)
            .context("building the PyPI layer")?;
        let n = recipe.layers.len();
        Source::Tar {
            tar: cache_dir.join(recipe.name).join(format!("layer-{n}.tar")),
            key: json!({"image": image.manifest_digest, "layer": n}),
        }
    } else {
        Source::Debs(&packages)
    };
    let data = prepare_dataset(&cache_dir, set_name, &source, args.rebuild)?;
    data.print();

    let registry = Registry::start().context("starting the registry")?;
    let src_ref = registry.reference(SOURCE_REPO);
    let arbor_ref = registry.reference(ARBOR_REPO);
    let t = Instant::now();
    skopeo_push(&data.layout, LAYOUT_TAG, &src_ref, None)
        .context("pushing the benchmark image to the registry")?;
    println!("pushed to {src_ref} in {:.1} s", t.elapsed().as_secs_f64());
    let timeout = Duration::from_secs(args.timeout);
    let mut convert = Command::new(&arbor);
    convert.args(["convert", "--plain-http", &src_ref, &arbor_ref]);
    let desc = describe(&convert);
    let t = Instant::now();
    let (status, _, stderr) = run_timed(&mut convert, timeout).context(desc.clone())?;
    let convert_seconds = t.elapsed().as_secs_f64();
    if !status.success() {
        bail!("`{desc}` failed ({status}):\n{}", tail(&stderr, 40));
    }
    let layers = manifest_layers(&inspect_raw(&arbor_ref)?)?;
    ensure!(
        layers.len() == 1,
        "the converted image has {} layers, expected 1",
        layers.len()
    );
    let (layer_type, layer_bytes) = layers[0].clone();
    println!(
        "converted to {arbor_ref} in {convert_seconds:.1} s: 1 layer, {layer_type}, {:.2} MB\n",
        layer_bytes as f64 / MB
    );

    let scratch = Scratch::create(args.tmp_dir.as_deref())?;
    let nydusd = find_tool(args.nydusd.as_deref(), "nydusd");
    let nydus_image = args
        .nydus_image
        .clone()
        .or_else(|| {
            let beside = nydusd.as_ref()?.with_file_name("nydus-image");
            beside.is_file().then_some(beside)
        })
        .or_else(|| find_tool(None, "nydus-image"));
    let nydus = match (args.no_nydus, nydusd, nydus_image) {
        (true, _, _) => {
            println!("nydusd: left out (--no-nydus)\n");
            None
        }
        (false, Some(d), Some(i)) => {
            let n = prepare_nydus(
                &d,
                &i,
                &data.root,
                &scratch.path.join("nydus"),
                &registry,
                timeout,
            )
            .context("preparing the nydusd side")?;
            println!(
                "nydusd: {} ({}); nydus-image converted the tree in {:.1} s: blob {:.2} MB\n",
                n.nydusd.display(),
                n.version,
                n.convert_seconds,
                n.blob_bytes as f64 / MB
            );
            Some(n)
        }
        _ => {
            println!(
                "nydusd: skipped, nydusd or nydus-image not installed \
                 (benches/install-nydus.sh builds them; or pass --nydusd and --nydus-image)\n"
            );
            None
        }
    };
    let mut bench = Bench {
        arbor: arbor.clone(),
        arbor_args: args.arbor_args.clone(),
        reference: arbor_ref.clone(),
        scratch: scratch.path.clone(),
        plain: data.plain.clone(),
        timeout,
        clk_tck: clock_ticks(),
        threads: args.threads as usize,
        nydus,
        anchor_mismatches: Vec::new(),
        eager: Command::new(&arbor)
            .args(["mount", "--help"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--prefetch-rest-eager")),
        reference_read: None,
        reference_stat: None,
        samples: Vec::new(),
        cold_runs: Vec::new(),
        mounts: 0,
        caches: 0,
    };
    for rep in 1..=args.reps {
        println!("repetition {rep}/{}", args.reps);
        bench.repetition(rep)?;
    }
    drop(scratch);
    drop(registry);

    let scenarios = bench.summarize();
    println!();
    print_table(&scenarios, &data, args.reps);
    let targets = targets(&scenarios);
    println!();
    for t in &targets {
        println!("{}", t["line"].as_str().unwrap_or(""));
    }
    println!();
    let traffic = bench.traffic_summary();
    print_cold_runs(&bench.cold_runs, layer_bytes);

    let report = json!({
        "benchmark": "fuse_read",
        "command": std::env::args().collect::<Vec<_>>(),
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "machine": machine,
        "dataset": data.to_json(),
        "image": {
            "source": src_ref,
            "converted": arbor_ref,
            "convert_seconds": convert_seconds,
            "layer_media_type": layer_type,
            "layer_bytes": layer_bytes,
        },
        "reps": args.reps,
        "threads": args.threads,
        "arbor_mount_args": args.arbor_args,
        "nydus": bench.nydus.as_ref().map(Nydus::to_json),
        "nydus_mismatches": bench.anchor_mismatches,
        "scenarios": scenarios.iter().map(ScenarioSummary::to_json).collect::<Vec<_>>(),
        "targets": targets,
        "cold_runs": bench.cold_runs,
        "cold_traffic_medians": traffic,
        "samples": bench.samples.iter().map(Sample::to_json).collect::<Vec<_>>(),
    });
    if let Some(dir) = json_out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = serde_json::to_vec_pretty(&report)?;
    text.push(b'\n');
    fs::write(&json_out, text).with_context(|| format!("writing {}", json_out.display()))?;
    println!("\nJSON results: {}", json_out.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The dataset

struct Dataset {
    set: String,
    debs: Vec<String>,
    /// The plain directory: the extracted tree on local disk.
    plain: PathBuf,
    /// The directory the layer was packed from (`plain` is `tree()` below it).
    root: PathBuf,
    layout: PathBuf,
    manifest_digest: String,
    tar_bytes: u64,
    gzip_bytes: u64,
    files: u64,
    bytes: u64,
    stats: Value,
}

impl Dataset {
    fn print(&self) {
        let s = &self.stats;
        println!(
            "tree ({}): {} files, {:.1} MB, {} dirs, {} symlinks ({} files < 16 KiB, {} >= 1 MiB, \
             largest {:.2} MB) at {}",
            self.set,
            self.files,
            self.bytes as f64 / MB,
            s["directories"],
            s["symlinks"],
            s["small_files_lt_16k"],
            s["big_files_ge_1m"],
            s["largest_file_bytes"].as_f64().unwrap_or(0.0) / MB,
            self.plain.display(),
        );
        println!(
            "image: 1 layer, {:.1} MB tar, {:.1} MB gzip, manifest {}\n      {}",
            self.tar_bytes as f64 / MB,
            self.gzip_bytes as f64 / MB,
            self.manifest_digest,
            self.debs.join(" ")
        );
    }

    fn to_json(&self) -> Value {
        json!({
            "set": self.set,
            "path_in_image": tree(),
            "plain_dir": self.plain,
            "debs": self.debs,
            "manifest_digest": self.manifest_digest,
            "layer_tar_bytes": self.tar_bytes,
            "layer_gzip_bytes": self.gzip_bytes,
            "regular_files": self.files,
            "content_bytes": self.bytes,
            "stats": self.stats,
        })
    }
}

/// Returns the cached dataset for `packages`, extracting and building what is missing.
/// What the tree is made of.
enum Source<'a> {
    /// Debian packages, extracted; the tree is kept.
    Debs(&'a [&'a str]),
    /// A layer tar, extracted whole (`key` says what it was built from).
    Tar { tar: PathBuf, key: Value },
}

fn prepare_dataset(
    cache: &Path,
    set_name: &str,
    source: &Source,
    rebuild: bool,
) -> Result<Dataset> {
    let deb_names: Vec<String> = match source {
        Source::Debs(packages) => {
            let debs_dir = cache.join("debs");
            fs::create_dir_all(&debs_dir)
                .with_context(|| format!("creating {}", debs_dir.display()))?;
            let debs = resolve_debs(&debs_dir, packages)?;
            packages.iter().map(|p| debs[*p].clone()).collect()
        }
        Source::Tar { .. } => Vec::new(),
    };
    let dir = cache.join(format!("fuse-read-{set_name}"));
    let stamp_path = dir.join("dataset.json");
    let mut key = json!({"version": DATASET_VERSION, "debs": deb_names, "tree": tree()});
    if let Source::Tar { key: k, .. } = source {
        key["layer"] = k.clone();
    }
    if !rebuild && let Some(d) = load_dataset(&dir, &stamp_path, &key, set_name) {
        println!("dataset: cached in {}", dir.display());
        return Ok(d);
    }

    println!("dataset: building in {}", dir.display());
    let t = Instant::now();
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let root = dir.join("root");
    let plain = root.join(tree());
    match source {
        Source::Debs(_) => {
            let extract = dir.join("extract");
            fs::create_dir_all(&extract)?;
            for deb in &deb_names {
                let path = cache.join("debs").join(deb);
                run_quiet(Command::new("dpkg-deb").arg("-x").arg(&path).arg(&extract))
                    .with_context(|| format!("extracting {}", path.display()))?;
            }
            // Keep only the tree, at the same path below the root.
            fs::create_dir_all(plain.parent().context("tree path without parent")?)?;
            fs::rename(extract.join(tree()), &plain)
                .with_context(|| format!("the packages hold no {}", tree()))?;
            fs::remove_dir_all(&extract)?;
        }
        Source::Tar { tar, .. } => {
            fs::create_dir_all(&root)?;
            run_quiet(
                Command::new("tar")
                    .args(["-x", "--numeric-owner", "-p", "-f"])
                    .arg(tar)
                    .arg("-C")
                    .arg(&root),
            )
            .with_context(|| format!("extracting {}", tar.display()))?;
            ensure!(plain.is_dir(), "{} holds no {}", tar.display(), tree());
        }
    }
    let tar_path = dir.join("layer.tar");
    {
        let out = BufWriter::with_capacity(1 << 20, File::create(&tar_path)?);
        tar_dir(&root, out).with_context(|| format!("tarring {}", root.display()))?;
    }
    let layout = dir.join("oci");
    let spec = ImageSpec {
        layers: vec![LayerSource::TarFile(tar_path.clone())],
        ..ImageSpec::default()
    };
    let manifest_digest = write_oci_layout(&layout, LAYOUT_TAG, &spec)?;
    let gzip_bytes = layout_layer_bytes(&layout, &manifest_digest)?;
    let stats = tree_stats(&plain)?;
    let stamp = json!({
        "key": key,
        "manifest_digest": manifest_digest,
        "tar_bytes": fs::metadata(&tar_path)?.len(),
        "gzip_bytes": gzip_bytes,
        "stats": stats,
    });
    fs::write(&stamp_path, serde_json::to_vec_pretty(&stamp)?)?;
    println!("  built in {:.1} s", t.elapsed().as_secs_f64());
    load_dataset(&dir, &stamp_path, &key, set_name)
        .context("the dataset just built does not read back from its stamp")
}

/// The dataset described by `stamp_path`, if it was built from `key` and is complete.
fn load_dataset(dir: &Path, stamp_path: &Path, key: &Value, set_name: &str) -> Option<Dataset> {
    let stamp: Value = serde_json::from_slice(&fs::read(stamp_path).ok()?).ok()?;
    if &stamp["key"] != key {
        return None;
    }
    let tar_bytes = stamp["tar_bytes"].as_u64()?;
    if fs::metadata(dir.join("layer.tar")).ok()?.len() != tar_bytes {
        return None;
    }
    let manifest_digest = stamp["manifest_digest"].as_str()?.to_string();
    let layout = dir.join("oci");
    let gzip_bytes = layout_layer_bytes(&layout, &manifest_digest).ok()?;
    if Some(gzip_bytes) != stamp["gzip_bytes"].as_u64() {
        return None;
    }
    let plain = dir.join("root").join(tree());
    let stats = stamp["stats"].clone();
    // The plain directory must still be what was packed.
    if tree_stats(&plain).ok()? != stats {
        return None;
    }
    Some(Dataset {
        set: set_name.to_string(),
        debs: key["debs"]
            .as_array()?
            .iter()
            .filter_map(|d| d.as_str().map(String::from))
            .collect(),
        plain,
        root: dir.join("root"),
        layout,
        manifest_digest,
        tar_bytes,
        gzip_bytes,
        files: stats["regular_files"].as_u64()?,
        bytes: stats["content_bytes"].as_u64()?,
        stats,
    })
}

/// Size of the single layer blob of manifest `digest` in an OCI layout; fails if it is missing.
fn layout_layer_bytes(layout: &Path, digest: &str) -> Result<u64> {
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let manifest: Value = serde_json::from_slice(&fs::read(blob(digest))?)?;
    let layers = manifest_layers(&manifest)?;
    ensure!(layers.len() == 1, "expected one layer");
    let d = manifest["layers"][0]["digest"]
        .as_str()
        .context("layer without digest")?;
    let on_disk = fs::metadata(blob(d))?.len();
    ensure!(on_disk == layers[0].1, "layer blob {d} has the wrong size");
    Ok(on_disk)
}

/// (media type, size) of each layer of an image manifest.
fn manifest_layers(manifest: &Value) -> Result<Vec<(String, u64)>> {
    manifest["layers"]
        .as_array()
        .context("manifest without layers (an index?)")?
        .iter()
        .map(|l| {
            Ok((
                l["mediaType"].as_str().unwrap_or("").to_string(),
                l["size"].as_u64().context("layer without size")?,
            ))
        })
        .collect()
}

fn tree_stats(root: &Path) -> Result<Value> {
    let (mut files, mut bytes, mut small, mut big, mut largest, mut dirs, mut links) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    walk(root, &mut |_, full, ft| {
        if ft.is_dir() {
            dirs += 1;
        } else if ft.is_symlink() {
            links += 1;
        } else if ft.is_file() {
            let size = fs::symlink_metadata(full)?.len();
            files += 1;
            bytes += size;
            small += u64::from(size < 16 << 10);
            big += u64::from(size >= 1 << 20);
            largest = largest.max(size);
        }
        Ok(())
    })?;
    Ok(json!({
        "regular_files": files,
        "content_bytes": bytes,
        "small_files_lt_16k": small,
        "big_files_ge_1m": big,
        "largest_file_bytes": largest,
        "directories": dirs,
        "symlinks": links,
    }))
}

// ---------------------------------------------------------------------------------------------
// Walking, reading and stat-ing a tree

/// Visits every entry below `root` (not `root` itself) depth first, in byte order of names
/// within each directory, each directory before its contents (the order of the layer tar).
/// `visit` gets the path relative to `root`, the full path and the type from `readdir`.
fn walk(root: &Path, visit: &mut dyn FnMut(&str, &Path, fs::FileType) -> Result<()>) -> Result<()> {
    fn inner(
        dir: &Path,
        rel: &str,
        visit: &mut dyn FnMut(&str, &Path, fs::FileType) -> Result<()>,
    ) -> Result<()> {
        let mut entries: Vec<(std::ffi::OsString, fs::FileType)> = Vec::new();
        for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e.with_context(|| format!("reading {}", dir.display()))?;
            let ft = e
                .file_type()
                .with_context(|| format!("type of {}", e.path().display()))?;
            entries.push((e.file_name(), ft));
        }
        entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        for (name, ft) in entries {
            let full = dir.join(&name);
            let r = if rel.is_empty() {
                name.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", name.to_string_lossy())
            };
            visit(&r, &full, ft)?;
            if ft.is_dir() {
                inner(&full, &r, visit)?;
            }
        }
        Ok(())
    }
    inner(root, "", visit)
}

/// A fast 64-bit checksum (not cryptographic: it only has to catch wrong bytes, and must not
/// cost much next to a warm read from the page cache).
fn checksum(data: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut lanes = [
        K ^ data.len() as u64,
        K.rotate_left(17),
        K.rotate_left(31),
        K.rotate_left(47),
    ];
    let mut blocks = data.chunks_exact(32);
    for b in &mut blocks {
        for (i, l) in lanes.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            *l = (*l ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
        }
    }
    let mut h = lanes
        .iter()
        .fold(0u64, |h, l| (h ^ l).wrapping_mul(K).rotate_left(23));
    for &b in blocks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
    }
    h ^ (h >> 32)
}

/// Combines (path, size, checksum) records, in path order, into one checksum.
fn combine(records: &mut [(String, u64, u64)]) -> u64 {
    records.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut h = 0u64;
    for (p, len, c) in records.iter() {
        for v in [checksum(p.as_bytes()), *len, *c] {
            h = (h ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(27);
        }
    }
    h
}

/// What one pass over a tree saw.
#[derive(Clone)]
struct Pass {
    /// Regular files read (or entries stat-ed).
    items: u64,
    /// Content bytes read (0 for stat).
    bytes: u64,
    checksum: u64,
    /// Per path: size and checksum (of the content, or of the metadata), to name differences.
    records: Vec<(String, u64, u64)>,
}

fn read_file(path: &Path, buf: &mut Vec<u8>) -> Result<(u64, u64)> {
    buf.clear();
    File::open(path)
        .and_then(|mut f| f.read_to_end(buf))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok((buf.len() as u64, checksum(buf)))
}

/// Walks `root` and reads every regular file fully, on `threads` threads (the walk on this
/// one, the reads on the others when more than 1).
fn read_tree(root: &Path, threads: usize) -> Result<Pass> {
    let mut records = Vec::new();
    if threads <= 1 {
        let mut buf = Vec::with_capacity(1 << 20);
        walk(root, &mut |rel, full, ft| {
            if ft.is_file() {
                let (len, c) = read_file(full, &mut buf)?;
                records.push((rel.to_string(), len, c));
            }
            Ok(())
        })?;
    } else {
        let (tx, rx) = mpsc::sync_channel::<(String, PathBuf)>(4096);
        let rx = Mutex::new(rx);
        let results = thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| -> Result<Vec<(String, u64, u64)>> {
                        let mut buf = Vec::with_capacity(1 << 20);
                        let mut out = Vec::new();
                        loop {
                            let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                            let Ok((rel, full)) = next else { break };
                            let (len, c) = read_file(&full, &mut buf)?;
                            out.push((rel, len, c));
                        }
                        Ok(out)
                    })
                })
                .collect();
            let walked = walk(root, &mut |rel, full, ft| {
                if ft.is_file() {
                    // A send fails only when every worker has stopped on an error.
                    let _ = tx.send((rel.to_string(), full.to_path_buf()));
                }
                Ok(())
            });
            drop(tx);
            let mut all = Vec::new();
            let mut first_err = walked.err();
            for w in workers {
                match w.join() {
                    Ok(Ok(v)) => all.extend(v),
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Err(_) => {
                        first_err.get_or_insert(anyhow::anyhow!("a reader thread panicked"));
                    }
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => Ok(all),
            }
        })?;
        records = results;
    }
    let bytes = records.iter().map(|r| r.1).sum();
    let checksum = combine(&mut records);
    Ok(Pass {
        items: records.len() as u64,
        bytes,
        checksum,
        records,
    })
}

/// Walks `root` and `lstat`s every entry.
fn stat_tree(root: &Path) -> Result<Pass> {
    let mut records = Vec::new();
    walk(root, &mut |rel, full, _| {
        let m = fs::symlink_metadata(full).with_context(|| format!("lstat {}", full.display()))?;
        // Directory sizes depend on the filesystem; everything else must match.
        let size = if m.is_dir() { 0 } else { m.size() };
        let meta = [
            u64::from(m.mode()),
            u64::from(m.uid()),
            u64::from(m.gid()),
            m.mtime() as u64,
        ];
        let mut bytes = Vec::with_capacity(32);
        for v in meta {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        records.push((rel.to_string(), size, checksum(&bytes)));
        Ok(())
    })?;
    let checksum = combine(&mut records);
    Ok(Pass {
        items: records.len() as u64,
        bytes: 0,
        checksum,
        records,
    })
}

/// Names (up to 10) of the paths where `got` differs from `want`.
fn differences(want: &Pass, got: &Pass) -> String {
    let w: BTreeMap<&str, (u64, u64)> = want
        .records
        .iter()
        .map(|(p, l, c)| (p.as_str(), (*l, *c)))
        .collect();
    let g: BTreeMap<&str, (u64, u64)> = got
        .records
        .iter()
        .map(|(p, l, c)| (p.as_str(), (*l, *c)))
        .collect();
    let mut out = Vec::new();
    for (p, a) in &w {
        match g.get(p) {
            None => out.push(format!("{p}: missing")),
            Some(b) if b != a => out.push(format!(
                "{p}: size {} vs {} (plain), checksum {:016x} vs {:016x}",
                b.0, a.0, b.1, a.1
            )),
            _ => {}
        }
    }
    for p in g.keys().filter(|p| !w.contains_key(*p)) {
        out.push(format!("{p}: not in the plain directory"));
    }
    let n = out.len();
    out.truncate(10);
    format!("{n} paths differ: {}", out.join("; "))
}

/// CPU seconds (user + system) this process has used, from getrusage.
fn self_cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is valid; getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Flushes dirty pages and drops the page, dentry and inode caches.
fn drop_caches() -> Result<()> {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches")
}

/// Runs `f` on its own thread and waits at most `timeout` (checking for interruption); a
/// hung read is left behind (the mount guards kill arbor, which fails it).
fn run_limited<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => return r,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("timed out after {timeout:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the measuring thread died"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mounts and clean-up

/// `umount PATH`, then `umount -l PATH` if that fails; returns what failed, if anything.
fn unmount(path: &Path) -> Option<String> {
    let plain = Command::new("umount")
        .arg(path)
        .stdin(Stdio::null())
        .output();
    match plain {
        Ok(o) if o.status.success() => return None,
        _ => {}
    }
    let first = match &plain {
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => e.to_string(),
    };
    let lazy = Command::new("umount")
        .arg("-l")
        .arg(path)
        .stdin(Stdio::null())
        .output();
    match lazy {
        Ok(o) if o.status.success() => Some(format!("umount failed ({first}); umount -l worked")),
        Ok(o) => Some(format!(
            "umount failed ({first}); umount -l failed too ({})",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("umount failed ({first}); umount -l: {e}")),
    }
}

/// The bench's temporary directory: mount points, arbor state, chunk caches. On drop,
/// everything still mounted below it is unmounted (lazily as a last resort) and it is removed.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn create(parent: Option<&Path>) -> Result<Scratch> {
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let path = parent.join(format!("arbor-bench-fuse-{}", std::process::id()));
        if path.exists() {
            ensure!(
                arbor_testkit::mounts_below(&path).is_empty(),
                "{} exists and has mounts below it",
                path.display()
            );
            fs::remove_dir_all(&path)?;
        }
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let path = fs::canonicalize(&path)?;
        Ok(Scratch { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for m in arbor_testkit::mounts_below(&self.path) {
            if let Some(e) = unmount(&m) {
                eprintln!("warning: cleaning up {}: {e}", m.display());
            }
        }
        if arbor_testkit::mounts_below(&self.path).is_empty() {
            if let Err(e) = fs::remove_dir_all(&self.path) {
                eprintln!("warning: removing {}: {e}", self.path.display());
            }
        } else {
            eprintln!(
                "warning: {} still has mounts below it; left in place",
                self.path.display()
            );
        }
    }
}

/// Prometheus samples: `name{labels}` → value.
type MetricMap = BTreeMap<String, f64>;

/// A running `arbor mount` or `nydusd`. [`FuseDaemon::stop`] unmounts and checks the exit
/// status; dropping it without that (on an error) unmounts lazily and terminates the process.
struct FuseDaemon {
    /// "arbor mount" or "nydusd", for messages.
    name: &'static str,
    /// The anchor (nydusd): asked to stop after its unmount, and its content mismatches
    /// are reported, not fatal. Arbor must exit cleanly by itself and serve exact bytes.
    anchor: bool,
    child: Option<Child>,
    dir: PathBuf,
    mountpoint: PathBuf,
    log: PathBuf,
    /// Empty for nydusd (no Prometheus endpoint).
    metrics_addr: String,
    /// Spawn to mounted, seconds.
    ready_seconds: f64,
    clk_tck: f64,
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

impl FuseDaemon {
    /// `arbor mount` of `reference` at `dir/mnt`, with state in `dir/state`, chunk cache
    /// `cache`; waits until it is mounted and serving metrics.
    fn start(
        arbor: &Path,
        extra: &[String],
        reference: &str,
        dir: &Path,
        cache: &Path,
        prefetch: bool,
        clk_tck: f64,
    ) -> Result<FuseDaemon> {
        let mountpoint = dir.join("mnt");
        let state = dir.join("state");
        fs::create_dir_all(&state)?;
        let metrics_addr = format!("127.0.0.1:{}", free_port()?);
        let mut cmd = Command::new(arbor);
        cmd.args(["mount", "--plain-http"])
            .arg("--cache-dir")
            .arg(cache)
            .arg("--state-dir")
            .arg(&state)
            .arg("--metrics-addr")
            .arg(&metrics_addr);
        if !prefetch {
            cmd.arg("--no-prefetch");
        }
        cmd.args(extra).arg(reference).arg(&mountpoint);
        // "prefetch done" lines tell when the background prefetch has finished.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn,arbor_fetch::prefetch=info");
        }
        cmd.env("NO_COLOR", "1");
        let m = FuseDaemon {
            name: "arbor mount",
            anchor: false,
            child: None,
            dir: dir.to_path_buf(),
            mountpoint,
            log: dir.join("arbor-mount.log"),
            metrics_addr,
            ready_seconds: 0.0,
            clk_tck,
        };
        m.spawn(cmd, cache, |log| log.contains("mounted "))
    }

    /// `nydusd` serving `nydus.bootstrap` at `dir/mnt` from the registry, its blob cache in
    /// `cache`, with nydus-snapshotter's default configuration (`prefetch`: its
    /// `fs_prefetch` of the whole blob; without: on demand only).
    fn start_nydusd(
        nydus: &Nydus,
        dir: &Path,
        cache: &Path,
        prefetch: bool,
        clk_tck: f64,
    ) -> Result<FuseDaemon> {
        let config = dir.join("nydusd.json");
        fs::create_dir_all(dir)?;
        fs::write(
            &config,
            serde_json::to_vec_pretty(&nydus.config(cache, prefetch))?,
        )?;
        let m = FuseDaemon {
            name: "nydusd",
            anchor: true,
            child: None,
            dir: dir.to_path_buf(),
            mountpoint: dir.join("mnt"),
            log: dir.join("nydusd.log"),
            metrics_addr: String::new(),
            ready_seconds: 0.0,
            clk_tck,
        };
        let mut cmd = Command::new(&nydus.nydusd);
        cmd.arg("--config")
            .arg(&config)
            .arg("--bootstrap")
            .arg(&nydus.bootstrap)
            .arg("--mountpoint")
            .arg(&m.mountpoint)
            .args(["--log-level", "warn"])
            // Its default raises the fd limit to 1,000,000, refused (EPERM) where the hard
            // limit is lower and may not be raised, as in containers.
            .args(["--rlimit-nofile", "0"]);
        m.spawn(cmd, cache, |_| true)
    }

    /// Starts `cmd` (its output to the log) and waits until the mount point is mounted and
    /// `ready` says so of the log.
    fn spawn(
        mut self,
        mut cmd: Command,
        cache: &Path,
        ready: impl Fn(&str) -> bool,
    ) -> Result<FuseDaemon> {
        fs::create_dir_all(&self.mountpoint)?;
        fs::create_dir_all(cache)?;
        let logf = File::create(&self.log)?;
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        let desc = describe(&cmd);
        let t = Instant::now();
        self.child = Some(cmd.spawn().with_context(|| format!("spawning {desc}"))?);
        loop {
            check_interrupted()?;
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!("`{desc}` exited early ({st}):\n{}", self.log_tail(30));
            }
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            if ready(&log) && arbor_testkit::is_mounted(&self.mountpoint) {
                break;
            }
            if t.elapsed() > MOUNT_TIMEOUT {
                bail!(
                    "`{desc}` not mounted after {MOUNT_TIMEOUT:?}:\n{}",
                    self.log_tail(30)
                );
            }
            thread::sleep(Duration::from_millis(2));
        }
        self.ready_seconds = t.elapsed().as_secs_f64();
        Ok(self)
    }

    fn log_tail(&self, lines: usize) -> String {
        tail(&fs::read_to_string(&self.log).unwrap_or_default(), lines)
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// CPU seconds (user + system) the arbor process has used so far.
    fn cpu_seconds(&self) -> f64 {
        let Some(pid) = self.pid() else { return 0.0 };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return 0.0;
        };
        let Some((_, after)) = stat.rsplit_once(')') else {
            return 0.0;
        };
        let f: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat(5); `after` starts at field 3.
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
            .sum();
        ticks as f64 / self.clk_tck
    }

    /// Scrapes the metrics endpoint.
    fn metrics(&self) -> Result<MetricMap> {
        let (status, body) = http_get(&self.metrics_addr, "/metrics", None)
            .with_context(|| format!("scraping http://{}/metrics", self.metrics_addr))?;
        ensure!(status == 200, "metrics endpoint answered HTTP {status}");
        let mut out = MetricMap::new();
        for l in body.lines().filter(|l| !l.starts_with('#')) {
            if let Some((k, v)) = l.rsplit_once(' ')
                && let Ok(v) = v.parse::<f64>()
            {
                out.insert(k.to_string(), v);
            }
        }
        out.insert(
            "process_cpu_seconds".to_string(),
            self.cpu_seconds().max(0.0),
        );
        Ok(out)
    }

    /// Waits until every layer's background prefetch logged "prefetch done"; returns the
    /// seconds the log gives for it.
    fn wait_prefetch(&self, layers: usize) -> Result<Option<f64>> {
        let t = Instant::now();
        loop {
            check_interrupted()?;
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let done: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("prefetch done"))
                .collect();
            if done.len() >= layers {
                let secs = done.iter().filter_map(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("seconds="))
                        .and_then(|v| v.parse::<f64>().ok())
                });
                return Ok(secs.reduce(f64::max));
            }
            if t.elapsed() > PREFETCH_TIMEOUT {
                eprintln!(
                    "warning: no \"prefetch done\" in the arbor log after {PREFETCH_TIMEOUT:?}"
                );
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unmounts, waits for arbor to exit and checks that it exited cleanly and left nothing
    /// mounted.
    fn stop(mut self) -> Result<()> {
        let mut warnings = Vec::new();
        if let Some(e) = unmount(&self.mountpoint) {
            warnings.push(e);
        }
        let name = self.name;
        let mut child = self
            .child
            .take()
            .with_context(|| format!("{name} already stopped"))?;
        // nydusd keeps running after its mount is gone: it is asked to stop (arbor mount is
        // not: it must exit by itself, cleanly, once unmounted).
        if self.anchor {
            // SAFETY: signalling our own child, which has not been reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        let t = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if t.elapsed() > EXIT_TIMEOUT {
                self.child = Some(child);
                bail!(
                    "{name} did not exit within {EXIT_TIMEOUT:?} of `umount {}`:\n{}",
                    self.mountpoint.display(),
                    self.log_tail(20)
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        let left = arbor_testkit::mounts_below(&self.dir);
        for m in &left {
            if let Some(e) = unmount(m) {
                warnings.push(e);
            }
        }
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        ensure!(
            status.success() || self.anchor,
            "{name} exited with {status} after umount:\n{}",
            self.log_tail(30)
        );
        ensure!(
            left.is_empty(),
            "{name} exited but left mounts behind: {left:?}"
        );
        Ok(())
    }
}

impl Drop for FuseDaemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if arbor_testkit::is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .stdin(Stdio::null())
                .output();
        }
        let pid = child.id() as libc::pid_t;
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for m in arbor_testkit::mounts_below(&self.dir) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&m)
                .stdin(Stdio::null())
                .output();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// nydusd, the anchor

/// Repository the nydus blob is pushed to.
const NYDUS_REPO: &str = "bench/nydus";

/// nydusd and the tree converted for it: `nydus-image create` of the same directory (its
/// defaults), the blob pushed to the same registry, the bootstrap kept locally (as
/// nydus-snapshotter does after pulling it).
struct Nydus {
    nydusd: PathBuf,
    version: String,
    bootstrap: PathBuf,
    registry: String,
    blob_id: String,
    blob_bytes: u64,
    convert_seconds: f64,
}

impl Nydus {
    /// nydus-snapshotter's default nydusd configuration (`misc/snapshotter/
    /// nydusd-config.fusedev.json`), over plain HTTP; `fs_prefetch` on or off. Its
    /// `digest_validate` is off: nydusd serves chunks without checking their digests (arbor
    /// checks every one), and nydusd 2.2 refuses to turn it on for the RAFS v6 images
    /// `nydus-image create` makes ("Rafs v6 doesn't support integrity validation yet"), so
    /// there is no verifying nydusd to compare with.
    fn config(&self, cache: &Path, prefetch: bool) -> Value {
        json!({
            "device": {
                "backend": {"type": "registry", "config": {
                    "scheme": "http", "host": self.registry, "repo": NYDUS_REPO,
                    "timeout": 5, "connect_timeout": 5, "retry_limit": 2,
                }},
                "cache": {"type": "blobcache", "config": {"work_dir": cache}},
            },
            "mode": "direct",
            "digest_validate": false,
            "iostats_files": false,
            "enable_xattr": true,
            "fs_prefetch": {"enable": prefetch, "threads_count": 2, "prefetch_all": true},
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "nydusd": self.nydusd,
            "version": self.version,
            "blob": format!("sha256:{}", self.blob_id),
            "blob_bytes": self.blob_bytes,
            "convert_seconds": self.convert_seconds,
            "config_prefetch": self.config(Path::new("CACHE"), true),
        })
    }
}

/// `name` from `given`, else `<target>/tools/nydus/bin` (benches/install-nydus.sh), else PATH.
fn find_tool(given: Option<&Path>, name: &str) -> Option<PathBuf> {
    if let Some(p) = given {
        return Some(p.to_path_buf());
    }
    let local = target_dir().join("tools/nydus/bin").join(name);
    if local.is_file() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Converts `root` with `nydus-image create` into `work` and pushes the blob to `registry`.
fn prepare_nydus(
    nydusd: &Path,
    nydus_image: &Path,
    root: &Path,
    work: &Path,
    registry: &Registry,
    timeout: Duration,
) -> Result<Nydus> {
    // benches/install-nydus.sh stamps its build (a crates.io build reports no version).
    let version = nydusd
        .parent()
        .and_then(|bin| fs::read_to_string(bin.with_file_name("VERSION")).ok())
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| first_line(Command::new(nydusd).arg("--version")));
    let blobs = work.join("blobs");
    fs::create_dir_all(&blobs)?;
    let bootstrap = work.join("bootstrap");
    let mut create = Command::new(nydus_image);
    create
        .arg("create")
        .arg("--blob-dir")
        .arg(&blobs)
        .arg("--bootstrap")
        .arg(&bootstrap)
        .args(["--log-level", "warn"])
        .arg(root);
    let desc = describe(&create);
    let t = Instant::now();
    let (status, _, stderr) = run_timed(&mut create, timeout).context(desc.clone())?;
    ensure!(
        status.success(),
        "`{desc}` failed ({status}):\n{}",
        tail(&stderr, 30)
    );
    let convert_seconds = t.elapsed().as_secs_f64();
    let mut found = Vec::new();
    for e in fs::read_dir(&blobs)? {
        let e = e?;
        if e.file_type()?.is_file() {
            found.push(e.path());
        }
    }
    ensure!(
        found.len() == 1,
        "nydus-image wrote {} blobs to {}, expected 1",
        found.len(),
        blobs.display()
    );
    let blob = found.remove(0);
    let blob_id = blob
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let data = fs::read(&blob)?;
    let digest = hex::encode(sha2::Sha256::digest(&data));
    ensure!(
        digest == blob_id,
        "the nydus blob {} is not named by its sha256 ({digest})",
        blob.display()
    );
    let reference =
        arbor_oci::Reference::parse(&registry.reference(&format!("{NYDUS_REPO}:blob")))?;
    let client = common::plain_http_client()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(client.push_blob_file(
            &reference,
            &format!("sha256:{blob_id}"),
            data.len() as u64,
            &blob,
        ))
        .context("pushing the nydus blob")?;
    Ok(Nydus {
        nydusd: nydusd.to_path_buf(),
        version,
        bootstrap,
        registry: registry.addr(),
        blob_id,
        blob_bytes: data.len() as u64,
        convert_seconds,
    })
}

// ---------------------------------------------------------------------------------------------
// The measurements

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Stat,
}

/// What comes before a timed pass.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Nothing: the page cache holds what earlier passes read.
    Warm,
    /// The page cache is dropped right before the pass.
    DropCaches,
    /// The first pass over a daemon started just now, after the page cache was dropped
    /// ([`Bench::mount_cold`]): the pass starts the moment the mount is ready, so a daemon
    /// that prefetches gets no head start beyond its own start-up, which is timed too.
    FreshMount,
}

/// One timed pass.
struct Sample {
    key: String,
    rep: u32,
    seconds: f64,
    items: u64,
    bytes: u64,
    /// CPU seconds of this process (the readers) during the pass.
    reader_cpu: f64,
    /// CPU seconds of the arbor process during the pass.
    arbor_cpu: Option<f64>,
    /// For the first pass over a fresh mount: how long the daemon took to mount.
    mount_seconds: Option<f64>,
}

impl Sample {
    fn to_json(&self) -> Value {
        json!({
            "scenario": self.key,
            "rep": self.rep,
            "seconds": self.seconds,
            "items": self.items,
            "bytes": self.bytes,
            "reader_cpu_seconds": self.reader_cpu,
            "arbor_cpu_seconds": self.arbor_cpu,
            "mount_seconds": self.mount_seconds,
        })
    }
}

/// The scenarios in table order: key, label, kind, plain counterpart.
fn scenario_defs(threads: usize) -> Vec<(String, String, Kind, Option<String>)> {
    let mut v: Vec<(String, String, Kind, Option<String>)> = Vec::new();
    let mut add = |k: &str, label: &str, kind: Kind, cp: Option<&str>| {
        v.push((k.into(), label.into(), kind, cp.map(String::from)));
    };
    add("plain_cold", "plain dir, cold", Kind::Read, None);
    add("plain_warm", "plain dir, warm", Kind::Read, None);
    add(
        "arbor_cold_noprefetch",
        "arbor cold, --no-prefetch",
        Kind::Read,
        Some("plain_cold"),
    );
    add(
        "arbor_cold_prefetch",
        "arbor cold, prefetch on",
        Kind::Read,
        Some("plain_cold"),
    );
    add(
        "arbor_cold_eager",
        "arbor cold, --prefetch-rest-eager",
        Kind::Read,
        Some("plain_cold"),
    );
    add(
        "arbor_warm",
        "arbor warm (page cache)",
        Kind::Read,
        Some("plain_warm"),
    );
    add(
        "arbor_warm_prefetching",
        "arbor warm, background fetch running",
        Kind::Read,
        Some("plain_warm"),
    );
    add(
        "arbor_memcache",
        "arbor after drop_caches, same mount",
        Kind::Read,
        Some("plain_cold"),
    );
    add(
        "arbor_diskcache",
        "arbor after drop_caches, new mount",
        Kind::Read,
        Some("plain_cold"),
    );
    add(
        "nydus_cold_noprefetch",
        "nydusd cold, no fs_prefetch",
        Kind::Read,
        Some("plain_cold"),
    );
    add(
        "nydus_cold_prefetch",
        "nydusd cold, fs_prefetch (default)",
        Kind::Read,
        Some("plain_cold"),
    );
    add(
        "nydus_warm",
        "nydusd warm (page cache)",
        Kind::Read,
        Some("plain_warm"),
    );
    add(
        "nydus_blobcache",
        "nydusd after drop_caches, same mount",
        Kind::Read,
        Some("plain_cold"),
    );
    if threads > 1 {
        let t = threads;
        for (k, label, cp) in [
            ("plain_cold", "plain dir, cold", None),
            ("plain_warm", "plain dir, warm", None),
            (
                "arbor_cold_noprefetch",
                "arbor cold, --no-prefetch",
                Some("plain_cold"),
            ),
            (
                "arbor_cold_prefetch",
                "arbor cold, prefetch on",
                Some("plain_cold"),
            ),
            ("arbor_warm", "arbor warm (page cache)", Some("plain_warm")),
        ] {
            add(
                &format!("{k}_x{t}"),
                &format!("{label}, {t} threads"),
                Kind::Read,
                cp.map(|c| format!("{c}_x{t}")).as_deref(),
            );
        }
    }
    add(
        "stat_plain_cold",
        "lstat all: plain dir, cold",
        Kind::Stat,
        None,
    );
    add(
        "stat_plain_warm",
        "lstat all: plain dir, warm",
        Kind::Stat,
        None,
    );
    add(
        "stat_arbor_fresh",
        "lstat all: arbor, fresh mount",
        Kind::Stat,
        Some("stat_plain_cold"),
    );
    add(
        "stat_arbor_warm",
        "lstat all: arbor, again",
        Kind::Stat,
        Some("stat_plain_warm"),
    );
    v
}

struct Bench {
    arbor: PathBuf,
    arbor_args: Vec<String>,
    reference: String,
    scratch: PathBuf,
    plain: PathBuf,
    timeout: Duration,
    clk_tck: f64,
    threads: usize,
    /// The anchor, when installed.
    nydus: Option<Nydus>,
    /// Passes where the anchor served other bytes or names than the plain directory has.
    anchor_mismatches: Vec<String>,
    /// The arbor binary has `mount --prefetch-rest-eager` (older builds, compared with
    /// `--arbor`, may not).
    eager: bool,
    /// The plain directory's read and stat passes: every other pass must match them.
    reference_read: Option<Pass>,
    reference_stat: Option<Pass>,
    samples: Vec<Sample>,
    cold_runs: Vec<Value>,
    mounts: u32,
    /// Caches made so far (their names' suffix).
    caches: u32,
}

impl Bench {
    fn mount(&mut self, cache: &Path, prefetch: bool) -> Result<FuseDaemon> {
        self.mounts += 1;
        let dir = self.scratch.join(format!("mount-{}", self.mounts));
        FuseDaemon::start(
            &self.arbor,
            &self.arbor_args,
            &self.reference,
            &dir,
            cache,
            prefetch,
            self.clk_tck,
        )
    }

    /// [`Bench::mount`] after dropping the page cache, for a cold pass right after it
    /// ([`Start::FreshMount`]).
    fn mount_cold(&mut self, cache: &Path, prefetch: bool) -> Result<FuseDaemon> {
        drop_caches()?;
        self.mount(cache, prefetch)
    }

    /// A new, empty cache directory for one daemon. Used caches are not deleted until the
    /// scratch directory is, at the end of the run: deleting one (thousands of chunk files)
    /// right before the next cold pass would make that pass pay for it, as ext4 without a
    /// journal (this VM's root) skips and re-checks every inode freed within the last 30 s
    /// when it allocates one, and the next pass creates thousands. The price is disk: the
    /// scratch directory grows by up to one tree's size per cold measurement (five to seven
    /// a repetition), all freed at the end.
    fn fresh_cache(&mut self, name: &str) -> Result<PathBuf> {
        self.caches += 1;
        let p = self.scratch.join(format!("{name}-{}", self.caches));
        fs::create_dir_all(&p)?;
        Ok(p)
    }

    /// One timed pass of `kind` over `root` (plain if `mount` is None), checked against the
    /// plain directory's.
    fn measure(
        &mut self,
        key: &str,
        rep: u32,
        kind: Kind,
        threads: usize,
        mount: Option<&FuseDaemon>,
        start: Start,
    ) -> Result<()> {
        check_interrupted()?;
        let root = match mount {
            Some(m) => m.mountpoint.join(tree()),
            None => self.plain.clone(),
        };
        if start == Start::DropCaches {
            drop_caches()?;
        }
        let arbor_cpu0 = mount.map(FuseDaemon::cpu_seconds);
        let r = root.clone();
        let (seconds, cpu, pass) = run_limited(self.timeout, move || {
            let cpu0 = self_cpu_seconds();
            let t = Instant::now();
            let pass = match kind {
                Kind::Read => read_tree(&r, threads)?,
                Kind::Stat => stat_tree(&r)?,
            };
            Ok((t.elapsed().as_secs_f64(), self_cpu_seconds() - cpu0, pass))
        })
        .with_context(|| format!("{key}: {}", root.display()))?;
        let arbor_cpu = mount.map(|m| m.cpu_seconds() - arbor_cpu0.unwrap_or(0.0));
        let reference = match kind {
            Kind::Read => &mut self.reference_read,
            Kind::Stat => &mut self.reference_stat,
        };
        match reference {
            None => {
                ensure!(
                    mount.is_none(),
                    "internal: the first pass must be the plain directory's"
                );
                *reference = Some(pass.clone());
            }
            Some(want) if want.checksum != pass.checksum || want.items != pass.items => {
                let what = if kind == Kind::Read {
                    "content"
                } else {
                    "metadata"
                };
                // The anchor's mistakes are reported, not fatal: the bench measures arbor.
                if let Some(m) = mount.filter(|m| m.anchor) {
                    let d = differences(want, &pass);
                    eprintln!(
                        "warning: {key} (rep {rep}): {} serves other {what}: {d}",
                        m.name
                    );
                    self.anchor_mismatches
                        .push(format!("{key} (rep {rep}): {d}"));
                } else {
                    bail!(
                        "{key} (rep {rep}): {what} of {} differs from the plain directory's \
                     (checksum {:016x}, {} items vs {:016x}, {} items): {}",
                        root.display(),
                        pass.checksum,
                        pass.items,
                        want.checksum,
                        want.items,
                        differences(want, &pass)
                    );
                }
            }
            Some(_) => {}
        }
        let rate = match kind {
            Kind::Read => format!(
                "{:>8.1} MB/s {:>8.0} files/s",
                pass.bytes as f64 / MB / seconds,
                pass.items as f64 / seconds
            ),
            Kind::Stat => format!("{:>8.0} entries/s", pass.items as f64 / seconds),
        };
        println!(
            "  {key:<28} {seconds:>8.3} s {rate}  cpu {cpu:.2} s{}",
            mount
                .zip(arbor_cpu)
                .map(|(m, c)| format!(" + {} {c:.2} s", m.name))
                .unwrap_or_default()
        );
        self.samples.push(Sample {
            key: key.to_string(),
            rep,
            seconds,
            items: pass.items,
            bytes: pass.bytes,
            reader_cpu: cpu,
            arbor_cpu,
            mount_seconds: mount
                .filter(|_| start == Start::FreshMount)
                .map(|m| m.ready_seconds),
        });
        Ok(())
    }

    /// Records the registry traffic of a cold run.
    fn record_cold(
        &mut self,
        key: &str,
        rep: u32,
        variant: &str,
        m: &FuseDaemon,
        at_end: &MetricMap,
        after_prefetch: Option<(&MetricMap, Option<f64>)>,
    ) {
        let pick = |mm: &MetricMap| {
            json!({
                "registry_bytes": metric(mm, "arbor_fetch_bytes_total{source=\"registry\"}"),
                "registry_requests": metric(mm, "arbor_fetch_requests_total{source=\"registry\"}"),
                "registry_errors": metric(mm, "arbor_fetch_errors_total{source=\"registry\"}"),
                "fetch_seconds_sum": metric(mm, "arbor_fetch_duration_seconds_sum"),
                "chunks_fetched": metric(mm, "arbor_chunk_reads_total{from=\"fetched\"}"),
                "chunks_memory": metric(mm, "arbor_chunk_reads_total{from=\"memory\"}"),
                "chunks_cache": metric(mm, "arbor_chunk_reads_total{from=\"cache\"}"),
                "prefetch_bytes": metric(mm, "arbor_prefetch_bytes_total"),
                "read_errors": metric(mm, "arbor_read_errors_total"),
                "verify_failures": metric(mm, "arbor_chunk_verify_failures_total"),
                "arbor_cpu_seconds": metric(mm, "process_cpu_seconds"),
            })
        };
        let read_seconds = self
            .samples
            .iter()
            .rev()
            .find(|s| s.key == key && s.rep == rep)
            .map(|s| s.seconds);
        self.cold_runs.push(json!({
            "rep": rep,
            "variant": variant,
            "scenario": key,
            "read_seconds": read_seconds,
            "mount_ready_seconds": m.ready_seconds,
            "at_end_of_read": pick(at_end),
            "after_prefetch": after_prefetch.map(|(mm, _)| pick(mm)),
            "prefetch_seconds_logged": after_prefetch.and_then(|(_, s)| s),
            "metrics_at_end_of_read": at_end,
        }));
    }

    /// Every measurement once.
    fn repetition(&mut self, rep: u32) -> Result<()> {
        let n = self.threads;
        let xn = |k: &str| format!("{k}_x{n}");

        // The plain directory.
        self.measure("plain_cold", rep, Kind::Read, 1, None, Start::DropCaches)?;
        self.measure("plain_warm", rep, Kind::Read, 1, None, Start::Warm)?;
        if n > 1 {
            self.measure(
                &xn("plain_cold"),
                rep,
                Kind::Read,
                n,
                None,
                Start::DropCaches,
            )?;
            self.measure(&xn("plain_warm"), rep, Kind::Read, n, None, Start::Warm)?;
        }
        self.measure(
            "stat_plain_cold",
            rep,
            Kind::Stat,
            1,
            None,
            Start::DropCaches,
        )?;
        self.measure("stat_plain_warm", rep, Kind::Stat, 1, None, Start::Warm)?;

        // Cold without prefetch, then warm and re-reads on the same mount.
        let cache_a = self.fresh_cache("cache-a")?;
        let m = self.mount_cold(&cache_a, false)?;
        self.measure(
            "arbor_cold_noprefetch",
            rep,
            Kind::Read,
            1,
            Some(&m),
            Start::FreshMount,
        )?;
        let at_end = m.metrics()?;
        self.measure("arbor_warm", rep, Kind::Read, 1, Some(&m), Start::Warm)?;
        if n > 1 {
            self.measure(&xn("arbor_warm"), rep, Kind::Read, n, Some(&m), Start::Warm)?;
        }
        self.measure(
            "arbor_memcache",
            rep,
            Kind::Read,
            1,
            Some(&m),
            Start::DropCaches,
        )?;
        let after = m.metrics()?;
        Self::check_no_fetch(&at_end, &after, "arbor_memcache");
        self.record_cold(
            "arbor_cold_noprefetch",
            rep,
            "no-prefetch",
            &m,
            &at_end,
            None,
        );
        m.stop()?;

        // A fresh mount over the chunk cache that run filled: stat, then reads from disk.
        let m = self.mount_cold(&cache_a, false)?;
        let before = m.metrics()?;
        self.measure(
            "stat_arbor_fresh",
            rep,
            Kind::Stat,
            1,
            Some(&m),
            Start::FreshMount,
        )?;
        self.measure("stat_arbor_warm", rep, Kind::Stat, 1, Some(&m), Start::Warm)?;
        self.measure(
            "arbor_diskcache",
            rep,
            Kind::Read,
            1,
            Some(&m),
            Start::DropCaches,
        )?;
        let after = m.metrics()?;
        Self::check_no_fetch(&before, &after, "stat_arbor_fresh/arbor_diskcache");
        m.stop()?;

        // Cold with prefetch on.
        self.cold_prefetch(rep, "arbor_cold_prefetch", 1)?;
        if self.eager {
            // The rest fetched at once, as nydusd's default whole-blob prefetch does.
            let cache = self.fresh_cache("cache-eager")?;
            self.arbor_args.push("--prefetch-rest-eager".into());
            let m = self.mount_cold(&cache, true);
            self.arbor_args.pop();
            let m = m?;
            self.measure(
                "arbor_cold_eager",
                rep,
                Kind::Read,
                1,
                Some(&m),
                Start::FreshMount,
            )?;
            let at_end = m.metrics()?;
            self.record_cold("arbor_cold_eager", rep, "eager", &m, &at_end, None);
            m.stop()?;
        }
        if n > 1 {
            self.cold_prefetch(rep, &xn("arbor_cold_prefetch"), n)?;
            let cache = self.fresh_cache("cache-e")?;
            let m = self.mount_cold(&cache, false)?;
            self.measure(
                &xn("arbor_cold_noprefetch"),
                rep,
                Kind::Read,
                n,
                Some(&m),
                Start::FreshMount,
            )?;
            let at_end = m.metrics()?;
            self.record_cold(
                &xn("arbor_cold_noprefetch"),
                rep,
                &format!("no-prefetch, {n} threads"),
                &m,
                &at_end,
                None,
            );
            m.stop()?;
        }
        self.nydus_repetition(rep)
    }

    /// nydusd: cold on demand, then warm and after drop_caches on that mount; cold with its
    /// default whole-blob prefetch on a fresh mount and blob cache.
    fn nydus_repetition(&mut self, rep: u32) -> Result<()> {
        let Some(nydus) = self.nydus.take() else {
            return Ok(());
        };
        let r = (|| {
            let cache = self.fresh_cache("nydus-cache-a")?;
            drop_caches()?;
            let m = self.nydus_mount(&nydus, &cache, false)?;
            self.measure(
                "nydus_cold_noprefetch",
                rep,
                Kind::Read,
                1,
                Some(&m),
                Start::FreshMount,
            )?;
            self.measure("nydus_warm", rep, Kind::Read, 1, Some(&m), Start::Warm)?;
            self.measure(
                "nydus_blobcache",
                rep,
                Kind::Read,
                1,
                Some(&m),
                Start::DropCaches,
            )?;
            m.stop()?;
            let cache = self.fresh_cache("nydus-cache-b")?;
            drop_caches()?;
            let m = self.nydus_mount(&nydus, &cache, true)?;
            self.measure(
                "nydus_cold_prefetch",
                rep,
                Kind::Read,
                1,
                Some(&m),
                Start::FreshMount,
            )?;
            m.stop()?;
            anyhow::Ok(())
        })();
        self.nydus = Some(nydus);
        r
    }

    fn nydus_mount(&mut self, nydus: &Nydus, cache: &Path, prefetch: bool) -> Result<FuseDaemon> {
        self.mounts += 1;
        let dir = self.scratch.join(format!("mount-{}", self.mounts));
        FuseDaemon::start_nydusd(nydus, &dir, cache, prefetch, self.clk_tck)
    }

    fn cold_prefetch(&mut self, rep: u32, key: &str, threads: usize) -> Result<()> {
        let cache = self.fresh_cache("cache-b")?;
        let m = self.mount_cold(&cache, true)?;
        self.measure(key, rep, Kind::Read, threads, Some(&m), Start::FreshMount)?;
        let at_end = m.metrics()?;
        if threads == 1 {
            // Re-read from the page cache while the rest of the layer is still fetched.
            let running = !m.log_tail(1000).contains("prefetch done");
            self.measure(
                "arbor_warm_prefetching",
                rep,
                Kind::Read,
                1,
                Some(&m),
                Start::Warm,
            )?;
            if !running {
                println!("  (the background fetch had already finished)");
            }
        }
        let secs = m.wait_prefetch(1)?;
        let after = m.metrics()?;
        let variant = if threads > 1 {
            format!("prefetch, {threads} threads")
        } else {
            "prefetch".to_string()
        };
        self.record_cold(key, rep, &variant, &m, &at_end, Some((&after, secs)));
        m.stop()?;
        Ok(())
    }

    /// Warns if the registry served anything between two scrapes (the reads between them
    /// should all have come from arbor's caches).
    fn check_no_fetch(before: &MetricMap, after: &MetricMap, what: &str) {
        let k = "arbor_fetch_bytes_total{source=\"registry\"}";
        let d = metric(after, k) - metric(before, k);
        if d > 0.0 {
            eprintln!(
                "warning: {what}: {d} bytes came from the registry, expected every read to hit \
                 arbor's caches"
            );
        }
    }

    fn summarize(&self) -> Vec<ScenarioSummary> {
        let defs = scenario_defs(self.threads);
        let mut out: Vec<ScenarioSummary> = Vec::new();
        for (key, label, kind, cp) in defs {
            let mine: Vec<&Sample> = self.samples.iter().filter(|s| s.key == key).collect();
            if mine.is_empty() {
                continue;
            }
            let secs = Spread::of(&mine.iter().map(|s| s.seconds).collect::<Vec<_>>());
            let items = mine[0].items;
            let bytes = mine[0].bytes;
            let reader_cpu = Spread::of(&mine.iter().map(|s| s.reader_cpu).collect::<Vec<_>>());
            let arbor_cpu: Vec<f64> = mine.iter().filter_map(|s| s.arbor_cpu).collect();
            let with_mount: Vec<f64> = mine
                .iter()
                .filter_map(|s| s.mount_seconds.map(|m| m + s.seconds))
                .collect();
            let ratio = cp.as_ref().and_then(|c| {
                out.iter()
                    .find(|o| &o.key == c)
                    .map(|o| secs.median / o.seconds.median)
            });
            out.push(ScenarioSummary {
                key,
                label,
                kind,
                counterpart: cp,
                seconds: secs,
                runs: mine.iter().map(|s| s.seconds).collect(),
                items,
                bytes,
                reader_cpu: reader_cpu.median,
                arbor_cpu: (!arbor_cpu.is_empty()).then(|| Spread::of(&arbor_cpu).median),
                ratio,
                with_mount: (!with_mount.is_empty()).then(|| Spread::of(&with_mount).median),
            });
        }
        out
    }

    /// Medians per cold-run variant of the registry traffic.
    fn traffic_summary(&self) -> Value {
        let mut variants: Vec<String> = Vec::new();
        for r in &self.cold_runs {
            let v = r["variant"].as_str().unwrap_or("?").to_string();
            if !variants.contains(&v) {
                variants.push(v);
            }
        }
        let med = |v: &str, path: &str| {
            let vals: Vec<f64> = self
                .cold_runs
                .iter()
                .filter(|r| r["variant"] == v)
                .filter_map(|r| r.pointer(path).and_then(Value::as_f64))
                .collect();
            (!vals.is_empty()).then(|| Spread::of(&vals).median)
        };
        Value::Array(
            variants
                .iter()
                .map(|v| {
                    json!({
                        "variant": v,
                        "runs": self.cold_runs.iter().filter(|r| r["variant"] == v.as_str()).count(),
                        "mount_ready_seconds": med(v, "/mount_ready_seconds"),
                        "registry_bytes_at_end": med(v, "/at_end_of_read/registry_bytes"),
                        "registry_requests_at_end": med(v, "/at_end_of_read/registry_requests"),
                        "chunks_fetched_at_end": med(v, "/at_end_of_read/chunks_fetched"),
                        "chunks_memory_at_end": med(v, "/at_end_of_read/chunks_memory"),
                        "chunks_cache_at_end": med(v, "/at_end_of_read/chunks_cache"),
                        "fetch_seconds_sum_at_end": med(v, "/at_end_of_read/fetch_seconds_sum"),
                        "arbor_cpu_seconds_at_end": med(v, "/at_end_of_read/arbor_cpu_seconds"),
                        "registry_bytes_total": med(v, "/after_prefetch/registry_bytes"),
                        "registry_requests_total": med(v, "/after_prefetch/registry_requests"),
                        "prefetch_bytes_total": med(v, "/after_prefetch/prefetch_bytes"),
                        "prefetch_seconds_logged": med(v, "/prefetch_seconds_logged"),
                    })
                })
                .collect(),
        )
    }
}

fn metric(m: &MetricMap, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------
// Results

struct ScenarioSummary {
    key: String,
    label: String,
    kind: Kind,
    counterpart: Option<String>,
    seconds: Spread,
    runs: Vec<f64>,
    items: u64,
    bytes: u64,
    reader_cpu: f64,
    arbor_cpu: Option<f64>,
    /// Median time over the counterpart's median time.
    ratio: Option<f64>,
    /// For a first pass over fresh mounts: the median of mount time plus pass time.
    with_mount: Option<f64>,
}

impl ScenarioSummary {
    fn mb_per_s(&self) -> Option<f64> {
        (self.kind == Kind::Read).then(|| self.bytes as f64 / MB / self.seconds.median)
    }

    fn items_per_s(&self) -> f64 {
        self.items as f64 / self.seconds.median
    }

    fn to_json(&self) -> Value {
        json!({
            "key": self.key,
            "label": self.label,
            "kind": if self.kind == Kind::Read { "read" } else { "stat" },
            "seconds": self.seconds.to_json(),
            "runs_seconds": self.runs,
            "mb_per_s": self.mb_per_s(),
            "files_per_s": (self.kind == Kind::Read).then(|| self.items_per_s()),
            "entries_per_s": (self.kind == Kind::Stat).then(|| self.items_per_s()),
            "items": self.items,
            "bytes": self.bytes,
            "reader_cpu_seconds_median": self.reader_cpu,
            "arbor_cpu_seconds_median": self.arbor_cpu,
            "counterpart": self.counterpart,
            "ratio_to_counterpart": self.ratio,
            "mount_plus_pass_seconds_median": self.with_mount,
        })
    }
}

fn print_table(scenarios: &[ScenarioSummary], data: &Dataset, reps: u32) {
    println!(
        "fuse read: {} ({} files, {:.1} MB), {reps} reps, medians; ratio = time / plain dir's",
        tree(),
        data.files,
        data.bytes as f64 / MB
    );
    println!(
        "{:<44} {:>9} {:>8} {:>8} {:>8} {:>9} {:>7} {:>9} {:>9}",
        "scenario", "median s", "min s", "max s", "MB/s", "files/s", "ratio", "cpu s", "+mount s"
    );
    for s in scenarios {
        let ratio = s
            .ratio
            .map(|r| format!("{r:.2}x"))
            .unwrap_or_else(|| "-".into());
        let mbs = s
            .mb_per_s()
            .map(|v| format!("{v:.1}"))
            .unwrap_or_else(|| "-".into());
        let cpu = match s.arbor_cpu {
            Some(a) => format!("{:.2}+{:.2}", s.reader_cpu, a),
            None => format!("{:.2}", s.reader_cpu),
        };
        let with_mount = s
            .with_mount
            .map(|v| format!("{v:.3}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<44} {:>9.3} {:>8.3} {:>8.3} {:>8} {:>9.0} {:>7} {:>9} {:>9}",
            s.label,
            s.seconds.median,
            s.seconds.min,
            s.seconds.max,
            mbs,
            s.items_per_s(),
            ratio,
            cpu,
            with_mount
        );
    }
    println!(
        "(files/s counts entries for lstat rows; cpu s = this process [+ arbor], median; \
         \"same mount\" re-reads come from arbor's memory cache, \"new mount\" from its disk cache;\n \
         cold passes over fresh mounts start the moment the mount is ready, the page cache dropped \
         before the daemon started; +mount s = median of daemon start to mounted plus the pass)"
    );
}

fn targets(scenarios: &[ScenarioSummary]) -> Vec<Value> {
    let ratio = |k: &str| scenarios.iter().find(|s| s.key == k).and_then(|s| s.ratio);
    let met = |ok: bool| if ok { "met" } else { "missed" };
    let mut out = Vec::new();
    if let Some(r) = ratio("arbor_warm") {
        out.push(json!({
            "name": "warm_read",
            "target": format!("<= {TARGET_WARM}x plain dir warm read"),
            "value": r,
            "met": r <= TARGET_WARM,
            "line": format!(
                "warm read within {TARGET_WARM}x of the plain directory: {r:.2}x ({})",
                met(r <= TARGET_WARM)
            ),
        }));
    }
    if let Some(r) = ratio("arbor_cold_prefetch") {
        let np = ratio("arbor_cold_noprefetch");
        out.push(json!({
            "name": "cold_read_all",
            "target": format!("<= {TARGET_COLD}x plain dir cold read (prefetch on)"),
            "value": r,
            "met": r <= TARGET_COLD,
            "no_prefetch_value": np,
            "line": format!(
                "cold read-all within {TARGET_COLD}x of the plain directory's cold read: {r:.2}x \
                 ({}); with --no-prefetch: {}",
                met(r <= TARGET_COLD),
                np.map(|v| format!("{v:.2}x ({})", met(v <= TARGET_COLD)))
                    .unwrap_or_else(|| "-".into())
            ),
        }));
    }
    let median = |k: &str| {
        scenarios
            .iter()
            .find(|s| s.key == k)
            .map(|s| s.seconds.median)
    };
    let with_mount = |k: &str| {
        scenarios
            .iter()
            .find(|s| s.key == k)
            .and_then(|s| s.with_mount)
    };
    for (mode, arbor, nydus) in [
        ("prefetch", "arbor_cold_prefetch", "nydus_cold_prefetch"),
        ("eager prefetch", "arbor_cold_eager", "nydus_cold_prefetch"),
        (
            "on demand",
            "arbor_cold_noprefetch",
            "nydus_cold_noprefetch",
        ),
    ] {
        if let (Some(a), Some(n)) = (median(arbor), median(nydus)) {
            let r = a / n;
            // Also from the daemon's start: what a user who mounts and then reads waits for.
            let total = with_mount(arbor).zip(with_mount(nydus));
            out.push(json!({
                "name": format!("cold_vs_nydusd_{}", mode.replace(' ', "_")),
                "target": format!("<= nydusd's cold read-all ({mode})"),
                "value": r,
                "met": r <= 1.0,
                "with_mount": total.map(|(a, n)| json!({"arbor": a, "nydusd": n, "ratio": a / n})),
                "line": format!(
                    "cold read-all ({mode}) no slower than nydusd's: arbor {a:.2} s vs nydusd \
                     {n:.2} s = {r:.2}x ({}){}",
                    met(r <= 1.0),
                    total
                        .map(|(a, n)| format!(
                            "; mount + read {a:.2} s vs {n:.2} s = {:.2}x",
                            a / n
                        ))
                        .unwrap_or_default()
                ),
            }));
        }
    }
    if let Some(r) = ratio("arbor_warm_prefetching") {
        out.push(json!({
            "name": "warm_read_while_prefetching",
            "target": format!("<= {TARGET_WARM}x plain dir warm read, background fetch running"),
            "value": r,
            "met": r <= TARGET_WARM,
            "line": format!(
                "warm read within {TARGET_WARM}x of the plain directory while the rest is \
                 fetched in the background: {r:.2}x ({})",
                met(r <= TARGET_WARM)
            ),
        }));
    }
    out
}

fn print_cold_runs(runs: &[Value], layer_bytes: u64) {
    println!(
        "registry traffic of each cold run (arbor metrics; converted layer blob {:.2} MB):",
        layer_bytes as f64 / MB
    );
    println!(
        "{:<24} {:>3} {:>7} {:>7} {:>8} {:>6} {:>5} {:>17} {:>8} {:>5} {:>9} {:>7}",
        "variant",
        "rep",
        "mount s",
        "read s",
        "MB read",
        "x blob",
        "reqs",
        "chunks fet/dsk/mem",
        "MB total",
        "reqs",
        "prefetch s",
        "cpu s"
    );
    let num = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_f64);
    let fmt = |x: Option<f64>, scale: f64, prec: usize| {
        x.map(|x| format!("{:.*}", prec, x / scale))
            .unwrap_or_else(|| "-".into())
    };
    for r in runs {
        let end_bytes = num(r, "/at_end_of_read/registry_bytes");
        let chunks = format!(
            "{}/{}/{}",
            fmt(num(r, "/at_end_of_read/chunks_fetched"), 1.0, 0),
            fmt(num(r, "/at_end_of_read/chunks_cache"), 1.0, 0),
            fmt(num(r, "/at_end_of_read/chunks_memory"), 1.0, 0),
        );
        println!(
            "{:<24} {:>3} {:>7} {:>7} {:>8} {:>6} {:>5} {:>17} {:>8} {:>5} {:>9} {:>7}",
            r["variant"].as_str().unwrap_or("?"),
            r["rep"],
            fmt(num(r, "/mount_ready_seconds"), 1.0, 3),
            fmt(num(r, "/read_seconds"), 1.0, 3),
            fmt(end_bytes, MB, 2),
            fmt(end_bytes.map(|b| b / layer_bytes.max(1) as f64), 1.0, 2),
            fmt(num(r, "/at_end_of_read/registry_requests"), 1.0, 0),
            chunks,
            fmt(num(r, "/after_prefetch/registry_bytes"), MB, 2),
            fmt(num(r, "/after_prefetch/registry_requests"), 1.0, 0),
            fmt(num(r, "/prefetch_seconds_logged"), 1.0, 2),
            fmt(num(r, "/at_end_of_read/arbor_cpu_seconds"), 1.0, 2),
        );
    }
    println!(
        "(\"MB read\", \"reqs\", chunks: registry bytes, range requests and chunk reads by source \
         (fetched / disk cache / memory cache) when the read of every file finished; \"x blob\": \
         MB read over the blob size; \"MB total\": after the background prefetch logged \
         \"prefetch done\"; cpu s: arbor's CPU time from mount to the end of the read)"
    );
}
