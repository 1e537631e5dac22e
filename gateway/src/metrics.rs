//! The gateway's Prometheus metrics: invocations by outcome (cold, warm or the error kind)
//! and their latency, time in the queue, cold-start phases, instance starts and deaths,
//! instances by state and requests waiting.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

#[derive(Default)]
struct SumCount {
    sum: f64,
    count: u64,
}

impl SumCount {
    fn add(&mut self, v: f64) {
        self.sum += v;
        self.count += 1;
    }
}

/// Counters, per function.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// (function, outcome) -> latency.
    invocations: BTreeMap<(String, String), SumCount>,
    queue: BTreeMap<String, SumCount>,
    /// (function, phase) -> seconds.
    phases: BTreeMap<(String, String), SumCount>,
    /// (function, outcome) -> count.
    starts: BTreeMap<(String, String), u64>,
    ended: BTreeMap<String, u64>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn invocation(&self, function: &str, outcome: &str, seconds: f64) {
        self.with(|s| {
            s.invocations
                .entry((function.into(), outcome.into()))
                .or_default()
                .add(seconds)
        });
    }

    pub fn queued(&self, function: &str, seconds: f64) {
        self.with(|s| s.queue.entry(function.into()).or_default().add(seconds));
    }

    pub fn started(&self, function: &str, outcome: &str, phases: &[(String, f64)]) {
        self.with(|s| {
            *s.starts
                .entry((function.into(), outcome.into()))
                .or_default() += 1;
            for (p, secs) in phases {
                s.phases
                    .entry((function.into(), p.clone()))
                    .or_default()
                    .add(*secs);
            }
        });
    }

    pub fn ended(&self, function: &str) {
        self.with(|s| *s.ended.entry(function.into()).or_default() += 1);
    }

    /// Appends the text format; `states` is (function, instances by state, waiting).
    pub fn render(&self, states: &[(String, BTreeMap<&str, u64>, usize)], out: &mut String) {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut sum_count = |name: &str, help: &str, rows: Vec<(String, &SumCount)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} summary");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}_sum{{{labels}}} {}", v.sum);
                let _ = writeln!(out, "{name}_count{{{labels}}} {}", v.count);
            }
        };
        sum_count(
            "arbor_fn_invocation_seconds",
            "Invocations through the gateway by outcome (cold, warm, or the error kind), and their time.",
            s.invocations
                .iter()
                .map(|((f, o), v)| (format!("function=\"{}\",outcome=\"{}\"", esc(f), esc(o)), v))
                .collect(),
        );
        sum_count(
            "arbor_fn_queue_seconds",
            "Time invocations waited for an instance.",
            s.queue
                .iter()
                .map(|(f, v)| (format!("function=\"{}\"", esc(f)), v))
                .collect(),
        );
        sum_count(
            "arbor_fn_cold_start_phase_seconds",
            "Cold-start phases of instances that became ready (network, pull, create, task, start, port).",
            s.phases
                .iter()
                .map(|((f, p), v)| (format!("function=\"{}\",phase=\"{}\"", esc(f), esc(p)), v))
                .collect(),
        );
        let _ = writeln!(
            out,
            "# HELP arbor_fn_instance_starts_total Instance starts by outcome (ok, failed)."
        );
        let _ = writeln!(out, "# TYPE arbor_fn_instance_starts_total counter");
        for ((f, o), n) in &s.starts {
            let _ = writeln!(
                out,
                "arbor_fn_instance_starts_total{{function=\"{}\",outcome=\"{}\"}} {n}",
                esc(f),
                esc(o)
            );
        }
        let _ = writeln!(
            out,
            "# HELP arbor_fn_instance_exits_total Instances whose process ended without being stopped."
        );
        let _ = writeln!(out, "# TYPE arbor_fn_instance_exits_total counter");
        for (f, n) in &s.ended {
            let _ = writeln!(
                out,
                "arbor_fn_instance_exits_total{{function=\"{}\"}} {n}",
                esc(f)
            );
        }
        let _ = writeln!(out, "# HELP arbor_fn_instances Instances by state.");
        let _ = writeln!(out, "# TYPE arbor_fn_instances gauge");
        let _ = writeln!(
            out,
            "# HELP arbor_fn_waiting Invocations waiting for an instance."
        );
        let _ = writeln!(out, "# TYPE arbor_fn_waiting gauge");
        for (f, by, waiting) in states {
            for st in ["starting", "idle", "busy", "stopping"] {
                let _ = writeln!(
                    out,
                    "arbor_fn_instances{{function=\"{}\",state=\"{st}\"}} {}",
                    esc(f),
                    by.get(st).copied().unwrap_or(0)
                );
            }
            let _ = writeln!(out, "arbor_fn_waiting{{function=\"{}\"}} {waiting}", esc(f));
        }
    }
}
