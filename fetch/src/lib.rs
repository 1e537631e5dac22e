//! Chunks on demand: where the bytes of a lazily mounted layer come from.
//!
//! A read of file bytes becomes a read of chunks ([`arbor_format::index::Chunk`]); the
//! [`fetcher::Fetcher`] serves each chunk from, in order:
//! 1. the in-memory cache of recently used chunks ([`memcache`]),
//! 2. the node-wide on-disk chunk cache ([`cache`]), content-addressed by chunk digest,
//! 3. a [`source::BlobSource`] (the registry today; a parent in a function tree later),
//!    fetching a block-aligned window of the blob with one Range request, at most one request
//!    in flight per window however many readers wait (single flight).
//!
//! Every chunk is verified against its sha256 before it is returned or stored, wherever it
//! came from. [`prefetch`] walks a layer's prefetch section, then the rest, in the
//! background, a learned start-up set first ([`learn`] records one from a mount's first reads).
//! [`metrics`] counts all of it and renders Prometheus text.
//! [`router`] tries blob sources in order, each within a deadline (parent, grandparent, then
//! registry); [`blocks`] keeps a function tree's layers as raw blob blocks proved against the
//! TOC's block table, which is what a node reads from its parent and serves its children.
//! [`nice`] runs background work (cache writers, a layer's proof) at a lower CPU priority.

pub mod blocks;
pub mod cache;
pub mod fetcher;
pub mod learn;
pub mod memcache;
pub mod metrics;
pub mod nice;
pub mod prefetch;
pub mod router;
pub mod source;
pub mod toc;

pub use cache::ChunkCache;
pub use fetcher::{Fetcher, FetcherOptions, LayerHandle};
pub use metrics::Metrics;
pub use source::{BlobSource, SourceError};

/// Parses a byte size: a number with an optional unit (`b`, `k`/`kb`/`kib`, `m`/`mb`/`mib`,
/// `g`/`gb`/`gib`; all binary multiples), e.g. `512KiB`, `10G`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
pub(crate) mod testutil;
