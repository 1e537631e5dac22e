//! The tree manager's state in etcd, and leader election between managers, over etcd's v3 JSON
//! gateway (HTTP/1.1 `POST /v3/...` with base64 keys and values; no gRPC client, so no second
//! tonic in the build).
//!
//! - [`EtcdClient`]: the handful of etcd calls used here (range, put, txn, lease grant,
//!   keep-alive and revoke), trying each configured endpoint in turn.
//! - [`EtcdStore`]: the manager's [`Snapshot`] (serde JSON) under `<prefix>/snapshot`, and the
//!   members' Peer addresses under `<prefix>/addrs`, written together in one transaction.
//!   Writes never block the caller: [`EtcdStore::save_state`] (and [`Store::save`]) hand the
//!   latest state to a background task which writes it (latest wins: a state superseded before
//!   it was written is skipped), retrying while the write fails and no newer state is waiting.
//!   A store may be *fenced* by an [`Election`]'s lease: then a state is only written while that
//!   lease still holds the leader key (checked by etcd in the same transaction), so a deposed
//!   leader can never overwrite its successor's state. Reading is async
//!   ([`EtcdStore::load_state`]); the sync [`Store::load`] runs the read on a helper thread with
//!   its own runtime, so it may be called from inside a runtime too (it blocks the caller).
//! - [`Election`]: campaign for leadership with a lease: a transaction creates
//!   `<prefix>/leader` (value: the manager's address, attached to the lease) if it is absent.
//!   The winner's [`Leadership`] keeps the lease alive (keep-alive every third of the TTL) and
//!   ends when the lease can no longer be confirmed in time (or the key is gone or someone
//!   else's); [`Leadership::resign`] revokes the lease, which deletes the key at once.
//!
//! [`TreeService::with_etcd`](crate::tree::TreeService::with_etcd) puts these together: a
//! standby manager that takes over when the leader's lease expires.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arbor_p2p::{Snapshot, Store, StoreError};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, instrument, warn};

/// The key prefix used when none is configured.
pub const DEFAULT_PREFIX: &str = "/arbor/p2p";
/// The leader lease's default time to live.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3);
/// Deadline of one etcd request (per endpoint tried).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest wait between retries of a failing snapshot write.
const WRITE_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Errors of the etcd client.
#[derive(Debug, Error)]
pub enum EtcdError {
    /// No endpoint was configured.
    #[error("no etcd endpoint configured")]
    NoEndpoints,
    /// An endpoint is not `host:port` or `http://host:port`.
    #[error("invalid etcd endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint given.
        endpoint: String,
        /// Why it was refused.
        reason: String,
    },
    /// The manager's own address is not `host:port`.
    #[error("invalid manager address {0:?}: expected host:port")]
    InvalidManagerAddress(String),
    /// The HTTP client could not be built.
    #[error("building the etcd HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// An endpoint could not be reached or the exchange broke.
    #[error("etcd {endpoint}{path}: {source}")]
    Http {
        /// The endpoint tried.
        endpoint: String,
        /// The gateway path.
        path: String,
        /// What failed.
        #[source]
        source: reqwest::Error,
    },
    /// An endpoint did not answer within the request deadline.
    #[error("etcd {endpoint}{path}: no answer within {timeout:?}")]
    Timeout {
        /// The endpoint tried.
        endpoint: String,
        /// The gateway path.
        path: String,
        /// The deadline.
        timeout: Duration,
    },
    /// etcd answered with an error.
    #[error("etcd {endpoint}{path}: HTTP {status}: {message}")]
    Server {
        /// The endpoint that answered.
        endpoint: String,
        /// The gateway path.
        path: String,
        /// The HTTP status.
        status: u16,
        /// etcd's error message (or the start of the body).
        message: String,
    },
    /// etcd's answer could not be decoded.
    #[error("etcd {path}: unexpected answer: {reason}")]
    Decode {
        /// The gateway path.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// A stored value could not be decoded.
    #[error("value of {key} is corrupt: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// What was wrong.
        reason: String,
    },
}

/// Where a manager keeps its state and holds its elections: see
/// [`TreeService::with_etcd`](crate::tree::TreeService::with_etcd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// The etcd cluster's client endpoints, `host:port` or `http://host:port`.
    pub endpoints: Vec<String>,
    /// The prefix of every key (default [`DEFAULT_PREFIX`]); managers of one deployment share
    /// it.
    pub prefix: String,
    /// The leader lease's TTL (default [`DEFAULT_LEASE_TTL`]; whole seconds, etcd's minimum is
    /// 2 s by default): a dead leader is replaced within about this time plus a third of it.
    pub lease_ttl: Duration,
}

impl EtcdConfig {
    /// The default prefix and TTL for the cluster at `endpoints`.
    pub fn new<S: AsRef<str>>(endpoints: &[S]) -> Self {
        Self {
            endpoints: endpoints.iter().map(|e| e.as_ref().to_owned()).collect(),
            prefix: DEFAULT_PREFIX.to_owned(),
            lease_ttl: DEFAULT_LEASE_TTL,
        }
    }
}

/// A key-value pair as stored in etcd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// The revision that created the key (0 if absent).
    pub create_revision: i64,
    /// The revision of the last change.
    pub mod_revision: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// One condition of a [`EtcdClient::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist (`create_revision == 0`).
    Absent(String),
    /// The key exists and is attached to this lease.
    Lease(String, i64),
}

/// One operation of a [`EtcdClient::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put `value` under `key`, attached to `lease` (0: none).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// The lease, 0 for none.
        lease: i64,
    },
    /// Read `key`.
    Get(String),
}

/// The outcome of a [`EtcdClient::txn`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether every comparison held (the `success` branch ran).
    pub succeeded: bool,
    /// For each [`Op::Get`] of the branch that ran, in order: the key-value, if it exists.
    pub gets: Vec<Option<KeyValue>>,
}

/// An etcd v3 client over the JSON gateway (see the [module docs](self)). Cheap to clone.
#[derive(Clone)]
pub struct EtcdClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    http: reqwest::Client,
    /// `http://host:port`, without a trailing slash.
    endpoints: Vec<String>,
    /// The endpoint that answered last: tried first.
    preferred: AtomicUsize,
    timeout: Duration,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient")
            .field("endpoints", &self.inner.endpoints)
            .finish_non_exhaustive()
    }
}

/// `host:port` or `http://host:port` as `http://host:port`.
fn normalize_endpoint(endpoint: &str) -> Result<String, EtcdError> {
    let invalid = |reason: &str| EtcdError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = endpoint.trim().trim_end_matches('/');
    if trimmed.starts_with("https://") {
        return Err(invalid("TLS is not supported: use http://"));
    }
    let rest = trimmed.strip_prefix("http://").unwrap_or(trimmed);
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(invalid("expected host:port"));
    };
    if host.is_empty() || rest.contains('/') || !matches!(port.parse::<u16>(), Ok(p) if p != 0) {
        return Err(invalid("expected host:port"));
    }
    Ok(format!("http://{rest}"))
}

fn b64(data: &[u8]) -> String {
    B64.encode(data)
}

/// An int64 of the gateway's JSON: a string (proto3 JSON) or a number; absent is 0.
fn int(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn decode_error(path: &str, reason: impl Into<String>) -> EtcdError {
    EtcdError::Decode {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn bytes_field(path: &str, v: Option<&Value>) -> Result<Vec<u8>, EtcdError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => B64
            .decode(s)
            .map_err(|e| decode_error(path, format!("bad base64: {e}"))),
        Some(other) => Err(decode_error(path, format!("expected base64, got {other}"))),
    }
}

fn key_value(path: &str, v: &Value) -> Result<KeyValue, EtcdError> {
    Ok(KeyValue {
        key: bytes_field(path, v.get("key"))?,
        value: bytes_field(path, v.get("value"))?,
        create_revision: int(v.get("create_revision")),
        mod_revision: int(v.get("mod_revision")),
        lease: int(v.get("lease")),
    })
}

/// The first key-value of a range response.
fn first_kv(path: &str, range: &Value) -> Result<Option<KeyValue>, EtcdError> {
    match range.get("kvs").and_then(Value::as_array) {
        Some(kvs) => kvs.first().map(|kv| key_value(path, kv)).transpose(),
        None => Ok(None),
    }
}

impl EtcdClient {
    /// A client of the etcd cluster at `endpoints` (`host:port` or `http://host:port`; plain
    /// HTTP only). Nothing is contacted yet.
    pub fn new<S: AsRef<str>>(endpoints: &[S]) -> Result<Self, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let endpoints = endpoints
            .iter()
            .map(|e| normalize_endpoint(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Self::build(endpoints, REQUEST_TIMEOUT)
    }

    fn build(endpoints: Vec<String>, timeout: Duration) -> Result<Self, EtcdError> {
        // reqwest is built with rustls but no crypto provider: it needs one installed even
        // for plain HTTP. Installing fails harmlessly when one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .http1_only()
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(EtcdError::Client)?;
        Ok(Self {
            inner: Arc::new(ClientInner {
                http,
                endpoints,
                preferred: AtomicUsize::new(0),
                timeout,
            }),
        })
    }

    /// The same cluster with a new HTTP client: for use in another runtime (an HTTP client's
    /// pooled connections belong to the runtime that opened them).
    pub fn fresh(&self) -> Result<Self, EtcdError> {
        Self::build(self.inner.endpoints.clone(), self.inner.timeout)
    }

    /// The endpoints, as `http://host:port`.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// POSTs `body` to `path` on the preferred endpoint, then on the others while they fail to
    /// answer (an error answer from etcd is returned at once, except 5xx which tries the next).
    #[instrument(level = "debug", name = "etcd_request", skip(self, body))]
    async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let n = self.inner.endpoints.len();
        let first = self.inner.preferred.load(Ordering::Relaxed) % n;
        let mut last = None;
        for i in 0..n {
            let idx = (first + i) % n;
            let endpoint = &self.inner.endpoints[idx];
            match self.call_one(endpoint, path, body).await {
                Ok(v) => {
                    self.inner.preferred.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e @ EtcdError::Server { status, .. }) if status < 500 => return Err(e),
                Err(e) => {
                    debug!(endpoint, path, error = %e, "etcd endpoint failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(EtcdError::NoEndpoints))
    }

    async fn call_one(&self, endpoint: &str, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let http_error = |source| EtcdError::Http {
            endpoint: endpoint.to_owned(),
            path: path.to_owned(),
            source,
        };
        let exchange = async {
            let response = self
                .inner
                .http
                .post(format!("{endpoint}{path}"))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .map_err(http_error)?;
            let status = response.status().as_u16();
            let text = response.text().await.map_err(http_error)?;
            Ok::<_, EtcdError>((status, text))
        };
        let (status, text) = tokio::time::timeout(self.inner.timeout, exchange)
            .await
            .map_err(|_| EtcdError::Timeout {
                endpoint: endpoint.to_owned(),
                path: path.to_owned(),
                timeout: self.inner.timeout,
            })??;
        // A streaming call (lease keep-alive) answers one JSON object per line.
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let value: Option<Value> = serde_json::from_str(first).ok();
        if !(200..300).contains(&status) {
            let message = value
                .as_ref()
                .and_then(|v| v.get("message").or_else(|| v.get("error")))
                .and_then(Value::as_str)
                .map_or_else(|| format!("{:.200}", text.trim()), str::to_owned);
            return Err(EtcdError::Server {
                endpoint: endpoint.to_owned(),
                path: path.to_owned(),
                status,
                message,
            });
        }
        let value = value.ok_or_else(|| decode_error(path, format!("not JSON: {first:.200}")))?;
        if let Some(error) = value.get("error") {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| error.to_string(), str::to_owned);
            return Err(EtcdError::Server {
                endpoint: endpoint.to_owned(),
                path: path.to_owned(),
                status,
                message,
            });
        }
        Ok(value)
    }

    /// The value under `key`, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let path = "/v3/kv/range";
        let v = self
            .call(path, &json!({ "key": b64(key.as_bytes()) }))
            .await?;
        first_kv(path, &v)
    }

    /// Puts `value` under `key`, attached to `lease` (0: none).
    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/kv/put", &put_body(key, value, lease))
            .await
            .map(drop)
    }

    /// Deletes `key` (nothing happens if it is absent).
    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        self.call("/v3/kv/deleterange", &json!({ "key": b64(key.as_bytes()) }))
            .await
            .map(drop)
    }

    /// Runs `success` if every comparison holds, else `failure`, atomically.
    pub async fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResponse, EtcdError> {
        let path = "/v3/kv/txn";
        let compare: Vec<Value> = compare
            .iter()
            .map(|c| match c {
                Compare::Absent(key) => json!({
                    "key": b64(key.as_bytes()),
                    "result": "EQUAL",
                    "target": "CREATE",
                    "create_revision": "0",
                }),
                Compare::Lease(key, lease) => json!({
                    "key": b64(key.as_bytes()),
                    "result": "EQUAL",
                    "target": "LEASE",
                    "lease": lease.to_string(),
                }),
            })
            .collect();
        let ops = |ops: &[Op]| -> Vec<Value> {
            ops.iter()
                .map(|op| match op {
                    Op::Put { key, value, lease } => {
                        json!({ "request_put": put_body(key, value, *lease) })
                    }
                    Op::Get(key) => json!({ "request_range": { "key": b64(key.as_bytes()) } }),
                })
                .collect()
        };
        let body = json!({
            "compare": compare,
            "success": ops(success),
            "failure": ops(failure),
        });
        let v = self.call(path, &body).await?;
        let succeeded = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        let mut gets = Vec::new();
        if let Some(responses) = v.get("responses").and_then(Value::as_array) {
            for r in responses {
                if let Some(range) = r.get("response_range") {
                    gets.push(first_kv(path, range)?);
                }
            }
        }
        Ok(TxnResponse { succeeded, gets })
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1; etcd may raise it to its minimum).
    /// Returns the lease id and the TTL granted.
    pub async fn lease_grant(&self, ttl: Duration) -> Result<(i64, Duration), EtcdError> {
        let path = "/v3/lease/grant";
        let secs = ttl.as_secs().max(1);
        let v = self.call(path, &json!({ "TTL": secs.to_string() })).await?;
        let id = int(v.get("ID"));
        if id == 0 {
            return Err(decode_error(path, "no lease id"));
        }
        let granted = u64::try_from(int(v.get("TTL"))).unwrap_or(secs);
        Ok((id, Duration::from_secs(granted.max(1))))
    }

    /// Renews `lease`; returns its remaining TTL, `None` if it no longer exists.
    pub async fn lease_keepalive(&self, lease: i64) -> Result<Option<Duration>, EtcdError> {
        let v = self
            .call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))
            .await?;
        let result = v.get("result").unwrap_or(&v);
        let ttl = int(result.get("TTL"));
        Ok((ttl > 0).then(|| Duration::from_secs(u64::try_from(ttl).unwrap_or(1))))
    }

    /// Revokes `lease`, deleting the keys attached to it. A lease that is gone already is fine.
    pub async fn lease_revoke(&self, lease: i64) -> Result<(), EtcdError> {
        match self
            .call("/v3/lease/revoke", &json!({ "ID": lease.to_string() }))
            .await
        {
            Ok(_) => Ok(()),
            Err(EtcdError::Server { message, .. }) if message.contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn put_body(key: &str, value: &[u8], lease: i64) -> Value {
    let mut body = json!({ "key": b64(key.as_bytes()), "value": b64(value) });
    if lease != 0 {
        body["lease"] = Value::String(lease.to_string());
    }
    body
}

/// The manager's persisted state: its snapshot and the members' Peer addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredState {
    /// The manager's trees and heartbeats.
    pub snapshot: Snapshot,
    /// Node id to `host:port` of its Peer service (empty if never saved).
    pub addrs: BTreeMap<String, String>,
}

/// Keys of an [`EtcdStore`] / [`Election`] under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Keys {
    snapshot: String,
    addrs: String,
    leader: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let prefix = prefix.trim_end_matches('/');
        Self {
            snapshot: format!("{prefix}/snapshot"),
            addrs: format!("{prefix}/addrs"),
            leader: format!("{prefix}/leader"),
        }
    }
}

/// One state waiting to be written.
#[derive(Debug, Clone)]
struct Pending {
    seq: u64,
    snapshot: Vec<u8>,
    /// `None`: leave the stored addresses alone ([`Store::save`] knows none).
    addrs: Option<Vec<u8>>,
    /// Write only while this lease holds the leader key.
    fence: Option<i64>,
}

/// Where the writes of an [`EtcdStore`] go, and what is known of them.
struct StoreShared {
    client: EtcdClient,
    keys: Keys,
    /// The lease that must hold the leader key for a write to happen: `Some(0)` while not
    /// leader (writes are dropped), `None` for an unfenced store.
    fence: Option<watch::Receiver<i64>>,
    /// Sequence number of the last state handed to the writer.
    queued: AtomicU64,
    /// Sequence number of the last state the writer is done with (written or dropped).
    done: watch::Sender<u64>,
    /// States written.
    written: AtomicU64,
}

/// The manager's [`Snapshot`] and member addresses in etcd (see the [module docs](self)).
/// Cheap to clone; clones share the background writer, which ends when the last clone is
/// dropped.
#[derive(Clone)]
pub struct EtcdStore {
    shared: Arc<StoreShared>,
    writer: watch::Sender<Option<Pending>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("snapshot_key", &self.shared.keys.snapshot)
            .field("fenced", &self.shared.fence.is_some())
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// A store under `prefix` (e.g. [`DEFAULT_PREFIX`]), writing whenever asked. Starts the
    /// background writer, so it must be called within a Tokio runtime.
    pub fn new(client: EtcdClient, prefix: &str) -> Self {
        Self::build(client, prefix, None)
    }

    /// A store under `prefix` that writes only while the lease in `fence` (0: none, writes
    /// are dropped) holds `prefix`'s leader key (see [`Election`]). Must be called within a
    /// Tokio runtime.
    pub fn fenced(client: EtcdClient, prefix: &str, fence: watch::Receiver<i64>) -> Self {
        Self::build(client, prefix, Some(fence))
    }

    fn build(client: EtcdClient, prefix: &str, fence: Option<watch::Receiver<i64>>) -> Self {
        let shared = Arc::new(StoreShared {
            client,
            keys: Keys::new(prefix),
            fence,
            queued: AtomicU64::new(0),
            done: watch::channel(0).0,
            written: AtomicU64::new(0),
        });
        let (writer, rx) = watch::channel(None);
        let span = info_span!("etcd_store_writer", key = %shared.keys.snapshot);
        tokio::spawn(write_loop(Arc::clone(&shared), rx).instrument(span));
        Self { shared, writer }
    }

    /// The key the snapshot is stored under.
    pub fn snapshot_key(&self) -> &str {
        &self.shared.keys.snapshot
    }

    /// How many states the background writer has written so far.
    pub fn writes(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Reads the stored state (snapshot and addresses, atomically); `None` if no snapshot was
    /// ever stored.
    pub async fn load_state(&self) -> Result<Option<StoredState>, EtcdError> {
        load_state(&self.shared.client, &self.shared.keys).await
    }

    /// Hands `snapshot` and `addrs` to the background writer and returns at once (latest
    /// wins). Dropped if the store is fenced and not leader now.
    pub fn save_state(&self, snapshot: &Snapshot, addrs: &BTreeMap<String, String>) {
        match serde_json::to_vec(addrs) {
            Ok(addrs) => self.queue(snapshot, Some(addrs)),
            Err(e) => warn!(error = %e, "encoding the member addresses failed"),
        }
    }

    fn queue(&self, snapshot: &Snapshot, addrs: Option<Vec<u8>>) {
        let fence = match &self.shared.fence {
            None => None,
            Some(rx) => match *rx.borrow() {
                0 => {
                    debug!("not leader: snapshot not written");
                    return;
                }
                lease => Some(lease),
            },
        };
        let snapshot = match serde_json::to_vec(snapshot) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(error = %e, "encoding the snapshot failed");
                return;
            }
        };
        let seq = self.shared.queued.fetch_add(1, Ordering::SeqCst) + 1;
        self.writer.send_replace(Some(Pending {
            seq,
            snapshot,
            addrs,
            fence,
        }));
    }

    /// Waits until every state handed over so far was written (or dropped: superseded,
    /// fenced off), at most `timeout`. Returns whether it got there in time.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let target = self.shared.queued.load(Ordering::SeqCst);
        let mut done = self.shared.done.subscribe();
        tokio::time::timeout(timeout, done.wait_for(|d| *d >= target))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

async fn load_state(client: &EtcdClient, keys: &Keys) -> Result<Option<StoredState>, EtcdError> {
    let r = client
        .txn(
            &[],
            &[Op::Get(keys.snapshot.clone()), Op::Get(keys.addrs.clone())],
            &[],
        )
        .await?;
    let mut gets = r.gets.into_iter();
    let Some(snapshot) = gets.next().flatten() else {
        return Ok(None);
    };
    let snapshot: Snapshot =
        serde_json::from_slice(&snapshot.value).map_err(|e| EtcdError::Corrupt {
            key: keys.snapshot.clone(),
            reason: e.to_string(),
        })?;
    let addrs = match gets.next().flatten() {
        Some(kv) => serde_json::from_slice(&kv.value).map_err(|e| EtcdError::Corrupt {
            key: keys.addrs.clone(),
            reason: e.to_string(),
        })?,
        None => BTreeMap::new(),
    };
    Ok(Some(StoredState { snapshot, addrs }))
}

/// Writes the latest pending state, retrying with backoff while it fails and nothing newer
/// is waiting. Ends when every [`EtcdStore`] clone is dropped.
async fn write_loop(shared: Arc<StoreShared>, mut rx: watch::Receiver<Option<Pending>>) {
    while rx.changed().await.is_ok() {
        let Some(pending) = rx.borrow_and_update().clone() else {
            continue;
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            match write(&shared, &pending).await {
                Ok(true) => {
                    shared.written.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        seq = pending.seq,
                        bytes = pending.snapshot.len(),
                        "state written"
                    );
                    break;
                }
                Ok(false) => {
                    warn!(
                        seq = pending.seq,
                        "no longer leader (lease lost): state not written"
                    );
                    break;
                }
                Err(e) => {
                    warn!(error = %e, ?backoff, "writing the state to etcd failed: retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        changed = rx.changed() => {
                            // A newer state (or the end): handled by the outer loop.
                            if changed.is_err() {
                                return;
                            }
                            rx.mark_changed();
                            break;
                        }
                    }
                    backoff = (backoff * 2).min(WRITE_BACKOFF_MAX);
                }
            }
        }
        shared.done.send_replace(pending.seq);
    }
}

/// Writes one state; `Ok(false)` if the fence did not hold.
async fn write(shared: &StoreShared, pending: &Pending) -> Result<bool, EtcdError> {
    let keys = &shared.keys;
    let mut ops = vec![Op::Put {
        key: keys.snapshot.clone(),
        value: pending.snapshot.clone(),
        lease: 0,
    }];
    if let Some(addrs) = &pending.addrs {
        ops.push(Op::Put {
            key: keys.addrs.clone(),
            value: addrs.clone(),
            lease: 0,
        });
    }
    let compare: Vec<Compare> = pending
        .fence
        .map(|lease| Compare::Lease(keys.leader.clone(), lease))
        .into_iter()
        .collect();
    Ok(shared.client.txn(&compare, &ops, &[]).await?.succeeded)
}

impl Store for EtcdStore {
    /// Reads the stored snapshot on a helper thread with its own runtime and HTTP client, and
    /// blocks until it is read (callable inside or outside a runtime).
    fn load(&self) -> Result<Option<Snapshot>, StoreError> {
        let client = self
            .shared
            .client
            .fresh()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let keys = self.shared.keys.clone();
        let read = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| StoreError::Backend(format!("runtime for the etcd read: {e}")))?;
            runtime
                .block_on(load_state(&client, &keys))
                .map_err(|e| match e {
                    EtcdError::Corrupt { .. } => StoreError::Corrupt(e.to_string()),
                    e => StoreError::Backend(e.to_string()),
                })
        });
        let state = read
            .join()
            .map_err(|_| StoreError::Backend("the etcd read panicked".into()))??;
        Ok(state.map(|s| s.snapshot))
    }

    /// Hands the snapshot to the background writer (the stored addresses are left alone).
    fn save(&mut self, snapshot: &Snapshot) -> Result<(), StoreError> {
        self.queue(snapshot, None);
        Ok(())
    }
}

/// Leader election among managers sharing a prefix (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct Election {
    client: EtcdClient,
    key: String,
    my_addr: String,
    ttl: Duration,
}

/// The outcome of one [`Election::try_campaign`].
#[derive(Debug)]
pub enum Campaign {
    /// This manager is the leader now.
    Won(Leadership),
    /// Another manager leads, at this address (empty if its key vanished meanwhile).
    Lost {
        /// The leader's address.
        leader: String,
    },
}

/// Why a [`Leadership`] ended.
#[derive(Debug, Error)]
pub enum Lost {
    /// etcd says the lease is gone (expired or revoked).
    #[error("the lease expired")]
    Expired,
    /// The lease could not be renewed in time.
    #[error("the lease could not be renewed in time: {0}")]
    Unconfirmed(EtcdError),
    /// The leader key is gone or attached to another lease.
    #[error("the leader key is gone or someone else's")]
    KeyLost,
}

impl Election {
    /// An election under `prefix` (key `<prefix>/leader`) in which this manager stands as
    /// `my_addr` (the address members dial), with leases of `ttl` (whole seconds, etcd may
    /// raise it to its minimum, 2 s by default).
    pub fn new(client: EtcdClient, prefix: &str, my_addr: &str, ttl: Duration) -> Self {
        Self {
            client,
            key: Keys::new(prefix).leader,
            my_addr: my_addr.to_owned(),
            ttl: ttl.max(Duration::from_secs(1)),
        }
    }

    /// The leader key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// This manager's address.
    pub fn my_addr(&self) -> &str {
        &self.my_addr
    }

    /// The current leader's address, `None` if there is none.
    pub async fn leader(&self) -> Result<Option<String>, EtcdError> {
        Ok(self
            .client
            .get(&self.key)
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    /// One attempt: if nobody leads, grants a lease and creates the leader key with it.
    pub async fn try_campaign(&self) -> Result<Campaign, EtcdError> {
        if let Some(leader) = self.leader().await? {
            return Ok(Campaign::Lost { leader });
        }
        let asked = Instant::now();
        let (lease, ttl) = self.client.lease_grant(self.ttl).await?;
        let outcome = self
            .client
            .txn(
                &[Compare::Absent(self.key.clone())],
                &[Op::Put {
                    key: self.key.clone(),
                    value: self.my_addr.as_bytes().to_vec(),
                    lease,
                }],
                &[Op::Get(self.key.clone())],
            )
            .await;
        match outcome {
            Ok(r) if r.succeeded => {
                info!(key = %self.key, lease, ?ttl, "elected leader");
                Ok(Campaign::Won(Leadership {
                    client: self.client.clone(),
                    key: self.key.clone(),
                    lease,
                    ttl,
                    confirmed: asked,
                }))
            }
            other => {
                if let Err(e) = self.client.lease_revoke(lease).await {
                    debug!(lease, error = %e, "revoking the unused lease failed");
                }
                let r = other?;
                let leader = r
                    .gets
                    .into_iter()
                    .flatten()
                    .next()
                    .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
                    .unwrap_or_default();
                Ok(Campaign::Lost { leader })
            }
        }
    }

    /// Campaigns until elected: an attempt every third of the TTL; `observed` is told the
    /// leader seen at each attempt (`None` for none). etcd errors are logged and retried.
    pub async fn campaign(&self, observed: &watch::Sender<Option<String>>) -> Leadership {
        let every = self.ttl / 3;
        loop {
            match self.try_campaign().await {
                Ok(Campaign::Won(leadership)) => {
                    observed.send_replace(Some(self.my_addr.clone()));
                    return leadership;
                }
                Ok(Campaign::Lost { leader }) => {
                    let leader = (!leader.is_empty()).then_some(leader);
                    observed.send_if_modified(|current| {
                        let changed = *current != leader;
                        if changed {
                            debug!(leader = ?leader, "observed leader");
                            current.clone_from(&leader);
                        }
                        changed
                    });
                }
                Err(e) => warn!(error = %e, "campaign failed: retrying"),
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// This manager's leadership: a lease holding the leader key.
#[derive(Debug)]
pub struct Leadership {
    client: EtcdClient,
    key: String,
    lease: i64,
    ttl: Duration,
    /// When the last keep-alive that succeeded was sent (the lease lives at least a TTL
    /// from then).
    confirmed: Instant,
}

impl Leadership {
    /// The lease holding the leader key.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// The lease's TTL as granted.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Keeps the lease alive (a keep-alive and a check of the key every third of the TTL)
    /// until leadership is lost, and says why. Leadership counts as lost as soon as the lease
    /// can no longer be shown alive for another third of the TTL, i.e. before etcd could expire
    /// it and elect someone else.
    pub async fn keep(&mut self) -> Lost {
        let every = self.ttl / 3;
        let deadline_margin = self.ttl - every;
        loop {
            tokio::time::sleep(every).await;
            let sent = Instant::now();
            let renewed = match self.client.lease_keepalive(self.lease).await {
                Ok(Some(_)) => match self.client.get(&self.key).await {
                    Ok(Some(kv)) if kv.lease == self.lease => Ok(()),
                    Ok(_) => return Lost::KeyLost,
                    Err(e) => Err(e),
                },
                Ok(None) => return Lost::Expired,
                Err(e) => Err(e),
            };
            match renewed {
                Ok(()) => self.confirmed = sent,
                Err(e) => {
                    warn!(lease = self.lease, error = %e, "lease keep-alive failed");
                    if self.confirmed.elapsed() >= deadline_margin {
                        return Lost::Unconfirmed(e);
                    }
                }
            }
        }
    }

    /// Gives leadership up: revokes the lease, which deletes the leader key at once.
    pub async fn resign(self) -> Result<(), EtcdError> {
        info!(key = %self.key, lease = self.lease, "resigning leadership");
        self.client.lease_revoke(self.lease).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        for (given, want) in [
            ("127.0.0.1:2379", "http://127.0.0.1:2379"),
            ("http://etcd:2379/", "http://etcd:2379"),
        ] {
            assert_eq!(normalize_endpoint(given).ok().as_deref(), Some(want));
        }
        for bad in ["", "etcd", "https://etcd:2379", "http://etcd:0", "etcd:1/x"] {
            assert!(normalize_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ints_and_kvs() {
        assert_eq!(int(Some(&json!("42"))), 42);
        assert_eq!(int(Some(&json!(7))), 7);
        assert_eq!(int(None), 0);
        let kv = key_value(
            "/x",
            &json!({"key": "Zm9v", "value": "YmFy", "create_revision": "3", "lease": "9"}),
        )
        .ok();
        assert_eq!(
            kv,
            Some(KeyValue {
                key: b"foo".to_vec(),
                value: b"bar".to_vec(),
                create_revision: 3,
                mod_revision: 0,
                lease: 9,
            })
        );
    }
}
