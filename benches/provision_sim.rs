//! `bench-provision-sim`: a discrete-event simulation of a cold-start burst, registry-only lazy
//! loading against FaaSNet-style function trees, driving the real tree manager
//! (`arbor_p2p::Manager`, through `arbor_p2p::sim`).
//!
//! **What it models.** `N` nodes cold-start one function at once. The image is 758 MB, of which
//! only the start-up set (default 130 MB, `--startup-mb`) must be on a node before it counts as
//! provisioned; the set is split into 512 KiB blocks (`--block-kib`). Each node has a 1 Gbit/s
//! downlink and a 1 Gbit/s uplink (`--node-rate`), the registry a 1 Gbit/s egress
//! (`--registry-rate`, e.g. `200mbit`).
//!
//! - *registry-only*: every node fetches every block from the registry, whose egress is shared
//!   fairly among the nodes still fetching (each also capped by its downlink);
//! - *trees*: the nodes join one function tree in burst order; the root reads the registry and
//!   every node streams each block on to its children as soon as it has it. A node's uplink is
//!   shared fairly among its children that are receiving; a child gets `min(share, downlink)`.
//!
//! The model is block-level with piecewise-constant rates recomputed per sender at every event
//! (see the `arbor_p2p::sim` module docs). A second row set kills `--failures-percent` of the
//! nodes (at least 1 for `N >= 8`) at random times (seeded xorshift, `--seed`) in the first half
//! of the failure-free burst: a dead node stops sending and receiving, the manager learns it
//! after a 1 s heartbeat timeout (`Manager::expire`, live nodes heartbeating every 250 ms), and
//! the re-parented nodes continue with the blocks they miss. Failed nodes are excluded.
//!
//! With `--start-s S` a node is ready once its function has also done `S` seconds of its own
//! start work, overlapped with the transfer (the work needs block i after i/blocks of it;
//! `arbor_p2p::sim::ready_time`); a last table sweeps `--start-sweep` at the largest N and
//! prints T(N)/T(1) for each: with transfer alone a binary tree's T(N)/T(1) tends to 2 (a
//! parent's uplink feeds two children), and a start that paces its reads below half the link
//! rate hides the depth (FaaSNet's one-container time was about 5 s).
//!
//! Columns: time until the last node is provisioned and the median; registry bytes as a multiple
//! of one start-up set; the highest receive and send rate of any node over any interval between
//! events (Mbit/s); `T(N)/T(1)` for trees.
//!
//! **What it does not model:** TCP dynamics (slow start, congestion control, loss), latency and
//! per-request overhead, CPU, disk, decompression, and the rest of the image beyond the start-up
//! set. It is an upper bound of what the topology allows, not a measurement.
//!
//! **Reference (FaaSNet, USENIX ATC 2021, DESIGN.md section 4):** 2,500 containers on 1,000 VMs
//! (1 Gbit/s each, 428 MB image) all started within 8.3 s, 1.6x the time for one container (their
//! Fig. 17); at 128 containers 5x faster than lazy loading from the registry alone; only the
//! root's bytes reach the registry; per-VM NIC use peaked at 35% of 1 Gbit/s.
//!
//! Results: a table on stdout and JSON in `<target dir>/bench-results/provision_sim.json`
//! (`--json`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use arbor_benches::{common, harness};
use arbor_p2p::sim::{self, SimConfig, SimResult, Strategy};
use clap::Parser;
use serde_json::{Value, json};

/// The whole image (only the start-up set is needed to start).
const IMAGE_MB: f64 = 758.0;

#[derive(Parser, Debug)]
#[command(about = "Simulated cold-start burst: registry-only lazy loading vs function trees")]
struct Args {
    /// Burst sizes, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4,8,16,32,64,128,256,512,1000"
    )]
    nodes: Vec<usize>,
    /// Registry egress (tc-style: 1gbit, 200mbit).
    #[arg(long, default_value = "1gbit", value_parser = harness::parse_rate)]
    registry_rate: u64,
    /// Per-node downlink and uplink.
    #[arg(long, default_value = "1gbit", value_parser = harness::parse_rate)]
    node_rate: u64,
    /// Size of the start-up set in MB (10^6 bytes), out of a 758 MB image.
    #[arg(long, default_value_t = 130.0)]
    startup_mb: f64,
    /// Block size in KiB.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    block_kib: u64,
    /// Percentage of nodes killed in the failure rows (at least 1 for N >= 8; 0: no such rows).
    #[arg(long, default_value_t = 1.0)]
    failures_percent: f64,
    /// Seconds of the function's own start-up work per node (runtime, interpreter, imports,
    /// with its data local), overlapped with the transfer: the function needs block i once it
    /// has done i/blocks of its work (`arbor_p2p::sim::ready_time`). 0: a node is ready when it
    /// holds the set (transfer only).
    #[arg(long, default_value_t = 0.0)]
    start_s: f64,
    /// Start-up work values (seconds) for the table of T(N)/T(1) at the largest N against the
    /// function's own start work.
    #[arg(long, value_delimiter = ',', default_value = "0,1,1.5,2,5")]
    start_sweep: Vec<f64>,
    /// Seed of the failure PRNG.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the JSON results [default: <target dir>/bench-results/provision_sim.json].
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

fn main() {
    harness::main_with(run);
}

fn row_json(r: &SimResult, t1: f64) -> Value {
    json!({
        "strategy": r.strategy.name(),
        "nodes": r.nodes,
        "failed": r.failed,
        "last_s": r.last_s,
        "data_last_s": r.data_last_s,
        "p50_s": r.p50_s,
        "registry_bytes": r.registry_bytes,
        "registry_sets": r.registry_sets,
        "peak_in_mbit_per_s": r.peak_in_mbps,
        "peak_out_mbit_per_s": r.peak_out_mbps,
        "t_over_t1": r.last_s / t1,
        "reparented": r.reparented,
        "duplicate_deliveries": r.duplicate_deliveries,
        "events": r.events,
    })
}

fn run() -> Result<bool> {
    let args = Args::parse();
    ensure!(
        !args.nodes.is_empty(),
        "--nodes: give at least one burst size"
    );
    ensure!(
        args.nodes.iter().all(|&n| n >= 1),
        "--nodes: burst sizes must be at least 1"
    );
    ensure!(
        args.startup_mb.is_finite() && args.startup_mb > 0.0,
        "--startup-mb must be positive"
    );
    ensure!(
        args.failures_percent.is_finite() && (0.0..100.0).contains(&args.failures_percent),
        "--failures-percent must be in [0, 100)"
    );
    let base = SimConfig {
        registry_bps: args.registry_rate as f64,
        node_down_bps: args.node_rate as f64,
        node_up_bps: args.node_rate as f64,
        set_bytes: (args.startup_mb * common::MB).round() as u64,
        block_bytes: args.block_kib * 1024,
        start_s: args.start_s,
        ..SimConfig::default()
    };
    ensure!(
        std::iter::once(args.start_s)
            .chain(args.start_sweep.iter().copied())
            .all(|x| x.is_finite() && x >= 0.0),
        "--start-s and --start-sweep take non-negative seconds"
    );
    let blocks = base.set_bytes.div_ceil(base.block_bytes);
    println!(
        "start-up set {} MB of a {IMAGE_MB} MB image, {} KiB blocks ({blocks} blocks); \
         registry {} Mbit/s, nodes {} Mbit/s down and up; heartbeat timeout {} ms; \
         start-up work {} s per node",
        args.startup_mb,
        args.block_kib,
        args.registry_rate as f64 / 1e6,
        args.node_rate as f64 / 1e6,
        base.timeout_ms,
        args.start_s,
    );
    let started = Instant::now();
    let simulate = |cfg: &SimConfig, s: Strategy| {
        sim::simulate(cfg, s).with_context(|| format!("{} with {} nodes", s.name(), cfg.nodes))
    };
    let one = SimConfig {
        nodes: 1,
        ..base.clone()
    };
    let t1 = simulate(&one, Strategy::Trees)?.last_s;

    println!();
    println!(
        "{:>5} | {:>24} {:>6} {:>11} | {:>24} {:>6} {:>11} {:>7} | {:>7}",
        "N",
        "registry-only last/p50 s",
        "reg x",
        "in/out Mb/s",
        "trees last/p50 s",
        "reg x",
        "in/out Mb/s",
        "T/T(1)",
        "speedup"
    );
    let mut rows = Vec::new();
    let mut no_fail_last = Vec::new();
    for &n in &args.nodes {
        let cfg = SimConfig {
            nodes: n,
            ..base.clone()
        };
        let lazy = simulate(&cfg, Strategy::RegistryOnly)?;
        let tree = simulate(&cfg, Strategy::Trees)?;
        println!(
            "{n:>5} | {:>11.3} {:>12.3} {:>6.1} {:>5.0}/{:<5.0} | {:>11.3} {:>12.3} {:>6.1} {:>5.0}/{:<5.0} {:>7.2} | {:>6.1}x",
            lazy.last_s,
            lazy.p50_s,
            lazy.registry_sets,
            lazy.peak_in_mbps,
            lazy.peak_out_mbps,
            tree.last_s,
            tree.p50_s,
            tree.registry_sets,
            tree.peak_in_mbps,
            tree.peak_out_mbps,
            tree.last_s / t1,
            lazy.last_s / tree.last_s,
        );
        no_fail_last.push((n, tree.last_s));
        rows.push(json!({
            "nodes": n,
            "registry_only": row_json(&lazy, t1),
            "trees": row_json(&tree, t1),
        }));
    }

    let mut failure_rows = Vec::new();
    if args.failures_percent > 0.0 {
        println!();
        println!(
            "with failures ({}% of nodes, at least 1 for N >= 8, at random times in the first half \
             of the burst; trees; failed nodes excluded)",
            args.failures_percent
        );
        println!(
            "{:>5} {:>6} | {:>24} {:>6} {:>11} {:>10} | {:>7} {:>13}",
            "N",
            "failed",
            "trees last/p50 s",
            "reg x",
            "in/out Mb/s",
            "reparented",
            "T/T(1)",
            "vs no failure"
        );
        for &(n, clean) in &no_fail_last {
            let k = sim::failure_count(n, args.failures_percent);
            if k == 0 {
                continue;
            }
            let cfg = SimConfig {
                nodes: n,
                failures: sim::random_failures(n, k, clean / 2.0, args.seed ^ n as u64),
                ..base.clone()
            };
            let r = simulate(&cfg, Strategy::Trees)?;
            println!(
                "{n:>5} {k:>6} | {:>11.3} {:>12.3} {:>6.2} {:>5.0}/{:<5.0} {:>10} | {:>7.2} {:>12.2}x",
                r.last_s,
                r.p50_s,
                r.registry_sets,
                r.peak_in_mbps,
                r.peak_out_mbps,
                r.reparented,
                r.last_s / t1,
                r.last_s / clean,
            );
            let mut row = row_json(&r, t1);
            if let Some(o) = row.as_object_mut() {
                o.insert(
                    "failure_times_s".into(),
                    json!(cfg.failures.iter().map(|f| f.at_s).collect::<Vec<_>>()),
                );
                o.insert("no_failure_last_s".into(), json!(clean));
            }
            failure_rows.push(row);
        }
    }
    // How the function's own start-up work changes T(N)/T(1) at the largest N: FaaSNet's
    // containers took about 5 s alone, so their reads were paced by the start, not the link.
    let mut start_rows = Vec::new();
    if let Some(&n) = args.nodes.iter().max()
        && !args.start_sweep.is_empty()
    {
        println!();
        println!(
            "start-up work per node (overlapped with the transfer) vs T({n})/T(1), trees, no failures"
        );
        println!(
            "{:>8} | {:>8} {:>9} {:>13} {:>8}",
            "start s",
            "T(1) s",
            format!("T({n}) s"),
            format!("T({n})/T(1)"),
            "data s"
        );
        for &start_s in &args.start_sweep {
            let at = |nodes: usize| {
                simulate(
                    &SimConfig {
                        nodes,
                        start_s,
                        ..base.clone()
                    },
                    Strategy::Trees,
                )
            };
            let (one, many) = (at(1)?, at(n)?);
            println!(
                "{start_s:>8.2} | {:>8.3} {:>9.3} {:>13.2} {:>8.3}",
                one.last_s,
                many.last_s,
                many.last_s / one.last_s,
                many.data_last_s,
            );
            start_rows.push(json!({
                "start_s": start_s,
                "nodes": n,
                "t1_s": one.last_s,
                "tn_s": many.last_s,
                "tn_over_t1": many.last_s / one.last_s,
                "data_last_s": many.data_last_s,
            }));
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!();
    println!("simulated in {elapsed:.2} s");

    let path = args
        .json
        .clone()
        .unwrap_or_else(|| common::target_dir().join("bench-results/provision_sim.json"));
    let report = harness::report(
        "provision_sim",
        json!({ "note": "simulation: results do not depend on this machine" }),
        json!({
            "model": {
                "image_mb": IMAGE_MB,
                "startup_mb": args.startup_mb,
                "startup_bytes": base.set_bytes,
                "block_bytes": base.block_bytes,
                "blocks": blocks,
                "registry_bits_per_s": args.registry_rate,
                "node_bits_per_s": args.node_rate,
                "heartbeat_ms": base.heartbeat_ms,
                "timeout_ms": base.timeout_ms,
                "failures_percent": args.failures_percent,
                "seed": args.seed,
                "start_s": args.start_s,
                "not_modelled": "TCP dynamics, latency, per-request overhead, CPU, disk",
            },
            "t1_s": t1,
            "rows": rows,
            "failure_rows": failure_rows,
            "start_rows": start_rows,
            "simulation_seconds": elapsed,
        }),
    );
    harness::write_json(&path, &report)?;
    println!("results: {}", path.display());
    Ok(true)
}
