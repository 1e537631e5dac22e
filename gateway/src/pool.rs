//! Functions and their instances: the invoke path (a free instance, else a cold start, else a
//! bounded queue), the instances' life (start through containerd with a CNI network, a
//! watch on their exit, stop), and the reconciler that scales to zero, keeps reserved
//! instances warm, replaces dead ones and drains old versions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arbor_client::run::{PullPolicy, RunOptions, SpecOptions, Stdio};
use arbor_client::{Observer, Target};
use arbor_oci::registry::{ClientOptions, RegistryClient};
use arbor_oci::{ImageLocation, Reference, Store};
use serde::Serialize;
use tokio::sync::{Notify, oneshot};
use tracing::{Instrument as _, info, info_span, warn};

use crate::def::{DefStore, FunctionRecord, FunctionSpec, validate_name};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::net::NetConfig;

/// The label marking the containers the gateway owns (so a restarted arbord finds them);
/// its value names the gateway's run.
pub const LABEL_GATEWAY: &str = "arbor.io/gateway";
/// The label naming an instance's function.
pub const LABEL_FUNCTION: &str = "arbor.io/function";
/// Log files kept per function (the oldest go first).
const LOGS_KEPT: usize = 32;
/// How often the reconciler looks at every function.
const TICK: Duration = Duration::from_millis(250);

/// What the gateway needs from the node.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// containerd (socket, namespace for instances, snapshotter).
    pub target: Target,
    /// The runtime instances run with (`io.containerd.arbor.v1`).
    pub runtime: String,
    pub net: NetConfig,
    /// `<arbord root>/functions`: records, logs.
    pub dir: PathBuf,
    /// Registries reached over plain HTTP (host or host:port).
    pub plain_http_hosts: Vec<String>,
    /// Registry credentials (`~/.docker/config.json` format); none: the default places.
    pub docker_config: Option<PathBuf>,
    /// Largest request body, bytes.
    pub max_body: usize,
    /// Largest response body taken from an instance, bytes.
    pub max_response: usize,
    /// SIGTERM to SIGKILL when an instance is stopped.
    pub stop_grace: Duration,
    /// cgroup parent of instances (default: containerd's `/NAMESPACE/ID`).
    pub cgroup_parent: Option<String>,
    /// Leave instances running when the gateway stops, and adopt them when it starts again
    /// (arbord's `fuse.handover`: their layers stay mounted across the restart).
    pub adopt: bool,
}

/// What the gateway keeps of a ready instance, so that a successor can adopt it
/// (`<dir>/instances/ID.json`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct InstanceRecord {
    id: String,
    function: String,
    version: u64,
    addr: SocketAddr,
    phases: Vec<(String, f64)>,
}

/// The function gateway of one node (cheap to clone).
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    opts: GatewayOptions,
    defs: DefStore,
    functions: Mutex<BTreeMap<String, Arc<Function>>>,
    http: reqwest::Client,
    plain: RegistryClient,
    tls: RegistryClient,
    metrics: Metrics,
    seq: AtomicU64,
    /// This gateway's run (the value of its instances' [`LABEL_GATEWAY`]).
    generation: String,
}

struct Function {
    name: String,
    st: Mutex<FnState>,
    /// Woken when an instance frees up, becomes ready or fails to start.
    changed: Notify,
}

struct FnState {
    record: FunctionRecord,
    instances: Vec<Arc<Instance>>,
    /// Requests in the queue.
    waiting: usize,
    /// Failed starts so far, and the last one's reason.
    failures: u64,
    last_failure: Option<String>,
    removing: bool,
    /// Instances out of the pool whose container and network are still being removed.
    stopping: usize,
}

/// One container serving a function.
struct Instance {
    id: String,
    version: u64,
    created_at: Instant,
    log: PathBuf,
    st: Mutex<InstState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstPhase {
    Starting,
    Ready,
    Stopping,
}

struct InstState {
    phase: InstPhase,
    addr: Option<SocketAddr>,
    inflight: u32,
    last_used: Instant,
    served: u64,
    /// (phase, seconds since the start was asked for), contiguous.
    phases: Vec<(String, f64)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What `GET /v1/functions/NAME` shows of an instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    pub id: String,
    pub version: u64,
    pub state: InstPhase,
    pub address: Option<String>,
    pub inflight: u32,
    pub served: u64,
    pub idle_seconds: f64,
    pub age_seconds: f64,
    /// Cold-start phases: (name, seconds), in order; they add up to the start's length.
    pub cold_start: Vec<(String, f64)>,
}

/// What `GET /v1/functions[/NAME]` shows of a function.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionView {
    pub name: String,
    pub version: u64,
    pub spec: FunctionSpec,
    pub updated: String,
    pub waiting: usize,
    pub removing: bool,
    pub last_start_failure: Option<String>,
    pub instances: Vec<InstanceView>,
}

/// The instance's answer to one invocation.
#[derive(Debug)]
pub struct Invoked {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: bytes::Bytes,
    pub instance: String,
    /// The request waited for an instance started for it.
    pub cold: bool,
    pub queue_seconds: f64,
}

/// Whether a PUT created, changed or left a function alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Deployed {
    Created,
    Updated,
    Unchanged,
}

/// Headers that belong to one hop, never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

impl Gateway {
    /// Opens the records under `opts.dir`, removes the instances and networks an earlier
    /// arbord left (they are not adopted: a restarted gateway starts instances anew), and
    /// starts the reconciler (which brings up reserved instances).
    pub async fn start(opts: GatewayOptions) -> Result<Gateway> {
        opts.net.check()?;
        let defs = DefStore::open(&opts.dir.join("defs"))?;
        arbor_oci::init_tls();
        let http = reqwest::Client::builder()
            .no_proxy()
            .http1_only()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build()
            .map_err(|e| Error::Internal(format!("building the HTTP client: {e}")))?;
        let creds = match &opts.docker_config {
            Some(p) => arbor_oci::auth::CredentialStore::from_file(p),
            None => arbor_oci::auth::CredentialStore::load_default(),
        }
        .map_err(|e| Error::Internal(format!("registry credentials: {e}")))?;
        let reg = |plain_http| {
            RegistryClient::new(
                ClientOptions {
                    plain_http,
                    ..Default::default()
                },
                creds.clone(),
            )
            .map_err(|e| Error::Internal(format!("registry client: {e}")))
        };
        let (plain, tls) = (reg(true)?, reg(false)?);
        let mut functions = BTreeMap::new();
        for r in defs.load()? {
            functions.insert(r.name.clone(), Arc::new(Function::new(r)));
        }
        let inner = Arc::new(Inner {
            opts,
            defs,
            functions: Mutex::new(functions),
            http,
            plain,
            tls,
            metrics: Metrics::default(),
            seq: AtomicU64::new(0),
            generation: hex::encode(
                &sha2_digest(format!("{}{:?}", std::process::id(), SystemTime::now()).as_bytes())
                    [..6],
            ),
        });
        let adopted = if inner.opts.adopt {
            inner.adopt_instances().await
        } else {
            Vec::new()
        };
        // Taken now, before any new instance of ours exists; removed in the background, since
        // removing a container's snapshot may need the arbord that is starting this.
        let old_netns: Vec<String> = inner
            .opts
            .net
            .leftovers()
            .into_iter()
            .filter(|id| !adopted.contains(id))
            .collect();
        let weak = Arc::downgrade(&inner);
        let cleaner = Arc::clone(&inner);
        tokio::spawn(
            async move {
                cleaner.clean_leftovers(old_netns, &adopted).await;
                drop(cleaner);
                let mut tick = tokio::time::interval(TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    inner.reconcile();
                }
            }
            .instrument(info_span!("reconciler")),
        );
        let n = lock(&inner.functions).len();
        info!(functions = n, "function gateway ready");
        let _ = std::fs::create_dir_all(inner.records_dir());
        Ok(Gateway { inner })
    }

    /// The largest request body.
    pub fn max_body(&self) -> usize {
        self.inner.opts.max_body
    }

    /// Creates or replaces `name`'s definition. A changed spec raises the version; the
    /// old version's instances are drained.
    pub fn deploy(&self, name: &str, spec: FunctionSpec) -> Result<(Deployed, FunctionView)> {
        validate_name(name)?;
        spec.validate()?;
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut fns = lock(&self.inner.functions);
        if let Some(f) = fns.get(name) {
            let mut st = lock(&f.st);
            if st.removing {
                return Err(Error::Removing(name.into()));
            }
            if st.record.spec == spec {
                drop(st);
                return Ok((Deployed::Unchanged, f.view()));
            }
            let r = FunctionRecord {
                name: name.into(),
                version: st.record.version + 1,
                spec,
                updated: now,
            };
            self.inner.defs.save(&r)?;
            info!(function = name, version = r.version, "function updated");
            st.record = r;
            st.failures = 0;
            st.last_failure = None;
            drop(st);
            f.changed.notify_waiters();
            return Ok((Deployed::Updated, f.view()));
        }
        let r = FunctionRecord {
            name: name.into(),
            version: 1,
            spec,
            updated: now,
        };
        self.inner.defs.save(&r)?;
        info!(function = name, image = %r.spec.image, "function deployed");
        let f = Arc::new(Function::new(r));
        let v = f.view();
        fns.insert(name.into(), f);
        Ok((Deployed::Created, v))
    }

    /// Every function.
    pub fn list(&self) -> Vec<FunctionView> {
        let fns: Vec<_> = lock(&self.inner.functions).values().cloned().collect();
        fns.iter().map(|f| f.view()).collect()
    }

    /// One function.
    pub fn get(&self, name: &str) -> Result<FunctionView> {
        Ok(self.inner.function(name)?.view())
    }

    /// Removes `name`: its record at once; its instances once their requests are answered.
    /// Waits up to `drain` for them to be gone (containers and networks removed); returns the
    /// instances still serving or stopping.
    pub async fn remove(&self, name: &str, drain: Duration) -> Result<usize> {
        let f = self.inner.function(name)?;
        {
            let mut st = lock(&f.st);
            if !st.removing {
                self.inner.defs.remove(name)?;
                st.removing = true;
                info!(function = name, "function removed; draining its instances");
            }
        }
        f.changed.notify_waiters();
        self.inner.reconcile();
        let deadline = Instant::now() + drain;
        loop {
            let left = {
                let st = lock(&f.st);
                st.instances.len() + st.stopping
            };
            if left == 0 {
                // Gone at once (the reconciler would also drop it on its next pass).
                let mut fns = lock(&self.inner.functions);
                if fns.get(name).is_some_and(|g| Arc::ptr_eq(g, &f)) {
                    fns.remove(name);
                }
                return Ok(0);
            }
            if Instant::now() >= deadline {
                return Ok(left);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The logs of `name`'s instances (newest last), at most `tail` bytes of each, the
    /// instance `only` if given.
    pub fn logs(&self, name: &str, only: Option<&str>, tail: u64) -> Result<Vec<(String, String)>> {
        validate_name(name)?;
        let dir = self.inner.opts.dir.join("logs").join(name);
        let mut files = log_files(&dir);
        if files.is_empty() {
            self.inner.function(name)?;
        }
        if let Some(id) = only {
            files.retain(|(_, p)| p.file_stem().and_then(|s| s.to_str()) == Some(id));
            if files.is_empty() {
                return Err(Error::NotFound(format!("{name}/{id}")));
            }
        }
        let mut out = Vec::new();
        for (_, p) in files {
            let id = p
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            out.push((id, read_tail(&p, tail)));
        }
        Ok(out)
    }

    /// Invokes `name`: `body` and `headers` are posted to an instance's `/invoke`.
    pub async fn invoke(
        &self,
        name: &str,
        request_id: &str,
        headers: Vec<(String, Vec<u8>)>,
        body: bytes::Bytes,
    ) -> Result<Invoked> {
        let f = self.inner.function(name)?;
        let t0 = Instant::now();
        let result = self.inner.invoke(&f, request_id, headers, body).await;
        let outcome = match &result {
            Ok(r) if r.cold => "cold",
            Ok(_) => "warm",
            Err(e) => e.kind(),
        };
        self.inner
            .metrics
            .invocation(name, outcome, t0.elapsed().as_secs_f64());
        result
    }

    /// Prometheus text of the gateway.
    pub fn render_metrics(&self, out: &mut String) {
        let fns: Vec<_> = lock(&self.inner.functions).values().cloned().collect();
        let mut states = Vec::new();
        for f in &fns {
            let st = lock(&f.st);
            let mut by = BTreeMap::new();
            for i in &st.instances {
                let s = lock(&i.st);
                let state = match s.phase {
                    InstPhase::Ready if s.inflight > 0 => "busy",
                    InstPhase::Ready => "idle",
                    InstPhase::Starting => "starting",
                    InstPhase::Stopping => "stopping",
                };
                *by.entry(state).or_insert(0u64) += 1;
            }
            states.push((f.name.clone(), by, st.waiting));
        }
        self.inner.metrics.render(&states, out);
    }

    /// arbord is shutting down: with `adopt`, leaves the instances running for the next
    /// arbord (their records are on disk); otherwise stops every instance, waiting for them.
    pub async fn shutdown(&self) {
        if self.inner.opts.adopt {
            let n: usize = lock(&self.inner.functions)
                .values()
                .map(|f| lock(&f.st).instances.len())
                .sum();
            info!(
                instances = n,
                "function instances left running for the next arbord"
            );
            return;
        }
        let fns: Vec<_> = lock(&self.inner.functions).values().cloned().collect();
        let mut all = Vec::new();
        for f in &fns {
            let mut st = lock(&f.st);
            st.removing = true;
            st.stopping += st.instances.len();
            all.extend(st.instances.drain(..).map(|i| (Arc::clone(f), i)));
            drop(st);
            f.changed.notify_waiters();
        }
        let stops = all.into_iter().map(|(f, i)| {
            lock(&i.st).phase = InstPhase::Stopping;
            let inner = Arc::clone(&self.inner);
            tokio::spawn(async move { inner.teardown_of(&f, &i).await })
        });
        for s in stops.collect::<Vec<_>>() {
            let _ = s.await;
        }
        // And those the reconciler was already stopping.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && fns.iter().any(|f| lock(&f.st).stopping > 0) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        info!("function instances stopped");
    }
}

impl Function {
    fn new(record: FunctionRecord) -> Function {
        Function {
            name: record.name.clone(),
            st: Mutex::new(FnState {
                record,
                instances: Vec::new(),
                waiting: 0,
                failures: 0,
                last_failure: None,
                removing: false,
                stopping: 0,
            }),
            changed: Notify::new(),
        }
    }

    fn view(&self) -> FunctionView {
        let st = lock(&self.st);
        FunctionView {
            name: self.name.clone(),
            version: st.record.version,
            spec: st.record.spec.clone(),
            updated: st.record.updated.clone(),
            waiting: st.waiting,
            removing: st.removing,
            last_start_failure: st.last_failure.clone(),
            instances: st.instances.iter().map(|i| i.view()).collect(),
        }
    }
}

impl Instance {
    fn view(&self) -> InstanceView {
        let s = lock(&self.st);
        InstanceView {
            id: self.id.clone(),
            version: self.version,
            state: s.phase,
            address: s.addr.map(|a| a.to_string()),
            inflight: s.inflight,
            served: s.served,
            idle_seconds: s.last_used.elapsed().as_secs_f64(),
            age_seconds: self.created_at.elapsed().as_secs_f64(),
            cold_start: s.phases.clone(),
        }
    }

    /// Takes a request slot if the instance is ready and has one.
    fn try_take(&self, concurrency: u32) -> Option<SocketAddr> {
        let mut s = lock(&self.st);
        if s.phase == InstPhase::Ready && s.inflight < concurrency {
            s.inflight += 1;
            return s.addr;
        }
        None
    }

    /// Marks it stopping if it serves nothing (under its lock, so no request slips in).
    fn try_stop(&self) -> bool {
        let mut s = lock(&self.st);
        if s.phase == InstPhase::Ready && s.inflight == 0 {
            s.phase = InstPhase::Stopping;
            return true;
        }
        false
    }

    fn live(&self) -> bool {
        lock(&self.st).phase != InstPhase::Stopping
    }

    fn phase(&self) -> InstPhase {
        lock(&self.st).phase
    }
}

/// What a request's pass through the queue reads of its function's spec.
struct Limits {
    concurrency: u32,
    queue_limit: u32,
    max_instances: u32,
    queue_timeout_secs: u64,
}

impl Limits {
    fn of(s: &FunctionSpec) -> Limits {
        Limits {
            concurrency: s.concurrency,
            queue_limit: s.queue_limit,
            max_instances: s.max_instances,
            queue_timeout_secs: s.queue_timeout_secs,
        }
    }
}

/// A request slot on an instance; freed on drop.
struct Lease {
    f: Arc<Function>,
    inst: Arc<Instance>,
    addr: SocketAddr,
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut s = lock(&self.inst.st);
            s.inflight = s.inflight.saturating_sub(1);
            s.served += 1;
            s.last_used = Instant::now();
        }
        self.f.changed.notify_waiters();
    }
}

/// A place in a function's queue; left on drop (also when the caller goes away).
struct Queued(Arc<Function>);

impl Drop for Queued {
    fn drop(&mut self) {
        let mut st = lock(&self.0.st);
        st.waiting = st.waiting.saturating_sub(1);
    }
}

struct NoObserver;
impl Observer for NoObserver {}

impl Inner {
    fn function(&self, name: &str) -> Result<Arc<Function>> {
        lock(&self.functions)
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(name.into()))
    }

    async fn invoke(
        self: &Arc<Self>,
        f: &Arc<Function>,
        request_id: &str,
        headers: Vec<(String, Vec<u8>)>,
        body: bytes::Bytes,
    ) -> Result<Invoked> {
        let t0 = Instant::now();
        let (lease, cold) = self.acquire(f).await?;
        let queue_seconds = t0.elapsed().as_secs_f64();
        self.metrics.queued(&f.name, queue_seconds);
        let timeout = lock(&f.st).record.spec.timeout_secs;
        let url = format!("http://{}/invoke", lease.addr);
        let mut rb = self
            .http
            .post(&url)
            .timeout(Duration::from_secs(timeout))
            .body(body);
        for (k, v) in headers {
            if !HOP_BY_HOP.contains(&k.as_str()) && k != "authorization" {
                rb = rb.header(k, v);
            }
        }
        rb = rb
            .header("x-arbor-request-id", request_id)
            .header("x-arbor-function", f.name.as_str());
        let instance = lease.inst.id.clone();
        let failed = |e: reqwest::Error| {
            if e.is_timeout() {
                Error::Timeout {
                    instance: instance.clone(),
                    secs: timeout,
                }
            } else {
                Error::InstanceFailed {
                    instance: instance.clone(),
                    why: arbor_oci::error::chain(&e),
                }
            }
        };
        let resp = rb.send().await.map_err(failed)?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        let body = match read_limited(resp, self.opts.max_response).await {
            Ok(b) => b,
            Err(Ok(e)) => return Err(failed(e)),
            Err(Err(why)) => {
                return Err(Error::InstanceFailed {
                    instance: instance.clone(),
                    why,
                });
            }
        };
        drop(lease);
        Ok(Invoked {
            status,
            headers,
            body,
            instance,
            cold,
            queue_seconds,
        })
    }

    /// A request slot: a free instance of the current version; else a place in the queue,
    /// with a cold start when the instances starting cannot take the queue; else 429. The
    /// bool: the slot is on an instance started while this request waited.
    async fn acquire(self: &Arc<Self>, f: &Arc<Function>) -> Result<(Lease, bool)> {
        let t0 = Instant::now();
        let mut queued: Option<Queued> = None;
        let mut seen_failures = None;
        let mut first_deadline = None;
        loop {
            let notified = f.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = {
                let mut st = lock(&f.st);
                if st.removing {
                    return Err(Error::Removing(f.name.clone()));
                }
                let seen = *seen_failures.get_or_insert(st.failures);
                // The numbers this pass needs, not the whole spec (this is the invoke path).
                let spec = Limits::of(&st.record.spec);
                let version = st.record.version;
                let deadline = *first_deadline
                    .get_or_insert(t0 + Duration::from_secs(spec.queue_timeout_secs));
                let current = || st.instances.iter().filter(|i| i.version == version);
                for i in current() {
                    if let Some(addr) = i.try_take(spec.concurrency) {
                        let cold = queued.is_some() && i.created_at >= t0;
                        let lease = Lease {
                            f: Arc::clone(f),
                            inst: Arc::clone(i),
                            addr,
                        };
                        return Ok((lease, cold));
                    }
                }
                let starting = current()
                    .filter(|i| i.phase() == InstPhase::Starting)
                    .count();
                if st.failures > seen && starting == 0 {
                    return Err(Error::StartFailed {
                        function: f.name.clone(),
                        why: st.last_failure.clone().unwrap_or_default(),
                    });
                }
                if queued.is_none() {
                    if st.waiting >= spec.queue_limit as usize {
                        return Err(Error::QueueFull {
                            function: f.name.clone(),
                            waiting: st.waiting,
                        });
                    }
                    st.waiting += 1;
                    queued = Some(Queued(Arc::clone(f)));
                }
                let live = st.instances.iter().filter(|i| i.live()).count();
                if st.waiting > starting * spec.concurrency as usize
                    && live < spec.max_instances as usize
                {
                    self.spawn_instance(f, &mut st);
                }
                if Instant::now() >= deadline {
                    return Err(Error::QueueTimeout(f.name.clone()));
                }
                deadline
            };
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return Err(Error::QueueTimeout(f.name.clone()));
            }
        }
    }

    /// Adds a starting instance of the current version and starts it in the background.
    fn spawn_instance(self: &Arc<Self>, f: &Arc<Function>, st: &mut FnState) {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let tag = hex::encode(&sha2_digest(format!("{}{n}{nanos}", f.name).as_bytes())[..4]);
        let id = format!("fn-{}-{tag}", f.name);
        let log = self
            .opts
            .dir
            .join("logs")
            .join(&f.name)
            .join(format!("{id}.log"));
        let inst = Arc::new(Instance {
            id,
            version: st.record.version,
            created_at: Instant::now(),
            log,
            st: Mutex::new(InstState {
                phase: InstPhase::Starting,
                addr: None,
                inflight: 0,
                last_used: Instant::now(),
                served: 0,
                phases: Vec::new(),
            }),
        });
        st.instances.push(Arc::clone(&inst));
        let (inner, f, record) = (Arc::clone(self), Arc::clone(f), st.record.clone());
        let span = info_span!("instance_start", function = %f.name, instance = %inst.id);
        tokio::spawn(async move { inner.start_instance(f, inst, record).await }.instrument(span));
    }

    async fn start_instance(
        self: Arc<Self>,
        f: Arc<Function>,
        inst: Arc<Instance>,
        record: FunctionRecord,
    ) {
        let t0 = Instant::now();
        match self.bring_up(&inst, &record).await {
            Ok((addr, phases, exited)) => {
                let total = t0.elapsed().as_secs_f64();
                {
                    let mut s = lock(&inst.st);
                    s.phase = InstPhase::Ready;
                    s.addr = Some(addr);
                    s.last_used = Instant::now();
                    s.phases = phases.clone();
                }
                self.metrics.started(&f.name, "ok", &phases);
                info!(seconds = total, %addr, "instance ready");
                self.save_record(&InstanceRecord {
                    id: inst.id.clone(),
                    function: f.name.clone(),
                    version: inst.version,
                    addr,
                    phases,
                });
                f.changed.notify_waiters();
                self.watch_exit(f, inst, exited);
            }
            Err(e) => {
                let why = e.to_string();
                warn!(error = %why, "instance failed to start");
                self.metrics.started(&f.name, "failed", &[]);
                {
                    let mut st = lock(&f.st);
                    st.instances.retain(|i| !Arc::ptr_eq(i, &inst));
                    st.failures += 1;
                    st.last_failure = Some(why);
                    st.stopping += 1;
                }
                lock(&inst.st).phase = InstPhase::Stopping;
                f.changed.notify_waiters();
                self.teardown_of(&f, &inst).await;
            }
        }
    }

    /// Network, container, port: the instance's address, its start phases, and a receiver of
    /// its exit.
    async fn bring_up(
        &self,
        inst: &Instance,
        record: &FunctionRecord,
    ) -> Result<(
        SocketAddr,
        Vec<(String, f64)>,
        oneshot::Receiver<arbor_client::Result<u32>>,
    )> {
        let t0 = Instant::now();
        let spec = &record.spec;
        // (phase, seconds since t0) as reached; made contiguous at the end.
        let mut marks: Vec<(&str, f64)> = Vec::new();
        if let Some(d) = inst.log.parent() {
            std::fs::create_dir_all(d).map_err(Error::io(format!("creating {}", d.display())))?;
            prune_logs(d);
        }
        let net = self.opts.net.clone();
        let id = inst.id.clone();
        let (netns, ip) = tokio::task::spawn_blocking(move || net.setup(&id))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let base = t0.elapsed().as_secs_f64();
        marks.push(("network", base));

        let mut o = RunOptions::new(&spec.image, &inst.id);
        o.runtime = self.opts.runtime.clone();
        o.detach = true;
        o.pull = PullPolicy::Missing;
        o.stdio = Stdio::LogFile(inst.log.clone());
        o.labels
            .insert(LABEL_GATEWAY.into(), self.generation.clone());
        o.labels.insert(LABEL_FUNCTION.into(), record.name.clone());
        o.labels
            .insert("arbor.io/version".into(), record.version.to_string());
        o.spec = SpecOptions {
            args: spec.command.clone(),
            entrypoint: spec.entrypoint.clone(),
            env: spec.env.clone(),
            memory_limit: spec.memory_mib.map(|m| (m << 20) as i64),
            cpus: spec.cpus,
            netns: Some(netns),
            hostname: Some(inst.id.clone()),
            cgroup_parent: self.opts.cgroup_parent.clone(),
            ..Default::default()
        };
        o.spec.annotations.insert(
            arbor_client::ready::ANN_FUNCTION.into(),
            record.name.clone(),
        );
        o.spec
            .annotations
            .insert(arbor_client::ready::ANN_PORT.into(), spec.port.to_string());
        let store = self.store(&spec.image)?;
        let start_timeout = Duration::from_secs(spec.start_timeout_secs);
        let outcome = tokio::time::timeout(
            start_timeout,
            arbor_client::run(&self.opts.target, Some(&store), &o, &NoObserver),
        )
        .await
        .map_err(|_| {
            Error::Internal(format!(
                "the container did not start within {start_timeout:?}"
            ))
        })?
        .map_err(|e| Error::Internal(format!("{}: {}", spec.image, arbor_oci::error::chain(&e))))?;
        for p in &outcome.phases {
            let name = match p.phase {
                arbor_client::Phase::Pulled => "pull",
                arbor_client::Phase::ContainerCreated => "create",
                arbor_client::Phase::TaskCreated => "task",
                arbor_client::Phase::TaskStarted => "start",
                _ => continue,
            };
            marks.push((name, base + p.seconds));
        }

        let mut exited = self.exit_of(&inst.id);
        let addr = SocketAddr::from((ip, spec.port));
        let deadline = t0 + start_timeout;
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_millis(250),
                tokio::net::TcpStream::connect(addr),
            );
            tokio::select! {
                r = &mut exited => {
                    let how = match r {
                        Ok(Ok(code)) => format!("exited with status {code}"),
                        Ok(Err(e)) => format!("was lost ({e})"),
                        Err(_) => "was lost".into(),
                    };
                    let log = read_tail(&inst.log, 400);
                    return Err(Error::Internal(format!(
                        "the process {how} before opening port {}{}",
                        spec.port,
                        if log.trim().is_empty() { String::new() } else { format!("; its last output: {}", log.trim()) }
                    )));
                }
                r = attempt => {
                    if let Ok(Ok(_)) = r {
                        break;
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Internal(format!(
                    "port {} never opened within {} s",
                    spec.port, spec.start_timeout_secs
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        marks.push(("port", t0.elapsed().as_secs_f64()));
        let mut before = 0.0;
        let phases = marks
            .into_iter()
            .map(|(name, at)| {
                let d = (at - before).max(0.0);
                before = at.max(before);
                (name.to_string(), d)
            })
            .collect();
        Ok((addr, phases, exited))
    }

    /// Calls [`Inner::instance_ended`] when `exited` says the process ended.
    fn watch_exit(
        self: &Arc<Self>,
        f: Arc<Function>,
        inst: Arc<Instance>,
        exited: oneshot::Receiver<arbor_client::Result<u32>>,
    ) {
        let inner = Arc::clone(self);
        tokio::spawn(
            async move {
                let why = match exited.await {
                    Ok(Ok(code)) => format!("exited with status {code}"),
                    Ok(Err(e)) => format!("lost: {e}"),
                    Err(_) => "lost".into(),
                };
                inner.instance_ended(&f, &inst, &why).await;
            }
            .in_current_span(),
        );
    }

    /// A receiver of the exit of container `id`'s task.
    fn exit_of(&self, id: &str) -> oneshot::Receiver<arbor_client::Result<u32>> {
        let (tx, rx) = oneshot::channel();
        let (t, id) = (self.opts.target.clone(), id.to_string());
        tokio::spawn(async move {
            let _ = tx.send(arbor_client::run::task::wait_exit(&t, &id).await);
        });
        rx
    }

    fn records_dir(&self) -> PathBuf {
        self.opts.dir.join("instances")
    }

    fn save_record(&self, r: &InstanceRecord) {
        if !self.opts.adopt {
            return;
        }
        let dir = self.records_dir();
        let p = dir.join(format!("{}.json", r.id));
        let tmp = dir.join(format!(".{}.json.tmp", r.id));
        let written = std::fs::create_dir_all(&dir)
            .and_then(|_| serde_json::to_vec(r).map_err(std::io::Error::other))
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|_| std::fs::rename(&tmp, &p));
        if let Err(e) = written {
            warn!(instance = %r.id, error = %e, "recording the instance (it will not be adopted)");
        }
    }

    /// Adopts the instances an earlier arbord left running: each recorded instance whose
    /// function still exists, whose task runs and whose port answers joins its function's
    /// pool as ready (an old version is drained by the reconciler as usual). Returns their
    /// ids; the rest are removed by [`Inner::clean_leftovers`].
    async fn adopt_instances(self: &Arc<Self>) -> Vec<String> {
        let mut adopted = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.records_dir()) else {
            return adopted;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let rec: Option<InstanceRecord> = std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let _ = std::fs::remove_file(&p);
            let Some(rec) = rec else { continue };
            let Ok(f) = self.function(&rec.function) else {
                continue;
            };
            let running = tokio::time::timeout(
                Duration::from_secs(5),
                arbor_client::run::task::running_pid(&self.opts.target, &rec.id),
            )
            .await;
            if !matches!(running, Ok(Ok(Some(_)))) {
                continue;
            }
            let answers = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect(rec.addr),
            )
            .await;
            if !matches!(answers, Ok(Ok(_))) {
                continue;
            }
            let inst = Arc::new(Instance {
                id: rec.id.clone(),
                version: rec.version,
                created_at: Instant::now(),
                log: self
                    .opts
                    .dir
                    .join("logs")
                    .join(&rec.function)
                    .join(format!("{}.log", rec.id)),
                st: Mutex::new(InstState {
                    phase: InstPhase::Ready,
                    addr: Some(rec.addr),
                    inflight: 0,
                    last_used: Instant::now(),
                    served: 0,
                    phases: rec.phases.clone(),
                }),
            });
            lock(&f.st).instances.push(Arc::clone(&inst));
            self.save_record(&rec);
            let exited = self.exit_of(&rec.id);
            self.watch_exit(f, inst, exited);
            info!(instance = %rec.id, function = %rec.function, addr = %rec.addr, "instance adopted");
            adopted.push(rec.id);
        }
        adopted
    }

    fn store(&self, image: &str) -> Result<Store> {
        let r = Reference::parse(image).map_err(|e| Error::Invalid(e.to_string()))?;
        let host = r
            .registry
            .rsplit_once(':')
            .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
            .map_or(r.registry.as_str(), |(h, _)| h);
        let plain = self
            .opts
            .plain_http_hosts
            .iter()
            .any(|h| *h == r.registry || h == host);
        let client = if plain { &self.plain } else { &self.tls };
        Store::open(&ImageLocation::Registry(r), client, false)
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// An instance's process ended (not stopped by us): it leaves the pool and is removed;
    /// the reconciler replaces it if the function needs it.
    async fn instance_ended(&self, f: &Arc<Function>, inst: &Arc<Instance>, why: &str) {
        {
            let mut s = lock(&inst.st);
            if s.phase == InstPhase::Stopping {
                return;
            }
            s.phase = InstPhase::Stopping;
        }
        warn!(function = %f.name, instance = %inst.id, why, "instance ended");
        self.metrics.ended(&f.name);
        {
            let mut st = lock(&f.st);
            st.instances.retain(|i| !Arc::ptr_eq(i, inst));
            st.stopping += 1;
        }
        f.changed.notify_waiters();
        self.teardown_of(f, inst).await;
    }

    /// [`Inner::teardown`] of an instance counted in its function's `stopping`.
    async fn teardown_of(&self, f: &Function, inst: &Instance) {
        self.teardown(inst).await;
        let mut st = lock(&f.st);
        st.stopping = st.stopping.saturating_sub(1);
    }

    /// Stops and removes the container, then its network.
    async fn teardown(&self, inst: &Instance) {
        if let Err(e) = arbor_client::run::task::stop_and_remove(
            &self.opts.target,
            &inst.id,
            self.opts.stop_grace,
        )
        .await
        {
            warn!(instance = %inst.id, error = %e, "removing the instance's container");
        }
        let (net, id) = (self.opts.net.clone(), inst.id.clone());
        let _ = tokio::task::spawn_blocking(move || net.teardown(&id)).await;
        let _ = std::fs::remove_file(self.records_dir().join(format!("{}.json", inst.id)));
        info!(instance = %inst.id, "instance removed");
    }

    /// Removes what an earlier arbord left and no one adopted: its instance containers and
    /// the network namespaces `netns`.
    async fn clean_leftovers(self: &Arc<Self>, netns: Vec<String>, adopted: &[String]) {
        let t = &self.opts.target;
        match arbor_client::run::task::list_labelled(t, LABEL_GATEWAY).await {
            Ok(cs) => {
                for (id, labels) in cs {
                    if labels.get(LABEL_GATEWAY) == Some(&self.generation) || adopted.contains(&id)
                    {
                        continue;
                    }
                    info!(instance = %id, "removing an instance left by an earlier arbord");
                    if let Err(e) =
                        arbor_client::run::task::stop_and_remove(t, &id, Duration::ZERO).await
                    {
                        warn!(instance = %id, error = %e, "removing a leftover instance");
                    }
                }
            }
            Err(e) => warn!(error = %e, "listing leftover instances (containerd not up yet?)"),
        }
        let net = self.opts.net.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for id in netns {
                net.teardown(&id);
            }
        })
        .await;
    }

    /// One pass over every function (see the module documentation).
    fn reconcile(self: &Arc<Self>) {
        let fns: Vec<_> = lock(&self.functions).values().cloned().collect();
        for f in fns {
            let mut stop = Vec::new();
            let mut st = lock(&f.st);
            let version = st.record.version;
            let spec = st.record.spec.clone();
            let idle_for = Duration::from_secs(spec.idle_timeout_secs);
            let mut keep = if st.removing {
                0
            } else {
                spec.min_instances as usize
            };
            let mut current: Vec<Arc<Instance>> = Vec::new();
            for i in &st.instances {
                if i.version == version && !st.removing {
                    current.push(Arc::clone(i));
                } else if i.try_stop() {
                    stop.push(Arc::clone(i));
                }
            }
            // Most recently used first: the reserved ones are the warmest.
            current.sort_by_key(|i| std::cmp::Reverse(lock(&i.st).last_used));
            let live = current.iter().filter(|i| i.live()).count();
            let mut alive = live;
            for i in current.iter().rev() {
                if alive <= keep {
                    break;
                }
                let idle = {
                    let s = lock(&i.st);
                    s.phase == InstPhase::Ready
                        && s.inflight == 0
                        && s.last_used.elapsed() >= idle_for
                };
                if idle && i.try_stop() {
                    stop.push(Arc::clone(i));
                    alive -= 1;
                }
            }
            st.instances
                .retain(|i| !stop.iter().any(|s| Arc::ptr_eq(s, i)));
            st.stopping += stop.len();
            let all_live = st.instances.iter().filter(|i| i.live()).count();
            keep = keep.min(spec.max_instances as usize);
            let mut n = alive;
            let mut total = all_live;
            while n < keep && total < spec.max_instances as usize {
                self.spawn_instance(&f, &mut st);
                n += 1;
                total += 1;
            }
            let gone = st.removing && st.instances.is_empty() && st.stopping == 0;
            drop(st);
            for i in stop {
                info!(function = %f.name, instance = %i.id, "stopping an idle or drained instance");
                let (inner, f) = (Arc::clone(self), Arc::clone(&f));
                tokio::spawn(async move { inner.teardown_of(&f, &i).await });
            }
            if gone {
                let mut fns = lock(&self.functions);
                if fns.get(&f.name).is_some_and(|g| Arc::ptr_eq(g, &f)) {
                    fns.remove(&f.name);
                }
            }
        }
    }
}

fn sha2_digest(b: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(b).to_vec()
}

/// The body, at most `limit` bytes: `Err(Ok(_))` reading failed, `Err(Err(why))` too large.
async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
) -> std::result::Result<bytes::Bytes, std::result::Result<reqwest::Error, String>> {
    let mut buf = bytes::BytesMut::new();
    while let Some(c) = resp.chunk().await.map_err(Ok)? {
        if buf.len() + c.len() > limit {
            return Err(Err(format!(
                "its response is over the limit of {limit} bytes"
            )));
        }
        buf.extend_from_slice(&c);
    }
    Ok(buf.freeze())
}

/// The log files of a function's directory, oldest first.
fn log_files(dir: &std::path::Path) -> Vec<(SystemTime, PathBuf)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().extension().and_then(|x| x.to_str()) == Some("log"))
                .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn prune_logs(dir: &std::path::Path) {
    let files = log_files(dir);
    let extra = files.len().saturating_sub(LOGS_KEPT - 1);
    for (_, p) in files.into_iter().take(extra) {
        let _ = std::fs::remove_file(p);
    }
}

/// The last `n` bytes of a file, lossily as text ("" when unreadable).
fn read_tail(p: &std::path::Path, n: u64) -> String {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let Ok(mut f) = std::fs::File::open(p) else {
        return String::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(n)));
    let mut b = Vec::new();
    let _ = f.take(n).read_to_end(&mut b);
    String::from_utf8_lossy(&b).into_owned()
}
