//! Blob sources: anything that can return bytes `[offset, offset + len)` of a blob.
//!
//! The registry is one source; a function-tree parent will be another. Sources do not
//! verify content: the fetcher does, above all sources, so a source that lies can only cause
//! an error, never wrong bytes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arbor_oci::Store;
use bytes::Bytes;
use tokio::sync::Semaphore;

/// A failed source read (the message names the source and what failed).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct SourceError {
    pub source_name: String,
    pub message: String,
}

/// A boxed future of a source read.
pub type ReadFuture<'a> = Pin<Box<dyn Future<Output = Result<Bytes, SourceError>> + Send + 'a>>;

/// Something that serves byte ranges of blobs.
pub trait BlobSource: Send + Sync + 'static {
    /// A short name for metrics and logs (`registry`, `peer`).
    fn kind(&self) -> &'static str;
    /// Exactly `len` bytes of blob `digest` from `offset`, or an error.
    fn read_range<'a>(&'a self, digest: &'a str, offset: u64, len: u64) -> ReadFuture<'a>;
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
            let _permit = self.permits.acquire().await.map_err(|e| SourceError {
                source_name: self.kind().into(),
                message: e.to_string(),
            })?;
            let data = self
                .store
                .blob_range(digest, offset, len)
                .await
                .map_err(|e| SourceError {
                    source_name: self.kind().into(),
                    message: arbor_oci::error::chain(&e),
                })?;
            if data.len() as u64 != len {
                return Err(SourceError {
                    source_name: self.kind().into(),
                    message: format!("asked for {len} bytes at {offset}, got {}", data.len()),
                });
            }
            Ok(data)
        })
    }
}
