//! Blob sources: anything that can return bytes `[offset, offset + len)` of a blob.
//!
//! The registry is one source; a function-tree parent is another (`arbor-peer`). Sources do
//! not verify content: the layers above do (the block table in [`crate::blocks`], chunk digests
//! in the fetcher), so a source that lies can only cause an error or a refetch, never wrong
//! bytes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arbor_oci::Store;
use bytes::Bytes;
use tokio::sync::Semaphore;

/// What kind of failure a source read was, for choosing what to try next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceErrorKind {
    /// The source does not have these bytes (404, a peer without the block).
    Lacks,
    /// The source did not answer in time.
    Timeout,
    /// Connection failure, 5xx, anything transient.
    Unavailable,
    /// 401/403, a bad request: retrying elsewhere may help, retrying here will not.
    Refused,
    /// The source answered with the wrong number of bytes.
    Short,
    /// The bytes did not match the layer's digests (a peer or registry that lied, or a
    /// damaged local copy).
    Corrupt,
}

impl SourceErrorKind {
    /// A short lowercase name for logs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceErrorKind::Lacks => "lacks",
            SourceErrorKind::Timeout => "timeout",
            SourceErrorKind::Unavailable => "unavailable",
            SourceErrorKind::Refused => "refused",
            SourceErrorKind::Short => "short",
            SourceErrorKind::Corrupt => "corrupt",
        }
    }
}

impl std::fmt::Display for SourceErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed source read (the message names the source and what failed).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct SourceError {
    pub kind: SourceErrorKind,
    pub source_name: String,
    pub message: String,
}

impl SourceError {
    pub fn new(
        kind: SourceErrorKind,
        source_name: impl Into<String>,
        message: impl Into<String>,
    ) -> SourceError {
        SourceError {
            kind,
            source_name: source_name.into(),
            message: message.into(),
        }
    }
}

/// Classifies an image store error.
fn classify(e: &arbor_oci::Error) -> SourceErrorKind {
    use arbor_oci::Error as E;
    match e {
        E::NotFound(_) => SourceErrorKind::Lacks,
        E::Status { status, .. } => match *status {
            404 | 410 => SourceErrorKind::Lacks,
            416 => SourceErrorKind::Short,
            408 => SourceErrorKind::Timeout,
            429 => SourceErrorKind::Unavailable,
            s if s >= 500 => SourceErrorKind::Unavailable,
            s if (400..500).contains(&s) => SourceErrorKind::Refused,
            _ => SourceErrorKind::Unavailable,
        },
        E::Auth { .. } | E::Credentials(_) | E::Reference { .. } => SourceErrorKind::Refused,
        E::Http { source, .. } if source.is_timeout() => SourceErrorKind::Timeout,
        E::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => SourceErrorKind::Lacks,
            std::io::ErrorKind::UnexpectedEof => SourceErrorKind::Short,
            std::io::ErrorKind::TimedOut => SourceErrorKind::Timeout,
            std::io::ErrorKind::PermissionDenied => SourceErrorKind::Refused,
            _ => SourceErrorKind::Unavailable,
        },
        // Http (connect, body), BadResponse, DigestMismatch, Malformed: transient or at
        // least not known to be this source's final answer.
        _ => SourceErrorKind::Unavailable,
    }
}

/// A boxed future of a source read.
pub type ReadFuture<'a> = Pin<Box<dyn Future<Output = Result<Bytes, SourceError>> + Send + 'a>>;

/// Something that serves byte ranges of blobs.
pub trait BlobSource: Send + Sync + 'static {
    /// A short name for metrics and logs (`registry`, `peer`).
    fn kind(&self) -> &'static str;
    /// Exactly `len` bytes of blob `digest` from `offset`, or an error.
    fn read_range<'a>(&'a self, digest: &'a str, offset: u64, len: u64) -> ReadFuture<'a>;
    /// Whether every byte this source returns stays on the node's disk, read again (and
    /// verified again) on request without the network: a function tree's
    /// [`crate::blocks::BlockSource`]. The chunks of a layer read through such a source are
    /// not copied into the chunk cache: a chunk evicted from memory is decoded again from
    /// the kept blob, so the node keeps one (compressed) copy and writes it once.
    fn keeps_blob(&self) -> bool {
        false
    }
}

/// Per-registry concurrency limits, shared by every source of a process.
#[derive(Default)]
pub struct Limits {
    per_host: usize,
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Limits {
    /// At most `per_host` requests in flight to any one registry host.
    pub fn new(per_host: usize) -> Arc<Limits> {
        Arc::new(Limits {
            per_host: per_host.max(1),
            hosts: Mutex::new(HashMap::new()),
        })
    }

    fn for_host(&self, host: &str) -> Arc<Semaphore> {
        let mut m = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            m.entry(host.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_host))),
        )
    }
}

/// Reads ranges through an image [`Store`] (a registry repository or an OCI layout), with
/// the registry's concurrency limit.
pub struct StoreSource {
    store: Store,
    permits: Arc<Semaphore>,
}

impl StoreSource {
    pub fn new(store: Store, limits: &Limits) -> StoreSource {
        let host = match &store {
            Store::Registry { reference, .. } => reference.endpoint().to_string(),
            Store::Layout { layout, .. } => layout.dir().display().to_string(),
        };
        StoreSource {
            permits: limits.for_host(&host),
            store,
        }
    }
}

impl BlobSource for StoreSource {
    fn kind(&self) -> &'static str {
        match self.store {
            Store::Registry { .. } => "registry",
            Store::Layout { .. } => "layout",
        }
    }

    fn read_range<'a>(&'a self, digest: &'a str, offset: u64, len: u64) -> ReadFuture<'a> {
        Box::pin(async move {
            let _permit = self.permits.acquire().await.map_err(|e| {
                SourceError::new(SourceErrorKind::Unavailable, self.kind(), e.to_string())
            })?;
            let data = self
                .store
                .blob_range(digest, offset, len)
                .await
                .map_err(|e| {
                    SourceError::new(classify(&e), self.kind(), arbor_oci::error::chain(&e))
                })?;
            if data.len() as u64 != len {
                return Err(SourceError::new(
                    SourceErrorKind::Short,
                    self.kind(),
                    format!("asked for {len} bytes at {offset}, got {}", data.len()),
                ));
            }
            Ok(data)
        })
    }
}

/// A blocking [`std::io::Read`] of a whole blob through a [`BlobSource`], in `step`-byte range
/// reads (for a blocking thread: each read waits on `rt`; never call it on a runtime thread).
/// It does not verify: whoever reads it checks the digest.
pub struct SourceReader {
    source: Arc<dyn BlobSource>,
    digest: String,
    size: u64,
    pos: u64,
    step: u64,
    buf: Bytes,
    rt: tokio::runtime::Handle,
}

impl SourceReader {
    pub fn new(
        source: Arc<dyn BlobSource>,
        digest: &str,
        size: u64,
        step: u64,
        rt: tokio::runtime::Handle,
    ) -> SourceReader {
        SourceReader {
            source,
            digest: digest.to_string(),
            size,
            pos: 0,
            step: step.max(1),
            buf: Bytes::new(),
            rt,
        }
    }
}

impl std::io::Read for SourceReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            if self.pos >= self.size || out.is_empty() {
                return Ok(0);
            }
            let len = self.step.min(self.size - self.pos);
            let data = self
                .rt
                .block_on(self.source.read_range(&self.digest, self.pos, len))
                .map_err(std::io::Error::other)?;
            if data.len() as u64 != len {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{}: short read at {}", self.source.kind(), self.pos),
                ));
            }
            self.pos += len;
            self.buf = data;
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        let _ = self.buf.split_to(n);
        Ok(n)
    }
}
