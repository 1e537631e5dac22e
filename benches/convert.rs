//! `bench-convert`: `arbor convert` against `skopeo copy --dest-compress-format=zstd:chunked`,
//! registry to registry, on the same multi-layer image built from Debian packages.
//!
//! The image is built once and cached (`target/bench-cache/`): `.deb` files fetched with
//! `apt-get download`, extracted with `dpkg-deb -x` into one root directory per layer, tarred
//! deterministically and written as an OCI layout with gzip layers. Each run pushes it to a private
//! source registry; every tool run then gets a fresh destination registry (so no tool can skip an
//! upload because the blob already exists) and skopeo's blob-info cache is deleted before each
//! skopeo run. Tool order alternates between repetitions.
//!
//! Benchmarks report, they do not judge: missed targets do not change the exit status, failing
//! tools do.

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use arbor_testkit::{ImageSpec, LayerSource, Registry, skopeo_push, tar_dir, write_oci_layout};
use clap::Parser;
use serde_json::{Value, json};

use arbor_benches::common;
use common::{
    MB, Spread, clock_ticks, describe, inspect_raw, machine_info, preflight, print_machine,
    resolve_debs, run_quiet, run_timed, tail, target_dir,
};

/// Tag of the image in the cached OCI layout.
const LAYOUT_TAG: &str = "bench";
/// Repository and tag used in the registries.
const SOURCE_REPO: &str = "bench/app:v1";
const TARGET_REPO: &str = "bench/app:converted";
/// Skopeo's blob-info cache (root, then rootless): it remembers which blobs a registry has and
/// what their compressed variants are, which would let a later run skip work.
const SKOPEO_BLOB_CACHES: &[&str] = &[
    "/var/lib/containers/cache/blob-info-cache-v1.boltdb",
    "~/.local/share/containers/cache/blob-info-cache-v1.boltdb",
];
/// Layer annotations that mark a zstd:chunked TOC (new and old key prefixes).
const TOC_ANNOTATIONS: &[&str] = &[
    "io.github.containers.zstd-chunked.manifest-position",
    "io.containers.zstd-chunked.manifest-position",
];
/// The targets of the issue: arbor at least this many times skopeo's throughput ...
const TARGET_THROUGHPUT: f64 = 4.0;
/// ... and at most this multiple of skopeo's output size.
const TARGET_SIZE: f64 = 1.05;

const AFTER_HELP: &str = "\
Sizes are in MB (10^6 bytes). Throughput is the uncompressed size of the image (the sum of
its layer tars) divided by the wall time of the tool run, registry to registry.

Needs root (dpkg-deb extracts files as their owners), skopeo, docker-registry, dpkg-deb and
apt-get, and a release build of arbor (cargo build --release -p arbor-cli).

Examples:
  cargo run --release -p arbor-benches --bin bench-convert
  cargo run --release -p arbor-benches --bin bench-convert -- --packages-small --reps 1
  benches/run-convert.sh --reps 5 --check";

#[derive(Parser)]
#[command(
    name = "bench-convert",
    about = "Benchmark `arbor convert` against `skopeo copy --dest-compress-format=zstd:chunked`",
    long_about = "Benchmarks `arbor convert` against `skopeo copy --dest-compress \
                  --dest-compress-format=zstd:chunked`, registry to registry, on the same \
                  multi-layer image (Debian packages: libc, Python, numpy/scipy/pandas, LLVM; \
                  about 550 MB uncompressed). Prints median/min/max wall time, throughput and \
                  output size per tool, the arbor/skopeo ratios and whether the targets \
                  (throughput >= 4x, size <= 1.05x) are met, and writes the same as JSON.",
    after_help = AFTER_HELP
)]
struct Args {
    /// Repetitions; each runs both tools once, alternating which one goes first.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// Use a small image (about 30 MB) for a quick smoke run.
    #[arg(long, env = "ARBOR_BENCH_SMALL")]
    packages_small: bool,
    /// Where downloaded .debs, layer tars and the OCI layout are cached
    /// [default: <target dir>/bench-cache].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Rebuild the layer tars and the OCI layout even if the cache is up to date.
    #[arg(long)]
    rebuild: bool,
    /// The arbor binary [default: <target dir>/release/arbor].
    #[arg(long, value_name = "PATH")]
    arbor: Option<PathBuf>,
    /// Extra argument for `arbor convert` (repeatable), e.g. --arbor-arg=--threads=2.
    #[arg(long = "arbor-arg", value_name = "ARG", allow_hyphen_values = true)]
    arbor_args: Vec<String>,
    /// Also run `arbor check SOURCE OUTPUT` on both tools' outputs of the first repetition
    /// (not timed); a failed check makes the exit status non-zero.
    #[arg(long)]
    check: bool,
    /// Where to write the JSON results [default: <target dir>/bench/convert.json].
    #[arg(long, value_name = "PATH")]
    json_out: Option<PathBuf>,
    /// Time limit of one tool run, in seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
}

/// One layer of the benchmark image: the Debian packages extracted into it.
struct LayerDef {
    name: &'static str,
    packages: &'static [&'static str],
}

/// The full image: about 550 MB uncompressed, from tens of thousands of small files (Python and
/// Perl modules, time zones, certificates) to 100 MB shared libraries (LLVM, OpenBLAS).
const FULL_IMAGE: &[LayerDef] = &[
    LayerDef {
        name: "base",
        packages: &[
            "libc6",
            "libgcc-s1",
            "libstdc++6",
            "zlib1g",
            "busybox-static",
            "libssl3",
            "ca-certificates",
            "tzdata",
            "coreutils",
            "bash",
            "perl-base",
        ],
    },
    LayerDef {
        name: "interpreters",
        packages: &[
            "python3.11-minimal",
            "libpython3.11-minimal",
            "libpython3.11-stdlib",
            "libpython3.11",
            "python3.11",
            "perl-modules-5.36",
            "libperl5.36",
        ],
    },
    LayerDef {
        name: "scientific",
        packages: &[
            "python3-numpy",
            "libopenblas0-pthread",
            "libgfortran5",
            "libblas3",
            "liblapack3",
            "python3-scipy",
            "python3-pandas",
            "python3-pandas-lib",
        ],
    },
    LayerDef {
        name: "toolchain",
        packages: &["libllvm15", "libclang-cpp15", "libz3-4", "libicu72"],
    },
];

/// The smoke-test image: about 30 MB.
const SMALL_IMAGE: &[LayerDef] = &[
    LayerDef {
        name: "base",
        packages: &["libc6", "zlib1g", "busybox-static", "tzdata"],
    },
    LayerDef {
        name: "python",
        packages: &["python3.11-minimal", "libpython3.11-minimal"],
    },
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    Arbor,
    Skopeo,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Arbor => "arbor",
            Tool::Skopeo => "skopeo",
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
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
        .unwrap_or_else(|| target_dir.join("bench/convert.json"));

    preflight(
        &arbor,
        &["skopeo", "docker-registry", "dpkg-deb", "apt-get"],
        "dpkg-deb -x must keep file owners for a realistic image",
    )?;

    let machine = machine_info(&arbor);
    print_machine(&machine);

    let (set_name, set) = if args.packages_small {
        ("small", SMALL_IMAGE)
    } else {
        ("full", FULL_IMAGE)
    };
    let image = prepare_image(&cache_dir, set_name, set, args.rebuild)?;
    print_image(&image);

    let source = Registry::start().context("starting the source registry")?;
    let src_ref = source.reference(SOURCE_REPO);
    let t = Instant::now();
    skopeo_push(&image.layout, LAYOUT_TAG, &src_ref, None)
        .context("pushing the benchmark image to the source registry")?;
    println!(
        "pushed to source registry {src_ref} in {:.1} s\n",
        t.elapsed().as_secs_f64()
    );

    let clk_tck = clock_ticks();
    let timeout = Duration::from_secs(args.timeout);
    let mut runs: Vec<RunResult> = Vec::new();
    for rep in 0..args.reps {
        let order = if rep % 2 == 0 {
            [Tool::Arbor, Tool::Skopeo]
        } else {
            [Tool::Skopeo, Tool::Arbor]
        };
        for (pos, tool) in order.into_iter().enumerate() {
            let check = args.check && rep == 0;
            let r = run_once(
                tool,
                &arbor,
                &args.arbor_args,
                &src_ref,
                timeout,
                clk_tck,
                check,
            )
            .with_context(|| format!("repetition {}: {}", rep + 1, tool.name()))?;
            println!(
                "rep {}/{} #{} {:<6} {:>8.2} s wall {:>8.2} s cpu  {:>8.1} MB/s  output {:>8.1} MB  \
                 layers {}{}",
                rep + 1,
                args.reps,
                pos + 1,
                tool.name(),
                r.wall_seconds,
                r.cpu_seconds,
                image.uncompressed_bytes as f64 / MB / r.wall_seconds,
                r.output_bytes as f64 / MB,
                r.layer_summary(),
                r.check
                    .as_ref()
                    .map(|c| format!("  check: {c}"))
                    .unwrap_or_default(),
            );
            runs.push(RunResult {
                rep: rep + 1,
                position: pos + 1,
                ..r
            });
        }
    }
    drop(source);

    let summary = summarize(&runs, image.uncompressed_bytes)?;
    println!();
    print_summary(&summary, &image, args.reps);

    let checks_failed: Vec<String> = runs
        .iter()
        .filter_map(|r| match &r.check {
            Some(c) if c != "ok" => Some(format!("{} rep {}: {c}", r.tool.name(), r.rep)),
            _ => None,
        })
        .collect();

    let report = json!({
        "benchmark": "convert",
        "command": std::env::args().collect::<Vec<_>>(),
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "machine": machine,
        "image": image.to_json(),
        "reps": args.reps,
        "commands": {
            "arbor": describe(&arbor_command(&arbor, &args.arbor_args, "SRC", "DST")),
            "skopeo": describe(&skopeo_command("SRC", "DST")),
        },
        "runs": runs.iter().map(RunResult::to_json).collect::<Vec<_>>(),
        "summary": summary.to_json(),
        "checks_failed": checks_failed,
    });
    if let Some(dir) = json_out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = serde_json::to_vec_pretty(&report)?;
    text.push(b'\n');
    fs::write(&json_out, text).with_context(|| format!("writing {}", json_out.display()))?;
    println!("\nJSON results: {}", json_out.display());

    if !checks_failed.is_empty() {
        bail!("arbor check failed:\n  {}", checks_failed.join("\n  "));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The image

/// Counts of what a layer holds.
#[derive(Default)]
struct TreeStats {
    regular_files: u64,
    /// Regular files smaller than 16 KiB.
    small_files: u64,
    /// Regular files of 1 MiB or more.
    big_files: u64,
    largest_file: u64,
    directories: u64,
    symlinks: u64,
}

impl TreeStats {
    fn to_json(&self) -> Value {
        json!({
            "regular_files": self.regular_files,
            "small_files_lt_16k": self.small_files,
            "big_files_ge_1m": self.big_files,
            "largest_file_bytes": self.largest_file,
            "directories": self.directories,
            "symlinks": self.symlinks,
        })
    }
}

struct Image {
    set: String,
    layout: PathBuf,
    manifest_digest: String,
    /// The cached description: per layer name, packages, .deb files, sizes and stats.
    layers: Vec<Value>,
    uncompressed_bytes: u64,
    source_bytes: u64,
}

impl Image {
    fn to_json(&self) -> Value {
        json!({
            "set": self.set,
            "manifest_digest": self.manifest_digest,
            "uncompressed_bytes": self.uncompressed_bytes,
            "source_gzip_bytes": self.source_bytes,
            "layers": self.layers,
        })
    }
}

/// Returns the cached image for `set`, building what is missing or out of date.
fn prepare_image(cache: &Path, set_name: &str, set: &[LayerDef], rebuild: bool) -> Result<Image> {
    let debs_dir = cache.join("debs");
    fs::create_dir_all(&debs_dir).with_context(|| format!("creating {}", debs_dir.display()))?;
    let all: Vec<&str> = set
        .iter()
        .flat_map(|l| l.packages.iter().copied())
        .collect();
    let debs = resolve_debs(&debs_dir, &all)?;

    let dir = cache.join(set_name);
    let stamp_path = dir.join("image.json");
    // What the cached build was made from: if this changes, everything is rebuilt.
    let key = json!(
        set.iter()
            .map(|l| json!({
                "name": l.name,
                "debs": l.packages.iter().map(|p| &debs[*p]).collect::<Vec<_>>(),
            }))
            .collect::<Vec<_>>()
    );
    if !rebuild && let Some(img) = load_cached(&dir, &stamp_path, &key, set_name) {
        println!("image: cached in {}", dir.display());
        return Ok(img);
    }

    println!("image: building in {}", dir.display());
    let t_all = Instant::now();
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir)?;
    let mut layers = Vec::new();
    let mut tars = Vec::new();
    for (i, def) in set.iter().enumerate() {
        let t = Instant::now();
        let root = dir.join(format!("rootfs-{i}"));
        fs::create_dir_all(&root)?;
        for pkg in def.packages {
            let deb = debs_dir.join(&debs[*pkg]);
            run_quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))
                .with_context(|| format!("extracting {}", deb.display()))?;
        }
        let mut stats = TreeStats::default();
        tree_stats(&root, &mut stats)?;
        let tar_path = dir.join(format!("layer-{i}.tar"));
        let tmp = dir.join(format!("layer-{i}.tar.tmp"));
        {
            let out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            tar_dir(&root, out).with_context(|| format!("tarring {}", root.display()))?;
        }
        fs::rename(&tmp, &tar_path)?;
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
        let tar_bytes = fs::metadata(&tar_path)?.len();
        println!(
            "  layer {} ({}): {:.1} MB tar, {} files, {:.1} s",
            i + 1,
            def.name,
            tar_bytes as f64 / MB,
            stats.regular_files,
            t.elapsed().as_secs_f64()
        );
        layers.push(json!({
            "name": def.name,
            "packages": def.packages,
            "debs": def.packages.iter().map(|p| &debs[*p]).collect::<Vec<_>>(),
            "tar": tar_path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "uncompressed_bytes": tar_bytes,
            "stats": stats.to_json(),
        }));
        tars.push(tar_path);
    }

    let t = Instant::now();
    let layout = dir.join("oci");
    let spec = ImageSpec {
        layers: tars.iter().cloned().map(LayerSource::TarFile).collect(),
        cmd: vec!["/usr/bin/python3.11".into()],
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        ..ImageSpec::default()
    };
    let manifest_digest = write_oci_layout(&layout, LAYOUT_TAG, &spec)?;
    let gzip_sizes = layout_layer_sizes(&layout, &manifest_digest)?;
    ensure!(
        gzip_sizes.len() == layers.len(),
        "OCI layout has {} layers, expected {}",
        gzip_sizes.len(),
        layers.len()
    );
    for (l, size) in layers.iter_mut().zip(&gzip_sizes) {
        l["gzip_bytes"] = json!(size);
    }
    println!(
        "  OCI layout (gzip level 6) written in {:.1} s; image built in {:.1} s",
        t.elapsed().as_secs_f64(),
        t_all.elapsed().as_secs_f64()
    );
    let stamp = json!({"key": key, "manifest_digest": manifest_digest, "layers": layers});
    fs::write(&stamp_path, serde_json::to_vec_pretty(&stamp)?)?;
    load_cached(&dir, &stamp_path, &key, set_name)
        .context("the image just built does not read back from its stamp")
}

/// The image described by `stamp_path`, if it was built from `key` and its files are all there.
fn load_cached(dir: &Path, stamp_path: &Path, key: &Value, set_name: &str) -> Option<Image> {
    let stamp: Value = serde_json::from_slice(&fs::read(stamp_path).ok()?).ok()?;
    if &stamp["key"] != key {
        return None;
    }
    let layers = stamp["layers"].as_array()?.clone();
    let mut uncompressed = 0;
    let mut gzip = 0;
    for l in &layers {
        let tar = dir.join(l["tar"].as_str()?);
        let size = l["uncompressed_bytes"].as_u64()?;
        if fs::metadata(&tar).ok()?.len() != size {
            return None;
        }
        uncompressed += size;
        gzip += l["gzip_bytes"].as_u64()?;
    }
    let manifest_digest = stamp["manifest_digest"].as_str()?.to_string();
    let layout = dir.join("oci");
    // The layout must still hold every blob of the manifest.
    let sizes = layout_layer_sizes(&layout, &manifest_digest).ok()?;
    if sizes.iter().sum::<u64>() != gzip {
        return None;
    }
    Some(Image {
        set: set_name.to_string(),
        layout,
        manifest_digest,
        layers,
        uncompressed_bytes: uncompressed,
        source_bytes: gzip,
    })
}

/// Sizes of the layer blobs of manifest `digest` in an OCI layout; fails if a blob is missing.
fn layout_layer_sizes(layout: &Path, digest: &str) -> Result<Vec<u64>> {
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let manifest: Value = serde_json::from_slice(&fs::read(blob(digest))?)?;
    let mut sizes = Vec::new();
    for l in manifest["layers"]
        .as_array()
        .context("manifest without layers")?
    {
        let d = l["digest"].as_str().context("layer without digest")?;
        let size = l["size"].as_u64().context("layer without size")?;
        let on_disk = fs::metadata(blob(d))
            .with_context(|| format!("layer blob {d}"))?
            .len();
        ensure!(
            on_disk == size,
            "layer blob {d} has {on_disk} bytes, manifest says {size}"
        );
        sizes.push(size);
    }
    Ok(sizes)
}

fn tree_stats(dir: &Path, stats: &mut TreeStats) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let meta = fs::symlink_metadata(e.path())?;
        let ft = meta.file_type();
        if ft.is_dir() {
            stats.directories += 1;
            tree_stats(&e.path(), stats)?;
        } else if ft.is_symlink() {
            stats.symlinks += 1;
        } else if ft.is_file() {
            let size = meta.len();
            stats.regular_files += 1;
            stats.small_files += u64::from(size < 16 << 10);
            stats.big_files += u64::from(size >= 1 << 20);
            stats.largest_file = stats.largest_file.max(size);
        }
    }
    Ok(())
}

fn print_image(image: &Image) {
    println!(
        "image ({}): {} layers, {:.1} MB uncompressed, {:.1} MB gzip, manifest {}",
        image.set,
        image.layers.len(),
        image.uncompressed_bytes as f64 / MB,
        image.source_bytes as f64 / MB,
        image.manifest_digest
    );
    for (i, l) in image.layers.iter().enumerate() {
        let st = &l["stats"];
        println!(
            "  layer {} {:<13} {:>7.1} MB tar {:>7.1} MB gzip  {:>6} files ({} < 16 KiB, {} >= 1 MiB, \
             largest {:.1} MB)",
            i + 1,
            l["name"].as_str().unwrap_or("?"),
            l["uncompressed_bytes"].as_f64().unwrap_or(0.0) / MB,
            l["gzip_bytes"].as_f64().unwrap_or(0.0) / MB,
            st["regular_files"],
            st["small_files_lt_16k"],
            st["big_files_ge_1m"],
            st["largest_file_bytes"].as_f64().unwrap_or(0.0) / MB,
        );
        let debs: Vec<&str> = l["debs"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!("      {}", debs.join(" "));
    }
}

// ---------------------------------------------------------------------------------------------
// Running the tools

/// One timed tool run.
struct RunResult {
    rep: u32,
    position: usize,
    tool: Tool,
    wall_seconds: f64,
    /// User + system CPU time of the tool process.
    cpu_seconds: f64,
    /// Sum of the layer sizes in the destination manifest.
    output_bytes: u64,
    /// Per output layer: media type, size, whether it carries a zstd:chunked TOC annotation.
    layers: Vec<(String, u64, bool)>,
    /// Result of `arbor check` on the output, when asked for.
    check: Option<String>,
    /// arbor's `--json` report.
    tool_report: Option<Value>,
}

impl RunResult {
    fn layer_summary(&self) -> String {
        let zstd = self
            .layers
            .iter()
            .filter(|(mt, ..)| mt.ends_with("+zstd"))
            .count();
        let toc = self.layers.iter().filter(|(.., toc)| *toc).count();
        format!(
            "{}/{} zstd, {}/{} TOC",
            zstd,
            self.layers.len(),
            toc,
            self.layers.len()
        )
    }

    fn to_json(&self) -> Value {
        json!({
            "rep": self.rep,
            "position": self.position,
            "tool": self.tool.name(),
            "wall_seconds": self.wall_seconds,
            "cpu_seconds": self.cpu_seconds,
            "output_bytes": self.output_bytes,
            "layers": self.layers.iter().map(|(mt, size, toc)| json!({
                "media_type": mt, "size": size, "zstd_chunked_toc_annotation": toc,
            })).collect::<Vec<_>>(),
            "check": self.check,
            "tool_report": self.tool_report,
        })
    }
}

fn arbor_command(arbor: &Path, extra: &[String], src: &str, dst: &str) -> Command {
    let mut c = Command::new(arbor);
    c.args(["convert", "--plain-http", "--json"])
        .args(extra)
        .args([src, dst]);
    c
}

fn skopeo_command(src: &str, dst: &str) -> Command {
    let mut c = Command::new("skopeo");
    // --insecure-policy and --*-no-creds: independent of the host's policy.json and auth files.
    c.args([
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--src-no-creds",
        "--dest-no-creds",
        "--dest-compress",
        "--dest-compress-format=zstd:chunked",
    ])
    .arg(format!("docker://{src}"))
    .arg(format!("docker://{dst}"));
    c
}

/// Runs `tool` once from `src_ref` to a fresh registry and inspects what it wrote.
fn run_once(
    tool: Tool,
    arbor: &Path,
    arbor_args: &[String],
    src_ref: &str,
    timeout: Duration,
    clk_tck: f64,
    check: bool,
) -> Result<RunResult> {
    let dest = Registry::start().context("starting a destination registry")?;
    let dst_ref = dest.reference(TARGET_REPO);
    let mut cmd = match tool {
        Tool::Arbor => arbor_command(arbor, arbor_args, src_ref, &dst_ref),
        Tool::Skopeo => {
            clear_skopeo_cache()?;
            skopeo_command(src_ref, &dst_ref)
        }
    };
    let desc = describe(&cmd);

    let cpu0 = children_cpu_ticks()?;
    let t = Instant::now();
    let (status, stdout, stderr) = run_timed(&mut cmd, timeout).context(desc.clone())?;
    let wall_seconds = t.elapsed().as_secs_f64();
    let cpu_seconds = (children_cpu_ticks()? - cpu0) as f64 / clk_tck;
    if !status.success() {
        bail!(
            "`{desc}` failed ({status}) after {wall_seconds:.1} s:\n{}\n(destination registry log tail:\n{})",
            tail(&stderr, 40),
            arbor_testkit::log_tail(dest.log_path(), 20)
        );
    }

    let tool_report = match tool {
        Tool::Arbor => match serde_json::from_str::<Value>(&stdout) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!(
                    "warning: arbor --json output is not JSON ({e}): {:.300}",
                    stdout
                );
                None
            }
        },
        Tool::Skopeo => None,
    };

    let layers = destination_layers(&dest, &dst_ref)?;
    ensure!(
        !layers.is_empty(),
        "{dst_ref}: the output image has no layers"
    );
    for (mt, size, _) in &layers {
        ensure!(
            mt.ends_with("+zstd"),
            "{} wrote a layer ({size} bytes) with media type {mt}, not +zstd",
            tool.name()
        );
    }
    let output_bytes = layers.iter().map(|(_, s, _)| s).sum();

    let check = check.then(|| {
        let mut c = Command::new(arbor);
        c.args(["check", "--plain-http", src_ref, &dst_ref]);
        match run_timed(&mut c, timeout) {
            Ok((st, _, _)) if st.success() => "ok".to_string(),
            Ok((st, out, err)) => format!("FAILED ({st}): {}", tail(&format!("{out}{err}"), 15)),
            Err(e) => format!("FAILED: {e:#}"),
        }
    });

    Ok(RunResult {
        rep: 0,
        position: 0,
        tool,
        wall_seconds,
        cpu_seconds,
        output_bytes,
        layers,
        check,
        tool_report,
    })
}

/// Deletes skopeo's blob-info caches so that no run profits from an earlier one.
fn clear_skopeo_cache() -> Result<()> {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    for p in SKOPEO_BLOB_CACHES {
        let path = match p.strip_prefix("~/") {
            Some(rest) => Path::new(&home).join(rest),
            None => PathBuf::from(p),
        };
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(())
}

/// (media type, size, has a zstd:chunked TOC annotation) of every layer of `reference` in
/// `registry`; follows an index to all its manifests.
fn destination_layers(registry: &Registry, reference: &str) -> Result<Vec<(String, u64, bool)>> {
    let manifest = inspect_raw(reference)?;
    let mut out = Vec::new();
    if let Some(children) = manifest["manifests"].as_array() {
        let repo = TARGET_REPO.split(':').next().unwrap_or(TARGET_REPO);
        for m in children {
            let d = m["digest"].as_str().context("index entry without digest")?;
            let child = inspect_raw(&registry.reference(&format!("{repo}@{d}")))?;
            collect_layers(&child, &mut out)?;
        }
    } else {
        collect_layers(&manifest, &mut out)?;
    }
    Ok(out)
}

fn collect_layers(manifest: &Value, out: &mut Vec<(String, u64, bool)>) -> Result<()> {
    for l in manifest["layers"]
        .as_array()
        .context("manifest without layers")?
    {
        let mt = l["mediaType"].as_str().unwrap_or("").to_string();
        let size = l["size"].as_u64().context("layer without size")?;
        let toc = TOC_ANNOTATIONS
            .iter()
            .any(|k| l["annotations"].get(*k).is_some());
        out.push((mt, size, toc));
    }
    Ok(())
}

/// CPU time (user + system, in clock ticks) of this process's reaped children, from
/// `/proc/self/stat` (cutime and cstime).
fn children_cpu_ticks() -> Result<u64> {
    let stat = fs::read_to_string("/proc/self/stat")?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/self/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 16 and 17 of stat(5); `after` starts at field 3.
    let cutime: u64 = fields.get(13).context("no cutime")?.parse()?;
    let cstime: u64 = fields.get(14).context("no cstime")?.parse()?;
    Ok(cutime + cstime)
}

// ---------------------------------------------------------------------------------------------
// Results

struct ToolSummary {
    tool: Tool,
    wall: Spread,
    cpu: Spread,
    output_bytes: Spread,
    /// Uncompressed MB per second at the median wall time.
    mb_per_s: f64,
}

struct Summary {
    tools: Vec<ToolSummary>,
    /// arbor MB/s / skopeo MB/s.
    throughput_ratio: f64,
    /// arbor output size / skopeo output size.
    size_ratio: f64,
}

impl Summary {
    fn to_json(&self) -> Value {
        let tools: serde_json::Map<String, Value> = self
            .tools
            .iter()
            .map(|t| {
                (
                    t.tool.name().to_string(),
                    json!({
                        "wall_seconds": t.wall.to_json(),
                        "cpu_seconds": t.cpu.to_json(),
                        "output_bytes": t.output_bytes.to_json(),
                        "uncompressed_mb_per_s": t.mb_per_s,
                    }),
                )
            })
            .collect();
        json!({
            "tools": tools,
            "ratios_arbor_over_skopeo": {
                "throughput": self.throughput_ratio,
                "size": self.size_ratio,
            },
            "targets": [
                {
                    "name": "throughput",
                    "target": format!(">= {TARGET_THROUGHPUT}x skopeo"),
                    "value": self.throughput_ratio,
                    "met": self.throughput_met(),
                },
                {
                    "name": "size",
                    "target": format!("<= {TARGET_SIZE}x skopeo"),
                    "value": self.size_ratio,
                    "met": self.size_met(),
                },
            ],
        })
    }

    fn throughput_met(&self) -> bool {
        self.throughput_ratio >= TARGET_THROUGHPUT
    }

    fn size_met(&self) -> bool {
        self.size_ratio <= TARGET_SIZE
    }
}

fn summarize(runs: &[RunResult], uncompressed: u64) -> Result<Summary> {
    let tools: Vec<ToolSummary> = [Tool::Arbor, Tool::Skopeo]
        .into_iter()
        .map(|tool| {
            let mine: Vec<&RunResult> = runs.iter().filter(|r| r.tool == tool).collect();
            let wall = Spread::of(&mine.iter().map(|r| r.wall_seconds).collect::<Vec<_>>());
            ToolSummary {
                tool,
                wall,
                cpu: Spread::of(&mine.iter().map(|r| r.cpu_seconds).collect::<Vec<_>>()),
                output_bytes: Spread::of(
                    &mine
                        .iter()
                        .map(|r| r.output_bytes as f64)
                        .collect::<Vec<_>>(),
                ),
                mb_per_s: uncompressed as f64 / MB / wall.median,
            }
        })
        .collect();
    ensure!(
        tools.iter().all(|t| t.wall.median.is_finite()),
        "no runs to summarize"
    );
    let (a, s) = (&tools[0], &tools[1]);
    Ok(Summary {
        throughput_ratio: a.mb_per_s / s.mb_per_s,
        size_ratio: a.output_bytes.median / s.output_bytes.median,
        tools,
    })
}

fn print_summary(summary: &Summary, image: &Image, reps: u32) {
    println!(
        "convert, registry to registry: {:.1} MB uncompressed ({:.1} MB gzip source) in {} layers, \
         {reps} reps",
        image.uncompressed_bytes as f64 / MB,
        image.source_bytes as f64 / MB,
        image.layers.len()
    );
    println!(
        "{:<8} {:>10} {:>9} {:>9} {:>10} {:>11} {:>11}",
        "tool", "median s", "min s", "max s", "MB/s", "output MB", "cpu s"
    );
    for t in &summary.tools {
        println!(
            "{:<8} {:>10.2} {:>9.2} {:>9.2} {:>10.1} {:>11.1} {:>11.1}",
            t.tool.name(),
            t.wall.median,
            t.wall.min,
            t.wall.max,
            t.mb_per_s,
            t.output_bytes.median / MB,
            t.cpu.median,
        );
    }
    println!(
        "arbor/skopeo: throughput {:.2}x, size {:.3}x",
        summary.throughput_ratio, summary.size_ratio
    );
    let met = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "target throughput >= {TARGET_THROUGHPUT}x skopeo: {:.2}x ({})",
        summary.throughput_ratio,
        met(summary.throughput_met())
    );
    println!(
        "target size <= {TARGET_SIZE}x skopeo: {:.3}x ({})",
        summary.size_ratio,
        met(summary.size_met())
    );
}
