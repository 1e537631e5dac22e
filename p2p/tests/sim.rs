//! The burst simulation against closed-form expectations (`arbor_p2p::sim`).

use arbor_p2p::sim::{
    SimConfig, SimResult, Strategy, failure_count, function_id, random_failures, ready_time,
    simulate,
};

/// A small set keeps debug-build runs fast: 13 MB in 512 KiB blocks (25 blocks).
fn config(nodes: usize) -> SimConfig {
    SimConfig {
        nodes,
        set_bytes: 13_000_000,
        ..SimConfig::default()
    }
}

fn run(cfg: &SimConfig, strategy: Strategy) -> SimResult {
    simulate(cfg, strategy).expect("simulation runs")
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs()
}

#[test]
fn one_node_takes_set_over_bottleneck_rate() {
    for (registry, node) in [(1e9, 1e9), (2e8, 1e9), (1e9, 5e8)] {
        let cfg = SimConfig {
            registry_bps: registry,
            node_down_bps: node,
            node_up_bps: node,
            ..config(1)
        };
        let expected = cfg.set_bytes as f64 * 8.0 / f64::min(registry, node);
        let lazy = run(&cfg, Strategy::RegistryOnly);
        let tree = run(&cfg, Strategy::Trees);
        assert!(
            close(lazy.last_s, expected, 0.01),
            "{} vs {expected}",
            lazy.last_s
        );
        assert!(
            close(tree.last_s, expected, 0.01),
            "{} vs {expected}",
            tree.last_s
        );
        assert!(close(tree.last_s, lazy.last_s, 0.01));
    }
}

#[test]
fn registry_bytes_one_set_with_trees_n_sets_without() {
    for n in [1, 2, 3, 7, 16, 33] {
        let cfg = config(n);
        let tree = run(&cfg, Strategy::Trees);
        assert_eq!(tree.registry_bytes, cfg.set_bytes, "trees, N = {n}");
        let lazy = run(&cfg, Strategy::RegistryOnly);
        assert_eq!(
            lazy.registry_bytes,
            n as u64 * cfg.set_bytes,
            "registry-only, N = {n}"
        );
        for r in [&tree, &lazy] {
            assert_eq!(r.duplicate_deliveries, 0);
            assert_eq!(r.missing_blocks, 0);
            assert!(r.provisioned_s.iter().all(Option::is_some));
        }
    }
}

#[test]
fn start_work_waits_for_the_blocks_it_needs() {
    let arrival = [0.1, 0.2, 0.3, 0.4];
    assert!(close(ready_time(&arrival, 0.0), 0.4, 1e-9));
    // Data faster than the work: ready the work's length after the first block.
    assert!(close(ready_time(&arrival, 4.0), 4.1, 1e-9));
    // Work faster than the data: a slice after the last block.
    assert!(close(ready_time(&arrival, 0.04), 0.41, 1e-9));
    // Blocks that came out of order wait for the latest so far.
    assert!(close(ready_time(&[0.5, 0.0, 0.0, 0.0], 0.4), 0.9, 1e-9));
    assert!(close(ready_time(&[], 2.0), 2.0, 1e-9));
}

/// With transfer alone a binary tree's T(N)/T(1) tends to 2 (a parent's uplink feeds two
/// children); when the function's own start-up work paces its reads below half the link
/// rate, as FaaSNet's starts did, the tree hides the fan-out: T(N)/T(1) near 1. The data
/// still arrives as before.
#[test]
fn start_work_slower_than_the_tree_hides_its_depth() {
    let at = |nodes: usize, start_s: f64| {
        run(
            &SimConfig {
                nodes,
                start_s,
                ..SimConfig::default()
            },
            Strategy::Trees,
        )
    };
    let (one, many) = (at(1, 0.0), at(64, 0.0));
    let bare = many.last_s / one.last_s;
    assert!(
        bare > 1.8 && bare < 2.2,
        "transfer only: T(64)/T(1) = {bare}"
    );
    let (one, many) = (at(1, 5.0), at(64, 5.0));
    let paced = many.last_s / one.last_s;
    assert!(paced < 1.1, "5 s of start work: T(64)/T(1) = {paced}");
    assert!(one.last_s >= 5.0 && many.data_last_s < many.last_s);
    assert!(close(many.data_last_s, at(64, 0.0).data_last_s, 1e-9));
}

#[test]
fn trees_beat_registry_only_and_scale_with_depth() {
    // The default 130 MB set here (248 blocks).
    let one = run(&SimConfig::default(), Strategy::Trees);
    let cfg = SimConfig {
        nodes: 64,
        ..SimConfig::default()
    };
    let tree = run(&cfg, Strategy::Trees);
    let lazy = run(&cfg, Strategy::RegistryOnly);
    assert!(
        lazy.last_s >= 5.0 * tree.last_s,
        "registry-only {} s, trees {} s",
        lazy.last_s,
        tree.last_s
    );
    let ratio = tree.last_s / one.last_s;
    assert!(ratio < 3.0, "T(64)/T(1) = {ratio}");
    assert!(ratio >= 1.0);
    // Registry-only: the registry is shared fairly, so everyone finishes together at N x T(1).
    assert!(close(lazy.last_s, 64.0 * one.last_s, 0.01));
    // No node ever sends faster than its uplink or receives faster than its downlink.
    assert!(tree.peak_out_mbps <= 1000.0 + 1e-6 && tree.peak_in_mbps <= 1000.0 + 1e-6);
}

#[test]
fn survivors_complete_after_failures() {
    for (n, seed) in [(16, 1), (64, 7), (100, 42), (200, 3)] {
        let base = run(&config(n), Strategy::Trees);
        let k = failure_count(n, 5.0);
        assert!(k >= 1);
        let cfg = SimConfig {
            failures: random_failures(n, k, base.last_s / 2.0, seed),
            ..config(n)
        };
        let r = run(&cfg, Strategy::Trees);
        assert_eq!(r.failed, k);
        let survivors = r.provisioned_s.iter().filter(|t| t.is_some()).count();
        assert_eq!(survivors, n - k, "every survivor is provisioned");
        assert_eq!(r.duplicate_deliveries, 0);
        assert_eq!(r.missing_blocks, 0);
        assert!(r.reparented >= 1, "failures caused re-parenting");
        // Detection takes at least the heartbeat timeout, so the burst gets slower.
        assert!(r.last_s >= base.last_s);
        let manager = r.manager.expect("trees keep the manager");
        let tree = manager.tree(&function_id()).expect("tree exists");
        tree.check().expect("valid tree");
        assert_eq!(tree.len(), n - k);
        // A failed root means the new root reads the registry again.
        assert!(r.registry_bytes >= cfg.set_bytes);
    }
}

#[test]
fn root_failure_moves_registry_reads_to_new_root() {
    let cfg = SimConfig {
        failures: vec![arbor_p2p::sim::Failure {
            node: 0,
            at_s: 0.05,
        }],
        ..config(8)
    };
    let r = run(&cfg, Strategy::Trees);
    assert_eq!(r.failed, 1);
    assert!(r.provisioned_s[1..].iter().all(Option::is_some));
    assert!(r.registry_bytes > cfg.set_bytes);
    assert!(r.last_s > 1.0, "detection needs the 1 s timeout");
}

#[test]
fn bad_configs_are_errors() {
    assert!(simulate(&config(0), Strategy::Trees).is_err());
    let cfg = SimConfig {
        block_bytes: 0,
        ..config(4)
    };
    assert!(simulate(&cfg, Strategy::RegistryOnly).is_err());
    let cfg = SimConfig {
        failures: vec![arbor_p2p::sim::Failure { node: 9, at_s: 0.0 }],
        ..config(4)
    };
    assert!(simulate(&cfg, Strategy::Trees).is_err());
}
