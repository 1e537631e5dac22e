//! `bench-provision`: a burst of cold starts of one function on N nodes at the same moment, with
//! and without function trees (issue #11's proof), against a stock full pull.
//!
//! Setup, once per registry rate (`--registry-rates`, Mbit/s): a
//! [`arbor_testkit::cluster::Cluster`] of max(`--nodes`) nodes, each a network namespace on one
//! bridge behind a `tc tbf` link of `--node-rate` Mbit/s each way, and a registry namespace behind
//! a link of the registry rate. A `docker-registry` runs in it; the function image is pushed
//! with skopeo and converted with `arbor convert` (default: the start-up set inferred from the
//! entrypoint, placed first in each layer as its prefetch section).
//!
//! The image (built and cached by `pyimage.rs` under `--cache-dir`, as the other benches do):
//! Debian's `base` and `python` layers (CPython 3.11), a `pypi` layer with numpy and Flask and
//! their dependencies installed by pip from pinned manylinux wheels, and an `app` layer with
//! `/app/server.py`, a Flask app that imports numpy. Its `Cmd` is `python3.11 /app/server.py`.
//! It is smaller than bench-cold-start's (no scipy, pandas, scikit-learn) so that a full run
//! stays under 20 minutes (14 on the 2-core VM): at N = 32 with the 200 Mbit/s registry and no
//! trees, the registry ships 32 start-up sets (67 MB of files, about 35 MB on the wire, each).
//!
//! Then, for each mode and N (`--nodes`, using the first N nodes), `--reps` times:
//!
//! * **registry**: one fresh `arbord` per node (`[p2p] enabled = false`): lazy loading, every
//!   node reads its blocks from the registry;
//! * **tree**: the same with function trees (`[p2p] enabled = true`, the tree manager in an
//!   `arbord` on the host's side of the bridge; every Prepare carries the
//!   `containerd.io/snapshot/arbor.function` label, so all nodes are in one function's tree);
//! * **full** (N ≤ 8): what a stock node does, without containerd: each node downloads every
//!   layer blob of the original (gzip) image from the registry (`curl` inside the node's
//!   namespace, all layers at once) and unpacks them in order (`tar -x`).
//!
//! The arbords (fresh roots: empty caches) are started in parallel; then all N cold starts begin
//! together (a barrier). An Arbor node's cold start: Prepare its layers lazily through the
//! snapshots API with the labels `arbor pull --function` sends (a remote snapshot per layer,
//! bottom first; each is a FUSE mount), then read every file of the converted image's start-up
//! set (the prefetch sections' files) through the mount of its layer, with `--readers` threads.
//! A full-pull node reads the same files from its unpacked tree. A node is *ready* when it has
//! read all of them; afterwards every file read is checked against the sha256 of that path in
//! the original layer tar.
//!
//! Reported per (registry rate, mode, N): T, the time until the last node is ready; the median
//! node time; the bytes the registry sent (its link's counter); the largest download and upload
//! of any node's link; T(N)/T(1) per mode; registry-only T / tree T at each N; and, as all
//! nodes share this machine's cores, the CPU seconds the arbords and readers used in the window
//! and the machine's busy fraction (all processes) over it: the CPU floor of a burst. Targets
//! (printed, never enforced): with trees T(32)/T(1) ≤ 1.3, registry bytes ≤ 1.05× one start-up
//! set whatever N, and at N = 32 behind the 200 Mbit/s registry trees ≥ 5× faster than
//! registry-only.
//!
//! The arbords are sized for 32 on a 2-core machine: a small memory cache, and the rest of each
//! layer (and with it the background proof of the layer, `[fetch] verify_layers`, which stays
//! on) starts only `rest_delay_secs` after the mount, well after the measurement.
//!
//! Run: `benches/run-provision.sh` (release build, all defaults), or e.g.
//! `target/release/bench-provision --nodes 1,2,4 --registry-rates 200 --json out.json --png
//! out.png` (`--keep-logs DIR` keeps every arbord's log, e.g. to see why a node read the
//! registry: `route missed ... kind=lacks|timeout` at debug level). Needs root, iproute2
//! (`ip netns`), `tc`, docker-registry, skopeo, curl, tar.

use arbor_benches::{chart, common, harness, pyimage};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use arbor_proto::snapshots::PrepareSnapshotRequest;
use arbor_proto::snapshots::snapshots_client::SnapshotsClient;
use arbor_snapshotter::labels as l;
use arbor_testkit::cluster::{Cluster, ClusterSpec};
use arbor_testkit::{Arbord, ArbordOptions, Registry, mounts_below, skopeo_push};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use common::{MB, Spread, machine_info, preflight, print_machine, target_dir};
use harness::{check_interrupted, http_get_all, run_checked, write_json};
use pyimage::{AppFile, CacheArgs, LayerDef, PATH_ENV, PYTHON, Recipe, hex};

/// Bump when the way the image or its start-up set is built changes.
const RECIPE_VERSION: u32 = 1;
const REPO: &str = "provision/fn";
const FUNCTION: &str = "fn/provision-bench";
/// Targets printed next to the results.
const TARGET_SCALE: f64 = 1.3;
const TARGET_REGISTRY: f64 = 1.05;
const TARGET_SPEEDUP: f64 = 5.0;
/// The largest N the full-pull mode runs at.
const FULL_MAX_NODES: usize = 8;

const SERVER_PY: &str = r#""""Arbor provision bench function: a Flask app that imports numpy at start and answers
GET / with a line fitted by numpy."""
import os

import numpy as np
from flask import Flask, jsonify

app = Flask(__name__)


@app.get("/")
def index():
    x = np.arange(12, dtype=float)
    slope, intercept = np.polyfit(x, 3 * x + 2, 1)
    return jsonify(ok="arbor-provision-ok", slope=round(float(slope), 6),
                   intercept=round(float(intercept), 6))


if __name__ == "__main__":
    app.run(host="0.0.0.0", port=int(os.environ.get("PORT", "8080")))
"#;

const TRACE_CODE: &str = r#"
import sys
sys.path.insert(0, "/app")
import server
r = server.app.test_client().get("/")
if r.status_code != 200 or b"arbor-provision-ok" not in r.data:
    raise SystemExit("the function answered %r" % r.data)
"#;

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Mode {
    Registry,
    Tree,
    Full,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Registry => "registry",
            Mode::Tree => "tree",
            Mode::Full => "full",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Mode::Registry => "lazy loading without trees: every node reads the registry",
            Mode::Tree => "function trees: nodes read from their parents",
            Mode::Full => "full pull (download + unpack, no containerd)",
        }
    }
}

#[derive(Parser)]
#[command(
    about = "Cold starts of one function on N nodes at once: lazy loading from the registry, \
             function trees, and a full pull (see the top of benches/provision.rs)"
)]
struct Args {
    /// Node counts (each a burst of that many simultaneous cold starts).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    nodes: Vec<usize>,
    /// Registry link rates, Mbit/s each way (one series each).
    #[arg(long, value_delimiter = ',', default_value = "1000,200")]
    registry_rates: Vec<u64>,
    /// Every node's link rate, Mbit/s each way.
    #[arg(long, default_value_t = 1000)]
    node_rate: u64,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "registry,tree,full"
    )]
    modes: Vec<Mode>,
    /// Repetitions of each (rate, mode, N); the table shows the one with the median T.
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Reader threads per node replaying the start-up reads.
    #[arg(long, default_value_t = 3)]
    readers: usize,
    /// The arbor CLI [default: <target dir>/release/arbor].
    #[arg(long)]
    arbor: Option<PathBuf>,
    /// The arbord binary [default: next to --arbor].
    #[arg(long)]
    arbord: Option<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
    /// Where full-pull nodes download and unpack [default: <target dir>/tmp].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Copy every arbord's log (nodes and tree manager) into DIR/<mode>-<rate>-<N>-<rep>/.
    #[arg(long, value_name = "DIR")]
    keep_logs: Option<PathBuf>,
    /// Go on after a failed run (recorded as failed) instead of stopping.
    #[arg(long)]
    keep_going: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw T against N as a PNG chart here.
    #[arg(long)]
    png: Option<PathBuf>,
}

fn main() {
    harness::main_with(run)
}

/// One file of the start-up set: where it is in the converted image and what it must hold.
#[derive(Clone)]
struct StartFile {
    layer: usize,
    rel: String,
    size: u64,
    sha256: String,
}

/// The converted image, as the nodes Prepare it.
struct Converted {
    reference: String,
    /// Per layer: its descriptor in the converted manifest and its chain ID.
    layers: Vec<(Value, String)>,
    /// The original image's layer blobs (digest, size), for the full pull.
    source_blobs: Vec<(String, u64)>,
    startup: Vec<StartFile>,
}

impl Converted {
    fn startup_bytes(&self) -> u64 {
        self.startup.iter().map(|f| f.size).sum()
    }
}

/// One (rate, mode, N) run.
struct RunResult {
    rate: u64,
    mode: Mode,
    nodes: usize,
    rep: usize,
    node_secs: Vec<f64>,
    prepare_secs: Vec<f64>,
    registry_bytes: u64,
    peak_in: u64,
    peak_out: u64,
    per_node: Vec<Value>,
    verified_files: usize,
    /// CPU seconds the node arbords, the tree manager and this process (the readers) used
    /// from the barrier until the last node was ready (Arbor modes only).
    cpu_s: f64,
    /// The machine's busy fraction over that window (all processes, /proc/stat).
    busy: f64,
    error: Option<String>,
}

impl RunResult {
    fn t(&self) -> f64 {
        self.node_secs.iter().copied().fold(f64::NAN, f64::max)
    }

    fn p50(&self) -> f64 {
        Spread::of(&self.node_secs).median
    }

    fn to_json(&self) -> Value {
        json!({
            "registry_rate_mbit": self.rate,
            "mode": self.mode.name(),
            "nodes": self.nodes,
            "rep": self.rep,
            "error": self.error,
            "t_last_ready_s": self.t(),
            "p50_node_s": self.p50(),
            "node_ready_s": self.node_secs,
            "prepare_s": self.prepare_secs,
            "registry_egress_bytes": self.registry_bytes,
            "peak_node_in_bytes": self.peak_in,
            "peak_node_out_bytes": self.peak_out,
            "verified_files": self.verified_files,
            "cpu_seconds_arbor_and_readers": self.cpu_s,
            "machine_busy_fraction": self.busy,
            "per_node": self.per_node,
        })
    }
}

fn run() -> Result<bool> {
    let args = Args::parse();
    ensure!(!args.nodes.is_empty() && !args.registry_rates.is_empty() && !args.modes.is_empty());
    ensure!(args.readers >= 1 && args.reps >= 1);
    let arbor = args
        .arbor
        .clone()
        .unwrap_or_else(|| target_dir().join("release/arbor"));
    let arbord = args
        .arbord
        .clone()
        .unwrap_or_else(|| arbor.with_file_name("arbord"));
    preflight(
        &arbor,
        &[
            "docker-registry",
            "skopeo",
            "ip",
            "tc",
            "nsenter",
            "curl",
            "tar",
        ],
        "network namespaces, tc and FUSE mounts",
    )?;
    ensure!(arbord.is_file(), "arbord {} not found", arbord.display());
    let mut machine = machine_info(&arbor);
    print_machine(&machine);
    harness::print_load(&mut machine);
    let cache = args
        .cache
        .dir
        .clone()
        .unwrap_or_else(|| target_dir().join("bench-cache"));
    let work = harness::WorkDir::create(
        &args
            .work_dir
            .clone()
            .unwrap_or_else(|| target_dir().join("tmp")),
        "provision-",
    )?;

    let image = pyimage::prepare_image(&cache, &recipe(), args.cache.rebuild)?;
    image.print();
    let hashes = original_hashes(&cache.join("provision"), &image.layers)?;

    let max_n = *args.nodes.iter().max().unwrap();
    let mut nodes = args.nodes.clone();
    nodes.sort_unstable();
    nodes.dedup();
    let mut results: Vec<RunResult> = Vec::new();
    let mut startup_info = Value::Null;
    let mut ok = true;
    for &rate in &args.registry_rates {
        check_interrupted()?;
        println!(
            "\n=== registry {rate} Mbit/s, nodes {} Mbit/s, {max_n} node namespaces ===",
            args.node_rate
        );
        let cluster = Cluster::new(
            &ClusterSpec::new(max_n, args.node_rate * 1_000_000).with_registry(rate * 1_000_000),
        )
        .context("building the cluster")?;
        let reg = Registry::start_in_netns(cluster.registry_ns().unwrap())?;
        let conv = push_and_convert(&arbor, &reg, &image, &hashes)?;
        if startup_info.is_null() {
            startup_info = json!({
                "files": conv.startup.len(),
                "bytes": conv.startup_bytes(),
                "per_layer_files": (0..conv.layers.len())
                    .map(|i| conv.startup.iter().filter(|f| f.layer == i).count())
                    .collect::<Vec<_>>(),
                "converted_layer_sizes": conv.layers.iter()
                    .map(|(d, _)| d["size"].as_u64().unwrap_or(0)).collect::<Vec<_>>(),
                "source_layer_sizes": conv.source_blobs.iter().map(|b| b.1).collect::<Vec<_>>(),
            });
        }
        println!(
            "start-up set (the converted image's prefetch sections): {} files, {:.1} MB",
            conv.startup.len(),
            conv.startup_bytes() as f64 / MB
        );
        for &mode in &args.modes {
            for &n in &nodes {
                if mode == Mode::Full && n > FULL_MAX_NODES {
                    continue;
                }
                for rep in 0..args.reps {
                    check_interrupted()?;
                    let r = run_one(
                        &args, &arbord, &cluster, &reg, &conv, &work, rate, mode, n, rep,
                    );
                    let r = match r {
                        Ok(r) => r,
                        Err(e) => {
                            ok = false;
                            eprintln!(
                                "run failed: registry {rate} Mbit/s, {} N={n}: {e:#}",
                                mode.name()
                            );
                            if !args.keep_going {
                                return Err(e);
                            }
                            RunResult {
                                rate,
                                mode,
                                nodes: n,
                                rep,
                                node_secs: Vec::new(),
                                prepare_secs: Vec::new(),
                                registry_bytes: 0,
                                peak_in: 0,
                                peak_out: 0,
                                per_node: Vec::new(),
                                verified_files: 0,
                                cpu_s: 0.0,
                                busy: 0.0,
                                error: Some(format!("{e:#}")),
                            }
                        }
                    };
                    if r.error.is_none() {
                        println!(
                            "  {:>8} N={n:<2} rep {rep}: T {:.2} s, p50 {:.2} s, registry sent {:.1} MB, peak node in {:.1} / out {:.1} MB",
                            mode.name(),
                            r.t(),
                            r.p50(),
                            r.registry_bytes as f64 / MB,
                            r.peak_in as f64 / MB,
                            r.peak_out as f64 / MB
                        );
                    }
                    results.push(r);
                }
            }
        }
        drop(reg);
        let names: Vec<String> = cluster
            .nodes()
            .iter()
            .map(|n| n.name().to_string())
            .collect();
        drop(cluster);
        let left: Vec<&String> = names
            .iter()
            .filter(|n| Path::new("/run/netns").join(n).exists())
            .collect();
        if !left.is_empty() {
            ok = false;
            eprintln!("error: namespaces left behind: {left:?}");
        }
    }

    let startup_bytes = startup_info["bytes"].as_u64().unwrap_or(0);
    let table = print_table(&args, &results, startup_bytes);
    if let Some(p) = &args.json {
        let rep = harness::report(
            "provision",
            machine,
            json!({
                "image": {
                    "description": "Flask + numpy function: Debian base and python3.11 layers, a \
                                    pypi layer (numpy, flask and deps from pinned wheels), app",
                    "layers": image.layers.iter().map(|l| json!({
                        "name": l["name"], "uncompressed_bytes": l["uncompressed_bytes"],
                        "gzip_bytes": l["gzip_bytes"],
                    })).collect::<Vec<_>>(),
                    "uncompressed_bytes": image.uncompressed_bytes,
                    "traced_startup_files": image.startup.len(),
                    "traced_startup_bytes": image.startup_bytes(),
                },
                "startup_set": startup_info,
                "node_rate_mbit": args.node_rate,
                "registry_rates_mbit": args.registry_rates,
                "readers_per_node": args.readers,
                "arbord_config": node_config("<registry>", false, 0, "<ip>", "<manager>"),
                "full_mode": Mode::Full.describe(),
                "targets": {
                    "tree_t32_over_t1_max": TARGET_SCALE,
                    "tree_registry_bytes_over_startup_set_max": TARGET_REGISTRY,
                    "n32_200mbit_registry_over_tree_min": TARGET_SPEEDUP,
                },
                "summary": table,
                "runs": results.iter().map(RunResult::to_json).collect::<Vec<_>>(),
            }),
        );
        write_json(p, &rep)?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &args.png {
        draw_chart(p, &args, &results, startup_bytes)?;
        println!("wrote {}", p.display());
    }
    Ok(ok && results.iter().all(|r| r.error.is_none()))
}

fn recipe() -> Recipe<'static> {
    Recipe {
        name: "provision",
        version: RECIPE_VERSION,
        layers: pyimage::SCIENTIFIC_LAYERS
            .iter()
            .filter(|l: &&LayerDef| l.name == "base" || l.name == "python")
            .collect(),
        wheels: Some(&pyimage::NUMPY_FLASK_WHEELS),
        app: vec![AppFile {
            path: "/app/server.py",
            mode: 0o644,
            data: SERVER_PY.as_bytes().to_vec(),
        }],
        startup_code: TRACE_CODE.into(),
        startup_label: "the Flask app's import and first answer".into(),
        entrypoint: Vec::new(),
        cmd: vec![PYTHON.into(), "/app/server.py".into()],
        env: vec![PATH_ENV.into(), "PORT=8080".into()],
    }
}

/// Normalizes a path in a tar or a prefetch list to `a/b/c`.
fn norm(p: &str) -> String {
    p.trim_start_matches("./")
        .trim_start_matches('/')
        .to_string()
}

/// Per layer: path → (size, sha256) of every regular file (hard links resolved) in the
/// original layer tars of the cached image.
fn original_hashes(dir: &Path, layers: &[Value]) -> Result<Vec<HashMap<String, (u64, String)>>> {
    let mut out = Vec::new();
    for layer in layers {
        let name = layer["tar"].as_str().context("layer without tar")?;
        let f = fs::File::open(dir.join(name)).with_context(|| format!("opening {name}"))?;
        let mut ar = tar::Archive::new(f);
        let mut map: HashMap<String, (u64, String)> = HashMap::new();
        let mut links = Vec::new();
        for e in ar.entries()? {
            let mut e = e?;
            let path = norm(&e.path()?.to_string_lossy());
            match e.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mut h = Sha256::new();
                    let mut buf = vec![0u8; 1 << 16];
                    let mut n = 0u64;
                    loop {
                        let k = e.read(&mut buf)?;
                        if k == 0 {
                            break;
                        }
                        h.update(&buf[..k]);
                        n += k as u64;
                    }
                    map.insert(path, (n, hex(&h.finalize())));
                }
                tar::EntryType::Link => {
                    if let Some(t) = e.link_name()? {
                        links.push((path, norm(&t.to_string_lossy())));
                    }
                }
                _ => {}
            }
        }
        for (p, t) in links {
            if let Some(v) = map.get(&t).cloned() {
                map.insert(p, v);
            }
        }
        out.push(map);
    }
    Ok(out)
}

/// Pushes the image to `reg`, converts it (start-up set inferred from the entrypoint) and
/// reads what the nodes need from the registry and the conversion report.
fn push_and_convert(
    arbor: &Path,
    reg: &Registry,
    image: &pyimage::Image,
    hashes: &[HashMap<String, (u64, String)>],
) -> Result<Converted> {
    let src = reg.reference(&format!("{REPO}:v1"));
    let dst = reg.reference(&format!("{REPO}:arbor"));
    let t = Instant::now();
    skopeo_push(&image.layout, &image.tag, &src, None).context("pushing the image")?;
    println!("pushed {src} in {:.1} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let out = run_checked(
        Command::new(arbor).args(["convert", "--plain-http", "--json", &src, &dst]),
        Duration::from_secs(1200),
    )?;
    let report: Value = serde_json::from_str(&out).context("arbor convert --json output")?;
    let img = &report["images"][0];
    println!(
        "converted to {dst} in {:.1} s; inferred start-up set: {}",
        t.elapsed().as_secs_f64(),
        img["inferred"]
    );
    let manifest = |tag: &str| -> Result<Value> {
        let (code, body) = http_get_all(
            &reg.addr(),
            &format!("/v2/{REPO}/manifests/{tag}"),
            harness::MEDIA_TYPES,
        )?;
        ensure!(code == 200, "GET manifest {tag}: {code}");
        Ok(serde_json::from_slice(&body)?)
    };
    let conv_manifest = manifest("arbor")?;
    let src_manifest = manifest("v1")?;
    let rep_layers = img["layers"].as_array().context("report without layers")?;
    let descs = conv_manifest["layers"]
        .as_array()
        .context("manifest layers")?;
    ensure!(
        rep_layers.len() == descs.len() && descs.len() == hashes.len(),
        "layer counts differ: report {}, manifest {}, image {}",
        rep_layers.len(),
        descs.len(),
        hashes.len()
    );
    let mut layers = Vec::new();
    let mut chain = String::new();
    let mut startup = Vec::new();
    let mut unhashed = 0;
    for (i, (rl, d)) in rep_layers.iter().zip(descs).enumerate() {
        ensure!(
            rl["target_digest"] == d["digest"],
            "layer {i}: report and manifest differ"
        );
        let diff = rl["diff_id"].as_str().context("diff_id")?;
        chain = if chain.is_empty() {
            diff.to_string()
        } else {
            format!(
                "sha256:{}",
                hex(&Sha256::digest(format!("{chain} {diff}").as_bytes()))
            )
        };
        layers.push((d.clone(), chain.clone()));
        for p in rl["prefetch"].as_array().into_iter().flatten() {
            let rel = norm(p.as_str().unwrap_or_default());
            match hashes[i].get(&rel) {
                Some((size, sum)) => startup.push(StartFile {
                    layer: i,
                    rel,
                    size: *size,
                    sha256: sum.clone(),
                }),
                None => unhashed += 1,
            }
        }
    }
    ensure!(
        !startup.is_empty(),
        "the converted image has no start-up set"
    );
    if unhashed > 0 {
        println!("note: {unhashed} prefetch entries are not regular files of their layer; skipped");
    }
    let source_blobs = src_manifest["layers"]
        .as_array()
        .context("source manifest layers")?
        .iter()
        .map(|d| {
            (
                d["digest"].as_str().unwrap_or_default().to_string(),
                d["size"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    Ok(Converted {
        reference: dst,
        layers,
        source_blobs,
        startup,
    })
}

/// The nodes' `p2p.peer_stall_ms`: 32 nodes share this machine's 2 cores, so a parent gets a
/// sixteenth of a core and may not send even a keep-alive for over a second while it is busy;
/// the deadline (1 s by default, for nodes of their own) is scaled by 3.
const PEER_STALL_MS: u64 = 3000;

/// The arbord config of a node (`manager` empty: the node's p2p is off).
fn node_config(reg_host: &str, p2p: bool, index: usize, ip: &str, manager: &str) -> String {
    let mut c = format!(
        "[registry]\nplain_http = [\"{reg_host}\"]\n\
         [cache]\nmemory_size = \"64MiB\"\n\
         [prefetch]\nrest_delay_secs = 3600\n\
         [fuse]\nthreads = 2\n"
    );
    if p2p {
        c.push_str(&format!(
            "[p2p]\nenabled = true\nnode_id = \"node{index}\"\nlisten = \"{ip}:7071\"\n\
             manager = \"{manager}\"\nheartbeat_secs = 2\npeer_stall_ms = {PEER_STALL_MS}\n"
        ));
    } else {
        c.push_str("[p2p]\nenabled = false\n");
    }
    c
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("0.0.0.0:0")?
        .local_addr()?
        .port())
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    args: &Args,
    arbord: &Path,
    cluster: &Cluster,
    reg: &Registry,
    conv: &Converted,
    work: &harness::WorkDir,
    rate: u64,
    mode: Mode,
    n: usize,
    rep: usize,
) -> Result<RunResult> {
    let nodes = &cluster.nodes()[..n];
    let reg_host = reg.addr().rsplit_once(':').unwrap().0.to_string();
    let mut manager_d = None;
    let mut arbords: Vec<Arbord> = Vec::new();
    if mode != Mode::Full {
        let p2p = mode == Mode::Tree;
        let manager = format!("{}:{}", cluster.host_addr(), free_port()?);
        if p2p {
            manager_d = Some(
                Arbord::start(&ArbordOptions {
                    bin: arbord.to_path_buf(),
                    config: Some(format!(
                        "[p2p]\nrun_manager = true\nmanager = \"{manager}\"\n\
                         heartbeat_timeout_secs = 20\n"
                    )),
                    ..Default::default()
                })
                .context("starting the tree manager")?,
            );
        }
        let started: Vec<Result<Arbord>> = thread::scope(|s| {
            let hs: Vec<_> = nodes
                .iter()
                .map(|node| {
                    let cfg = node_config(
                        &reg_host,
                        p2p,
                        node.index(),
                        &node.addr().to_string(),
                        &manager,
                    );
                    s.spawn(move || {
                        Arbord::start(&ArbordOptions {
                            bin: arbord.to_path_buf(),
                            netns: Some((node.name().to_string(), node.addr())),
                            config: Some(cfg),
                            ..Default::default()
                        })
                        .with_context(|| format!("starting arbord on {}", node.name()))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| bail!("panicked")))
                .collect()
        });
        for a in started {
            arbords.push(a?);
        }
    }
    let roots: Vec<PathBuf> = arbords.iter().map(|a| a.root().to_path_buf()).collect();
    let run_dir = work
        .path()
        .join(format!("{}-{rate}-{n}-{rep}", mode.name()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    let registry_before = cluster.registry_ns().unwrap().link_bytes()?;
    let links_before: Vec<_> = nodes
        .iter()
        .map(|n| n.link_bytes())
        .collect::<Result<_>>()?;
    let pids: Vec<u32> = arbords
        .iter()
        .chain(manager_d.iter())
        .filter_map(Arbord::pid)
        .chain([std::process::id()])
        .collect();
    let cpu = || -> f64 {
        pids.iter()
            .filter_map(|p| harness::cpu_seconds(*p))
            .map(|(u, s)| u + s)
            .sum()
    };
    let stat_before = proc_stat();
    let cpu_before = cpu();
    let barrier = Barrier::new(n);
    struct NodeOut {
        start: Instant,
        prepared: Instant,
        done: Instant,
        /// (index into the start-up files, sha256 of what was read)
        data: Vec<(usize, String)>,
    }
    let outs: Vec<Result<NodeOut>> = thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let (barrier, rt, arbords, run_dir) = (&barrier, &rt, &arbords, &run_dir);
                let node = &nodes[i];
                s.spawn(move || -> Result<NodeOut> {
                    barrier.wait();
                    let start = Instant::now();
                    let dirs: Vec<PathBuf> = if mode == Mode::Full {
                        let d = run_dir.join(format!("node{i}"));
                        full_pull(node, reg, conv, &d)?;
                        let root = d.join("rootfs");
                        vec![root; conv.layers.len()]
                    } else {
                        let a = &arbords[i];
                        let mut dirs = Vec::new();
                        let mut parent = String::new();
                        for (desc, chain) in &conv.layers {
                            let before: HashSet<PathBuf> =
                                mounts_below(a.root()).into_iter().collect();
                            rt.block_on(prepare(a, conv, desc, chain, &parent))?;
                            let new: Vec<PathBuf> = mounts_below(a.root())
                                .into_iter()
                                .filter(|m| !before.contains(m))
                                .collect();
                            ensure!(new.len() == 1, "layer {chain}: new mounts {new:?}");
                            dirs.push(new[0].clone());
                            parent = chain.clone();
                        }
                        dirs
                    };
                    let prepared = Instant::now();
                    let data = replay(&dirs, &conv.startup, args.readers)?;
                    Ok(NodeOut {
                        start,
                        prepared,
                        done: Instant::now(),
                        data,
                    })
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("node thread panicked")))
            .collect()
    });
    let stat_after = proc_stat();
    let cpu_after = cpu();
    let registry_after = cluster.registry_ns().unwrap().link_bytes()?;
    let links_after: Vec<_> = nodes
        .iter()
        .map(|n| n.link_bytes())
        .collect::<Result<_>>()?;
    let mut per_node = Vec::new();
    for (i, a) in arbords.iter().enumerate() {
        let m = a.metrics().unwrap_or_default();
        let mut routes: BTreeMap<String, f64> = BTreeMap::new();
        for line in m
            .lines()
            .filter(|l| l.starts_with("arbor_p2p_route_bytes_total{"))
        {
            if let (Some(r), Some((_, v))) = (line.split("route=\"").nth(1), line.rsplit_once(' '))
            {
                let route = r.split('"').next().unwrap_or("?").to_string();
                *routes.entry(route).or_default() += v.parse::<f64>().unwrap_or(0.0);
            }
        }
        let depth = m
            .lines()
            .find(|l| l.starts_with("arbor_p2p_tree_depth{"))
            .and_then(|l| l.rsplit_once(' '))
            .map(|(_, v)| v.to_string());
        per_node.push(json!({"node": i, "route_bytes": routes, "tree_depth": depth}));
    }
    let mut errors = Vec::new();
    let mut good = Vec::new();
    for (i, o) in outs.into_iter().enumerate() {
        match o {
            Ok(o) => good.push(o),
            Err(e) => errors.push(format!(
                "node {i}: {e:#}{}",
                arbords
                    .get(i)
                    .map(|a| format!("\n  arbord log tail:\n{}", a.log_tail(15)))
                    .unwrap_or_default()
            )),
        }
    }
    // Check every byte read against the original layer tars.
    let mut verified = 0;
    for (i, o) in good.iter().enumerate() {
        for (k, digest) in &o.data {
            let f = &conv.startup[*k];
            if *digest != f.sha256 {
                errors.push(format!("node {i}: {} differs from the original", f.rel));
            } else {
                verified += 1;
            }
        }
    }
    if let Some(dir) = &args.keep_logs {
        let d = dir.join(format!("{}-{rate}-{n}-{rep}", mode.name()));
        fs::create_dir_all(&d)?;
        for (i, a) in arbords.iter().enumerate() {
            fs::copy(a.log_path(), d.join(format!("node{i}.log"))).ok();
        }
        if let Some(m) = &manager_d {
            fs::copy(m.log_path(), d.join("manager.log")).ok();
        }
    }
    let mut stop_errors = Vec::new();
    for mut a in arbords {
        if !a.is_running() {
            stop_errors.push(format!("arbord exited early; log:\n{}", a.log_tail(20)));
        }
        drop(a);
    }
    drop(manager_d);
    for r in &roots {
        let m = mounts_below(r);
        if !m.is_empty() {
            stop_errors.push(format!("mounts left behind: {m:?}"));
        }
    }
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir).ok();
    }
    errors.extend(stop_errors);
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    let t0 = good.iter().map(|o| o.start).min().unwrap();
    let deltas: Vec<_> = links_after
        .iter()
        .zip(&links_before)
        .map(|(a, b)| *a - *b)
        .collect();
    for (i, d) in deltas.iter().enumerate() {
        if let Some(v) = per_node[..].get_mut(i) {
            v["link_in_bytes"] = json!(d.to_ns);
            v["link_out_bytes"] = json!(d.to_host);
        } else {
            per_node
                .push(json!({"node": i, "link_in_bytes": d.to_ns, "link_out_bytes": d.to_host}));
        }
    }
    Ok(RunResult {
        rate,
        mode,
        nodes: n,
        rep,
        node_secs: good.iter().map(|o| (o.done - t0).as_secs_f64()).collect(),
        prepare_secs: good
            .iter()
            .map(|o| (o.prepared - o.start).as_secs_f64())
            .collect(),
        registry_bytes: (registry_after - registry_before).to_host,
        peak_in: deltas.iter().map(|d| d.to_ns).max().unwrap_or(0),
        peak_out: deltas.iter().map(|d| d.to_host).max().unwrap_or(0),
        per_node,
        verified_files: verified,
        cpu_s: cpu_after - cpu_before,
        busy: machine_busy(&stat_before, &stat_after),
        error: None,
    })
}

/// The first line of /proc/stat: (busy, total) jiffies over all CPUs.
fn proc_stat() -> (u64, u64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn machine_busy(a: &(u64, u64), b: &(u64, u64)) -> f64 {
    let total = b.1.saturating_sub(a.1);
    if total == 0 {
        return f64::NAN;
    }
    b.0.saturating_sub(a.0) as f64 / total as f64
}

/// A lazy Prepare of one layer with the labels `arbor pull --function` sends.
async fn prepare(
    a: &Arbord,
    conv: &Converted,
    desc: &Value,
    chain: &str,
    parent: &str,
) -> Result<()> {
    let mut labels: BTreeMap<String, String> = desc["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("containerd.io/snapshot/"))
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    let digest = desc["digest"].as_str().context("layer digest")?;
    labels.insert(l::TARGET.into(), chain.into());
    labels.insert(l::ARBOR_LAYER_DIGEST.into(), digest.into());
    labels.insert(l::ARBOR_IMAGE_REF.into(), conv.reference.clone());
    labels.insert(l::ARBOR_FUNCTION.into(), FUNCTION.into());
    let key = l::read_pull_key(a.root()).context("arbord's pull key")?;
    labels.insert(
        l::PULL_MAC.into(),
        l::pull_mac(&key, digest, &conv.reference, chain),
    );
    let ch = arbor_proto::connect(a.socket()).await?;
    let r = SnapshotsClient::new(ch)
        .prepare(PrepareSnapshotRequest {
            snapshotter: "arbor".into(),
            key: format!("default/1/extract {chain}"),
            parent: parent.into(),
            labels: labels.into_iter().collect(),
        })
        .await;
    match r {
        Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
        Err(s) => bail!("Prepare of {chain}: {s}"),
        Ok(_) => bail!("Prepare of {chain} was not lazy (an ordinary snapshot)"),
    }
}

/// Reads every start-up file (whole) from the directory of its layer with `readers` threads;
/// returns (index into `files`, sha256 of the bytes read).
///
/// Each thread reads through one reused 1 MiB buffer and hashes as it reads: 32 nodes share
/// this machine's 2 cores, and a fresh allocation per file (a 30 MB numpy library is mapped
/// anew and its pages zeroed by the kernel) took a tenth of the burst's CPU, measuring the
/// reader's allocator instead of the node. Hashing in the window costs less than that.
fn replay(dirs: &[PathBuf], files: &[StartFile], readers: usize) -> Result<Vec<(usize, String)>> {
    let next = AtomicUsize::new(0);
    let out = Mutex::new(Vec::with_capacity(files.len()));
    thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = (0..readers)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(f) = files.get(k) else {
                            return Ok(());
                        };
                        let p = dirs[f.layer].join(&f.rel);
                        let digest = pyimage::sha256_file_with(&p, &mut buf)?;
                        out.lock().unwrap().push((k, digest));
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap_or_else(|_| bail!("reader panicked"))?;
        }
        Ok(())
    })?;
    Ok(out.into_inner().unwrap())
}

/// A stock node's pull without containerd: every original layer blob downloaded at once
/// inside the node's namespace, then unpacked in order into `dir/rootfs`.
fn full_pull(
    node: &arbor_testkit::cluster::ClusterNode,
    reg: &Registry,
    conv: &Converted,
    dir: &Path,
) -> Result<()> {
    let root = dir.join("rootfs");
    fs::create_dir_all(&root)?;
    let mut children = Vec::new();
    for (i, (digest, _)) in conv.source_blobs.iter().enumerate() {
        let out = dir.join(format!("blob-{i}"));
        let url = format!("http://{}/v2/{REPO}/blobs/{digest}", reg.addr());
        let c = node
            .exec("curl")
            .args(["-sSf", "--max-time", "1800", "-o"])
            .arg(&out)
            .arg(&url)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning curl")?;
        children.push((out, c));
    }
    let mut blobs = Vec::new();
    for (out, c) in children {
        let o = c.wait_with_output()?;
        ensure!(
            o.status.success(),
            "curl on {}: {}",
            node.name(),
            String::from_utf8_lossy(&o.stderr)
        );
        blobs.push(out);
    }
    for b in &blobs {
        let o = Command::new("tar")
            .arg("-x")
            .arg("-f")
            .arg(b)
            .arg("-C")
            .arg(&root)
            .output()?;
        ensure!(
            o.status.success(),
            "tar -x {}: {}",
            b.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

/// The median-T run of each (rate, mode, N).
fn medians(results: &[RunResult]) -> Vec<&RunResult> {
    let mut groups: BTreeMap<(u64, usize, usize), Vec<&RunResult>> = BTreeMap::new();
    for r in results.iter().filter(|r| r.error.is_none()) {
        groups
            .entry((r.rate, r.mode as usize, r.nodes))
            .or_default()
            .push(r);
    }
    groups
        .into_values()
        .map(|mut v| {
            v.sort_by(|a, b| a.t().total_cmp(&b.t()));
            v[v.len() / 2]
        })
        .collect()
}

/// Prints the table and the targets; returns them as JSON.
fn print_table(args: &Args, results: &[RunResult], startup: u64) -> Value {
    let meds = medians(results);
    let find = |rate: u64, mode: Mode, n: usize| {
        meds.iter()
            .find(|r| r.rate == rate && r.mode == mode && r.nodes == n)
            .copied()
    };
    println!(
        "\nBurst of N simultaneous cold starts of one function (start-up set {:.1} MB, {} readers \
         per node); nodes {} Mbit/s; arbord [fetch] verify_layers on (its proof waits for \
         [prefetch] rest_delay_secs = 3600, after the measurement); tree nodes' \
         p2p.peer_stall_ms = {PEER_STALL_MS} (32 nodes on 2 cores).",
        startup as f64 / MB,
        args.readers,
        args.node_rate
    );
    println!(
        "modes: registry = {}; tree = {}; full = {}",
        Mode::Registry.describe(),
        Mode::Tree.describe(),
        Mode::Full.describe()
    );
    println!(
        "{:>9} {:>9} {:>3} {:>8} {:>8} {:>8} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7} {:>5}",
        "registry",
        "mode",
        "N",
        "T s",
        "p50 s",
        "T/T(1)",
        "reg MB",
        "reg/set",
        "reg/1node",
        "peak in",
        "peak out",
        "reg/tree",
        "cpu s",
        "busy"
    );
    println!(
        "(reg/set: registry bytes / the start-up set's file bytes; reg/1node: registry bytes / \
         what the registry sent one node alone without trees (registry, N=1), i.e. one start-up \
         set on the wire; peak in/out: MB on the busiest node link; cpu s: CPU seconds of the \
         arbords and the readers from the barrier to the last ready node; busy: the machine's \
         CPU use over that window, all processes)"
    );
    // One node's start-up set on the wire, per registry rate.
    let one_node = |rate: u64| find(rate, Mode::Registry, 1).map(|r| r.registry_bytes as f64);
    let mut rows = Vec::new();
    for &rate in &args.registry_rates {
        for &mode in &args.modes {
            let t1 = find(rate, mode, 1).map(|r| r.t());
            for r in meds.iter().filter(|r| r.rate == rate && r.mode == mode) {
                let scale = t1.map(|t1| r.t() / t1);
                let speedup = match (
                    find(rate, Mode::Registry, r.nodes),
                    find(rate, Mode::Tree, r.nodes),
                ) {
                    (Some(a), Some(b)) if mode == Mode::Tree => Some(a.t() / b.t()),
                    _ => None,
                };
                let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
                let per_node = one_node(rate).map(|b| r.registry_bytes as f64 / b);
                println!(
                    "{:>5}Mb/s {:>9} {:>3} {:>8.2} {:>8.2} {:>8} {:>9.1} {:>7.2} {:>9} {:>9.1} {:>9.1} {:>9} {:>7} {:>5}",
                    rate,
                    mode.name(),
                    r.nodes,
                    r.t(),
                    r.p50(),
                    opt(scale),
                    r.registry_bytes as f64 / MB,
                    r.registry_bytes as f64 / startup as f64,
                    opt(per_node),
                    r.peak_in as f64 / MB,
                    r.peak_out as f64 / MB,
                    opt(speedup),
                    if mode == Mode::Full {
                        "-".to_string()
                    } else {
                        format!("{:.1}", r.cpu_s)
                    },
                    format!("{:.0}%", r.busy * 100.0)
                );
                rows.push(json!({
                    "registry_rate_mbit": rate, "mode": mode.name(), "nodes": r.nodes,
                    "t_s": r.t(), "p50_s": r.p50(), "t_over_t1": scale,
                    "registry_bytes": r.registry_bytes,
                    "registry_over_startup_set": r.registry_bytes as f64 / startup as f64,
                    "registry_over_one_node": per_node,
                    "peak_node_in_bytes": r.peak_in, "peak_node_out_bytes": r.peak_out,
                    "registry_only_over_tree": speedup,
                    "cpu_seconds_arbor_and_readers": r.cpu_s, "machine_busy_fraction": r.busy,
                }));
            }
        }
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|r| r.error.is_some())
        .map(|r| format!("{} Mb/s {} N={}", r.rate, r.mode.name(), r.nodes))
        .collect();
    if !failed.is_empty() {
        println!("FAILED runs: {}", failed.join(", "));
    }
    // Targets.
    let maxn = args.nodes.iter().copied().max().unwrap_or(1);
    let mut targets = Vec::new();
    println!("\ntargets (measured, not enforced):");
    for &rate in &args.registry_rates {
        if let (Some(a), Some(b)) = (find(rate, Mode::Tree, maxn), find(rate, Mode::Tree, 1)) {
            let v = a.t() / b.t();
            println!(
                "  {rate} Mb/s: tree T({maxn})/T(1) = {v:.2} (target ≤ {TARGET_SCALE}): {}",
                if v <= TARGET_SCALE { "met" } else { "NOT met" }
            );
            targets.push(json!({"registry_rate_mbit": rate, "target": "tree_scale", "nodes": maxn, "value": v, "met": v <= TARGET_SCALE}));
        }
        // One node's start-up set: on the wire (registry-only N=1) if measured, else its
        // file bytes.
        let (base, what) = match one_node(rate) {
            Some(b) => (b, "one node's start-up set on the wire (registry, N=1)"),
            None => (startup as f64, "the start-up set's file bytes"),
        };
        let worst = meds
            .iter()
            .filter(|r| r.rate == rate && r.mode == Mode::Tree)
            .map(|r| (r.registry_bytes as f64 / base, r.nodes))
            .fold(
                (f64::NAN, 0),
                |a, b| if a.0.is_nan() || b.0 > a.0 { b } else { a },
            );
        if !worst.0.is_nan() {
            let met = worst.0 <= TARGET_REGISTRY;
            println!(
                "  {rate} Mb/s: tree registry bytes at most {:.2}x {what} (at N={}) (target <= {TARGET_REGISTRY} at every N): {}",
                worst.0,
                worst.1,
                if met { "met" } else { "NOT met" }
            );
            targets.push(json!({"registry_rate_mbit": rate, "target": "tree_registry_bytes", "baseline": what, "value": worst.0, "at_nodes": worst.1, "met": met}));
        }
        if let (Some(a), Some(b)) = (
            find(rate, Mode::Registry, maxn),
            find(rate, Mode::Tree, maxn),
        ) {
            let v = a.t() / b.t();
            println!(
                "  {rate} Mb/s: registry-only T / tree T at N={maxn} = {v:.2} (target ≥ {TARGET_SPEEDUP} at N=32, 200 Mb/s): {}",
                if v >= TARGET_SPEEDUP {
                    "met"
                } else {
                    "NOT met"
                }
            );
            targets.push(json!({"registry_rate_mbit": rate, "target": "speedup", "nodes": maxn, "value": v, "met": v >= TARGET_SPEEDUP}));
        }
    }
    json!({"rows": rows, "targets": targets, "failed": failed})
}

/// T against N, one line per (mode, registry rate).
fn draw_chart(path: &Path, args: &Args, results: &[RunResult], startup: u64) -> Result<()> {
    use chart::{BLACK, Canvas, GREY, LIGHT_GREY, WHITE};
    let meds = medians(results);
    let mut ns: Vec<usize> = meds.iter().map(|r| r.nodes).collect();
    ns.sort_unstable();
    ns.dedup();
    ensure!(!ns.is_empty(), "no results to draw");
    let tmax = meds.iter().map(|r| r.t()).fold(0.0, f64::max).max(1e-3);
    // A round axis maximum.
    let step = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0, 200.0, 500.0]
        .into_iter()
        .find(|s| tmax / s <= 8.0)
        .unwrap_or(1000.0);
    let ymax = (tmax / step).ceil() * step;
    let (w, h) = (1000i64, 640i64);
    let (left, right, top, bottom) = (80i64, 260i64, 70i64, 60i64);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let mut c = Canvas::new(w as usize, h as usize, WHITE);
    c.text(
        left,
        14,
        "Burst cold start: time until the last of N nodes is ready",
        2,
        BLACK,
    );
    c.text(
        left,
        38,
        &format!(
            "start-up set {:.1} MB, nodes {} Mbit/s; solid: registry {} Mbit/s{}",
            startup as f64 / MB,
            args.node_rate,
            args.registry_rates.first().copied().unwrap_or(0),
            args.registry_rates
                .get(1)
                .map_or(String::new(), |r| format!(", dashed: registry {r} Mbit/s"))
        ),
        1,
        GREY,
    );
    let x_of = |n: usize| {
        let i = ns.iter().position(|&m| m == n).unwrap_or(0) as i64;
        if ns.len() == 1 {
            left + pw / 2
        } else {
            left + i * pw / (ns.len() as i64 - 1)
        }
    };
    let y_of = |t: f64| top + ph - (t / ymax * ph as f64).round() as i64;
    let mut v = 0.0;
    while v <= ymax + 1e-9 {
        let y = y_of(v);
        c.fill(left, y, pw, 1, LIGHT_GREY);
        let label = format!("{v:.0}");
        c.text(
            left - 10 - chart::text_width(&label, 1),
            y - 3,
            &label,
            1,
            GREY,
        );
        v += step;
    }
    for &n in &ns {
        let x = x_of(n);
        c.fill(x, top, 1, ph, LIGHT_GREY);
        let label = n.to_string();
        c.text(
            x - chart::text_width(&label, 1) / 2,
            top + ph + 8,
            &label,
            1,
            BLACK,
        );
    }
    c.fill(left, top + ph, pw, 1, BLACK);
    c.fill(left, top, 1, ph, BLACK);
    c.text(
        left + pw / 2 - 60,
        h - 24,
        "N nodes (simultaneous)",
        1,
        BLACK,
    );
    c.text(8, top - 16, "T (s)", 1, BLACK);
    let color = |m: Mode| match m {
        Mode::Registry => [214u8, 39, 40],
        Mode::Tree => [31, 119, 180],
        Mode::Full => [110, 110, 110],
    };
    let mut legend_y = top;
    for (ri, &rate) in args.registry_rates.iter().enumerate() {
        for &mode in &args.modes {
            let pts: Vec<(i64, i64)> = meds
                .iter()
                .filter(|r| r.rate == rate && r.mode == mode)
                .map(|r| (x_of(r.nodes), y_of(r.t())))
                .collect();
            if pts.is_empty() {
                continue;
            }
            let col = color(mode);
            for win in pts.windows(2) {
                let ((x0, y0), (x1, y1)) = (win[0], win[1]);
                let steps = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
                for k in 0..=steps {
                    if ri > 0 && (k / 8) % 2 == 1 {
                        continue;
                    }
                    let x = x0 + (x1 - x0) * k / steps;
                    let y = y0 + (y1 - y0) * k / steps;
                    c.fill(x - 1, y - 1, 3, 3, col);
                }
            }
            for &(x, y) in &pts {
                c.fill(x - 3, y - 3, 7, 7, col);
            }
            let lx = left + pw + 20;
            if ri > 0 {
                for k in 0..3 {
                    c.fill(lx + k * 10, legend_y + 3, 6, 3, col);
                }
            } else {
                c.fill(lx, legend_y + 3, 26, 3, col);
            }
            let name = match mode {
                Mode::Full => "full pull".to_string(),
                m => m.name().to_string(),
            };
            c.text(
                lx + 32,
                legend_y,
                &format!("{name}, reg {rate} Mb/s"),
                1,
                BLACK,
            );
            legend_y += 18;
        }
    }
    if let Some(d) = path.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(path, c.png()?)?;
    Ok(())
}
