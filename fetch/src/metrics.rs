//! Counters of where bytes came from, rendered in the Prometheus text format, and the HTTP
//! endpoint serving them (hyper, exact path, bounded connections and time).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;

/// Upper bounds (seconds) of the fetch latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The kinds of FUSE request counted in `arbor_fuse_requests_total{op}`, by index
/// ([`Metrics::fuse_request`]).
pub const FUSE_OPS: [&str; 8] = [
    "lookup",
    "getattr",
    "read",
    "readdir",
    "readlink",
    "getxattr",
    "listxattr",
    "other",
];

#[derive(Default, Clone, Copy)]
struct SourceStats {
    bytes: u64,
    requests: u64,
    errors: u64,
}

#[derive(Default, Clone, Copy)]
struct LayerStats {
    fetched: u64,
    data_len: u64,
}

/// What the fetcher counts (see the module docs).
#[derive(Default)]
pub struct Metrics {
    sources: Mutex<BTreeMap<&'static str, SourceStats>>,
    layers: Mutex<BTreeMap<String, LayerStats>>,
    latency: Mutex<([u64; BUCKETS.len()], u64, f64)>,
    pub chunk_mem_hits: AtomicU64,
    pub chunk_disk_hits: AtomicU64,
    pub chunk_fetched: AtomicU64,
    pub chunk_zero: AtomicU64,
    pub cache_corrupt: AtomicU64,
    pub verify_failures: AtomicU64,
    pub read_errors: AtomicU64,
    pub prefetch_bytes: AtomicU64,
    /// Compressed bytes fetched along with misses by the group read-ahead.
    pub group_read_ahead_bytes: AtomicU64,
    /// Compressed bytes fetched ahead of a reader moving forward through a layer.
    pub sequential_read_ahead_bytes: AtomicU64,
    /// Compressed bytes of learned start-up sets fetched at mount.
    pub learned_prefetch_bytes: AtomicU64,
    pub cache_bytes: AtomicU64,
    pub cache_chunks: AtomicU64,
    /// Chunks not written to the disk cache because the write-back queue was full.
    pub writeback_dropped: AtomicU64,
    /// Microseconds reads spent waiting for a fetch (summed over reads).
    pub read_wait_micros: AtomicU64,
    /// File bytes written into the kernel's page cache ahead of a reader going through a
    /// directory in order (FUSE_NOTIFY_STORE), and the files they made up.
    pub fuse_pushed_bytes: AtomicU64,
    pub fuse_pushed_files: AtomicU64,
    /// FUSE requests the layers answered, by kind (indexes of [`FUSE_OPS`]).
    pub fuse_requests: [AtomicU64; FUSE_OPS.len()],
}

impl Metrics {
    /// Records one source request.
    pub fn source(&self, kind: &'static str, bytes: u64, ok: bool, took: Duration) {
        {
            let mut s = self.sources.lock().unwrap_or_else(|e| e.into_inner());
            let e = s.entry(kind).or_default();
            e.requests += 1;
            e.bytes += bytes;
            if !ok {
                e.errors += 1;
            }
        }
        let secs = took.as_secs_f64();
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.0[i] += 1;
            }
        }
        h.1 += 1;
        h.2 += secs;
    }

    /// Registers a layer so its fetched share can be reported.
    pub fn layer(&self, digest: &str, data_len: u64) {
        let mut l = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        l.entry(digest.to_string()).or_default().data_len = data_len;
    }

    /// Counts compressed bytes fetched for a layer.
    pub fn layer_fetched(&self, digest: &str, bytes: u64) {
        let mut l = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        l.entry(digest.to_string()).or_default().fetched += bytes;
    }

    /// Counts one FUSE request of kind `FUSE_OPS[op]` (out of range: "other").
    pub fn fuse_request(&self, op: usize) {
        self.fuse_requests[op.min(FUSE_OPS.len() - 1)].fetch_add(1, Ordering::Relaxed);
    }

    /// FUSE requests of kind `op` (a [`FUSE_OPS`] name) answered so far.
    pub fn fuse_requests(&self, op: &str) -> u64 {
        FUSE_OPS
            .iter()
            .position(|o| *o == op)
            .map_or(0, |i| self.fuse_requests[i].load(Ordering::Relaxed))
    }

    /// Bytes fetched from sources of `kind` so far.
    pub fn source_bytes(&self, kind: &str) -> u64 {
        let s = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        s.get(kind).map_or(0, |e| e.bytes)
    }

    /// Requests made to sources of `kind` so far.
    pub fn source_requests(&self, kind: &str) -> u64 {
        let s = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        s.get(kind).map_or(0, |e| e.requests)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let sources = self
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        head(
            &mut o,
            "arbor_fetch_bytes_total",
            "counter",
            "Compressed bytes fetched, by source.",
        );
        for (k, s) in &sources {
            let _ = writeln!(o, "arbor_fetch_bytes_total{{source=\"{k}\"}} {}", s.bytes);
        }
        head(
            &mut o,
            "arbor_fetch_requests_total",
            "counter",
            "Range requests made, by source.",
        );
        for (k, s) in &sources {
            let _ = writeln!(
                o,
                "arbor_fetch_requests_total{{source=\"{k}\"}} {}",
                s.requests
            );
        }
        head(
            &mut o,
            "arbor_fetch_errors_total",
            "counter",
            "Failed range requests, by source.",
        );
        for (k, s) in &sources {
            let _ = writeln!(o, "arbor_fetch_errors_total{{source=\"{k}\"}} {}", s.errors);
        }
        head(
            &mut o,
            "arbor_chunk_reads_total",
            "counter",
            "Chunk reads by where the chunk came from (hit ratio = mem+disk over all).",
        );
        for (k, v) in [
            ("memory", &self.chunk_mem_hits),
            ("cache", &self.chunk_disk_hits),
            ("fetched", &self.chunk_fetched),
            ("zero", &self.chunk_zero),
        ] {
            let _ = writeln!(
                o,
                "arbor_chunk_reads_total{{from=\"{k}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        for (name, help, v) in [
            (
                "arbor_chunk_verify_failures_total",
                "Chunks that did not match their digest.",
                &self.verify_failures,
            ),
            (
                "arbor_cache_corrupt_total",
                "Cached chunks found corrupt and removed.",
                &self.cache_corrupt,
            ),
            (
                "arbor_read_errors_total",
                "Reads failed with EIO.",
                &self.read_errors,
            ),
            (
                "arbor_prefetch_bytes_total",
                "Compressed bytes fetched by background prefetch.",
                &self.prefetch_bytes,
            ),
            (
                "arbor_group_read_ahead_bytes_total",
                "Compressed bytes fetched along with a miss: the rest of its file and its directory's other files.",
                &self.group_read_ahead_bytes,
            ),
            (
                "arbor_sequential_read_ahead_bytes_total",
                "Compressed bytes fetched ahead of a reader moving forward through a layer.",
                &self.sequential_read_ahead_bytes,
            ),
            (
                "arbor_learned_prefetch_bytes_total",
                "Compressed bytes of learned start-up sets fetched when their layers were mounted.",
                &self.learned_prefetch_bytes,
            ),
            (
                "arbor_fuse_pushed_bytes_total",
                "File bytes written into the kernel's page cache ahead of a reader going through a directory in order.",
                &self.fuse_pushed_bytes,
            ),
            (
                "arbor_fuse_pushed_files_total",
                "Files written into the kernel's page cache ahead of a reader going through a directory in order.",
                &self.fuse_pushed_files,
            ),
            (
                "arbor_cache_writeback_dropped_total",
                "Chunks not written to the disk cache because the write-back queue was full (slow or full disk).",
                &self.writeback_dropped,
            ),
        ] {
            head(&mut o, name, "counter", help);
            let _ = writeln!(o, "{name} {}", v.load(Ordering::Relaxed));
        }
        head(
            &mut o,
            "arbor_read_wait_seconds_total",
            "counter",
            "Time reads spent waiting for a chunk to be fetched, summed over reads (what a start waits for the link).",
        );
        let _ = writeln!(
            o,
            "arbor_read_wait_seconds_total {}",
            self.read_wait_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        head(
            &mut o,
            "arbor_fuse_requests_total",
            "counter",
            "FUSE requests the kernel sent the layers, by operation (each is a round trip to the daemon).",
        );
        for (op, v) in FUSE_OPS.iter().zip(&self.fuse_requests) {
            let _ = writeln!(
                o,
                "arbor_fuse_requests_total{{op=\"{op}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        for (name, help, v) in [
            (
                "arbor_cache_bytes",
                "Bytes in the chunk cache.",
                &self.cache_bytes,
            ),
            (
                "arbor_cache_chunks",
                "Chunks in the chunk cache.",
                &self.cache_chunks,
            ),
        ] {
            head(&mut o, name, "gauge", help);
            let _ = writeln!(o, "{name} {}", v.load(Ordering::Relaxed));
        }
        let (buckets, count, sum) = *self.latency.lock().unwrap_or_else(|e| e.into_inner());
        head(
            &mut o,
            "arbor_fetch_duration_seconds",
            "histogram",
            "Latency of source range requests.",
        );
        for (b, n) in BUCKETS.iter().zip(buckets) {
            let _ = writeln!(o, "arbor_fetch_duration_seconds_bucket{{le=\"{b}\"}} {n}");
        }
        let _ = writeln!(
            o,
            "arbor_fetch_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(o, "arbor_fetch_duration_seconds_sum {sum}");
        let _ = writeln!(o, "arbor_fetch_duration_seconds_count {count}");
        let layers = self
            .layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        head(
            &mut o,
            "arbor_layer_fetched_bytes",
            "gauge",
            "Compressed bytes fetched per layer.",
        );
        for (d, l) in &layers {
            let _ = writeln!(
                o,
                "arbor_layer_fetched_bytes{{layer=\"{d}\"}} {}",
                l.fetched
            );
        }
        head(
            &mut o,
            "arbor_layer_fetched_ratio",
            "gauge",
            "Share of each layer's data fetched.",
        );
        for (d, l) in &layers {
            let r = if l.data_len == 0 {
                0.0
            } else {
                l.fetched as f64 / l.data_len as f64
            };
            let _ = writeln!(o, "arbor_layer_fetched_ratio{{layer=\"{d}\"}} {r:.4}");
        }
        o
    }
}

/// Connections served at the same time at most; further connections wait in the listen
/// backlog until one finishes (a scraper opens one at a time).
pub const MAX_CONNECTIONS: usize = 16;
/// Longest one connection may live, from accept to the end of the answer, whatever the
/// client does (slow headers, slow reads, keeping it open).
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// Limits of [`serve_with`].
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    pub max_connections: usize,
    pub connection_deadline: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: MAX_CONNECTIONS,
            connection_deadline: CONNECTION_DEADLINE,
        }
    }
}

/// A function rendering the metrics text.
pub type Render = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `render()` at `GET /metrics` on `listener` until the task is dropped, with the
/// default [`ServeLimits`].
pub async fn serve(listener: TcpListener, render: Render) {
    serve_with(listener, render, ServeLimits::default()).await
}

/// Serves `render()` over HTTP/1.1 (hyper): `GET` or `HEAD` of exactly `/metrics` (any
/// query) answers 200, any other path 404, any other method 405. Each connection is closed
/// after one answer or at `connection_deadline`; at most `max_connections` are served at once.
/// Accept errors (e.g. out of file descriptors) are logged and retried after a pause, never
/// in a busy loop.
pub async fn serve_with(listener: TcpListener, render: Render, limits: ServeLimits) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    loop {
        let Ok(permit) = std::sync::Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let render = std::sync::Arc::clone(&render);
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let render = std::sync::Arc::clone(&render);
                async move { Ok::<_, std::convert::Infallible>(answer(&req, &render)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .max_buf_size(16 << 10)
                .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
            // Dropping the connection future closes the socket.
            let _ = tokio::time::timeout(limits.connection_deadline, conn).await;
        });
    }
}

fn answer(
    req: &hyper::Request<hyper::body::Incoming>,
    render: &Render,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use hyper::{Method, StatusCode};
    let (status, body) = if req.uri().path() != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            "only /metrics is served\n".to_string(),
        )
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        (StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_string())
    } else {
        (StatusCode::OK, render())
    };
    let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}
