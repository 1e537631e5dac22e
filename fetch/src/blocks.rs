//! Raw blob blocks for function trees: a layer's compressed bytes kept block by block, each
//! block verified against the TOC's block table before it is used, kept or served.
//!
//! A node in a function tree serves its children the blob's own bytes (not decoded chunks), so
//! a child can check them without decompressing and forward them the moment they land. The
//! unit is the block of the `arbor` TOC extension (`blockSize`, 512 KiB by default): `blocks[i]`
//! is the sha256 of `blob[i·blockSize, min((i+1)·blockSize, dataLength))` (docs/format.md §5.2).
//!
//! [`BlockSource`] stands where a layer's blob source stands (it is a [`BlobSource`]): a read
//! of `[a, b)` becomes a read of the blocks covering it. Blocks already on disk are read and
//! verified again (a damaged copy is fetched anew, never served); the missing ones are fetched
//! from the layer's [`Router`] (parent, grandparent, registry) in contiguous runs, one fetch per
//! block however many readers want it (single flight), verified, written to the node's
//! [`BlockStore`], and returned. When a run fails verification the route that served it is
//! reported to the router ([`Router::report_bad`]), which skips it for a while, and the run is
//! fetched once more from the next route; bytes that fail twice are an error
//! ([`SourceErrorKind::Corrupt`]), never data.
//!
//! The same `BlockSource` is what the node's peer service reads from when a child asks: a
//! block the node is still fetching is waited for (single flight) and sent as soon as it is
//! verified, so a tree streams a start-up set down its levels instead of storing and forwarding
//! whole layers. Ranges past the block table's `dataLength` (the TOC and footer, which the TOC
//! digest covers) pass through to the router unchanged.
//!
//! On disk a layer's blocks are one sparse file named by the blob digest; which blocks it holds
//! is kept in memory. After a restart the file's blocks are unknown and proved one by one on
//! first use (read and hashed: a hole hashes wrong and is fetched).

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arbor_format::Digest;
use arbor_format::index::LayerIndex;
use bytes::{Bytes, BytesMut};
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::router::Router;
use crate::source::{BlobSource, ReadFuture, SourceError, SourceErrorKind};

/// The block table of a layer (the `arbor` TOC extension's `blockSize`, `dataLength`, `blocks`).
#[derive(Debug, Clone)]
pub struct BlockTable {
    pub block_size: u64,
    pub data_length: u64,
    pub digests: Arc<[Digest]>,
}

impl BlockTable {
    /// The table of a validated index, or `None` for a layer without the `arbor` extension
    /// (an eStargz or plain zstd:chunked layer: peers cannot serve it block by block).
    pub fn from_index(index: &LayerIndex) -> Option<BlockTable> {
        let a = index.arbor.as_ref()?;
        if a.block_size == 0 || a.blocks.len() as u64 != a.data_length.div_ceil(a.block_size) {
            return None;
        }
        Some(BlockTable {
            block_size: a.block_size,
            data_length: a.data_length,
            digests: a.blocks.clone().into(),
        })
    }

    /// Number of blocks.
    pub fn len(&self) -> u64 {
        self.digests.len() as u64
    }

    /// Whether the table has no block (an empty data region).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// `[start, end)` of block `i` in the blob.
    pub fn range(&self, i: u64) -> (u64, u64) {
        let start = i * self.block_size;
        (start, (start + self.block_size).min(self.data_length))
    }

    fn verify(&self, i: u64, data: &[u8]) -> bool {
        let Some(want) = self.digests.get(i as usize) else {
            return false;
        };
        let (s, e) = self.range(i);
        data.len() as u64 == e - s && Sha256::digest(data).as_slice() == want.as_bytes()
    }
}

/// Where a node keeps the blocks of the layers it serves in function trees: one sparse file per
/// blob under one directory.
pub struct BlockStore {
    dir: PathBuf,
    recent: Arc<Recent>,
    next_layer: AtomicU64,
}

/// Bytes of verified blocks a [`BlockStore`] keeps in memory for all its layers.
pub const RECENT_BLOCK_BYTES: u64 = 16 << 20;

/// The blocks a store's layers proved last, kept in memory (first in, first out, within
/// [`RECENT_BLOCK_BYTES`]). In a tree a block lands and is asked for at once by the node's own
/// reads and by its two children: they take it from here instead of reading it back from
/// disk and hashing it again (which took a third of a node's hashing in a burst). What is
/// here was proved against the block table when it was fetched or read.
#[derive(Default)]
struct Recent {
    state: Mutex<RecentState>,
}

#[derive(Default)]
struct RecentState {
    /// (layer id, block) -> bytes
    blocks: HashMap<(u64, u64), Bytes>,
    order: std::collections::VecDeque<(u64, u64)>,
    bytes: u64,
}

impl Recent {
    fn get(&self, key: (u64, u64)) -> Option<Bytes> {
        lock(&self.state).blocks.get(&key).cloned()
    }

    fn put(&self, key: (u64, u64), data: &Bytes) {
        let len = data.len() as u64;
        if len > RECENT_BLOCK_BYTES / 4 {
            return;
        }
        let mut st = lock(&self.state);
        if st.blocks.insert(key, data.clone()).is_some() {
            return;
        }
        st.order.push_back(key);
        st.bytes += len;
        while st.bytes > RECENT_BLOCK_BYTES {
            let Some(old) = st.order.pop_front() else {
                break;
            };
            if let Some(d) = st.blocks.remove(&old) {
                st.bytes -= d.len() as u64;
            }
        }
    }

    /// Forgets a layer's blocks (its source is gone).
    fn forget(&self, layer: u64) {
        let mut st = lock(&self.state);
        let before = st.order.len();
        st.order.retain(|k| k.0 != layer);
        if st.order.len() != before {
            let gone: Vec<(u64, u64)> =
                st.blocks.keys().filter(|k| k.0 == layer).copied().collect();
            for k in gone {
                if let Some(d) = st.blocks.remove(&k) {
                    st.bytes -= d.len() as u64;
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BlockStore {
    /// A store in `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> std::io::Result<Arc<BlockStore>> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Arc::new(BlockStore {
            dir,
            recent: Default::default(),
            next_layer: AtomicU64::new(0),
        }))
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of blob `digest`; `None` unless `digest` is `sha256:` and 64 lowercase hex
    /// digits (so no digest can name a path outside the store).
    fn path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| self.dir.join(hex))
    }

    /// The block source of one layer: its blocks in this store, the missing ones fetched from
    /// `upstream`. Reuses blocks an earlier process left in the store (each proved on first use).
    pub fn layer(
        &self,
        digest: &str,
        table: BlockTable,
        upstream: Arc<Router>,
    ) -> Result<Arc<BlockSource>, SourceError> {
        let refused = |m: String| SourceError::new(SourceErrorKind::Refused, "blocks", m);
        let path = self
            .path(digest)
            .ok_or_else(|| refused(format!("{digest:?} is not a sha256 digest")))?;
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .and_then(|f| {
                if f.metadata()?.len() != table.data_length {
                    f.set_len(table.data_length)?;
                }
                Ok(f)
            })
            .map_err(|e| refused(format!("block file {}: {e}", path.display())))?;
        let initial = if existed { UNKNOWN } else { ABSENT };
        let state = (0..table.len()).map(|_| AtomicU8::new(initial)).collect();
        Ok(Arc::new(BlockSource {
            id: self.next_layer.fetch_add(1, Ordering::Relaxed),
            recent: Arc::clone(&self.recent),
            digest: digest.to_string(),
            table,
            file: Arc::new(file),
            state,
            inflight: Mutex::new(HashMap::new()),
            upstream,
            stats: Default::default(),
            settle: Mutex::new(None),
            toc: std::sync::OnceLock::new(),
        }))
    }

    /// Deletes the blocks of blob `digest` (the node no longer serves it).
    pub fn remove(&self, digest: &str) -> std::io::Result<()> {
        match self.path(digest) {
            Some(p) => match std::fs::remove_file(p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            },
            None => Ok(()),
        }
    }
}

const UNKNOWN: u8 = 0;
const PRESENT: u8 = 1;
const ABSENT: u8 = 2;

/// Counters of one [`BlockSource`] (they only grow).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BlockStats {
    /// Blocks read from the store (and proved).
    pub local: u64,
    /// Blocks taken from the store's memory of recently proved blocks.
    pub memory: u64,
    /// Blocks fetched from the router and proved.
    pub fetched: u64,
    /// Bytes of those.
    pub fetched_bytes: u64,
    /// Fetched runs that failed verification (each reported to the router).
    pub corrupt: u64,
    /// Blocks on disk that failed verification (refetched).
    pub local_corrupt: u64,
}

#[derive(Default)]
struct Counters {
    local: AtomicU64,
    memory: AtomicU64,
    fetched: AtomicU64,
    fetched_bytes: AtomicU64,
    corrupt: AtomicU64,
    local_corrupt: AtomicU64,
}

/// One layer's blocks: see the module docs.
pub struct BlockSource {
    /// This source's key in the store's [`Recent`] blocks.
    id: u64,
    recent: Arc<Recent>,
    digest: String,
    table: BlockTable,
    file: Arc<File>,
    state: Vec<AtomicU8>,
    /// Blocks being fetched; the semaphore is closed when the fetch ends, however it ends.
    inflight: Mutex<HashMap<u64, Arc<Semaphore>>>,
    upstream: Arc<Router>,
    stats: Counters,
    /// Until the routes settle (a node's place in its tree is known) or the deadline passes,
    /// fetches wait rather than go to the registry; see [`BlockSource::wait_for_routes`].
    settle: Mutex<Option<(tokio::sync::watch::Receiver<bool>, tokio::time::Instant)>>,
    /// The compressed TOC as this node read and verified it, and where it sits in the blob:
    /// served to children from memory ([`BlockSource::keep_toc`]).
    toc: std::sync::OnceLock<(u64, Bytes)>,
}

/// Blocks this reader fetches; released (and their waiters woken) on drop, also when the
/// reading future is cancelled.
struct Claim<'a> {
    src: &'a BlockSource,
    blocks: Vec<u64>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut m = self.src.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for b in &self.blocks {
            if let Some(s) = m.remove(b) {
                s.close();
            }
        }
    }
}

impl Drop for BlockSource {
    fn drop(&mut self) {
        self.recent.forget(self.id);
    }
}

/// How many times a read goes back for blocks another reader was fetching and did not get.
const ROUNDS: usize = 3;

impl BlockSource {
    /// The blob's digest.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The layer's block table.
    pub fn table(&self) -> &BlockTable {
        &self.table
    }

    /// The router the missing blocks come from (its routes change with the tree).
    pub fn upstream(&self) -> &Arc<Router> {
        &self.upstream
    }

    /// Holds the first fetches until `settled` turns true (the router's routes are final: a node
    /// knows its parent) or `until` passes, whichever comes first; then never again. A node
    /// that joins a tree in a burst would otherwise read the registry until its place arrives.
    pub fn wait_for_routes(
        &self,
        settled: tokio::sync::watch::Receiver<bool>,
        until: tokio::time::Instant,
    ) {
        *self.settle.lock().unwrap_or_else(|e| e.into_inner()) = Some((settled, until));
    }

    async fn routes_settled(&self) {
        let gate = self
            .settle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some((mut rx, until)) = gate else { return };
        if !*rx.borrow() {
            let waited = tokio::time::Instant::now();
            let _ = tokio::time::timeout_at(until, rx.wait_for(|v| *v)).await;
            debug!(layer = %self.digest, waited_ms = waited.elapsed().as_millis() as u64, "waited for the layer's routes to settle");
        }
        *self.settle.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Keeps the layer's compressed TOC, `bytes` at `offset` of the blob, which this node read
    /// and verified against the TOC digest before mounting the layer: reads of ranges inside
    /// it (a child reading the TOC before it mounts the layer) are answered from memory
    /// instead of going up the routes, so a burst costs the registry one TOC per layer, not
    /// one per node. Not verified here: whoever reads it checks the TOC digest. Only the
    /// first call counts.
    pub fn keep_toc(&self, offset: u64, bytes: Bytes) {
        let _ = self.toc.set((offset, bytes));
    }

    /// Bytes `[offset, end)` of the kept TOC, if they lie inside it.
    fn kept_toc(&self, offset: u64, end: u64) -> Option<Bytes> {
        let (start, bytes) = self.toc.get()?;
        let from = offset.checked_sub(*start)?;
        let to = end.checked_sub(*start)?;
        (to <= bytes.len() as u64).then(|| bytes.slice(from as usize..to as usize))
    }

    /// Blocks proved present on disk.
    pub fn present(&self) -> u64 {
        self.state
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) == PRESENT)
            .count() as u64
    }

    /// This layer's counters.
    pub fn stats(&self) -> BlockStats {
        let c = &self.stats;
        BlockStats {
            local: c.local.load(Ordering::Relaxed),
            memory: c.memory.load(Ordering::Relaxed),
            fetched: c.fetched.load(Ordering::Relaxed),
            fetched_bytes: c.fetched_bytes.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            local_corrupt: c.local_corrupt.load(Ordering::Relaxed),
        }
    }

    /// Bytes `[offset, offset + len)` of the blob, every block of them proved.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, SourceError> {
        let end = offset.checked_add(len).ok_or_else(|| {
            SourceError::new(SourceErrorKind::Refused, "blocks", "range overflows")
        })?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        if end > self.table.data_length {
            // The TOC and footer: not in the block table, verified by the TOC digest.
            if let Some(b) = self.kept_toc(offset, end) {
                return Ok(b);
            }
            return self.upstream.read_range(&self.digest, offset, len).await;
        }
        let bs = self.table.block_size;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let mut got: BTreeMap<u64, Bytes> = BTreeMap::new();
        let known: Vec<u64> = self
            .take_recent(first..=last, &mut got)
            .into_iter()
            .filter(|&b| self.state(b) != ABSENT)
            .collect();
        self.read_local(&known, &mut got).await;
        for round in 0.. {
            let missing: Vec<u64> = (first..=last).filter(|b| !got.contains_key(b)).collect();
            if missing.is_empty() {
                break;
            }
            if round == ROUNDS {
                return Err(SourceError::new(
                    SourceErrorKind::Unavailable,
                    "blocks",
                    format!("blocks {missing:?} of {} still missing", self.digest),
                ));
            }
            let (claim, waits) = self.claim(&missing);
            for run in runs(&claim.blocks) {
                for (b, data) in self.fetch_run(run.0, run.1).await? {
                    got.insert(b, data);
                }
            }
            drop(claim);
            let mut theirs = Vec::with_capacity(waits.len());
            for (b, sem) in waits {
                // Closed when the other reader's fetch ends; the error is that signal.
                let _ = sem.acquire().await;
                theirs.push(b);
            }
            let theirs = self.take_recent(theirs, &mut got);
            self.read_local(&theirs, &mut got).await;
        }
        if let (1, Some((&b, data))) = (got.len(), got.first_key_value()) {
            // Within one block (most chunk frames): a slice of it, no copy.
            let s = self.table.range(b).0;
            let to = ((end - s) as usize).min(data.len());
            return Ok(data.slice(((offset.max(s) - s) as usize).min(to)..to));
        }
        let mut out = BytesMut::with_capacity(len as usize);
        for (b, data) in got {
            let (s, _) = self.table.range(b);
            let from = offset.max(s) - s;
            let to = (end.min(s + data.len() as u64) - s) as usize;
            out.extend_from_slice(&data[from as usize..to]);
        }
        Ok(out.freeze())
    }

    /// Moves the blocks among `blocks` that are in memory ([`Recent`]) into `got`; returns
    /// the others.
    fn take_recent(
        &self,
        blocks: impl IntoIterator<Item = u64>,
        got: &mut BTreeMap<u64, Bytes>,
    ) -> Vec<u64> {
        let mut rest = Vec::new();
        for b in blocks {
            match self.recent.get((self.id, b)) {
                Some(d) => {
                    self.stats.memory.fetch_add(1, Ordering::Relaxed);
                    got.insert(b, d);
                }
                None => rest.push(b),
            }
        }
        rest
    }

    fn state(&self, b: u64) -> u8 {
        self.state
            .get(b as usize)
            .map_or(ABSENT, |s| s.load(Ordering::Relaxed))
    }

    fn set_state(&self, b: u64, v: u8) {
        if let Some(s) = self.state.get(b as usize) {
            s.store(v, Ordering::Relaxed);
        }
    }

    /// Claims the blocks nobody is fetching; returns them and the fetches to wait for.
    fn claim(&self, blocks: &[u64]) -> (Claim<'_>, Vec<(u64, Arc<Semaphore>)>) {
        let mut m = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let mut mine = Vec::new();
        let mut waits = Vec::new();
        for &b in blocks {
            match m.get(&b) {
                Some(s) => waits.push((b, Arc::clone(s))),
                None => {
                    m.insert(b, Arc::new(Semaphore::new(0)));
                    mine.push(b);
                }
            }
        }
        (
            Claim {
                src: self,
                blocks: mine,
            },
            waits,
        )
    }

    /// Reads `blocks` from disk, keeping those that prove (and marking the others absent).
    async fn read_local(&self, blocks: &[u64], got: &mut BTreeMap<u64, Bytes>) {
        if blocks.is_empty() {
            return;
        }
        let file = Arc::clone(&self.file);
        let table = self.table.clone();
        let want: Vec<u64> = blocks.to_vec();
        let read = tokio::task::spawn_blocking(move || {
            want.into_iter()
                .map(|b| {
                    let (s, e) = table.range(b);
                    let mut buf = vec![0u8; (e - s) as usize];
                    let ok = file.read_exact_at(&mut buf, s).is_ok() && table.verify(b, &buf);
                    (b, ok.then(|| Bytes::from(buf)))
                })
                .collect::<Vec<_>>()
        })
        .await;
        let Ok(read) = read else { return };
        for (b, data) in read {
            match data {
                Some(d) => {
                    self.set_state(b, PRESENT);
                    self.stats.local.fetch_add(1, Ordering::Relaxed);
                    self.recent.put((self.id, b), &d);
                    got.insert(b, d);
                }
                None => {
                    if self.state(b) == PRESENT {
                        self.stats.local_corrupt.fetch_add(1, Ordering::Relaxed);
                        warn!(layer = %self.digest, block = b, "stored block failed verification, fetching it again");
                    }
                    self.set_state(b, ABSENT);
                }
            }
        }
    }

    /// Fetches blocks `first..=last` from the router, proves each, keeps them on disk.
    async fn fetch_run(&self, first: u64, last: u64) -> Result<Vec<(u64, Bytes)>, SourceError> {
        let start = self.table.range(first).0;
        let end = self.table.range(last).1;
        self.routes_settled().await;
        let mut tried = Vec::new();
        for _ in 0..2 {
            let (data, route) = self
                .upstream
                .read_routed(&self.digest, start, end - start)
                .await?;
            let table = self.table.clone();
            let file = Arc::clone(&self.file);
            let proved = tokio::task::spawn_blocking(move || {
                let mut good = Vec::new();
                let mut bad = Vec::new();
                for b in first..=last {
                    let (s, e) = table.range(b);
                    let block = data.slice((s - start) as usize..(e - start) as usize);
                    if table.verify(b, &block) {
                        // A failed write only costs a refetch later: the block stays absent.
                        let kept = file.write_all_at(&block, s).is_ok();
                        good.push((b, block, kept));
                    } else {
                        bad.push(b);
                    }
                }
                (good, bad)
            })
            .await
            .map_err(|e| SourceError::new(SourceErrorKind::Unavailable, "blocks", e.to_string()))?;
            let (good, bad) = proved;
            if bad.is_empty() {
                let mut out = Vec::with_capacity(good.len());
                for (b, block, kept) in good {
                    if kept {
                        self.set_state(b, PRESENT);
                    }
                    self.stats.fetched.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .fetched_bytes
                        .fetch_add(block.len() as u64, Ordering::Relaxed);
                    self.recent.put((self.id, b), &block);
                    out.push((b, block));
                }
                debug!(layer = %self.digest, first, last, route = %route, "blocks fetched");
                return Ok(out);
            }
            self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
            warn!(layer = %self.digest, route = %route, blocks = ?bad,
                "blocks failed verification against the block table, reporting the route");
            self.upstream.report_bad(&route);
            tried.push(route);
        }
        Err(SourceError::new(
            SourceErrorKind::Corrupt,
            "blocks",
            format!(
                "blocks {first}..={last} of {} failed verification from {}",
                self.digest,
                tried.join(", then ")
            ),
        ))
    }
}

/// Consecutive runs `(first, last)` of sorted block numbers.
fn runs(blocks: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == b => *last = b,
            _ => out.push((b, b)),
        }
    }
    out
}

impl BlobSource for BlockSource {
    fn kind(&self) -> &'static str {
        "blocks"
    }
    fn keeps_blob(&self) -> bool {
        true
    }

    fn read_range<'a>(&'a self, digest: &'a str, offset: u64, len: u64) -> ReadFuture<'a> {
        Box::pin(async move {
            if digest != self.digest {
                return Err(SourceError::new(
                    SourceErrorKind::Lacks,
                    "blocks",
                    format!("holds {}, not {digest}", self.digest),
                ));
            }
            self.read(offset, len).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Route;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    const BS: u64 = 4096;

    /// A blob source over one blob that can lie and counts what it serves.
    struct Mem {
        blob: Vec<u8>,
        lie: std::sync::atomic::AtomicBool,
        delay: Duration,
        reads: AtomicUsize,
        bytes: AtomicU64,
    }

    impl Mem {
        fn new(blob: &[u8]) -> Arc<Mem> {
            Arc::new(Mem {
                blob: blob.to_vec(),
                lie: false.into(),
                delay: Duration::ZERO,
                reads: AtomicUsize::new(0),
                bytes: AtomicU64::new(0),
            })
        }
    }

    impl BlobSource for Mem {
        fn kind(&self) -> &'static str {
            "mem"
        }
        fn read_range<'a>(&'a self, _d: &'a str, offset: u64, len: u64) -> ReadFuture<'a> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                self.reads.fetch_add(1, Ordering::SeqCst);
                self.bytes.fetch_add(len, Ordering::SeqCst);
                let mut v = self.blob[offset as usize..(offset + len) as usize].to_vec();
                if self.lie.load(Ordering::SeqCst) {
                    v[0] ^= 1;
                }
                Ok(Bytes::from(v))
            })
        }
    }

    fn blob(n: usize) -> Vec<u8> {
        crate::testutil::test_noise(0x1234_5678_9abc_def0, n)
    }

    fn table(blob: &[u8], data_length: u64) -> BlockTable {
        let digests: Vec<Digest> = blob[..data_length as usize]
            .chunks(BS as usize)
            .map(Digest::of)
            .collect();
        BlockTable {
            block_size: BS,
            data_length,
            digests: digests.into(),
        }
    }

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn router(routes: &[(&str, Arc<Mem>)]) -> Arc<Router> {
        Arc::new(Router::new(
            routes
                .iter()
                .map(|(n, m)| {
                    Route::new(
                        *n,
                        Arc::clone(m) as Arc<dyn BlobSource>,
                        Duration::from_secs(5),
                    )
                })
                .collect(),
        ))
    }

    /// A fresh store and layer `DIGEST` of `data` (block table up to `dl`) read from a
    /// registry in memory; the directory lives as long as the returned guard.
    fn registry_layer(
        data: &[u8],
        dl: u64,
    ) -> (
        tempfile::TempDir,
        Arc<BlockStore>,
        Arc<Mem>,
        Arc<BlockSource>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::new(dir.path()).unwrap();
        let reg = Mem::new(data);
        let src = store
            .layer(
                DIGEST,
                table(data, dl),
                router(&[("registry", Arc::clone(&reg))]),
            )
            .unwrap();
        (dir, store, reg, src)
    }

    #[tokio::test]
    async fn ranges_come_back_exact_and_blocks_are_fetched_once() {
        let data = blob(10 * BS as usize + 100);
        let dl = 9 * BS + 50;
        let (_dir, _store, reg, src) = registry_layer(&data, dl);
        for (o, l) in [
            (0, 1),
            (5, BS),
            (BS, BS),
            (2 * BS - 5, 5),
            (BS - 1, 2),
            (3 * BS + 7, 2 * BS),
            (0, dl),
            (dl - 3, 3),
        ] {
            let got = src.read(o, l).await.unwrap();
            assert_eq!(
                &got[..],
                &data[o as usize..(o + l) as usize],
                "range {o}+{l}"
            );
        }
        // Every block came from the registry exactly once.
        assert_eq!(src.stats().fetched, table(&data, dl).len());
        assert_eq!(reg.bytes.load(Ordering::SeqCst), dl);
        assert_eq!(src.present(), table(&data, dl).len());
        // Past the data region: passed through.
        let tail = src.read(dl, 100).await.unwrap();
        assert_eq!(&tail[..], &data[dl as usize..(dl + 100) as usize]);
        let before = reg.reads.load(Ordering::SeqCst);
        // A kept TOC answers reads inside it from memory (a child reading it before its mount);
        // reads that leave it still pass through.
        let toc = Bytes::copy_from_slice(&data[(dl + 10) as usize..(dl + 40) as usize]);
        src.keep_toc(dl + 10, toc);
        for (o, l) in [(dl + 10, 30), (dl + 15, 5), (dl + 39, 1)] {
            let got = src.read(o, l).await.unwrap();
            assert_eq!(
                &got[..],
                &data[o as usize..(o + l) as usize],
                "kept {o}+{l}"
            );
        }
        assert_eq!(
            reg.reads.load(Ordering::SeqCst),
            before,
            "served from memory"
        );
        for (o, l) in [(dl + 9, 2), (dl + 39, 2), (dl, 100)] {
            let got = src.read(o, l).await.unwrap();
            assert_eq!(
                &got[..],
                &data[o as usize..(o + l) as usize],
                "past {o}+{l}"
            );
        }
        assert_eq!(
            reg.reads.load(Ordering::SeqCst),
            before + 3,
            "passed through"
        );
    }

    #[tokio::test]
    async fn recently_proved_blocks_are_served_from_memory_not_hashed_again() {
        let data = blob(6 * BS as usize);
        let dl = data.len() as u64;
        let (_dir, store, reg, src) = registry_layer(&data, dl);
        src.read(0, dl).await.unwrap();
        // Asked again (a child, the node's own reads): from memory, not from disk.
        let got = src.read(BS / 2, 4 * BS).await.unwrap();
        assert_eq!(
            &got[..],
            &data[(BS / 2) as usize..(BS / 2 + 4 * BS) as usize]
        );
        let st = src.stats();
        assert_eq!((st.fetched, st.local, st.memory), (6, 0, 5));
        // The memory is per layer: another source of the same store does not see them.
        let other = store
            .layer(
                "sha256:1111111111111111111111111111111111111111111111111111111111111111",
                table(&data, dl),
                router(&[("registry", Arc::clone(&reg))]),
            )
            .unwrap();
        other.read(0, BS).await.unwrap();
        assert_eq!(other.stats().memory, 0);
        // A source that goes away takes its blocks out of memory.
        drop(src);
        let st = lock(&store.recent.state);
        assert!(st.blocks.keys().all(|k| k.0 == other.id));
        assert_eq!(st.bytes, BS);
    }

    #[tokio::test]
    async fn concurrent_readers_share_one_fetch() {
        let data = blob(64 * BS as usize);
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::new(dir.path()).unwrap();
        let reg = Arc::new(Mem {
            delay: Duration::from_millis(50),
            ..Arc::into_inner(Mem::new(&data)).unwrap()
        });
        let src = store
            .layer(
                DIGEST,
                table(&data, data.len() as u64),
                router(&[("registry", Arc::clone(&reg))]),
            )
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..16u64 {
            let s = Arc::clone(&src);
            tasks.push(tokio::spawn(async move { s.read(i * 100, 8 * BS).await }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let got = t.await.unwrap().unwrap();
            let o = i * 100;
            assert_eq!(&got[..], &data[o..o + 8 * BS as usize]);
        }
        assert!(
            reg.bytes.load(Ordering::SeqCst) <= 9 * BS,
            "{} bytes fetched for 9 blocks",
            reg.bytes.load(Ordering::SeqCst)
        );
    }

    #[tokio::test]
    async fn a_lying_route_is_reported_and_the_next_one_serves() {
        let data = blob(8 * BS as usize);
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::new(dir.path()).unwrap();
        let parent = Mem::new(&data);
        parent.lie.store(true, Ordering::SeqCst);
        let reg = Mem::new(&data);
        let r = router(&[
            ("parent", Arc::clone(&parent)),
            ("registry", Arc::clone(&reg)),
        ]);
        let src = store
            .layer(DIGEST, table(&data, data.len() as u64), Arc::clone(&r))
            .unwrap();
        let got = src.read(BS / 2, 3 * BS).await.unwrap();
        assert_eq!(
            &got[..],
            &data[(BS / 2) as usize..(BS / 2 + 3 * BS) as usize]
        );
        assert_eq!(src.stats().corrupt, 1);
        let parent_stats = r.stats().into_iter().find(|s| s.name == "parent").unwrap();
        assert_eq!(parent_stats.bad, 1);
        // The parent is skipped now: the next read goes straight to the registry.
        let before = parent.reads.load(Ordering::SeqCst);
        src.read(6 * BS, BS).await.unwrap();
        assert_eq!(parent.reads.load(Ordering::SeqCst), before);
    }

    #[tokio::test]
    async fn bytes_that_fail_twice_are_an_error_not_data() {
        let data = blob(4 * BS as usize);
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::new(dir.path()).unwrap();
        let liar = Mem::new(&data);
        liar.lie.store(true, Ordering::SeqCst);
        let src = store
            .layer(
                DIGEST,
                table(&data, data.len() as u64),
                router(&[("registry", liar)]),
            )
            .unwrap();
        let e = src.read(0, BS).await.unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::Corrupt);
        assert_eq!(src.present(), 0);
    }

    #[tokio::test]
    async fn a_damaged_stored_block_is_fetched_again_and_a_restart_reuses_the_rest() {
        let data = blob(6 * BS as usize);
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::new(dir.path()).unwrap();
        let t = table(&data, data.len() as u64);
        let reg = Mem::new(&data);
        let src = store
            .layer(DIGEST, t.clone(), router(&[("registry", Arc::clone(&reg))]))
            .unwrap();
        src.read(0, 6 * BS).await.unwrap();
        drop(src);
        // Damage block 2 on disk, then "restart": a new source over the same file.
        let path = dir.path().join(DIGEST.strip_prefix("sha256:").unwrap());
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"XXXX", 2 * BS + 10).unwrap();
        let reg2 = Mem::new(&data);
        let src = store
            .layer(DIGEST, t, router(&[("registry", Arc::clone(&reg2))]))
            .unwrap();
        let got = src.read(0, 6 * BS).await.unwrap();
        assert_eq!(&got[..], &data[..]);
        assert_eq!(
            reg2.bytes.load(Ordering::SeqCst),
            BS,
            "only the damaged block is refetched"
        );
        assert_eq!(src.stats().local, 5);
    }

    #[tokio::test]
    async fn fetches_wait_for_the_routes_to_settle_then_never_again() {
        let data = blob(4 * BS as usize);
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::new(dir.path()).unwrap();
        let reg = Mem::new(&data);
        let parent = Mem::new(&data);
        let r = router(&[("registry", Arc::clone(&reg))]);
        let src = store
            .layer(DIGEST, table(&data, data.len() as u64), Arc::clone(&r))
            .unwrap();
        let (tx, rx) = tokio::sync::watch::channel(false);
        src.wait_for_routes(rx, tokio::time::Instant::now() + Duration::from_secs(10));
        let reader = {
            let src = Arc::clone(&src);
            tokio::spawn(async move { src.read(0, BS).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "the read waits for the routes");
        // The place arrives: the parent goes first, then the gate opens.
        r.set_routes(vec![
            Route::new(
                "parent",
                Arc::clone(&parent) as Arc<dyn BlobSource>,
                Duration::from_secs(5),
            ),
            Route::new(
                "registry",
                Arc::clone(&reg) as Arc<dyn BlobSource>,
                Duration::from_secs(5),
            ),
        ]);
        tx.send(true).unwrap();
        assert_eq!(&reader.await.unwrap().unwrap()[..], &data[..BS as usize]);
        assert_eq!(
            reg.reads.load(Ordering::SeqCst),
            0,
            "nothing from the registry"
        );
        assert_eq!(parent.reads.load(Ordering::SeqCst), 1);

        // A gate that never opens holds reads until its deadline only, and only once.
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::new(dir.path()).unwrap();
        let src = store
            .layer(
                DIGEST,
                table(&data, data.len() as u64),
                router(&[("registry", Arc::clone(&reg))]),
            )
            .unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(false);
        src.wait_for_routes(rx, tokio::time::Instant::now() + Duration::from_millis(100));
        let t = std::time::Instant::now();
        src.read(0, BS).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(100));
        let t = std::time::Instant::now();
        src.read(BS, BS).await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn digests_cannot_name_paths_outside_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::new(dir.path()).unwrap();
        for bad in [
            "sha256:../../etc/passwd",
            "sha512:00",
            "sha256:ABCDEF",
            "",
            "sha256:/x",
        ] {
            assert!(store.path(bad).is_none(), "{bad}");
        }
        assert!(store.path(DIGEST).is_some());
    }

    #[test]
    fn runs_are_consecutive_blocks() {
        assert_eq!(runs(&[1, 2, 3, 5, 7, 8]), vec![(1, 3), (5, 5), (7, 8)]);
        assert!(runs(&[]).is_empty());
    }
}
