//! A discrete-event simulation of a cold-start burst, driving the real [`Manager`].
//!
//! `N` nodes cold-start one function at `t = 0`. A node is *provisioned* when it holds the whole
//! start-up set, split into fixed-size blocks (the last one may be shorter). Two strategies:
//!
//! - [`Strategy::RegistryOnly`]: lazy loading from the registry alone. Every node fetches every
//!   block from the registry; the registry's egress is shared fairly among the nodes currently
//!   fetching, and each node is also limited by its own downlink.
//! - [`Strategy::Trees`]: the nodes join the function's tree through [`Manager::join`] in burst
//!   order (all at `t = 0`, in id order). The root reads the registry; every other node reads from
//!   its parent, block by block, as soon as the parent holds the block it needs next (streaming,
//!   not store-and-forward). A sender's uplink is shared fairly among its children that are
//!   currently receiving a block; a child's rate is `min(share, downlink)`.
//!
//! # Model
//!
//! Block-level and fluid per link: every node has at most one incoming flow (from the registry
//! or its parent), which carries one block at a time, always the lowest block the node lacks. A
//! flow whose source does not hold that block yet is idle and takes no share of the source's
//! uplink. Rates are piecewise constant and recomputed, for one sender only, whenever that
//! sender's set of busy flows changes (a child stalls, resumes, finishes, fails or is
//! re-parented); the next block completion of each flow sits in an event queue (stale entries are
//! skipped by version). Each event touches O(1) flows in the tree case, so a run costs
//! O(N x blocks x log) plus O(N) per registry-share change.
//!
//! Because every node receives blocks in ascending order from a source that also holds a prefix,
//! every node's holdings stay a prefix, also across re-parenting: a re-parented node continues
//! from the first block it lacks, and only once its new parent holds it.
//!
//! # Failures
//!
//! A failed node stops sending and receiving at once (a block in flight to or from it is lost).
//! Live nodes heartbeat to the manager every `heartbeat_ms`; at each such tick the simulation
//! calls [`Manager::expire`] with `timeout_ms`, and applies the returned [`Change`]s: a
//! re-parented node resumes from its new parent (or the registry, if it became the root). The
//! simulation keeps its own copy of the parent links, updated *only* from `Change`s, and checks at
//! the end that it equals the manager's tree.
//!
//! # Start-up work
//!
//! With [`SimConfig::start_s`] a node is ready when its function has also done its own start
//! work (runtime, interpreter, imports), which overlaps with the transfer: the work is spread
//! evenly over the blocks in order and waits for a block that has not arrived ([`ready_time`]).
//! A function whose work paces its reads below half the link rate hides the tree's depth
//! (FaaSNet's regime: its containers took about 5 s alone); with transfer alone a binary tree
//! takes about twice one node's time, as a parent's uplink feeds two children.
//!
//! # Not modelled
//!
//! TCP dynamics (slow start, congestion control), latency, per-block request overhead, CPU and
//! disk (beyond the constant start work), the order in which a function really reads its
//! blocks, the image outside the start-up set, and max-min redistribution when downlinks
//! differ (all nodes share one downlink rate, so the equal share *is* max-min fair).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use thiserror::Error;

use crate::manager::{FunctionId, Manager, ManagerError, Millis};
use crate::tree::{Change, NodeId};

/// Sizes are in MB (10^6 bytes).
pub const MB: f64 = 1e6;

/// Simulation failed or was given an impossible setup.
#[derive(Debug, Error)]
pub enum SimError {
    /// The configuration cannot be simulated.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The manager refused an operation.
    #[error(transparent)]
    Manager(#[from] ManagerError),
    /// The simulation stopped making progress, or its view disagrees with the manager's.
    #[error("simulation error: {0}")]
    Inconsistent(String),
}

/// How the nodes get the start-up set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Every node reads the registry.
    RegistryOnly,
    /// One function tree, only the root reads the registry.
    Trees,
}

impl Strategy {
    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::RegistryOnly => "registry-only",
            Strategy::Trees => "trees",
        }
    }
}

/// Node `node` (index in burst order) fails at `at_s` seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Failure {
    /// Index of the node, `0..nodes`.
    pub node: usize,
    /// Time of the failure in seconds.
    pub at_s: f64,
}

/// One simulation's setup. Rates are in bits per second, sizes in bytes.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of nodes in the burst.
    pub nodes: usize,
    /// Registry egress.
    pub registry_bps: f64,
    /// Per-node downlink.
    pub node_down_bps: f64,
    /// Per-node uplink.
    pub node_up_bps: f64,
    /// Size of the start-up set.
    pub set_bytes: u64,
    /// Block size.
    pub block_bytes: u64,
    /// Nodes to kill, and when.
    pub failures: Vec<Failure>,
    /// Interval of live nodes' heartbeats (and of expiry checks).
    pub heartbeat_ms: Millis,
    /// Heartbeat timeout after which the manager fails a node.
    pub timeout_ms: Millis,
    /// Seconds of the function's own start-up work (runtime, interpreter, imports) on a node
    /// that already holds its data; 0: a node is ready when it holds the set (transfer only).
    /// See [`ready_time`] for how it overlaps with the transfer.
    pub start_s: f64,
}

impl Default for SimConfig {
    /// 1 node, 1 Gbit/s everywhere, a 130 MB start-up set in 512 KiB blocks, no failures,
    /// heartbeats every 250 ms and a 1 s timeout.
    fn default() -> Self {
        Self {
            nodes: 1,
            registry_bps: 1e9,
            node_down_bps: 1e9,
            node_up_bps: 1e9,
            set_bytes: 130_000_000,
            block_bytes: 512 * 1024,
            failures: Vec::new(),
            heartbeat_ms: 250,
            timeout_ms: 1000,
            start_s: 0.0,
        }
    }
}

/// The outcome of one run. Failed nodes are excluded from every figure.
#[derive(Debug, Clone)]
pub struct SimResult {
    /// The strategy simulated.
    pub strategy: Strategy,
    /// Nodes in the burst.
    pub nodes: usize,
    /// Nodes that failed.
    pub failed: usize,
    /// Time until the last surviving node was ready (seconds): it held the set and, with
    /// [`SimConfig::start_s`], finished its start-up work.
    pub last_s: f64,
    /// Time until the last surviving node held the whole set (seconds; `last_s` when
    /// `start_s` is 0).
    pub data_last_s: f64,
    /// Median provisioning time of the survivors (lower median, seconds).
    pub p50_s: f64,
    /// Bytes read from the registry.
    pub registry_bytes: u64,
    /// `registry_bytes` as a multiple of the start-up set.
    pub registry_sets: f64,
    /// Highest receive rate of any surviving node over any interval between events (Mbit/s).
    pub peak_in_mbps: f64,
    /// Highest send rate of any surviving node over any interval between events (Mbit/s).
    pub peak_out_mbps: f64,
    /// Ready time per node, `None` for failed nodes.
    pub provisioned_s: Vec<Option<f64>>,
    /// Block deliveries beyond the first, summed over survivors (0 if every block came once).
    pub duplicate_deliveries: u64,
    /// Blocks a survivor never received (0 when all completed).
    pub missing_blocks: u64,
    /// Parent changes applied after the initial joins.
    pub reparented: usize,
    /// Events processed.
    pub events: u64,
    /// The manager at the end (trees only).
    pub manager: Option<Manager>,
}

/// A xorshift64* generator: small, seeded and good enough to pick victims and times.
#[derive(Debug, Clone)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// A generator from `seed` (0 is replaced by a fixed non-zero constant).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`; returns 0 for `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// `count` distinct nodes out of `nodes`, each failing at a uniform time in `[0, horizon_s)`.
pub fn random_failures(nodes: usize, count: usize, horizon_s: f64, seed: u64) -> Vec<Failure> {
    let mut rng = XorShift64::new(seed);
    let mut pool: Vec<usize> = (0..nodes).collect();
    let count = count.min(nodes);
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let j = i + rng.below(nodes - i);
        pool.swap(i, j);
        out.push(Failure {
            node: pool[i],
            at_s: rng.next_f64() * horizon_s.max(0.0),
        });
    }
    out
}

/// The node id of burst index `i` (zero-padded, so id order is burst order).
pub fn node_id(i: usize) -> NodeId {
    NodeId(format!("node-{i:06}"))
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Block { node: usize, version: u64 },
    Fail { node: usize },
    Tick { ms: Millis },
}

#[derive(Debug, Clone, Copy)]
struct Event {
    t: f64,
    seq: u64,
    kind: Kind,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    /// Reversed: the earliest event is the greatest (for the max-heap).
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .t
            .total_cmp(&self.t)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

#[derive(Debug, Clone, Default)]
struct Flow {
    active: bool,
    block: usize,
    remaining: f64,
    rate: f64,
    since: f64,
    version: u64,
}

/// Stop when simulated time passes this (seconds): a guard against a stuck simulation.
const MAX_TIME_S: f64 = 1e7;

struct Sim<'a> {
    cfg: &'a SimConfig,
    n: usize,
    blocks: usize,
    now: f64,
    alive: Vec<bool>,
    in_tree: Vec<bool>,
    have: Vec<usize>,
    done_at: Vec<Option<f64>>,
    /// Source of each node's flow: a node index, or `n` for the registry.
    src: Vec<Option<usize>>,
    /// Receivers of each sender (index `n` is the registry).
    kids: Vec<Vec<usize>>,
    flow: Vec<Flow>,
    deliveries: Vec<u16>,
    /// When each node first held each block (`node * blocks + block`; infinite: never).
    arrival: Vec<f64>,
    out_rate: Vec<f64>,
    out_since: Vec<f64>,
    peak_in: Vec<f64>,
    peak_out: Vec<f64>,
    dirty: Vec<usize>,
    is_dirty: Vec<bool>,
    heap: BinaryHeap<Event>,
    seq: u64,
    registry_bytes: u64,
    manager: Option<(Manager, FunctionId)>,
    ids: Vec<NodeId>,
    index: HashMap<NodeId, usize>,
    pending_fails: usize,
    /// Live nodes not provisioned yet.
    unfinished: usize,
    /// Failed nodes the manager has not removed yet.
    undetected: usize,
    reparented: usize,
    initialised: bool,
}

impl Sim<'_> {
    fn block_size(&self, b: usize) -> u64 {
        let start = b as u64 * self.cfg.block_bytes;
        self.cfg
            .block_bytes
            .min(self.cfg.set_bytes.saturating_sub(start))
    }

    fn push(&mut self, t: f64, kind: Kind) {
        self.seq += 1;
        self.heap.push(Event {
            t,
            seq: self.seq,
            kind,
        });
    }

    fn mark_dirty(&mut self, s: usize) {
        if !self.is_dirty[s] {
            self.is_dirty[s] = true;
            self.dirty.push(s);
        }
    }

    fn up_bytes(&self, s: usize) -> f64 {
        if s == self.n {
            self.cfg.registry_bps / 8.0
        } else if self.alive[s] {
            self.cfg.node_up_bps / 8.0
        } else {
            0.0
        }
    }

    fn can_send(&self, s: usize, c: usize) -> bool {
        s == self.n || (self.alive[s] && self.have[s] > self.have[c])
    }

    /// Brings `c`'s flow up to `now`, recording its rate if it ran for a while.
    fn advance(&mut self, c: usize) {
        let now = self.now;
        let f = &mut self.flow[c];
        if f.active {
            let dt = now - f.since;
            if dt > 0.0 {
                if f.rate > self.peak_in[c] {
                    self.peak_in[c] = f.rate;
                }
                f.remaining -= f.rate * dt;
            }
        }
        f.since = now;
    }

    /// Stops `c`'s flow (a partial block is lost).
    fn stop(&mut self, c: usize) {
        if self.flow[c].active {
            self.advance(c);
            let f = &mut self.flow[c];
            f.active = false;
            f.version += 1;
            if let Some(s) = self.src[c] {
                self.mark_dirty(s);
            }
        }
    }

    fn try_start(&mut self, c: usize) {
        let Some(s) = self.src[c] else { return };
        if !self.alive[c] || self.flow[c].active || self.have[c] >= self.blocks {
            return;
        }
        if !self.can_send(s, c) {
            return;
        }
        let size = self.block_size(self.have[c]) as f64;
        let now = self.now;
        let f = &mut self.flow[c];
        f.active = true;
        f.block = self.have[c];
        f.remaining = size;
        f.rate = 0.0;
        f.since = now;
        f.version += 1;
        self.mark_dirty(s);
    }

    fn recompute(&mut self, s: usize) {
        if self.now > self.out_since[s] && self.out_rate[s] > self.peak_out[s] {
            self.peak_out[s] = self.out_rate[s];
        }
        self.out_since[s] = self.now;
        let active: Vec<usize> = self.kids[s]
            .iter()
            .copied()
            .filter(|&k| self.flow[k].active)
            .collect();
        let share = if active.is_empty() {
            0.0
        } else {
            (self.up_bytes(s) / active.len() as f64).min(self.cfg.node_down_bps / 8.0)
        };
        for &k in &active {
            self.advance(k);
            let f = &mut self.flow[k];
            f.rate = share;
            f.version += 1;
            let version = f.version;
            let at = self.now + f.remaining.max(0.0) / share;
            if share > 0.0 {
                self.push(at, Kind::Block { node: k, version });
            }
        }
        self.out_rate[s] = share * active.len() as f64;
    }

    fn on_block(&mut self, c: usize, version: u64) {
        let f = &self.flow[c];
        if !f.active || f.version != version || !self.alive[c] {
            return;
        }
        let Some(s) = self.src[c] else { return };
        self.advance(c);
        let b = self.flow[c].block;
        self.have[c] = b + 1;
        self.deliveries[c * self.blocks + b] =
            self.deliveries[c * self.blocks + b].saturating_add(1);
        let first = &mut self.arrival[c * self.blocks + b];
        *first = first.min(self.now);
        if s == self.n {
            self.registry_bytes += self.block_size(b);
        }
        if self.have[c] == self.blocks {
            self.done_at[c] = Some(self.now);
            self.unfinished -= 1;
        }
        if self.have[c] < self.blocks && self.can_send(s, c) && self.flow[c].rate > 0.0 {
            // Same sender, same set of busy flows: the rate stays.
            let size = self.block_size(self.have[c]) as f64;
            let now = self.now;
            let f = &mut self.flow[c];
            f.block = self.have[c];
            f.remaining = size;
            f.since = now;
            f.version += 1;
            let (version, at) = (f.version, now + size / f.rate);
            self.push(at, Kind::Block { node: c, version });
        } else {
            let f = &mut self.flow[c];
            f.active = false;
            f.version += 1;
            self.mark_dirty(s);
        }
        for i in 0..self.kids[c].len() {
            let k = self.kids[c][i];
            self.try_start(k);
        }
    }

    fn on_fail(&mut self, c: usize) {
        self.pending_fails = self.pending_fails.saturating_sub(1);
        if !self.alive[c] {
            return;
        }
        self.stop(c);
        self.alive[c] = false;
        if self.done_at[c].is_none() {
            self.unfinished -= 1;
        }
        if self.in_tree[c] {
            self.undetected += 1;
        }
        for i in 0..self.kids[c].len() {
            let k = self.kids[c][i];
            self.stop(k);
        }
        self.mark_dirty(c);
    }

    fn on_tick(&mut self, ms: Millis) -> Result<(), SimError> {
        let Some((manager, _)) = self.manager.as_mut() else {
            return Ok(());
        };
        for c in 0..self.n {
            if self.alive[c] && self.in_tree[c] {
                manager.heartbeat(&self.ids[c], ms);
            }
        }
        let changes = manager.expire(ms, self.cfg.timeout_ms);
        for (_, change) in changes {
            self.apply(change)?;
        }
        if self.work_left() {
            let next = ms + self.cfg.heartbeat_ms;
            self.push(next as f64 / 1000.0, Kind::Tick { ms: next });
        }
        Ok(())
    }

    fn lookup(&self, id: &NodeId) -> Result<usize, SimError> {
        self.index
            .get(id)
            .copied()
            .ok_or_else(|| SimError::Inconsistent(format!("change names unknown node {id}")))
    }

    fn unlink(&mut self, c: usize) {
        if let Some(old) = self.src[c].take() {
            self.kids[old].retain(|&k| k != c);
        }
    }

    fn apply(&mut self, change: Change) -> Result<(), SimError> {
        match change {
            Change::Parent { node, parent } => {
                let c = self.lookup(&node)?;
                let new = match parent {
                    Some(p) => self.lookup(&p)?,
                    None => self.n,
                };
                self.stop(c);
                self.unlink(c);
                self.src[c] = Some(new);
                self.kids[new].push(c);
                self.in_tree[c] = true;
                if self.initialised {
                    self.reparented += 1;
                }
                self.try_start(c);
            }
            Change::Removed { node } => {
                let c = self.lookup(&node)?;
                self.stop(c);
                self.unlink(c);
                if self.in_tree[c] && !self.alive[c] {
                    self.undetected -= 1;
                }
                self.in_tree[c] = false;
            }
        }
        Ok(())
    }

    fn work_left(&self) -> bool {
        self.pending_fails > 0 || self.unfinished > 0 || self.undetected > 0
    }

    fn drain_dirty(&mut self) {
        while let Some(s) = self.dirty.pop() {
            self.is_dirty[s] = false;
            self.recompute(s);
        }
    }
}

fn validate(cfg: &SimConfig) -> Result<usize, SimError> {
    let bad = |m: &str| Err(SimError::InvalidConfig(m.to_owned()));
    if cfg.nodes == 0 {
        return bad("at least one node");
    }
    for (name, r) in [
        ("registry rate", cfg.registry_bps),
        ("node downlink", cfg.node_down_bps),
        ("node uplink", cfg.node_up_bps),
    ] {
        if !(r.is_finite() && r > 0.0) {
            return Err(SimError::InvalidConfig(format!("{name} must be positive")));
        }
    }
    if cfg.set_bytes == 0 || cfg.block_bytes == 0 {
        return bad("start-up set and block size must be positive");
    }
    let blocks = cfg.set_bytes.div_ceil(cfg.block_bytes);
    if blocks > 10_000_000 {
        return bad("more than 10^7 blocks");
    }
    if cfg.heartbeat_ms == 0 {
        return bad("heartbeat interval must be positive");
    }
    if !(cfg.start_s.is_finite() && cfg.start_s >= 0.0) {
        return bad("start-up work must be a finite, non-negative time");
    }
    let mut failing = vec![false; cfg.nodes];
    for f in &cfg.failures {
        if f.node >= cfg.nodes || !(f.at_s.is_finite() && f.at_s >= 0.0) {
            return Err(SimError::InvalidConfig(format!("bad failure {f:?}")));
        }
        failing[f.node] = true;
    }
    if failing.iter().all(|&x| x) {
        return bad("every node fails");
    }
    Ok(blocks as usize)
}

/// Runs one burst with `strategy`.
pub fn simulate(cfg: &SimConfig, strategy: Strategy) -> Result<SimResult, SimError> {
    let blocks = validate(cfg)?;
    let n = cfg.nodes;
    let ids: Vec<NodeId> = (0..n).map(node_id).collect();
    let index = ids.iter().cloned().zip(0..n).collect();
    let mut sim = Sim {
        cfg,
        n,
        blocks,
        now: 0.0,
        alive: vec![true; n],
        in_tree: vec![false; n],
        have: vec![0; n],
        done_at: vec![None; n],
        src: vec![None; n],
        kids: vec![Vec::new(); n + 1],
        flow: vec![Flow::default(); n],
        deliveries: vec![0; n * blocks],
        arrival: vec![f64::INFINITY; n * blocks],
        out_rate: vec![0.0; n + 1],
        out_since: vec![0.0; n + 1],
        peak_in: vec![0.0; n],
        peak_out: vec![0.0; n + 1],
        dirty: Vec::new(),
        is_dirty: vec![false; n + 1],
        heap: BinaryHeap::new(),
        seq: 0,
        registry_bytes: 0,
        manager: None,
        ids,
        index,
        pending_fails: cfg.failures.len(),
        unfinished: n,
        undetected: 0,
        reparented: 0,
        initialised: false,
    };
    match strategy {
        Strategy::RegistryOnly => {
            for c in 0..n {
                sim.src[c] = Some(n);
                sim.kids[n].push(c);
                sim.try_start(c);
            }
        }
        Strategy::Trees => {
            let function = function_id();
            let mut manager = Manager::new();
            for c in 0..n {
                let placement = manager.join(&function, sim.ids[c].clone(), 0)?;
                for change in placement.changes {
                    sim.apply(change)?;
                }
            }
            sim.manager = Some((manager, function));
            sim.push(
                cfg.heartbeat_ms as f64 / 1000.0,
                Kind::Tick {
                    ms: cfg.heartbeat_ms,
                },
            );
        }
    }
    sim.initialised = true;
    for f in &cfg.failures {
        sim.push(f.at_s, Kind::Fail { node: f.node });
    }
    sim.drain_dirty();

    let mut events = 0u64;
    while sim.work_left() {
        let Some(ev) = sim.heap.pop() else {
            return Err(SimError::Inconsistent(
                "no events left but nodes are not provisioned".into(),
            ));
        };
        if ev.t > MAX_TIME_S {
            return Err(SimError::Inconsistent(format!(
                "still running at {MAX_TIME_S} s"
            )));
        }
        sim.now = ev.t.max(sim.now);
        events += 1;
        match ev.kind {
            Kind::Block { node, version } => sim.on_block(node, version),
            Kind::Fail { node } => sim.on_fail(node),
            Kind::Tick { ms } => sim.on_tick(ms)?,
        }
        sim.drain_dirty();
    }
    // Close the last rate intervals.
    for s in 0..=n {
        sim.recompute(s);
    }

    if let Some((manager, function)) = &sim.manager {
        let tree = manager
            .tree(function)
            .ok_or_else(|| SimError::Inconsistent("the tree vanished".into()))?;
        for c in 0..n {
            let theirs = if tree.contains(&sim.ids[c]) {
                match tree.parent(&sim.ids[c]) {
                    Ok(Some(p)) => Some(sim.lookup(p)?),
                    Ok(None) => Some(n),
                    Err(e) => return Err(SimError::Inconsistent(e.to_string())),
                }
            } else {
                None
            };
            if theirs != sim.src[c] || sim.alive[c] != tree.contains(&sim.ids[c]) {
                return Err(SimError::Inconsistent(format!(
                    "{}: simulation has source {:?}, manager {:?}",
                    sim.ids[c], sim.src[c], theirs
                )));
            }
        }
    }

    let survivors: Vec<usize> = (0..n).filter(|&c| sim.alive[c]).collect();
    let data_last_s = survivors
        .iter()
        .filter_map(|&c| sim.done_at[c])
        .fold(0.0, f64::max);
    let ready: Vec<Option<f64>> = (0..n)
        .map(|c| {
            (sim.alive[c] && sim.done_at[c].is_some())
                .then(|| ready_time(&sim.arrival[c * blocks..(c + 1) * blocks], cfg.start_s))
        })
        .collect();
    let mut times: Vec<f64> = ready.iter().flatten().copied().collect();
    times.sort_by(f64::total_cmp);
    let mut duplicate_deliveries = 0u64;
    let mut missing_blocks = 0u64;
    for &c in &survivors {
        for &d in &sim.deliveries[c * blocks..(c + 1) * blocks] {
            match d {
                0 => missing_blocks += 1,
                d => duplicate_deliveries += u64::from(d - 1),
            }
        }
    }
    let to_mbps = |bytes_per_s: f64| bytes_per_s * 8.0 / 1e6;
    let peak_in = survivors
        .iter()
        .map(|&c| sim.peak_in[c])
        .fold(0.0, f64::max);
    let peak_out = survivors
        .iter()
        .map(|&c| sim.peak_out[c])
        .fold(0.0, f64::max);
    Ok(SimResult {
        strategy,
        nodes: n,
        failed: n - survivors.len(),
        last_s: times.last().copied().unwrap_or(0.0),
        data_last_s,
        p50_s: times
            .get(times.len().saturating_sub(1) / 2)
            .copied()
            .unwrap_or(0.0),
        registry_bytes: sim.registry_bytes,
        registry_sets: sim.registry_bytes as f64 / cfg.set_bytes as f64,
        peak_in_mbps: to_mbps(peak_in),
        peak_out_mbps: to_mbps(peak_out),
        provisioned_s: ready,
        duplicate_deliveries,
        missing_blocks,
        reparented: sim.reparented,
        events,
        manager: sim.manager.map(|(m, _)| m),
    })
}

/// When a node whose blocks arrived at `arrival` (seconds, in block order) is ready, given
/// `start_s` seconds of start-up work: the work is spread evenly over the blocks in order (the
/// function needs block `i` once it has done `i / blocks` of its work) and waits for a block
/// that has not arrived. So a node whose data streams in faster than its work consumes it is
/// ready `start_s` after its first block; one whose data comes slower is ready a
/// `start_s / blocks` slice after its last block. With `start_s == 0` it is the last arrival.
///
/// A lazily started function reads its start-up set while it runs (in a different order than
/// the blocks, which this model ignores); its prefetch streams the set in block order
/// meanwhile.
pub fn ready_time(arrival: &[f64], start_s: f64) -> f64 {
    if arrival.is_empty() {
        return start_s;
    }
    let slice = start_s / arrival.len() as f64;
    arrival.iter().fold(0.0, |t, &a| t.max(a) + slice)
}

/// The function id the simulation's tree uses.
pub fn function_id() -> FunctionId {
    FunctionId::new("burst")
}

/// `max(1, round(nodes * percent / 100))` failures for `nodes >= 8` (0 below, or if `percent`
/// is 0).
pub fn failure_count(nodes: usize, percent: f64) -> usize {
    if nodes < 8 || percent <= 0.0 {
        0
    } else {
        ((nodes as f64 * percent / 100.0).round() as usize).clamp(1, nodes - 1)
    }
}
