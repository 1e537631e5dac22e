//! Counters of where bytes came from, rendered in the Prometheus text format, and a minimal
//! HTTP endpoint serving them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Upper bounds (seconds) of the fetch latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
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
    pub cache_bytes: AtomicU64,
    pub cache_chunks: AtomicU64,
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
        ] {
            head(&mut o, name, "counter", help);
            let _ = writeln!(o, "{name} {}", v.load(Ordering::Relaxed));
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

/// Serves `render()` at `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    render: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let render = std::sync::Arc::clone(&render);
        tokio::spawn(async move {
            // Read the request head (it may arrive in several segments), at most 8 KiB.
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk)).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let req = String::from_utf8_lossy(&buf);
            let (status, body) = if req.starts_with("GET /metrics") {
                ("200 OK", render())
            } else {
                ("404 Not Found", "only /metrics is served\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
