//! `bench-invoke`: functions through arbord's gateway (issue #13's proof), side by side in one
//! run: the same gateway with its instances on Arbor (lazy snapshotter, arbor runtime) and on
//! stock containerd's overlayfs snapshotter (full pull, runc).
//!
//! The function is built the way a Python function image usually is (`pyimage.rs`, cached
//! under `--cache-dir`): Debian's `base` and `python` layers (CPython 3.11), a `pypi` layer
//! with numpy and Flask and their dependencies installed by pip from pinned manylinux wheels,
//! and an `app` layer with `/app/server.py`, a Flask app that imports numpy at start and
//! answers `POST /invoke` on port 9000 (the custom-container convention) with a line fitted
//! by numpy to the request body's length. The image is pushed to a `docker-registry` in a
//! network namespace behind a `tc tbf` link of `--rate` Mbit/s (default 1000) each way and
//! converted with `arbor convert` as a new user would (start-up set inferred from the
//! entrypoint; no hand-written list).
//!
//! Per repetition, each mode (order alternating) on a fresh node (`testkit::functions::FnNode`:
//! a fresh arbord with an empty cache and the gateway, a fresh containerd), page cache dropped:
//!
//! * **cold**: the function deployed scaled to zero; the time of the first
//!   `POST /v1/functions/bench/invoke` to its answer, split into the gateway's phases
//!   (network: netns + CNI; pull; create: snapshot and container; task; start; port: the
//!   process until its port opens; proxy: the rest, forwarding the request and the answer);
//! * **warm** (Arbor mode; the gateway does not depend on the snapshotter): `--warm` requests
//!   one after another, alternating through the gateway and straight to the instance's
//!   address, each on a new connection: p50/p99 and the gateway's added p50 (target ≤ 1 ms);
//! * **throughput** (Arbor mode, first repetition): the function redeployed with 1, 2, 3, 4
//!   reserved instances (min = max = k), `--clients` client threads invoking it for
//!   `--seconds` each: answers per second.
//!
//! Prints a table, writes JSON (`--json`) and a chart (`--png`). Wrong answers and failing
//! tools make the exit status non-zero; slow results never do.
//!
//! Run: `benches/run-invoke.sh` (release build), or `target/release/bench-invoke --reps 3`.
//! Needs root, docker-registry, skopeo, the CNI plugins, containerd and runc.

use arbor_benches::{chart, common, harness, pyimage};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use arbor_testkit::functions::{FnNode, FnNodeOptions, FnSnapshotter, http_exchange};
use clap::Parser;
use serde_json::{Value, json};

use common::{MB, Spread, machine_info, preflight, print_machine, target_dir};
use harness::{Remote, Startup, check_interrupted, write_json};
use pyimage::{AppFile, CacheArgs, LayerDef, PATH_ENV, PYTHON, Recipe};

const RECIPE_VERSION: u32 = 1;
/// The gateway's added warm latency at p50 the issue asks for, ms.
const TARGET_ADDED_P50_MS: f64 = 1.0;

const SERVER_PY: &str = r#""""Arbor invoke bench function: a Flask app that imports numpy at start and answers
POST /invoke (port 9000) with a line fitted by numpy to the body's length."""
import os

import numpy as np
from flask import Flask, jsonify, request

app = Flask(__name__)


@app.post("/invoke")
def invoke():
    n = len(request.get_data()) + 3
    x = np.arange(n, dtype=float)
    slope, intercept = np.polyfit(x, 3 * x + 2, 1)
    return jsonify(ok="arbor-invoke-ok", n=n, slope=round(float(slope), 6),
                   intercept=round(float(intercept), 6))


if __name__ == "__main__":
    app.run(host="0.0.0.0", port=int(os.environ.get("PORT", "9000")), threaded=True)
"#;

const TRACE_CODE: &str = r#"
import sys
sys.path.insert(0, "/app")
import server
r = server.app.test_client().post("/invoke", data=b"x")
if r.status_code != 200 or b"arbor-invoke-ok" not in r.data:
    raise SystemExit("the function answered %r" % r.data)
"#;

const PHASES: &[&str] = &[
    "network", "pull", "create", "task", "start", "port", "proxy",
];

#[derive(Parser)]
#[command(
    about = "Functions through arbord's gateway: cold invoke on Arbor vs overlayfs, warm \
                   latency vs calling the instance, throughput with 1-4 instances (see the top \
                   of benches/invoke.rs)"
)]
struct Args {
    /// Registry link, Mbit/s each way.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// tbf queue of the link, ms.
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
    /// Repetitions of each cold mode; the table shows medians.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Warm requests each way (through the gateway, straight to the instance).
    #[arg(long, default_value_t = 400)]
    warm: usize,
    /// Client threads of the throughput runs.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// The arbor CLI [default: <target dir>/release/arbor].
    #[arg(long)]
    arbor: Option<std::path::PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    #[arg(long)]
    png: Option<std::path::PathBuf>,
}

fn recipe() -> Recipe<'static> {
    Recipe {
        name: "invoke",
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
        env: vec![PATH_ENV.into(), "PORT=9000".into()],
    }
}

fn main() {
    harness::main_with(run)
}

/// One cold invoke: seconds to the answer and its phases.
struct Cold {
    mode: FnSnapshotter,
    total: f64,
    phases: Vec<(String, f64)>,
}

fn check_answer(body: &[u8]) -> Result<()> {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    ensure!(
        v["ok"] == "arbor-invoke-ok" && v["slope"] == 3.0,
        "the function answered {:?}",
        String::from_utf8_lossy(body)
    );
    Ok(())
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn run() -> Result<bool> {
    let args = Args::parse();
    ensure!(args.reps >= 1 && args.warm >= 10 && args.clients >= 1);
    let arbor = args
        .arbor
        .clone()
        .unwrap_or_else(|| target_dir().join("release/arbor"));
    let arbord = arbor.with_file_name("arbord");
    preflight(
        &arbor,
        &[
            "docker-registry",
            "skopeo",
            "containerd",
            "runc",
            "ip",
            "tc",
        ],
        "containerd, network namespaces, CNI and FUSE mounts",
    )?;
    ensure!(arbord.is_file(), "arbord {} not found", arbord.display());
    for p in ["bridge", "host-local", "loopback"] {
        ensure!(
            std::path::Path::new("/usr/lib/cni").join(p).is_file(),
            "the CNI plugin {p} is missing (containernetworking-plugins)"
        );
    }
    let mut machine = machine_info(&arbor);
    print_machine(&machine);
    harness::print_load(&mut machine);
    let cache = args
        .cache
        .dir
        .clone()
        .unwrap_or_else(|| target_dir().join("bench-cache"));
    let image = pyimage::prepare_image(&cache, &recipe(), args.cache.rebuild)?;
    image.print();

    let remote = Remote::start(args.rate * 1_000_000, args.latency_ms)?;
    remote.push(&image.layout, &image.tag, "bench/invoke", "v1")?;
    let conv = remote.convert(
        &arbor,
        "bench/invoke",
        "v1",
        "v1-arbor",
        Startup::Inferred,
        Duration::from_secs(1800),
    )?;
    let registry_host = remote
        .addr()
        .rsplit_once(':')
        .map(|(h, _)| h.to_string())
        .context("registry address")?;

    let mut colds: Vec<Cold> = Vec::new();
    let mut warm = Value::Null;
    let mut throughput = Vec::new();
    for rep in 0..args.reps {
        let order = if rep % 2 == 0 {
            [FnSnapshotter::Overlayfs, FnSnapshotter::Arbor]
        } else {
            [FnSnapshotter::Arbor, FnSnapshotter::Overlayfs]
        };
        for mode in order {
            check_interrupted()?;
            let mut o = FnNodeOptions::new(&arbord, mode);
            o.plain_http = vec![registry_host.clone()];
            o.bridge = "arbinv0".into();
            o.subnet = "10.202.0.0/24".into();
            o.namespace = "bench-fn".into();
            let node = FnNode::start(&o).context("starting a node")?;
            let image_ref = match mode {
                FnSnapshotter::Arbor => remote.reference("bench/invoke", "v1-arbor"),
                FnSnapshotter::Overlayfs => remote.reference("bench/invoke", "v1"),
            };
            node.deploy(
                "bench",
                &json!({"image": image_ref, "max_instances": 4, "idle_timeout_secs": 600,
                        "start_timeout_secs": 300, "timeout_secs": 120}),
            )?;
            harness::drop_caches();
            let t0 = Instant::now();
            let r = node.invoke("bench", b"cold")?;
            let total = t0.elapsed().as_secs_f64();
            ensure!(
                r.status == 200,
                "{}: cold invoke: {} {}",
                mode.name(),
                r.status,
                r.text()
            );
            ensure!(r.header("x-arbor-start") == "cold");
            check_answer(&r.body)?;
            let f = node.function("bench")?;
            let mut phases: Vec<(String, f64)> = f["instances"][0]["cold_start"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_f64()?)))
                .collect();
            let sum: f64 = phases.iter().map(|(_, s)| s).sum();
            phases.push(("proxy".into(), (total - sum).max(0.0)));
            println!(
                "rep {} {:<9} cold invoke {total:.2} s ({})",
                rep + 1,
                mode.name(),
                phases
                    .iter()
                    .map(|(n, s)| format!("{n} {s:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            colds.push(Cold {
                mode,
                total,
                phases,
            });
            if mode == FnSnapshotter::Arbor {
                let addr = f["instances"][0]["address"]
                    .as_str()
                    .context("the instance's address")?
                    .to_string();
                let w = measure_warm(&node, &addr, args.warm)?;
                println!(
                    "rep {} warm p50 gateway {:.2} ms / direct {:.2} ms (added {:.2} ms), p99 {:.2} / {:.2} ms",
                    rep + 1,
                    w["gateway_p50_ms"].as_f64().unwrap_or(f64::NAN),
                    w["direct_p50_ms"].as_f64().unwrap_or(f64::NAN),
                    w["added_p50_ms"].as_f64().unwrap_or(f64::NAN),
                    w["gateway_p99_ms"].as_f64().unwrap_or(f64::NAN),
                    w["direct_p99_ms"].as_f64().unwrap_or(f64::NAN),
                );
                if warm.is_null() || rep == args.reps / 2 {
                    warm = w;
                }
                if rep == 0 {
                    throughput = measure_throughput(&node, &image_ref, &args)?;
                }
            }
            drop(node);
        }
    }

    // Summary.
    let med = |m: FnSnapshotter, f: &dyn Fn(&Cold) -> f64| {
        Spread::of(
            &colds
                .iter()
                .filter(|c| c.mode == m)
                .map(f)
                .collect::<Vec<_>>(),
        )
    };
    let phase_of = |c: &Cold, p: &str| {
        c.phases
            .iter()
            .find(|(n, _)| n == p)
            .map_or(0.0, |(_, s)| *s)
    };
    let mut modes = serde_json::Map::new();
    println!();
    println!(
        "cold invoke through the gateway, registry behind {} Mbit/s, median of {} (seconds):",
        args.rate, args.reps
    );
    print!("  {:<10} {:>7}", "", "total");
    for p in PHASES {
        print!(" {p:>8}");
    }
    println!();
    for m in [FnSnapshotter::Overlayfs, FnSnapshotter::Arbor] {
        let total = med(m, &|c| c.total);
        print!("  {:<10} {:>7.2}", m.name(), total.median);
        let mut ph = serde_json::Map::new();
        for p in PHASES {
            let s = med(m, &|c| phase_of(c, p));
            print!(" {:>8.2}", s.median);
            ph.insert((*p).into(), s.to_json());
        }
        println!();
        modes.insert(
            m.name().into(),
            json!({"total_seconds": total.to_json(), "phases": ph,
                   "runs": colds.iter().filter(|c| c.mode == m).map(|c| json!({"total": c.total, "phases": c.phases})).collect::<Vec<_>>()}),
        );
    }
    let over = med(FnSnapshotter::Overlayfs, &|c| c.total).median;
    let arb = med(FnSnapshotter::Arbor, &|c| c.total).median;
    let speedup = over / arb;
    println!("  arbor cold invoke {speedup:.1}x faster than overlayfs");
    let added = warm["added_p50_ms"].as_f64().unwrap_or(f64::NAN);
    println!(
        "warm invoke p50: gateway {:.2} ms, direct {:.2} ms: the gateway adds {added:.2} ms (target <= {TARGET_ADDED_P50_MS} ms: {}); p99 {:.2} / {:.2} ms",
        warm["gateway_p50_ms"].as_f64().unwrap_or(f64::NAN),
        warm["direct_p50_ms"].as_f64().unwrap_or(f64::NAN),
        if added <= TARGET_ADDED_P50_MS {
            "met"
        } else {
            "NOT met"
        },
        warm["gateway_p99_ms"].as_f64().unwrap_or(f64::NAN),
        warm["direct_p99_ms"].as_f64().unwrap_or(f64::NAN),
    );
    println!(
        "throughput ({} clients, {} s each):",
        args.clients, args.seconds
    );
    for t in &throughput {
        println!(
            "  {} instance(s): {:.0} invocations/s ({} answered, {} errors)",
            t["instances"],
            t["per_second"].as_f64().unwrap_or(0.0),
            t["answered"],
            t["errors"]
        );
    }
    let ok = throughput.iter().all(|t| t["errors"] == 0);

    if let Some(p) = &args.json {
        let rep = harness::report(
            "invoke",
            machine,
            json!({
                "link": {"rate_mbit": args.rate, "latency_ms": args.latency_ms},
                "image": image.to_json(&[]),
                "conversion": conv,
                "reps": args.reps,
                "cold": modes,
                "cold_speedup": speedup,
                "warm": warm,
                "target_added_p50_ms": TARGET_ADDED_P50_MS,
                "throughput": throughput,
            }),
        );
        write_json(p, &rep)?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &args.png {
        let bars = [FnSnapshotter::Overlayfs, FnSnapshotter::Arbor]
            .iter()
            .map(|&m| {
                let total = med(m, &|c| c.total).median;
                chart::Bar {
                    label: m.name().into(),
                    values: PHASES
                        .iter()
                        .map(|p| med(m, &|c| phase_of(c, p)).median)
                        .collect(),
                    note: if m == FnSnapshotter::Arbor {
                        format!("{total:.2} s  {speedup:.1}x faster")
                    } else {
                        format!("{total:.2} s")
                    },
                }
            })
            .collect();
        let c = chart::BarChart {
            title: "Cold invoke of a scaled-to-zero function through arbord's gateway".into(),
            subtitle: vec![
                format!(
                    "PyPI Flask + numpy function, image {:.0} MB; registry behind {} Mbit/s; median of {}",
                    image.uncompressed_bytes as f64 / MB,
                    args.rate,
                    args.reps
                ),
                format!(
                    "warm p50: gateway {:.2} ms vs direct {:.2} ms",
                    warm["gateway_p50_ms"].as_f64().unwrap_or(f64::NAN),
                    warm["direct_p50_ms"].as_f64().unwrap_or(f64::NAN)
                ),
            ],
            segments: PHASES
                .iter()
                .zip([
                    [150, 150, 150],
                    [70, 110, 190],
                    [240, 170, 60],
                    [200, 120, 160],
                    [120, 200, 200],
                    [90, 170, 100],
                    [60, 60, 60],
                ])
                .map(|(n, c)| ((*n).to_string(), c))
                .collect(),
            groups: vec![chart::Group {
                heading: String::new(),
                bars,
            }],
            axis_label: "seconds".into(),
        };
        std::fs::write(p, c.render().png()?)?;
        println!("wrote {}", p.display());
    }
    Ok(ok)
}

/// `n` warm invocations each way, alternating: gateway, direct.
fn measure_warm(node: &FnNode, direct: &str, n: usize) -> Result<Value> {
    let mut gw = Vec::with_capacity(n);
    let mut dr = Vec::with_capacity(n);
    let path = "/v1/functions/bench/invoke";
    for i in 0..n + 10 {
        let t = Instant::now();
        let r = http_exchange(
            &node.api,
            "POST",
            path,
            &[],
            b"warm",
            Duration::from_secs(30),
        )?;
        let g = t.elapsed().as_secs_f64() * 1e3;
        ensure!(r.status == 200, "warm invoke: {} {}", r.status, r.text());
        check_answer(&r.body)?;
        let t = Instant::now();
        let r = http_exchange(
            direct,
            "POST",
            "/invoke",
            &[],
            b"warm",
            Duration::from_secs(30),
        )?;
        let d = t.elapsed().as_secs_f64() * 1e3;
        ensure!(r.status == 200, "direct invoke: {} {}", r.status, r.text());
        check_answer(&r.body)?;
        // The first few warm the connections and caches of both paths.
        if i >= 10 {
            gw.push(g);
            dr.push(d);
        }
    }
    let (g50, d50) = (percentile(&gw, 0.5), percentile(&dr, 0.5));
    Ok(json!({
        "requests": n,
        "gateway_p50_ms": g50, "gateway_p99_ms": percentile(&gw, 0.99),
        "direct_p50_ms": d50, "direct_p99_ms": percentile(&dr, 0.99),
        "added_p50_ms": g50 - d50,
    }))
}

/// Answers per second with k = 1..4 reserved instances.
fn measure_throughput(node: &FnNode, image: &str, args: &Args) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for k in 1..=4u32 {
        check_interrupted()?;
        node.deploy(
            "bench",
            &json!({"image": image, "min_instances": k, "max_instances": k,
                    "idle_timeout_secs": 600, "start_timeout_secs": 300, "queue_limit": 1000,
                    "env": [format!("INSTANCES={k}")]}),
        )?;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let f = node.function("bench")?;
            let ready = f["instances"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|i| i["state"] == "ready" && i["version"] == f["version"])
                .count();
            let all = f["instances"].as_array().map_or(0, Vec::len);
            if ready == k as usize && all == k as usize {
                break;
            }
            if Instant::now() > deadline {
                bail!("{k} instances did not get ready: {f}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let stop = Instant::now() + Duration::from_secs(args.seconds);
        let api = node.api.clone();
        let threads: Vec<_> = (0..args.clients)
            .map(|_| {
                let api = api.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut err) = (0u64, 0u64);
                    while Instant::now() < stop {
                        match http_exchange(
                            &api,
                            "POST",
                            "/v1/functions/bench/invoke",
                            &[],
                            b"t",
                            Duration::from_secs(60),
                        ) {
                            Ok(r) if r.status == 200 && check_answer(&r.body).is_ok() => ok += 1,
                            _ => err += 1,
                        }
                    }
                    (ok, err)
                })
            })
            .collect();
        let t0 = Instant::now();
        let (mut ok, mut err) = (0, 0);
        for t in threads {
            let (a, b) = t
                .join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
            ok += a;
            err += b;
        }
        let secs = t0.elapsed().as_secs_f64();
        let per_second = ok as f64 / secs;
        println!(
            "throughput with {k} instance(s): {per_second:.0}/s ({ok} answered, {err} errors)"
        );
        out.push(json!({"instances": k, "answered": ok, "errors": err, "seconds": secs, "per_second": per_second}));
    }
    Ok(out)
}
