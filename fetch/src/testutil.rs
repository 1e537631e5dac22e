//! Test helpers: incompressible content and in-memory layers with real zstd frames.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arbor_format::index::{Chunk, IndexEntry, LayerIndex};
use arbor_format::tarstream::EntryKind;
use bytes::Bytes;

use crate::fetcher::LayerHandle;
use crate::source::{BlobSource, ReadFuture};

/// `n` pseudo-random bytes (xorshift from `state`) that do not compress.
pub fn test_noise(state: u64, n: usize) -> Vec<u8> {
    let mut x = state | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `size` bytes that do not compress, different for each `seed`.
pub fn noise(seed: u64, size: u64) -> Vec<u8> {
    test_noise(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), size as usize)
}

/// An in-memory blob source counting its requests.
pub struct MemBlob {
    pub blob: Vec<u8>,
    pub reads: AtomicUsize,
    /// Bytes served.
    pub bytes: AtomicU64,
    /// What [`BlobSource::keeps_blob`] answers (a stand-in for a function tree's block store).
    pub kept: bool,
}

impl BlobSource for MemBlob {
    fn kind(&self) -> &'static str {
        "mem"
    }
    fn keeps_blob(&self) -> bool {
        self.kept
    }
    fn read_range<'a>(&'a self, _digest: &'a str, offset: u64, len: u64) -> ReadFuture<'a> {
        Box::pin(async move {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.bytes.fetch_add(len, Ordering::SeqCst);
            // A range past the blob's end is answered short, as a lying source would.
            let end = ((offset + len) as usize).min(self.blob.len());
            let start = (offset as usize).min(end);
            Ok(Bytes::copy_from_slice(&self.blob[start..end]))
        })
    }
}

/// A layer of `n` one-chunk files `d/f000`... (file `i` holds `noise(i, size)`) whose frames
/// are real zstd frames, served from memory.
pub fn encoded_layer(n: usize, size: u64, unit: u64) -> (Arc<LayerHandle>, Arc<MemBlob>) {
    encoded_layer_kept(n, size, unit, false)
}

/// [`encoded_layer`] whose source says whether it keeps the blob on disk.
pub fn encoded_layer_kept(
    n: usize,
    size: u64,
    unit: u64,
    kept: bool,
) -> (Arc<LayerHandle>, Arc<MemBlob>) {
    let mut blob = Vec::new();
    let entries = (0..n)
        .map(|i| {
            let name = format!("d/f{i:03}");
            let data = noise(i as u64, size);
            let frame = zstd::bulk::compress(&data, 3).expect("zstd");
            let mut e = IndexEntry::bare(EntryKind::Regular, &name, "");
            e.size = size;
            e.chunks = vec![Chunk {
                file_offset: 0,
                size,
                blob_offset: blob.len() as u64,
                blob_end: (blob.len() + frame.len()) as u64,
                digest: Some(arbor_format::Digest::of(&data)),
                zeros: false,
            }];
            blob.extend_from_slice(&frame);
            e
        })
        .collect();
    let index = LayerIndex {
        entries,
        data_end: blob.len() as u64,
        arbor: None,
    };
    let src = Arc::new(MemBlob {
        blob,
        reads: AtomicUsize::new(0),
        bytes: AtomicU64::new(0),
        kept,
    });
    let l = LayerHandle::new(
        "sha256:01",
        src.blob.len() as u64,
        Arc::new(index),
        vec![Arc::clone(&src) as Arc<dyn BlobSource>],
        unit,
    );
    (Arc::new(l), src)
}
