//! [`PeerService`]: the `arbor.v1.Peer` service a node serves its function-tree children from.
//!
//! A child asks for bytes `[offset, offset + length)` of a layer blob; the node looks the blob
//! up through its [`Provider`] (the verified, block-caching source of a layer it serves in that
//! function's tree) and streams the range back. The source may itself still be fetching from
//! the node's own parent or the registry, so the range is read in block-sized steps (see
//! [`PeerServiceOptions::step`]) and each step is streamed as soon as it is read, in pieces of
//! at most 256 KiB: the child gets the first bytes before the whole range is fetched. While a
//! step is pending the service sends a `waiting` keep-alive every 250 ms, so the child can tell
//! a working parent from a stalled one; a step that takes longer than
//! [`PeerServiceOptions::max_wait`] fails the request with `DEADLINE_EXCEEDED`, so a source
//! that never answers does not hold the child forever.
//!
//! Node-wide limits are shared by all requests: at most [`PeerServiceOptions::max_inflight`]
//! requests stream at once (more are refused with `RESOURCE_EXHAUSTED`), and the bytes sent go
//! through one token bucket of [`PeerServiceOptions::upload_limit`] bytes per second. Counters
//! for metrics are in [`PeerService::stats`].
//!
//! Nothing is verified here: the child checks every block against the layer's TOC block table.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbor_fetch::source::{BlobSource, SourceError, SourceErrorKind};
use arbor_proto::arbor::peer_server::{Peer, PeerServer};
use arbor_proto::arbor::{RangePiece, ReadRangeRequest};
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, debug_span};

/// The longest range one request may ask for.
pub const MAX_RANGE: u64 = 64 << 20;

/// The largest piece of data sent in one message.
pub const MAX_PIECE: usize = 256 << 10;

/// How often a `waiting` keep-alive is sent while the service waits for bytes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(250);

/// Default [`PeerServiceOptions::max_inflight`].
pub const DEFAULT_MAX_INFLIGHT: usize = 64;

/// Default [`PeerServiceOptions::step`].
pub const DEFAULT_STEP: u64 = 512 << 10;

/// Default [`PeerServiceOptions::max_wait`].
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(30);

/// At most this many node ids are counted separately in [`PeerServiceStats::bytes_by_node`];
/// the bytes of any further node are counted under [`OTHER_NODES`].
pub const MAX_TRACKED_NODES: usize = 1024;

/// The [`PeerServiceStats::bytes_by_node`] key of nodes past [`MAX_TRACKED_NODES`].
pub const OTHER_NODES: &str = "(other)";

/// The [`PeerServiceStats::bytes_by_node`] key of requests that named no node.
pub const UNKNOWN_NODE: &str = "(unknown)";

/// Node ids longer than this are cut (they are accounting keys, chosen by the client).
const MAX_NODE_ID: usize = 128;

/// Responses buffered per request before the task waits for the client to read.
const CHANNEL_DEPTH: usize = 4;

/// Where a node's Peer service finds the blobs it serves.
pub trait Provider: Send + Sync + 'static {
    /// The source of blob `digest` in `function`'s tree and the blob's size, or `None` when the
    /// node does not serve that blob in that tree (the request fails with `NOT_FOUND`).
    ///
    /// The source should be the node's verified, block-caching source of the layer: it may
    /// itself fetch from the node's own parent or the registry, which is how a parent streams
    /// what it is still receiving.
    fn source(&self, function: &str, digest: &str) -> Option<(Arc<dyn BlobSource>, u64)>;
}

/// Options of a [`PeerService`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerServiceOptions {
    /// Bytes per second all requests together may send; 0 is unlimited. The burst is
    /// `max(1 MiB, upload_limit / 10)`.
    pub upload_limit: u64,
    /// Requests streaming at once, node-wide; more are refused with `RESOURCE_EXHAUSTED`
    /// (0 is taken as 1).
    pub max_inflight: usize,
    /// A range is read from the source in steps that end on multiples of this many bytes,
    /// each sent as soon as it is read (0 is taken as 1; best the layers' block size).
    pub step: u64,
    /// The longest the service waits for one step from its source, keeping the child attached
    /// with keep-alives meanwhile. Past it the request fails with `DEADLINE_EXCEEDED` (a
    /// timeout to the child, which tries its next source); `Duration::ZERO` waits forever.
    pub max_wait: Duration,
    /// How long a request for a blob the node does not serve (yet) waits for it to appear,
    /// with keep-alives, before `NOT_FOUND`: in a burst a child often asks for a layer its
    /// parent is still preparing. `Duration::ZERO`: answer `NOT_FOUND` at once.
    pub layer_wait: Duration,
}

impl Default for PeerServiceOptions {
    fn default() -> PeerServiceOptions {
        PeerServiceOptions {
            upload_limit: 0,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            step: DEFAULT_STEP,
            max_wait: DEFAULT_MAX_WAIT,
            layer_wait: Duration::ZERO,
        }
    }
}

/// Counters of a [`PeerService`] (all but `inflight` only grow).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerServiceStats {
    /// `ReadRange` requests received.
    pub requests: u64,
    /// Requests refused as invalid (`INVALID_ARGUMENT`).
    pub refused: u64,
    /// Requests for a blob the node does not serve (`NOT_FOUND`).
    pub not_found: u64,
    /// Requests refused because too many were in flight (`RESOURCE_EXHAUSTED`).
    pub busy: u64,
    /// Requests whose source failed while streaming.
    pub failed: u64,
    /// Requests whose client went away before the end of the range.
    pub cancelled: u64,
    /// Requests streamed to the end.
    pub completed: u64,
    /// Requests streaming now.
    pub inflight: u64,
    /// Data bytes sent.
    pub bytes_sent: u64,
    /// Data bytes sent per requesting node id (at most [`MAX_TRACKED_NODES`] ids, then
    /// [`OTHER_NODES`]; requests without a node id count under [`UNKNOWN_NODE`]).
    pub bytes_by_node: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    refused: AtomicU64,
    not_found: AtomicU64,
    busy: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    completed: AtomicU64,
    inflight: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_by_node: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    fn sent(&self, node: &str, n: u64) {
        self.bytes_sent.fetch_add(n, Ordering::Relaxed);
        let mut m = self.bytes_by_node.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = m.get_mut(node) {
            *v += n;
        } else if m.len() < MAX_TRACKED_NODES {
            m.insert(node.to_string(), n);
        } else {
            *m.entry(OTHER_NODES.to_string()).or_insert(0) += n;
        }
    }

    fn snapshot(&self) -> PeerServiceStats {
        PeerServiceStats {
            requests: self.requests.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            not_found: self.not_found.load(Ordering::Relaxed),
            busy: self.busy.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            inflight: self.inflight.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_by_node: self
                .bytes_by_node
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// A node-wide upload limit: a token bucket of bytes, refilled at `rate` bytes per second up
/// to `burst`. A taker reserves its bytes at once (the balance may go negative) and waits until
/// the balance it left is paid back, so takers are served in the order they came.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    tokens: f64,
    last: Instant,
}

/// The longest single wait for tokens (a guard against absurd rates and balances).
const MAX_TOKEN_WAIT: Duration = Duration::from_secs(3600);

impl TokenBucket {
    /// A full bucket of `rate` bytes per second (`rate` > 0), burst `max(1 MiB, rate / 10)`.
    pub(crate) fn new(rate: u64) -> TokenBucket {
        let rate = rate.max(1) as f64;
        let burst = (rate / 10.0).max((1u64 << 20) as f64);
        TokenBucket {
            rate,
            burst,
            state: Mutex::new(BucketState {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// Takes `n` bytes at `now`; returns how long the taker must wait before sending them.
    fn reserve(&self, now: Instant, n: u64) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now > s.last {
            let refill = now.duration_since(s.last).as_secs_f64() * self.rate;
            s.tokens = (s.tokens + refill).min(self.burst);
            s.last = now;
        }
        s.tokens -= n as f64;
        if s.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::try_from_secs_f64(-s.tokens / self.rate)
                .unwrap_or(MAX_TOKEN_WAIT)
                .min(MAX_TOKEN_WAIT)
        }
    }

    /// Waits until `n` bytes may be sent.
    pub(crate) async fn acquire(&self, n: u64) {
        let wait = self.reserve(Instant::now(), n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

struct Inner<P: ?Sized> {
    provider: Arc<P>,
    step: u64,
    max_wait: Option<Duration>,
    layer_wait: Duration,
    max_inflight: usize,
    permits: Arc<Semaphore>,
    bucket: Option<TokenBucket>,
    counters: Counters,
}

/// The `arbor.v1.Peer` service; see the module docs.
///
/// Clones share everything (limits, counters): keep a clone to read [`PeerService::stats`]
/// after [`PeerService::into_server`].
pub struct PeerService<P: Provider + ?Sized> {
    inner: Arc<Inner<P>>,
}

impl<P: Provider + ?Sized> Clone for PeerService<P> {
    fn clone(&self) -> Self {
        PeerService {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<P: Provider + ?Sized> PeerService<P> {
    /// A service over the blobs `provider` names.
    pub fn new(provider: Arc<P>, opts: PeerServiceOptions) -> PeerService<P> {
        let max_inflight = opts.max_inflight.clamp(1, Semaphore::MAX_PERMITS);
        PeerService {
            inner: Arc::new(Inner {
                provider,
                step: opts.step.max(1),
                max_wait: (!opts.max_wait.is_zero()).then_some(opts.max_wait),
                layer_wait: opts.layer_wait,
                max_inflight,
                permits: Arc::new(Semaphore::new(max_inflight)),
                bucket: (opts.upload_limit > 0).then(|| TokenBucket::new(opts.upload_limit)),
                counters: Counters::default(),
            }),
        }
    }

    /// The tonic server of this service, to add to a `tonic::transport::Server`.
    pub fn into_server(self) -> PeerServer<Self> {
        PeerServer::new(self)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PeerServiceStats {
        self.inner.counters.snapshot()
    }

    /// The node-wide limit of requests in flight.
    pub fn max_inflight(&self) -> usize {
        self.inner.max_inflight
    }

    fn refuse(&self, message: String) -> Status {
        self.inner.counters.refused.fetch_add(1, Ordering::Relaxed);
        debug!(%message, "peer request refused");
        Status::invalid_argument(message)
    }
}

/// The status of a request for a blob the node does not serve in that tree.
fn not_served(digest: &str, function: &str) -> Status {
    Status::not_found(format!(
        "{digest} is not served in function {function:?}'s tree here"
    ))
}

/// The status a child gets when the node's source failed.
fn source_status(e: &SourceError) -> Status {
    let message = e.to_string();
    match e.kind {
        SourceErrorKind::Lacks => Status::not_found(message),
        // Corrupt: the node's own copy or upstream gave bytes that did not verify; the child
        // should try its next source, as for any upstream failure.
        SourceErrorKind::Timeout
        | SourceErrorKind::Unavailable
        | SourceErrorKind::Short
        | SourceErrorKind::Corrupt => Status::unavailable(message),
        SourceErrorKind::Refused => Status::failed_precondition(message),
    }
}

/// A node id as an accounting key: bounded in length, never empty.
fn node_key(node: &str) -> String {
    if node.is_empty() {
        return UNKNOWN_NODE.to_string();
    }
    let mut end = node.len().min(MAX_NODE_ID);
    while !node.is_char_boundary(end) {
        end -= 1;
    }
    node[..end].to_string()
}

type PieceSender = mpsc::Sender<Result<RangePiece, Status>>;

/// Runs `fut`, sending a `waiting` keep-alive every [`KEEPALIVE_INTERVAL`] until it is done.
/// `None` when the client went away (the future is dropped).
async fn with_keepalive<F: Future>(tx: &PieceSender, fut: F) -> Option<F::Output> {
    let mut tick =
        tokio::time::interval_at(Instant::now() + KEEPALIVE_INTERVAL, KEEPALIVE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return Some(out),
            _ = tx.closed() => return None,
            _ = tick.tick() => {
                let waiting = RangePiece { data: Bytes::new(), waiting: true };
                match tx.try_send(Ok(waiting)) {
                    // Full: data is already queued for the client, which is not stalled.
                    Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return None,
                }
            }
        }
    }
}

/// What became of a streamed request.
enum Outcome {
    Completed,
    Failed,
    Cancelled,
}

/// One request's streaming task.
struct Streamer<P: ?Sized> {
    inner: Arc<Inner<P>>,
    /// `None`: not served yet; waited for (`layer_wait`) before streaming.
    source: Option<Arc<dyn BlobSource>>,
    function: String,
    digest: String,
    node: String,
    offset: u64,
    end: u64,
    /// The request's in-flight slot, freed (and `inflight` lowered) before `tx` is dropped, so
    /// the slot is free by the time the client sees the end of the stream.
    permit: Option<OwnedSemaphorePermit>,
    tx: PieceSender,
}

impl<P: Provider + ?Sized> Streamer<P> {
    async fn run(mut self) {
        let started = Instant::now();
        let outcome = self.stream().await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        // Counted before `tx` is dropped (the client sees the end of the stream after this).
        let c = &self.inner.counters;
        match outcome {
            Outcome::Completed => {
                c.completed.fetch_add(1, Ordering::Relaxed);
                debug!(elapsed_ms, "peer range sent");
            }
            // Counted in `fail`, before the client is told.
            Outcome::Failed => debug!(elapsed_ms, "peer range failed"),
            Outcome::Cancelled => {
                c.cancelled.fetch_add(1, Ordering::Relaxed);
                debug!(elapsed_ms, "peer client went away");
            }
        }
        drop(self.permit.take());
        c.inflight.fetch_sub(1, Ordering::Relaxed);
    }

    /// The blob's source, waiting (with keep-alives, up to `layer_wait`) for the node to start
    /// serving it; `Err` is the outcome when it does not (or the range is outside it).
    async fn source(&self) -> Result<Arc<dyn BlobSource>, Outcome> {
        if let Some(s) = &self.source {
            return Ok(Arc::clone(s));
        }
        let inner = &self.inner;
        let wait = async {
            let deadline = Instant::now() + inner.layer_wait;
            loop {
                if let Some(found) = inner.provider.source(&self.function, &self.digest) {
                    return Some(found);
                }
                if Instant::now() >= deadline {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        match with_keepalive(&self.tx, wait).await {
            None => Err(Outcome::Cancelled),
            Some(None) => {
                inner.counters.not_found.fetch_add(1, Ordering::Relaxed);
                debug!(wait = ?inner.layer_wait, "blob not served here");
                let _ = self
                    .tx
                    .send(Err(not_served(&self.digest, &self.function)))
                    .await;
                Err(Outcome::Failed)
            }
            Some(Some((_, size))) if self.end > size => {
                inner.counters.refused.fetch_add(1, Ordering::Relaxed);
                let status = Status::invalid_argument(format!(
                    "range {}..{} is outside the blob ({size} bytes)",
                    self.offset, self.end
                ));
                let _ = self.tx.send(Err(status)).await;
                Err(Outcome::Failed)
            }
            Some(Some((source, _))) => Ok(source),
        }
    }

    async fn stream(&self) -> Outcome {
        let source = match self.source().await {
            Ok(s) => s,
            Err(outcome) => return outcome,
        };
        let mut pos = self.offset;
        while pos < self.end {
            // Steps end on multiples of `step` (block boundaries when it is the block size), so
            // each read covers whole blocks but the first and last.
            let step = self.inner.step;
            let stop = (pos / step)
                .saturating_add(1)
                .saturating_mul(step)
                .min(self.end);
            let n = stop - pos;
            let read = source.read_range(&self.digest, pos, n);
            let read = async {
                match self.inner.max_wait {
                    Some(max) => tokio::time::timeout(max, read).await.ok(),
                    None => Some(read.await),
                }
            };
            let data = match with_keepalive(&self.tx, read).await {
                None => return Outcome::Cancelled,
                Some(None) => {
                    let wait = self.inner.max_wait.unwrap_or_default();
                    debug!(pos, ?wait, "peer source gave nothing in time");
                    let status = Status::deadline_exceeded(format!(
                        "{}: no bytes at {pos} within {wait:?}",
                        source.kind()
                    ));
                    return self.fail(status).await;
                }
                Some(Some(Ok(d))) if d.len() as u64 == n => d,
                Some(Some(Ok(d))) => {
                    let e = SourceError::new(
                        SourceErrorKind::Short,
                        source.kind(),
                        format!("asked for {n} bytes at {pos}, got {}", d.len()),
                    );
                    return self.fail_source(&e).await;
                }
                Some(Some(Err(e))) => return self.fail_source(&e).await,
            };
            if !self.send(data).await {
                return Outcome::Cancelled;
            }
            pos += n;
        }
        Outcome::Completed
    }

    /// Sends `data` in pieces, each after its upload tokens; false when the client went away.
    async fn send(&self, data: Bytes) -> bool {
        let mut at = 0;
        while at < data.len() {
            let piece = data.slice(at..data.len().min(at + MAX_PIECE));
            at += piece.len();
            let n = piece.len() as u64;
            let paced = match &self.inner.bucket {
                Some(bucket) => with_keepalive(&self.tx, bucket.acquire(n)).await.is_some(),
                None => true,
            };
            if !paced {
                return false;
            }
            let msg = RangePiece {
                data: piece,
                waiting: false,
            };
            if self.tx.send(Ok(msg)).await.is_err() {
                return false;
            }
            self.inner.counters.sent(&self.node, n);
        }
        true
    }

    async fn fail_source(&self, e: &SourceError) -> Outcome {
        debug!(kind = %e.kind, error = %e, "peer source failed");
        self.fail(source_status(e)).await
    }

    async fn fail(&self, status: Status) -> Outcome {
        self.inner.counters.failed.fetch_add(1, Ordering::Relaxed);
        // The client may be gone already; nothing more to do then.
        let _ = self.tx.send(Err(status)).await;
        Outcome::Failed
    }
}

#[tonic::async_trait]
impl<P: Provider + ?Sized> Peer for PeerService<P> {
    type ReadRangeStream = ReceiverStream<Result<RangePiece, Status>>;

    async fn read_range(
        &self,
        request: Request<ReadRangeRequest>,
    ) -> Result<Response<Self::ReadRangeStream>, Status> {
        let req = request.into_inner();
        let span = debug_span!(
            "peer_serve_range",
            function = %req.function,
            digest = %req.digest,
            offset = req.offset,
            length = req.length,
            node = %req.node,
        );
        let c = &self.inner.counters;
        c.requests.fetch_add(1, Ordering::Relaxed);
        let entered = span.enter();
        if req.digest.is_empty() {
            return Err(self.refuse("digest is empty".to_string()));
        }
        if req.length == 0 {
            return Err(self.refuse("length is 0".to_string()));
        }
        if req.length > MAX_RANGE {
            return Err(self.refuse(format!(
                "length {} is over the limit of {MAX_RANGE} bytes",
                req.length
            )));
        }
        let found = self.inner.provider.source(&req.function, &req.digest);
        if found.is_none() && self.inner.layer_wait.is_zero() {
            c.not_found.fetch_add(1, Ordering::Relaxed);
            debug!("blob not served here");
            return Err(not_served(&req.digest, &req.function));
        }
        let Some(end) = req.offset.checked_add(req.length) else {
            return Err(self.refuse(format!("range {}+{} overflows", req.offset, req.length)));
        };
        if let Some((_, size)) = &found
            && end > *size
        {
            return Err(self.refuse(format!(
                "range {}+{} is outside the blob ({size} bytes)",
                req.offset, req.length
            )));
        }
        let Ok(permit) = Arc::clone(&self.inner.permits).try_acquire_owned() else {
            c.busy.fetch_add(1, Ordering::Relaxed);
            debug!(
                max = self.inner.max_inflight,
                "too many peer requests in flight"
            );
            return Err(Status::resource_exhausted(format!(
                "{} requests in flight",
                self.inner.max_inflight
            )));
        };
        c.inflight.fetch_add(1, Ordering::Relaxed);
        debug!("serving peer range");
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let streamer = Streamer {
            inner: Arc::clone(&self.inner),
            source: found.map(|(s, _)| s),
            function: req.function,
            digest: req.digest,
            node: node_key(&req.node),
            offset: req.offset,
            end,
            permit: Some(permit),
            tx,
        };
        drop(entered);
        tokio::spawn(streamer.run().instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn bucket_burst_then_rate() {
        let b = TokenBucket::new(4 * MIB);
        let t0 = Instant::now();
        // Starts full: the burst (1 MiB) goes at once.
        assert_eq!(b.reserve(t0, MIB), Duration::ZERO);
        // Then the balance is negative: 1 MiB more waits 1/4 s.
        let w = b.reserve(t0, MIB);
        assert!((w.as_secs_f64() - 0.25).abs() < 1e-6, "{w:?}");
        // The next taker queues behind it.
        let w = b.reserve(t0, MIB);
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-6, "{w:?}");
        // After 0.5 s the debt is paid: a small taker goes at once, a big one waits its share.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.reserve(t1, 0), Duration::ZERO);
        let w = b.reserve(t1, 2 * MIB);
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-6, "{w:?}");
        // A long idle time refills only up to the burst.
        let t2 = t1 + Duration::from_secs(100);
        assert_eq!(b.reserve(t2, MIB), Duration::ZERO);
        let w = b.reserve(t2, MIB / 4);
        assert!((w.as_secs_f64() - 1.0 / 16.0).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn bucket_burst_is_a_tenth_of_a_big_rate() {
        let b = TokenBucket::new(100 * MIB);
        let t0 = Instant::now();
        assert_eq!(b.reserve(t0, 10 * MIB), Duration::ZERO);
        assert!(b.reserve(t0, 1) > Duration::ZERO);
    }

    #[test]
    fn bucket_survives_absurd_inputs() {
        let b = TokenBucket::new(1);
        let t0 = Instant::now();
        assert_eq!(b.reserve(t0, u64::MAX), MAX_TOKEN_WAIT);
        // Time going backwards is ignored.
        let _ = b.reserve(t0 - Duration::from_millis(5), 1);
    }

    #[tokio::test]
    async fn bucket_paces_in_real_time() {
        let b = TokenBucket::new(8 * MIB);
        let t0 = std::time::Instant::now();
        // 1 MiB burst, then 2 MiB at 8 MiB/s: about 250 ms.
        for _ in 0..12 {
            b.acquire(256 << 10).await;
        }
        let e = t0.elapsed();
        assert!(e >= Duration::from_millis(200), "{e:?}");
        assert!(e < Duration::from_secs(2), "{e:?}");
    }

    #[test]
    fn node_keys_are_bounded() {
        assert_eq!(node_key(""), UNKNOWN_NODE);
        assert_eq!(node_key("n1"), "n1");
        assert_eq!(node_key(&"x".repeat(1000)).len(), MAX_NODE_ID);
        let s = "é".repeat(200);
        assert!(node_key(&s).len() <= MAX_NODE_ID);
    }

    #[test]
    fn per_node_bytes_are_bounded() {
        let c = Counters::default();
        for i in 0..MAX_TRACKED_NODES + 10 {
            c.sent(&format!("n{i}"), 1);
        }
        c.sent("n0", 5);
        let s = c.snapshot();
        assert_eq!(s.bytes_by_node.len(), MAX_TRACKED_NODES + 1);
        assert_eq!(s.bytes_by_node[OTHER_NODES], 10);
        assert_eq!(s.bytes_by_node["n0"], 6);
        assert_eq!(s.bytes_sent, MAX_TRACKED_NODES as u64 + 15);
    }

    #[test]
    fn source_errors_map_to_statuses() {
        let st = |k| source_status(&SourceError::new(k, "x", "y")).code();
        assert_eq!(st(SourceErrorKind::Lacks), tonic::Code::NotFound);
        assert_eq!(st(SourceErrorKind::Timeout), tonic::Code::Unavailable);
        assert_eq!(st(SourceErrorKind::Unavailable), tonic::Code::Unavailable);
        assert_eq!(st(SourceErrorKind::Short), tonic::Code::Unavailable);
        assert_eq!(st(SourceErrorKind::Corrupt), tonic::Code::Unavailable);
        assert_eq!(
            st(SourceErrorKind::Refused),
            tonic::Code::FailedPrecondition
        );
    }
}
