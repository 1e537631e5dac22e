//! The fetcher: file reads → chunks → caches or sources, with single flight and verification.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbor_format::index::{Chunk, LayerIndex, decode_chunk};
use bytes::Bytes;
use futures_util::FutureExt as _;
use tokio::sync::OnceCell;
use tracing::{debug, warn};

use crate::cache::{ChunkCache, Lookup};
use crate::memcache::{Dirty, MemCache};
use crate::metrics::Metrics;
use crate::source::BlobSource;

/// Why a read failed (the FUSE layer answers EIO).
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("no source could serve {digest} bytes {start}..{end}: {errors}")]
    Sources {
        digest: String,
        start: u64,
        end: u64,
        errors: String,
    },
    #[error(
        "chunk of {name:?} at blob offset {offset} failed verification after a refetch: {reason}"
    )]
    Verification {
        name: String,
        offset: u64,
        reason: String,
    },
    #[error("fetching {digest} bytes {start}..{end} timed out after {secs} s")]
    Timeout {
        digest: String,
        start: u64,
        end: u64,
        secs: u64,
    },
    #[error("no such file entry {0}")]
    NoEntry(usize),
    #[error("layer {0} was proved to lie about its content: it is not served any more")]
    Poisoned(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Fetcher settings.
#[derive(Debug, Clone)]
pub struct FetcherOptions {
    /// Fetch unit: windows of the blob are aligned to this size (bytes of the compressed blob).
    pub fetch_unit: u64,
    /// Bytes of verified chunks kept in memory. While the disk cache's writers are behind,
    /// chunks not yet written are kept over it, by at most [`FetcherOptions::writeback_bytes`].
    pub memory_budget: u64,
    /// Longest a source request may take before the read fails.
    pub fetch_timeout: Duration,
    /// Let background fetching (the rest of a layer) run while a workload is reading, one
    /// paced window at a time; otherwise it waits until reads pause for [`ACTIVE_WITHIN`].
    /// On small machines its CPU (decompression, hashing, cache writes) slows start-ups.
    pub background_while_active: bool,
    /// Windows after a missed one fetched along with it (0: none).
    pub read_ahead: usize,
    /// Bytes (of the blob) fetched along with the first miss in a directory: the rest of the
    /// missed file, then the other files of its directory (a Python package's modules and
    /// their `__pycache__`), so a program that imports a package file by file waits for one
    /// round trip, not one per file (0: off). See [`LayerHandle::group_windows`].
    pub group_read_ahead: u64,
    /// Windows of group read-ahead in flight at once, across all groups and layers (at least
    /// 1). Speculative bytes in flight queue ahead of the next demand miss on the link.
    pub group_concurrency: usize,
    /// Bytes of chunks waiting to be written to the disk cache at most. Beyond it, chunks
    /// evicted from memory are not written (counted in `arbor_cache_writeback_dropped_total`;
    /// they are refetched if read again), and the background prefetch of a layer's rest
    /// waits for the writers instead of fetching more ([`Fetcher::writeback_room`]).
    pub writeback_bytes: u64,
    /// Windows fetched ahead, at most, of a reader that moves through a layer in blob order
    /// (0: off): once [`SEQUENTIAL_STREAK`] misses in a row each came right after windows
    /// already fetched, the windows after the miss are fetched too, 4 at first and doubling
    /// with each further such miss, like the kernel's read-ahead of a file read sequentially.
    /// A program that reads most of an image (a copy, a checksum, a scan) then waits for
    /// few round trips; a starting program, whose misses jump between directories, does not
    /// trigger it.
    pub sequential_read_ahead: usize,
    /// Bytes of the blob one request covers at most for a reader of whole layers: consecutive
    /// windows that the sequential read-ahead (or the group read-ahead of a reader with a
    /// sequential stretch, or an eager prefetch of the rest) wants are fetched with one range
    /// request up to this size, then decoded window by window; a window is never split.
    /// Registries charge per request: docker-registry spends about 4 ms of CPU on each, as
    /// much as on 4 MB of content, and on a small node that CPU is taken from the reader.
    /// Demand misses and a starting program's read-ahead still fetch one window a request.
    pub max_request: u64,
}

impl Default for FetcherOptions {
    fn default() -> Self {
        FetcherOptions {
            fetch_unit: 1 << 20,
            memory_budget: 256 << 20,
            fetch_timeout: Duration::from_secs(60),
            background_while_active: false,
            read_ahead: 0,
            group_read_ahead: DEFAULT_GROUP_READ_AHEAD,
            group_concurrency: DEFAULT_GROUP_CONCURRENCY,
            writeback_bytes: DEFAULT_WRITEBACK_BYTES,
            sequential_read_ahead: DEFAULT_SEQUENTIAL_READ_AHEAD,
            max_request: DEFAULT_MAX_REQUEST,
        }
    }
}

/// Default of [`FetcherOptions::max_request`].
pub const DEFAULT_MAX_REQUEST: u64 = 4 << 20;

/// Default of [`FetcherOptions::sequential_read_ahead`] (with 1 MiB windows, 32 MiB ahead).
pub const DEFAULT_SEQUENTIAL_READ_AHEAD: usize = 32;
/// Misses in a row, each right after already fetched windows, that make a reader sequential.
pub const SEQUENTIAL_STREAK: u32 = 3;
/// Largest jump (in windows) from one miss to the next that still counts as sequential, if
/// every window between them was fetched: the reader read through them.
const SEQUENTIAL_GAP: usize = 16;

/// Default of [`FetcherOptions::group_read_ahead`].
pub const DEFAULT_GROUP_READ_AHEAD: u64 = 8 << 20;

/// Largest gap between two wanted chunk frames that [`Fetcher::fetch_chunks`] fetches across
/// rather than making two requests.
pub const CHUNK_RANGE_GAP: u64 = 64 << 10;

/// Default of [`FetcherOptions::group_concurrency`].
pub const DEFAULT_GROUP_CONCURRENCY: usize = 4;

/// (entry index, chunk index) within a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    pub entry: u32,
    pub chunk: u32,
}

/// One lazily readable layer blob: its validated TOC and where to fetch it from.
///
/// The blob's chunks are partitioned once into *fetch windows*: runs of consecutive chunk
/// frames (in blob order) of about `fetch_unit` bytes, never splitting a chunk. A window is
/// the unit of fetching, of single flight and of prefetch, so every chunk is fetched with
/// exactly one window and small files are fetched many at a time.
pub struct LayerHandle {
    /// Digest of the compressed blob.
    pub digest: String,
    pub size: u64,
    pub index: Arc<LayerIndex>,
    sources: Vec<Arc<dyn BlobSource>>,
    /// Every source keeps the blob on the node's disk ([`BlobSource::keeps_blob`]): chunks
    /// of this layer are not written to the chunk cache.
    blob_kept: bool,
    /// Fetch windows: blob range and the chunks they hold, in blob order.
    windows: Vec<Window>,
    /// Window of each chunk: `chunk_window[entry][chunk]` (u32::MAX for zero chunks).
    chunk_window: Vec<Vec<u32>>,
    /// Set once the layer is proved to lie: nothing of it is served any more.
    poisoned: std::sync::atomic::AtomicBool,
    /// Locality group of each entry (its directory; see [`LayerHandle::group_windows`]).
    entry_group: Vec<u32>,
    /// Windows holding each group's chunks, in blob order, and whether a miss in the group
    /// has already fetched them: `[0]` a miss outside the planned prefetch (all of them),
    /// `[1]` a miss inside it (those the prefetch brings).
    groups: Vec<(Vec<u32>, [std::sync::atomic::AtomicBool; 2])>,
    /// First reads of this mount, when it is being learned from.
    recorder: std::sync::OnceLock<Arc<crate::learn::Recorder>>,
    /// Windows fetched (and verified) since the layer was opened.
    fetched: WindowBits,
    /// Windows the background prefetch brings as urgent work (the learned start-up set and
    /// the prefetch section): a miss on one of them reads ahead only within them
    /// ([`LayerHandle::plan_prefetch`]).
    planned: WindowBits,
    /// A sequential reader's progress (see [`FetcherOptions::sequential_read_ahead`]).
    stream: Mutex<Stream>,
    /// The window whose first read fetches the next stretch ahead of a sequential reader,
    /// before it misses (`usize::MAX`: none), and the stretch's length in windows.
    seq_marker: AtomicUsize,
    seq_ahead: AtomicUsize,
}

/// One bit per window of a layer, set concurrently.
#[derive(Debug)]
struct WindowBits(Vec<AtomicU64>);

impl WindowBits {
    fn new(windows: usize) -> Self {
        Self(
            (0..windows.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }

    fn set(&self, w: usize) {
        if let Some(word) = self.0.get(w / 64) {
            word.fetch_or(1 << (w % 64), Ordering::Relaxed);
        }
    }

    fn get(&self, w: usize) -> bool {
        self.0
            .get(w / 64)
            .is_some_and(|word| word.load(Ordering::Relaxed) & (1 << (w % 64)) != 0)
    }
}

/// Where a reader moving forward through a layer is, as its misses tell.
#[derive(Debug, Clone, Copy)]
struct Stream {
    /// The last missed window (`usize::MAX`: none yet).
    last: usize,
    /// Misses in a row that came right after fetched windows or inside the stretch.
    streak: u32,
    /// The last window the sequential read-ahead has asked for (`usize::MAX`: none): a miss
    /// up to it is the reader catching up with its read-ahead, not a jump.
    end: usize,
}

/// A run of chunk frames fetched with one request.
#[derive(Debug, Clone)]
pub struct Window {
    pub start: u64,
    pub end: u64,
    pub chunks: Vec<ChunkRef>,
}

impl LayerHandle {
    pub fn new(
        digest: &str,
        size: u64,
        index: Arc<LayerIndex>,
        sources: Vec<Arc<dyn BlobSource>>,
        fetch_unit: u64,
    ) -> LayerHandle {
        let mut by_offset = Vec::new();
        let mut chunk_window: Vec<Vec<u32>> = Vec::with_capacity(index.entries.len());
        for (ei, e) in index.entries.iter().enumerate() {
            chunk_window.push(vec![u32::MAX; e.chunks.len()]);
            for (ci, c) in e.chunks.iter().enumerate() {
                if !c.zeros {
                    let r = ChunkRef {
                        entry: ei as u32,
                        chunk: ci as u32,
                    };
                    by_offset.push((c.blob_offset, c.blob_end, r));
                }
            }
        }
        by_offset.sort_unstable_by_key(|(o, _, _)| *o);
        let mut windows: Vec<Window> = Vec::new();
        for (off, end, r) in by_offset {
            match windows.last_mut() {
                Some(w) if end - w.start <= fetch_unit.max(4096) && off >= w.end => {
                    w.end = end;
                    w.chunks.push(r);
                }
                _ => windows.push(Window {
                    start: off,
                    end,
                    chunks: vec![r],
                }),
            }
            chunk_window[r.entry as usize][r.chunk as usize] = (windows.len() - 1) as u32;
        }
        let (entry_group, groups) = locality_groups(&index, &chunk_window);
        let windows_len = windows.len();
        let blob_kept = !sources.is_empty() && sources.iter().all(|s| s.keeps_blob());
        LayerHandle {
            digest: digest.to_string(),
            size,
            index,
            sources,
            blob_kept,
            windows,
            chunk_window,
            poisoned: Default::default(),
            entry_group,
            groups,
            recorder: Default::default(),
            fetched: WindowBits::new(windows_len),
            planned: WindowBits::new(windows_len),
            stream: Mutex::new(Stream {
                last: usize::MAX,
                streak: 0,
                end: usize::MAX,
            }),
            seq_marker: AtomicUsize::new(usize::MAX),
            seq_ahead: AtomicUsize::new(0),
        }
    }

    fn mark_fetched(&self, w: usize) {
        self.fetched.set(w);
    }

    fn was_fetched(&self, w: usize) -> bool {
        self.fetched.get(w)
    }

    /// Notes that the background prefetch is about to fetch windows `ws` as urgent work (a
    /// learned start-up set, the prefetch section). A read that misses one of them moves the
    /// set's own windows of its file and directory ahead of the prefetch's order (group
    /// read-ahead within the set), but fetches none of the directory's files outside the set
    /// and starts no sequential read-ahead: the start-up set says what the program reads.
    /// Under load (a burst of starts on a busy node) reads often overtake the prefetch, and
    /// each such miss would otherwise pull up to [`FetcherOptions::group_read_ahead`] of
    /// files outside the set, from the registry or through the function tree.
    pub fn plan_prefetch(&self, ws: impl IntoIterator<Item = usize>) {
        for w in ws {
            self.planned.set(w);
        }
    }

    /// Whether window `w` is one the background prefetch brings ([`Self::plan_prefetch`]).
    pub fn prefetch_planned(&self, w: usize) -> bool {
        self.planned.get(w)
    }

    /// Notes a miss at window `w` and returns how many misses in a row (this one included)
    /// moved forward through the layer: each came at most [`SEQUENTIAL_GAP`] windows after
    /// the previous one with every window in between fetched (the reader read through them),
    /// or inside the stretch the sequential read-ahead has asked for (the reader caught up
    /// with windows still in flight). Anything else is a jump: the stretch is forgotten.
    fn note_miss(&self, w: usize) -> u32 {
        let mut st = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let next = if w == st.last {
            st.streak
        } else if st.last != usize::MAX
            && w > st.last
            && ((st.end != usize::MAX && w <= st.end)
                || (w - st.last <= SEQUENTIAL_GAP && (st.last + 1..w).all(|x| self.was_fetched(x))))
        {
            st.streak + 1
        } else {
            st.end = usize::MAX;
            0
        };
        st.last = w;
        st.streak = next;
        next
    }

    /// The last window the sequential read-ahead has asked for since the reader's last jump.
    fn stretch_end(&self) -> Option<usize> {
        let st = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        (st.end != usize::MAX).then_some(st.end)
    }

    /// Notes that the sequential read-ahead asked for the windows up to `end`.
    fn note_stretch(&self, end: usize) {
        let mut st = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        st.end = if st.end == usize::MAX {
            end
        } else {
            st.end.max(end)
        };
    }

    /// The windows of the locality group of `entry`: the files of its directory, a
    /// `__pycache__` directory counting as its parent (a module's compiled file is read
    /// right after the directory's other lookups), in blob order. Tar order keeps a
    /// directory's files together, so these are few and mostly adjacent windows.
    pub fn group_windows(&self, entry: usize) -> &[u32] {
        self.entry_group
            .get(entry)
            .and_then(|g| self.groups.get(*g as usize))
            .map_or(&[], |(w, _)| w.as_slice())
    }

    /// Starts recording this mount's first reads (see [`crate::learn`]); a second call
    /// returns the recorder already set.
    pub fn record(&self, recorder: Arc<crate::learn::Recorder>) -> Arc<crate::learn::Recorder> {
        Arc::clone(self.recorder.get_or_init(|| recorder))
    }

    /// The recorder of this mount's first reads, if it is being learned from.
    pub fn recorder(&self) -> Option<&Arc<crate::learn::Recorder>> {
        self.recorder.get()
    }

    /// Window of chunk `r`, if it has one (zero chunks have none).
    pub fn window_index(&self, r: ChunkRef) -> Option<usize> {
        self.window_of(r)
    }

    /// Stops serving this layer: every later read of it fails ([`FetchError::Poisoned`]), and
    /// a filesystem serving it answers EIO (a layer proved to lie, still under running
    /// containers).
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
    }

    /// Whether [`LayerHandle::poison`] was called.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub fn chunk(&self, r: ChunkRef) -> Option<(&str, &Chunk)> {
        let e = self.index.entries.get(r.entry as usize)?;
        Some((e.name.as_str(), e.chunks.get(r.chunk as usize)?))
    }

    /// The fetch windows, in blob order.
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    fn window_of(&self, r: ChunkRef) -> Option<usize> {
        let w = *self
            .chunk_window
            .get(r.entry as usize)?
            .get(r.chunk as usize)?;
        (w != u32::MAX).then_some(w as usize)
    }
}

/// Groups entries by directory (a `__pycache__` directory joins its parent) and lists the
/// windows holding each group's chunks.
#[allow(clippy::type_complexity)]
fn locality_groups(
    index: &LayerIndex,
    chunk_window: &[Vec<u32>],
) -> (
    Vec<u32>,
    Vec<(Vec<u32>, [std::sync::atomic::AtomicBool; 2])>,
) {
    let mut by_dir: HashMap<&str, u32> = HashMap::new();
    let mut groups: Vec<Vec<u32>> = Vec::new();
    let mut entry_group = Vec::with_capacity(index.entries.len());
    for (ei, e) in index.entries.iter().enumerate() {
        let name = e.name.trim_end_matches('/');
        let mut dir = name.rsplit_once('/').map_or("", |(d, _)| d);
        if let Some(parent) = dir.strip_suffix("/__pycache__") {
            dir = parent;
        } else if dir == "__pycache__" {
            dir = "";
        }
        let next = groups.len() as u32;
        let g = *by_dir.entry(dir).or_insert(next);
        if g == next {
            groups.push(Vec::new());
        }
        entry_group.push(g);
        if let Some(ws) = chunk_window.get(ei) {
            groups[g as usize].extend(ws.iter().copied().filter(|w| *w != u32::MAX));
        }
    }
    let groups = groups
        .into_iter()
        .map(|mut w| {
            w.sort_unstable();
            w.dedup();
            (w, Default::default())
        })
        .collect();
    (entry_group, groups)
}

type WindowResult = Arc<Result<Vec<(ChunkRef, Bytes)>, FetchError>>;
type WindowKey = (String, usize);

/// Windows after the current one [`Fetcher::disk_read_ahead`] loads from the disk cache.
const DISK_READ_AHEAD: usize = 2;

/// Serves chunks of layers; shared by every mount of a process.
pub struct Fetcher {
    cache: Arc<ChunkCache>,
    mem: MemCache,
    metrics: Arc<Metrics>,
    opts: FetcherOptions,
    inflight: Mutex<HashMap<WindowKey, Arc<OnceCell<WindowResult>>>>,
    /// Windows being loaded from the disk cache ahead of reads ([`Fetcher::disk_read_ahead`]).
    disk_ahead: Mutex<std::collections::HashSet<WindowKey>>,
    /// Chunks waiting to be written to the disk cache, and its writers.
    writeback: Arc<WriteBack>,
    /// Urgent (demand or prefetch-section) window fetches in flight; background fetches wait
    /// while there are any, and for [`QUIET_BEFORE_BACKGROUND`] after the last one.
    urgent: AtomicUsize,
    last_urgent_ms: AtomicU64,
    /// Last file read (any origin): a workload is running.
    last_read_ms: AtomicU64,
    /// While a workload reads, one background window at a time, paced.
    background_slot: tokio::sync::Semaphore,
    /// Group read-ahead windows in flight ([`FetcherOptions::group_concurrency`]).
    group_slots: Arc<tokio::sync::Semaphore>,
    /// The runtime the fetcher was made on, for work started from FUSE worker threads.
    rt: Option<tokio::runtime::Handle>,
    epoch: Instant,
}

/// Reads within this long mean a workload is active: background fetching then waits (or,
/// with [`FetcherOptions::background_while_active`], runs one window at a time with
/// [`BACKGROUND_PACE_WHILE_ACTIVE`] between windows), so it does not take CPU
/// (decompression, hashing, cache writes) from a starting function.
pub const ACTIVE_WITHIN: Duration = Duration::from_millis(250);
/// Pause after each background window while a workload is active.
pub const BACKGROUND_PACE_WHILE_ACTIVE: Duration = Duration::from_millis(25);

/// How long background fetching stays paused after the last urgent fetch, so that a
/// workload's next read (after a short burst of CPU work) does not queue behind it.
pub const QUIET_BEFORE_BACKGROUND: Duration = Duration::from_millis(100);

/// Writer threads (blocking-pool tasks) that drain the write-back queue at most. Each takes
/// chunk after chunk until the queue is empty, so a hung or full disk holds at most this many
/// threads, and a burst of evictions costs no thread per chunk.
pub const MAX_WRITEBACK_WRITERS: usize = 2;
/// Default of [`FetcherOptions::writeback_bytes`].
pub const DEFAULT_WRITEBACK_BYTES: u64 = 64 << 20;
/// Longest [`Fetcher::flush`] waits for writes in flight (a hung disk must not hang a
/// shutdown or the write-back loop forever).
pub const FLUSH_WAIT: Duration = Duration::from_secs(30);

/// `ws` cut into runs of consecutive windows (in `ws`'s order), each covering at most
/// `max_bytes` of the blob unless it is a single window, and at most `max_windows` windows.
/// Windows the layer does not have are left out.
pub(crate) fn runs(
    layer: &LayerHandle,
    ws: &[usize],
    max_bytes: u64,
    max_windows: usize,
) -> Vec<Vec<usize>> {
    let sized = ws
        .iter()
        .filter_map(|&w| layer.windows.get(w).map(|win| (w, win.end - win.start)));
    pack(sized, max_bytes, max_windows, |run, w| {
        run.last().is_some_and(|&p| p + 1 == *w)
    })
}

/// `items` (each with its size) grouped greedily in order: an item joins the last group while
/// `follows(group, item)`, the group has fewer than `max_items` and stays within `budget`
/// bytes; otherwise it starts a group (alone, whatever its size).
pub(crate) fn pack<T>(
    items: impl IntoIterator<Item = (T, u64)>,
    budget: u64,
    max_items: usize,
    follows: impl Fn(&[T], &T) -> bool,
) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0u64;
    for (item, n) in items {
        match out.last_mut() {
            Some(group)
                if group.len() < max_items
                    && bytes.saturating_add(n) <= budget
                    && follows(group, &item) =>
            {
                group.push(item);
                bytes += n;
            }
            _ => {
                out.push(vec![item]);
                bytes = n;
            }
        }
    }
    out
}

/// Counts an urgent fetch in flight for as long as it lives.
struct UrgentGuard<'a>(&'a Fetcher);

impl Drop for UrgentGuard<'_> {
    fn drop(&mut self) {
        self.0
            .last_urgent_ms
            .store(self.0.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.0.urgent.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The chunks of file entry number `entry` (`e`) from its chunk `first` on that start before
/// the file offset `end`.
fn chunks_in(
    e: &arbor_format::index::IndexEntry,
    entry: usize,
    first: usize,
    end: u64,
) -> impl Iterator<Item = (ChunkRef, &arbor_format::index::Chunk)> {
    e.chunks
        .iter()
        .enumerate()
        .skip(first)
        .take_while(move |(_, c)| c.file_offset < end)
        .map(move |(ci, c)| {
            let r = ChunkRef {
                entry: entry as u32,
                chunk: ci as u32,
            };
            (r, c)
        })
}

/// Appends (without copying) the part of chunk `c` (its decoded `data`) inside the file range `[offset, end)`.
fn push_part(
    out: &mut Vec<Bytes>,
    data: &Bytes,
    c: &arbor_format::index::Chunk,
    offset: u64,
    end: u64,
) {
    let from = offset.max(c.file_offset) - c.file_offset;
    let to = end.min(c.file_offset + c.size) - c.file_offset;
    out.push(data.slice(from as usize..to as usize));
}

fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> impl std::future::Future<Output = Result<T, FetchError>> {
    let h = tokio::task::spawn_blocking(f);
    async move { h.await.map_err(|e| FetchError::Internal(e.to_string())) }
}

impl Fetcher {
    pub fn new(
        cache: Arc<ChunkCache>,
        metrics: Arc<Metrics>,
        opts: FetcherOptions,
    ) -> Arc<Fetcher> {
        let group_slots = Arc::new(tokio::sync::Semaphore::new(opts.group_concurrency.max(1)));
        Arc::new(Fetcher {
            mem: MemCache::new(opts.memory_budget),
            cache,
            metrics,
            opts,
            inflight: Mutex::new(HashMap::new()),
            disk_ahead: Mutex::new(std::collections::HashSet::new()),
            writeback: Arc::new(WriteBack::default()),
            urgent: AtomicUsize::new(0),
            last_urgent_ms: AtomicU64::new(0),
            last_read_ms: AtomicU64::new(0),
            background_slot: tokio::sync::Semaphore::new(1),
            group_slots,
            rt: tokio::runtime::Handle::try_current().ok(),
            epoch: Instant::now(),
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    pub fn options(&self) -> &FetcherOptions {
        &self.opts
    }

    /// Bytes `[offset, offset + len)` of file entry `entry` (clamped to the file's end), as
    /// the parts of the chunks they lie in (no copy; `concat()` joins them).
    pub async fn read_file(
        self: &Arc<Self>,
        layer: &Arc<LayerHandle>,
        entry: usize,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Bytes>, FetchError> {
        let (e, first, end) = match self.read_range(layer, entry, offset, len)? {
            Some(r) => r,
            None => return Ok(Vec::new()),
        };
        self.record(layer, entry, e, first, end);
        let mut out = Vec::new();
        for (r, c) in chunks_in(e, entry, first, end) {
            let data = self.chunk(layer, r).await?;
            self.pass_marker(layer, r);
            push_part(&mut out, &data, c, offset, end);
        }
        Ok(out)
    }

    /// [`Fetcher::read_file`] answered on the calling thread when every chunk it needs is in
    /// the memory cache; `None` when one must be read from disk or fetched. For a FUSE
    /// worker: such a read then costs no hop to the runtime, and never blocks.
    pub fn read_file_held(
        self: &Arc<Self>,
        layer: &Arc<LayerHandle>,
        entry: usize,
        offset: u64,
        len: u64,
    ) -> Option<Result<Vec<Bytes>, FetchError>> {
        let (e, first, end) = match self.read_range(layer, entry, offset, len) {
            Ok(Some(r)) => r,
            Ok(None) => return Some(Ok(Vec::new())),
            Err(err) => return Some(Err(err)),
        };
        let mut out = Vec::new();
        for (r, c) in chunks_in(e, entry, first, end) {
            match self.held_chunk(layer, r, false) {
                Ok(Some(data)) => {
                    self.pass_marker(layer, r);
                    push_part(&mut out, &data, c, offset, end)
                }
                Ok(None) => return None,
                Err(err) => return Some(Err(err)),
            }
        }
        self.record(layer, entry, e, first, end);
        Some(Ok(out))
    }

    /// The entry, its first chunk at `offset` and the end of the range; `None` when empty.
    fn read_range<'a>(
        &self,
        layer: &'a LayerHandle,
        entry: usize,
        offset: u64,
        len: u64,
    ) -> Result<Option<(&'a arbor_format::index::IndexEntry, usize, u64)>, FetchError> {
        self.last_read_ms.store(self.now_ms(), Ordering::Relaxed);
        let e = layer
            .index
            .entries
            .get(entry)
            .ok_or(FetchError::NoEntry(entry))?;
        let end = offset.saturating_add(len).min(e.size);
        if offset >= end {
            return Ok(None);
        }
        let first = e
            .chunks
            .partition_point(|c| c.file_offset + c.size <= offset);
        Ok(Some((e, first, end)))
    }

    /// Notes the chunks a read touches for the layer's start-up recorder, if it has one.
    fn record(
        &self,
        layer: &LayerHandle,
        entry: usize,
        e: &arbor_format::index::IndexEntry,
        first: usize,
        end: u64,
    ) {
        if let Some(rec) = layer.recorder() {
            let last = e.chunks.partition_point(|c| c.file_offset < end);
            rec.note(entry as u32, first as u32..last as u32);
        }
    }

    /// A chunk this node holds, verified: a zero chunk, or one in the memory cache, or (with
    /// `blocking`: it reads and hashes, so not on a runtime thread) one in the disk cache or
    /// a zero chunk with a digest to check. `None`: it must be fetched (or looked up with
    /// `blocking`).
    fn held_chunk(
        &self,
        layer: &LayerHandle,
        r: ChunkRef,
        blocking: bool,
    ) -> Result<Option<Bytes>, FetchError> {
        if layer.is_poisoned() {
            return Err(FetchError::Poisoned(layer.digest.clone()));
        }
        let (name, c) = layer
            .chunk(r)
            .ok_or_else(|| FetchError::Internal(format!("no chunk {r:?}")))?;
        let Some(digest) = c.digest.as_ref() else {
            // A zero chunk written without a digest: its content is known.
            self.metrics.chunk_zero.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(Bytes::from(vec![0u8; c.size as usize])));
        };
        let key = *digest.as_bytes();
        // Chunks are keyed by digest alone, and another image's TOC may name the same digest
        // with another size: only a chunk of the size this TOC says is a hit (anything else
        // would be truncated, or panic when sliced); this layer's chunk then fails to verify.
        if let Some(b) = self.mem.get(&key).filter(|b| b.len() as u64 == c.size) {
            self.metrics.chunk_mem_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(b));
        }
        // Evicted from memory and waiting for (or in) its disk write: still held.
        if let Some(b) = self
            .writeback
            .get(&key)
            .filter(|b| b.len() as u64 == c.size)
        {
            self.metrics.chunk_mem_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(b));
        }
        if !blocking {
            return Ok(None);
        }
        if c.zeros {
            // Zeros need no fetch; verify against the digest all the same.
            let data = vec![0u8; c.size as usize];
            arbor_format::index::verify_chunk(name, c, &data).map_err(|e| {
                FetchError::Verification {
                    name: name.to_string(),
                    offset: c.blob_offset,
                    reason: e.to_string(),
                }
            })?;
            self.metrics.chunk_zero.fetch_add(1, Ordering::Relaxed);
            let b = Bytes::from(data);
            self.remember(key, b.clone(), Dirty::Clean);
            return Ok(Some(b));
        }
        match self.cache.get(digest, c.size) {
            Lookup::Hit(data) => {
                self.metrics.chunk_disk_hits.fetch_add(1, Ordering::Relaxed);
                let b = Bytes::from(data);
                self.remember(key, b.clone(), Dirty::Clean);
                Ok(Some(b))
            }
            Lookup::Corrupt => {
                self.metrics.cache_corrupt.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Lookup::Miss => Ok(None),
        }
    }

    /// After a chunk came from the disk cache: loads the other chunks of its window and of
    /// the next [`DISK_READ_AHEAD`] windows that are on disk but not in memory, in the
    /// background on the blocking pool (one task per window, once at a time), so a reader
    /// going through files does not wait for each cache file read and hash in turn.
    fn disk_read_ahead(self: &Arc<Self>, layer: &Arc<LayerHandle>, r: ChunkRef) {
        let Some(w) = layer.window_of(r) else {
            return;
        };
        for next in (w..layer.windows.len()).take(DISK_READ_AHEAD + 1) {
            let key = (layer.digest.clone(), next);
            if self
                .disk_ahead
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&key)
            {
                continue;
            }
            let refs: Vec<ChunkRef> = layer.windows[next]
                .chunks
                .iter()
                .copied()
                .filter(|&cr| cr != r)
                .filter(|&cr| {
                    layer
                        .chunk(cr)
                        .and_then(|(_, c)| c.digest.as_ref())
                        .is_some_and(|d| !self.mem.contains(d.as_bytes()) && self.cache.contains(d))
                })
                .collect();
            if refs.is_empty() {
                continue;
            }
            if !self
                .disk_ahead
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.clone())
            {
                continue;
            }
            let (f, l) = (Arc::clone(self), Arc::clone(layer));
            tokio::task::spawn_blocking(move || {
                for cr in refs {
                    // A chunk that fails here is read (or fetched) again on demand.
                    let _ = f.held_chunk(&l, cr, true);
                }
                f.disk_ahead
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
            });
        }
    }

    /// One verified chunk.
    pub async fn chunk(
        self: &Arc<Self>,
        layer: &Arc<LayerHandle>,
        r: ChunkRef,
    ) -> Result<Bytes, FetchError> {
        if let Some(b) = self.held_chunk(layer, r, false)? {
            return Ok(b);
        }
        let (name, c) = layer
            .chunk(r)
            .ok_or_else(|| FetchError::Internal(format!("no chunk {r:?}")))?;
        let on_disk = c.zeros || c.digest.as_ref().is_some_and(|d| self.cache.contains(d));
        if on_disk {
            let (f, l) = (Arc::clone(self), Arc::clone(layer));
            if let Some(b) = blocking(move || f.held_chunk(&l, r, true)).await?? {
                self.disk_read_ahead(layer, r);
                return Ok(b);
            }
        }
        let w = layer
            .window_of(r)
            .ok_or_else(|| FetchError::Internal(format!("chunk {r:?} has no window")))?;
        self.read_ahead(layer, w);
        self.read_group(layer, r, w);
        if !layer.prefetch_planned(w) {
            self.read_sequential(layer, w);
        }
        let waited = Instant::now();
        let window = self.window(layer, w).await;
        let waited = waited.elapsed();
        self.metrics
            .read_wait_micros
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        debug!(layer = %layer.digest, file = name, window = w, waited_ms = waited.as_millis() as u64, "read waited for a fetch");
        match window.as_ref() {
            Ok(chunks) => {
                if let Some((_, b)) = chunks.iter().find(|(cr, _)| *cr == r) {
                    self.metrics.chunk_fetched.fetch_add(1, Ordering::Relaxed);
                    return Ok(b.clone());
                }
                // The window came, but this chunk did not verify: fetch it alone once more.
                self.refetch(layer, r).await
            }
            Err(e) => Err(e.clone()),
        }
    }

    async fn refetch(&self, layer: &Arc<LayerHandle>, r: ChunkRef) -> Result<Bytes, FetchError> {
        let (name, c) = layer
            .chunk(r)
            .ok_or_else(|| FetchError::Internal(format!("no chunk {r:?}")))?;
        let (name, c) = (name.to_string(), c.clone());
        warn!(layer = %layer.digest, file = %name, offset = c.blob_offset, "chunk failed verification, refetching it");
        let frame = self.read_sources(layer, c.blob_offset, c.blob_end).await?;
        let (n, cc) = (name.clone(), c.clone());
        let decoded = blocking(move || decode_chunk(&n, &cc, &frame)).await?;
        match decoded {
            Ok(data) => {
                let b = Bytes::from(data);
                if let Some(d) = &c.digest {
                    self.remember_fetched(layer, *d.as_bytes(), b.clone(), Dirty::Urgent);
                }
                self.metrics.chunk_fetched.fetch_add(1, Ordering::Relaxed);
                Ok(b)
            }
            Err(e) => {
                self.metrics.verify_failures.fetch_add(1, Ordering::Relaxed);
                warn!(layer = %layer.digest, file = %name, error = %e, "chunk failed verification twice");
                Err(FetchError::Verification {
                    name,
                    offset: c.blob_offset,
                    reason: e.to_string(),
                })
            }
        }
    }

    /// Fetches window `w` of the layer once however many callers ask at the same time,
    /// decodes and verifies each of its chunks, and stores the good ones in the cache. A chunk
    /// that does not verify is left out of the result (the caller refetches it alone).
    /// Urgent: while it runs (and shortly after), background fetches wait.
    pub async fn window(&self, layer: &Arc<LayerHandle>, w: usize) -> WindowResult {
        self.urgent.fetch_add(1, Ordering::AcqRel);
        let _guard = UrgentGuard(self);
        self.window_once(layer, w, Dirty::Urgent).await
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// After a read had to fetch window `w`, fetches the next [`FetcherOptions::read_ahead`]
    /// windows too (concurrently, as urgent): tar order keeps a directory's files together,
    /// and a starting program reads its modules and libraries directory by directory, so
    /// they are likely its next misses.
    fn read_ahead(self: &Arc<Self>, layer: &Arc<LayerHandle>, w: usize) {
        for next in (w + 1..layer.windows.len()).take(self.opts.read_ahead) {
            if !self.wanted(layer, next) {
                continue;
            }
            let (f, l) = (Arc::clone(self), Arc::clone(layer));
            tokio::spawn(async move {
                let _ = f.window(&l, next).await;
            });
        }
    }

    /// Whether window `w` is neither held (memory or disk) nor being fetched: worth fetching
    /// ahead of reads.
    fn wanted(&self, layer: &LayerHandle, w: usize) -> bool {
        !self.window_cached(layer, w)
            && !self
                .inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&(layer.digest.clone(), w))
    }

    /// After a miss at window `w`, if the reader is moving forward through the layer
    /// ([`LayerHandle::note_miss`]), fetches the windows after `w` in the background as urgent
    /// work, through the group read-ahead's slots: 4 windows on the [`SEQUENTIAL_STREAK`]th
    /// such miss, doubling with each further one up to
    /// [`FetcherOptions::sequential_read_ahead`]. The window after `w` becomes the layer's
    /// marker ([`Fetcher::pass_marker`]).
    fn read_sequential(self: &Arc<Self>, layer: &Arc<LayerHandle>, w: usize) {
        let max = self.opts.sequential_read_ahead;
        let streak = layer.note_miss(w);
        if max == 0 || streak < SEQUENTIAL_STREAK {
            if streak == 0 {
                // The reader jumped: no stretch ahead of it any more.
                layer.seq_marker.store(usize::MAX, Ordering::Relaxed);
                layer.seq_ahead.store(0, Ordering::Relaxed);
            }
            return;
        }
        // A reader that caught up with its stretch keeps the stretch's length at least.
        let ahead = (4usize << (streak - SEQUENTIAL_STREAK).min(16))
            .max(layer.seq_ahead.load(Ordering::Relaxed))
            .min(max);
        self.fetch_ahead(layer, w, ahead);
    }

    /// When a read reaches the layer's marker window, the stretch is extended at once to
    /// twice as many windows past it (up to the maximum) and the marker moves to the next
    /// window: a sequential reader keeps a constant lead of fetched windows (the kernel's
    /// asynchronous read-ahead, slid window by window), so the fetches never stop while it
    /// reads what is already fetched and it does not catch up with them at a stretch's end.
    fn pass_marker(self: &Arc<Self>, layer: &Arc<LayerHandle>, r: ChunkRef) {
        let marker = layer.seq_marker.load(Ordering::Relaxed);
        if marker == usize::MAX || layer.window_of(r) != Some(marker) {
            return;
        }
        if layer
            .seq_marker
            .compare_exchange(marker, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let ahead = (layer.seq_ahead.load(Ordering::Relaxed) * 2)
            .clamp(4, self.opts.sequential_read_ahead.max(4));
        self.fetch_ahead(layer, marker, ahead);
    }

    /// Fetches windows `w + 1 ..= w + ahead` that are neither held nor in flight, in the
    /// background through the group read-ahead's slots, and sets the marker on the next
    /// window. Windows the stretch already asked for are not looked at again: with the
    /// marker on every window this runs once per window the reader enters, often on a FUSE
    /// worker, and checking a window locks the caches once per chunk.
    fn fetch_ahead(self: &Arc<Self>, layer: &Arc<LayerHandle>, w: usize, ahead: usize) {
        let mut bytes = 0;
        let from = layer
            .stretch_end()
            .map_or(w + 1, |end| end.saturating_add(1).max(w + 1));
        let to = w
            .saturating_add(ahead)
            .min(layer.windows.len().saturating_sub(1));
        let marker = w + 1;
        // While at least half the lead is still ahead of the reader, the stretch grows only
        // by whole requests ([`FetcherOptions::max_request`]), not a window at a time.
        let span: u64 = layer
            .windows
            .get(from..=to)
            .map_or(0, |ws| ws.iter().map(|x| x.end - x.start).sum());
        if from <= to
            && layer.stretch_end().is_some()
            && span < self.opts.max_request
            && from.saturating_sub(marker) >= ahead / 2
        {
            layer.seq_ahead.store(ahead, Ordering::Relaxed);
            if marker < layer.windows.len() {
                layer.seq_marker.store(marker, Ordering::Relaxed);
            }
            return;
        }
        let wanted: Vec<usize> = (from..=to).filter(|&x| self.wanted(layer, x)).collect();
        for &x in &wanted {
            bytes += layer.windows[x].end - layer.windows[x].start;
        }
        self.spawn_speculative(layer, &wanted, true);
        layer.seq_ahead.store(ahead, Ordering::Relaxed);
        layer.note_stretch(to);
        if marker < layer.windows.len() {
            layer.seq_marker.store(marker, Ordering::Relaxed);
        }
        self.metrics
            .sequential_read_ahead_bytes
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// On the first miss in a locality group (a directory), fetches in the background, as
    /// urgent work, the windows of the rest of the missed file and then of the group's other
    /// files, [`FetcherOptions::group_read_ahead`] bytes at most,
    /// [`FetcherOptions::group_concurrency`] at a time over all groups: a program that opens a
    /// file usually reads it whole, and an import of a package reads many of its files one
    /// after another, each a round trip if fetched alone.
    fn read_group(self: &Arc<Self>, layer: &Arc<LayerHandle>, r: ChunkRef, w: usize) {
        let budget = self.opts.group_read_ahead;
        if budget == 0 {
            return;
        }
        let Some(&g) = layer.entry_group.get(r.entry as usize) else {
            return;
        };
        let Some((group, started)) = layer.groups.get(g as usize) else {
            return;
        };
        // The rest of the file first (its windows after the missed one), then the group's
        // windows from the missed one on, then those before it.
        let file = layer
            .chunk_window
            .get(r.entry as usize)
            .map(|ws| {
                ws.iter()
                    .skip(r.chunk as usize + 1)
                    .copied()
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let within_set = layer.prefetch_planned(w);
        let first_miss = !started[usize::from(within_set)].swap(true, Ordering::AcqRel);
        let split = group.partition_point(|x| (*x as usize) <= w);
        let rest: Box<dyn Iterator<Item = u32>> = if first_miss {
            Box::new(group[split..].iter().chain(&group[..split]).copied())
        } else {
            Box::new(std::iter::empty())
        };
        // A miss on a window the prefetch brings only moves the set's own windows ahead (the
        // rest of the file, then the directory's files in the set): the set says what the
        // program reads, and the directory's other files are what it left out.
        let mut picked = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut bytes = 0u64;
        for x in file.into_iter().chain(rest) {
            let x = x as usize;
            if x == w
                || x == u32::MAX as usize
                || (within_set && !layer.prefetch_planned(x))
                || !seen.insert(x)
            {
                continue;
            }
            let Some(win) = layer.windows.get(x) else {
                continue;
            };
            if bytes + (win.end - win.start) > budget {
                break;
            }
            if self.window_cached(layer, x) {
                continue;
            }
            bytes += win.end - win.start;
            picked.push(x);
        }
        if picked.is_empty() {
            return;
        }
        self.metrics
            .group_read_ahead_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        // In the order picked, at most `group_concurrency` requests in flight over all groups
        // and layers; a window a read fetched meanwhile is not fetched again.
        // A reader already moving through the layer in order reads whole layers: its
        // group read-ahead goes in runs like the sequential one.
        let sequential = layer.stretch_end().is_some();
        self.spawn_speculative(layer, &picked, sequential);
    }

    /// Fetches windows `ws` in the background as urgent work once one of the read-ahead slots
    /// ([`FetcherOptions::group_concurrency`], shared by group and sequential read-ahead)
    /// frees, but not those a read fetched meanwhile. With `pace` (a reader of whole layers:
    /// the sequential read-ahead, or the group read-ahead of a reader with a sequential
    /// stretch), runs of consecutive windows go in one request each,
    /// [`FetcherOptions::max_request`] bytes at most ([`Fetcher::fetch_run`]), taking a slot
    /// per window until their bytes have come, and each request first waits for room in the
    /// write-back queue ([`Fetcher::writeback_room`]): read-ahead that can run through a
    /// whole layer must go at the disk cache's pace, or what it evicts from memory would be
    /// dropped and fetched again. Without, each window is a request of its own, holding its
    /// slot until decoded. Spawned on the fetcher's runtime, so FUSE workers may call it.
    fn spawn_speculative(self: &Arc<Self>, layer: &Arc<LayerHandle>, ws: &[usize], pace: bool) {
        let Some(rt) = &self.rt else {
            return;
        };
        // A slot per window, as when each window was a request of its own: the speculative
        // bytes on the link ahead of the next demand miss stay what `group_concurrency` says.
        // A starting program's group read-ahead (unpaced) keeps one request per window, each
        // holding its slot until decoded: merged, its windows came later for the misses that
        // wait for them, and a start on demand took 2-4% longer (bench-cold-start, pypi,
        // 1 Gbit/s link). Runs are for readers of whole layers.
        let slots_max = self.opts.group_concurrency.max(1);
        let max_bytes = if pace { self.opts.max_request } else { 0 };
        for run in runs(layer, ws, max_bytes, slots_max) {
            let (f, l) = (Arc::clone(self), Arc::clone(layer));
            let slots = Arc::clone(&self.group_slots);
            rt.spawn(async move {
                if pace {
                    f.writeback_room().await;
                }
                let n = u32::try_from(run.len()).unwrap_or(u32::MAX);
                let Ok(permit) = slots.acquire_many_owned(n).await else {
                    return;
                };
                let wanted: Vec<usize> = run.into_iter().filter(|&w| f.wanted(&l, w)).collect();
                let mut parts = runs(&l, &wanted, u64::MAX, usize::MAX);
                if pace && parts.len() == 1 {
                    // The slots free when the bytes have come, not after decoding.
                    let part = parts.remove(0);
                    f.urgent_run(&l, &part, Some(permit)).await;
                } else {
                    for part in parts {
                        f.urgent_run(&l, &part, None).await;
                    }
                    drop(permit);
                }
            });
        }
    }

    /// Fetches just the chunks `refs` of a layer (those not in memory or the disk cache), as
    /// urgent work: their frames in blob order, in ranges merged across gaps of at most
    /// [`CHUNK_RANGE_GAP`], each chunk decoded, verified and kept like a window's. For a
    /// learned set whose chunks are scattered among others in their windows. Returns the
    /// bytes fetched. A chunk that fails verification is left out (a read refetches it).
    pub async fn fetch_chunks(
        &self,
        layer: &Arc<LayerHandle>,
        refs: &[ChunkRef],
    ) -> Result<u64, FetchError> {
        if layer.is_poisoned() {
            return Err(FetchError::Poisoned(layer.digest.clone()));
        }
        let mut want: Vec<(String, Chunk)> = refs
            .iter()
            .filter_map(|&r| layer.chunk(r))
            .filter(|(_, c)| !c.zeros && c.digest.as_ref().is_some_and(|d| !self.holds(d)))
            .map(|(n, c)| (n.to_string(), c.clone()))
            .collect();
        want.sort_by_key(|(_, c)| c.blob_offset);
        want.dedup_by_key(|(_, c)| c.blob_offset);
        // (blob start, blob end, the chunks in it)
        type Range = (u64, u64, Vec<(String, Chunk)>);
        let mut ranges: Vec<Range> = Vec::new();
        for (n, c) in want {
            match ranges.last_mut() {
                Some((_, end, v))
                    if c.blob_offset >= *end && c.blob_offset - *end <= CHUNK_RANGE_GAP =>
                {
                    *end = c.blob_end;
                    v.push((n, c));
                }
                _ => ranges.push((c.blob_offset, c.blob_end, vec![(n, c)])),
            }
        }
        self.urgent.fetch_add(1, Ordering::AcqRel);
        let _guard = UrgentGuard(self);
        let mut fetched = 0u64;
        for (start, end, chunks) in ranges {
            let data = self.read_sources(layer, start, end).await?;
            fetched += data.len() as u64;
            let metrics = Arc::clone(&self.metrics);
            let digest = layer.digest.clone();
            let decoded = blocking(move || {
                let mut out = Vec::with_capacity(chunks.len());
                for (name, c) in chunks {
                    let frame = &data[(c.blob_offset - start) as usize..(c.blob_end - start) as usize];
                    match decode_chunk(&name, &c, frame) {
                        Ok(v) => out.push((c.digest.clone(), Bytes::from(v))),
                        Err(e) => {
                            metrics.verify_failures.fetch_add(1, Ordering::Relaxed);
                            warn!(layer = %digest, file = %name, error = %e, "chunk did not verify");
                        }
                    }
                }
                out
            })
            .await?;
            for (d, b) in decoded {
                if let Some(d) = d {
                    self.remember_fetched(layer, *d.as_bytes(), b, Dirty::Urgent);
                }
            }
        }
        Ok(fetched)
    }

    /// True when background work may use the link now: no urgent fetch in flight or within
    /// [`QUIET_BEFORE_BACKGROUND`], and no workload read within [`ACTIVE_WITHIN`]. Other
    /// background readers of whole layers (the snapshotter's read-through proof) pace
    /// themselves on it, as [`Fetcher::background_windows`] does.
    pub fn is_quiet(&self) -> bool {
        let now = self.now_ms();
        self.urgent.load(Ordering::Acquire) == 0
            && now.saturating_sub(self.last_urgent_ms.load(Ordering::Relaxed))
                >= QUIET_BEFORE_BACKGROUND.as_millis() as u64
            && now.saturating_sub(self.last_read_ms.load(Ordering::Relaxed))
                >= ACTIVE_WITHIN.as_millis() as u64
    }

    /// [`Fetcher::fetch_windows`] for background work (prefetching the rest of a layer):
    /// starts only when no urgent fetch has been in flight for [`QUIET_BEFORE_BACKGROUND`], so
    /// reads a workload is waiting for never queue behind it for the link or the registry;
    /// and not while the workload reads at all (see [`ACTIVE_WITHIN`]). Each window's result,
    /// in order.
    pub async fn background_windows(
        &self,
        layer: &Arc<LayerHandle>,
        ws: &[usize],
    ) -> Vec<WindowResult> {
        loop {
            let quiet_ms = self
                .now_ms()
                .saturating_sub(self.last_urgent_ms.load(Ordering::Relaxed));
            if self.urgent.load(Ordering::Acquire) == 0
                && quiet_ms >= QUIET_BEFORE_BACKGROUND.as_millis() as u64
            {
                let read_ago = self
                    .now_ms()
                    .saturating_sub(self.last_read_ms.load(Ordering::Relaxed));
                if read_ago >= ACTIVE_WITHIN.as_millis() as u64 {
                    return self.fetch_run(layer, ws, Dirty::Background, None).await;
                }
                if self.opts.background_while_active
                    && let Ok(_slot) = self.background_slot.try_acquire()
                {
                    let r = self.fetch_run(layer, ws, Dirty::Background, None).await;
                    tokio::time::sleep(BACKGROUND_PACE_WHILE_ACTIVE).await;
                    return r;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `dirty`: how its chunks are to be written back ([`Dirty::Background`]: only into free
    /// space of the disk cache).
    async fn window_once(&self, layer: &Arc<LayerHandle>, w: usize, dirty: Dirty) -> WindowResult {
        self.window_once_with(layer, w, self.fetch_window(layer, w, dirty))
            .await
    }

    /// Window `w`'s result: from the fetch of it already in flight if there is one (its
    /// cell in `inflight`), else from `fetch`, which concurrent readers of `w` then wait for.
    async fn window_once_with(
        &self,
        layer: &Arc<LayerHandle>,
        w: usize,
        fetch: impl Future<Output = Result<Vec<(ChunkRef, Bytes)>, FetchError>>,
    ) -> WindowResult {
        let key = (layer.digest.clone(), w);
        let cell = {
            let mut m = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(m.entry(key.clone()).or_default())
        };
        let result = cell
            .get_or_init(|| async { Arc::new(fetch.await) })
            .await
            .clone();
        let mut m = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if m.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            m.remove(&key);
        }
        result
    }

    async fn fetch_window(
        &self,
        layer: &Arc<LayerHandle>,
        w: usize,
        dirty: Dirty,
    ) -> Result<Vec<(ChunkRef, Bytes)>, FetchError> {
        let window = layer
            .windows
            .get(w)
            .ok_or_else(|| FetchError::Internal(format!("no window {w}")))?;
        let data = self.read_sources(layer, window.start, window.end).await?;
        self.decode_window(layer, w, data, dirty).await
    }

    /// Fetches the consecutive windows `ws` with one range request, then decodes and keeps
    /// each as [`Fetcher::fetch_window`] would (each window's decoding on its own blocking
    /// thread). Reads of any of them meanwhile wait for this fetch, as for a window's; a
    /// window some other fetch already has in flight is taken from that one.
    /// `permit` (read-ahead slots) is released when the bytes have come.
    async fn fetch_run(
        &self,
        layer: &Arc<LayerHandle>,
        ws: &[usize],
        dirty: Dirty,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Vec<WindowResult> {
        let consecutive = ws.windows(2).all(|p| p[1] == p[0] + 1);
        let bounds = ws
            .first()
            .zip(ws.last())
            .and_then(|(&a, &b)| Some((layer.windows.get(a)?.start, layer.windows.get(b)?.end)));
        let Some((start, end)) = bounds.filter(|_| consecutive) else {
            let each = ws.iter().map(|&w| self.window_once(layer, w, dirty));
            return futures_util::future::join_all(each).await;
        };
        let body = async move {
            let r = self.read_sources(layer, start, end).await;
            drop(permit);
            r
        }
        .shared();
        let each = ws.iter().map(|&w| {
            let body = body.clone();
            self.window_once_with(layer, w, async move {
                let data = body.await?;
                let win = layer
                    .windows
                    .get(w)
                    .ok_or_else(|| FetchError::Internal(format!("no window {w}")))?;
                let (s, e) = ((win.start - start) as usize, (win.end - start) as usize);
                if e > data.len() || s > e {
                    return Err(FetchError::Internal(format!(
                        "window {w} outside the {} bytes fetched",
                        data.len()
                    )));
                }
                self.decode_window(layer, w, data.slice(s..e), dirty).await
            })
        });
        futures_util::future::join_all(each).await
    }

    /// `ws` cut into the runs that [`Fetcher::fetch_windows`] fetches with one request each:
    /// consecutive windows, [`FetcherOptions::max_request`] bytes at most.
    pub fn request_runs(&self, layer: &LayerHandle, ws: &[usize]) -> Vec<Vec<usize>> {
        runs(layer, ws, self.opts.max_request, usize::MAX)
    }

    /// Fetches the consecutive windows `ws` (a run of [`Fetcher::request_runs`]) with one
    /// range request as urgent work, as [`Fetcher::window`] does one; each window's result,
    /// in order.
    pub async fn fetch_windows(&self, layer: &Arc<LayerHandle>, ws: &[usize]) -> Vec<WindowResult> {
        self.urgent_run(layer, ws, None).await
    }

    async fn urgent_run(
        &self,
        layer: &Arc<LayerHandle>,
        ws: &[usize],
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Vec<WindowResult> {
        self.urgent.fetch_add(1, Ordering::AcqRel);
        let _guard = UrgentGuard(self);
        self.fetch_run(layer, ws, Dirty::Urgent, permit).await
    }

    /// Decodes and verifies the chunks of window `w` from its bytes `data` (on a blocking
    /// thread), keeps them and marks the window fetched.
    async fn decode_window(
        &self,
        layer: &Arc<LayerHandle>,
        w: usize,
        data: Bytes,
        dirty: Dirty,
    ) -> Result<Vec<(ChunkRef, Bytes)>, FetchError> {
        let window = layer
            .windows
            .get(w)
            .ok_or_else(|| FetchError::Internal(format!("no window {w}")))?;
        let start = window.start;
        let refs: Vec<(ChunkRef, String, Chunk)> = window
            .chunks
            .iter()
            .filter_map(|&r| layer.chunk(r).map(|(n, c)| (r, n.to_string(), c.clone())))
            .collect();
        let metrics = Arc::clone(&self.metrics);
        let digest = layer.digest.clone();
        let decoded = blocking(move || {
            let mut out = Vec::with_capacity(refs.len());
            for (r, name, c) in refs {
                let frame = &data[(c.blob_offset - start) as usize..(c.blob_end - start) as usize];
                match decode_chunk(&name, &c, frame) {
                    Ok(v) => out.push((r, c.digest.clone(), Bytes::from(v))),
                    Err(e) => {
                        metrics.verify_failures.fetch_add(1, Ordering::Relaxed);
                        warn!(layer = %digest, file = %name, error = %e, "chunk did not verify");
                    }
                }
            }
            out
        })
        .await?;
        layer.mark_fetched(w);
        // Neighbours are likely read next (files of a directory, chunks of a file): keep them
        // all in memory; they reach the disk cache when evicted or flushed (write-back).
        for (_, d, b) in &decoded {
            if let Some(d) = d {
                self.remember_fetched(layer, *d.as_bytes(), b.clone(), dirty);
            }
        }
        Ok(decoded.into_iter().map(|(r, _, b)| (r, b)).collect())
    }

    /// Whether the chunk is in memory, on its way to disk, or on disk: nothing to fetch.
    fn holds(&self, d: &arbor_format::Digest) -> bool {
        self.mem.contains(d.as_bytes())
            || self.writeback.contains(d.as_bytes())
            || self.cache.contains(d)
    }

    /// Whether every chunk of window `w` is already in memory or in the disk cache.
    pub fn window_cached(&self, layer: &LayerHandle, w: usize) -> bool {
        // A kept blob's fetched windows are on this node's disk (in the block store).
        if layer.blob_kept && layer.was_fetched(w) {
            return true;
        }
        layer.windows.get(w).is_some_and(|win| {
            win.chunks.iter().all(|&r| {
                layer
                    .chunk(r)
                    .and_then(|(_, c)| c.digest.as_ref())
                    .is_some_and(|d| self.holds(d))
            })
        })
    }

    /// Reads `[start, end)` from the first source that serves it.
    async fn read_sources(
        &self,
        layer: &LayerHandle,
        start: u64,
        end: u64,
    ) -> Result<Bytes, FetchError> {
        let mut errors = Vec::new();
        for s in &layer.sources {
            let t = Instant::now();
            let r = tokio::time::timeout(
                self.opts.fetch_timeout,
                s.read_range(&layer.digest, start, end - start),
            )
            .await;
            match r {
                // Every source checks the length it was asked for; a wrong one here would
                // make the frames' offsets wrong, so it is an error all the same.
                Ok(Ok(b)) if b.len() as u64 != end - start => {
                    self.metrics.source(s.kind(), 0, false, t.elapsed());
                    errors.push(format!(
                        "{}: {} bytes for a range of {}",
                        s.kind(),
                        b.len(),
                        end - start
                    ));
                }
                Ok(Ok(b)) => {
                    self.metrics
                        .source(s.kind(), b.len() as u64, true, t.elapsed());
                    self.metrics.layer_fetched(&layer.digest, b.len() as u64);
                    debug!(layer = %layer.digest, start, end, source = s.kind(), "fetched");
                    return Ok(b);
                }
                Ok(Err(e)) => {
                    self.metrics.source(s.kind(), 0, false, t.elapsed());
                    errors.push(e.to_string());
                }
                Err(_) => {
                    self.metrics.source(s.kind(), 0, false, t.elapsed());
                    errors.push(format!(
                        "{}: timed out after {} s",
                        s.kind(),
                        self.opts.fetch_timeout.as_secs()
                    ));
                }
            }
        }
        warn!(layer = %layer.digest, start, end, errors = %errors.join("; "), "fetch failed");
        Err(FetchError::Sources {
            digest: layer.digest.clone(),
            start,
            end,
            errors: errors.join("; "),
        })
    }

    /// Keeps a chunk just fetched and verified for `layer` in memory, to be written to the
    /// disk cache as `dirty` says, unless the layer's blob stays on the node's disk anyway
    /// ([`BlobSource::keeps_blob`]): then it is clean, and dropped when evicted.
    fn remember_fetched(&self, layer: &LayerHandle, key: [u8; 32], data: Bytes, dirty: Dirty) {
        if layer.blob_kept {
            self.remember_in(key, data, Dirty::Clean, false);
        } else {
            self.remember_in(key, data, dirty, false);
        }
    }

    /// Keeps a verified chunk in memory (`dirty`: not on disk yet; [`Dirty::Clean`]: read
    /// back from the disk cache, on a blocking-pool thread) and writes whatever dirty chunks
    /// that evicts.
    fn remember(&self, key: [u8; 32], data: Bytes, dirty: Dirty) {
        self.remember_in(key, data, dirty, dirty == Dirty::Clean);
    }

    /// [`Fetcher::remember`]; `blocking_thread`: the caller may write evicted chunks itself
    /// when the write-back queue has no room.
    fn remember_in(&self, key: [u8; 32], data: Bytes, dirty: Dirty, blocking_thread: bool) {
        // While the writers are behind (the queue over half full), chunks not yet written stay
        // in memory, up to `writeback_bytes` over the budget, and clean ones make the room: a
        // dirty chunk evicted now would likely find the queue full and be dropped.
        let slack = if self.writeback.bytes.load(Ordering::Relaxed) > self.opts.writeback_bytes / 2
        {
            self.opts.writeback_bytes
        } else {
            0
        };
        let evicted = self.mem.put_holding_dirty(key, data, dirty, slack);
        if evicted.is_empty() {
            return;
        }
        if let Some(dropped) = self.store(evicted) {
            if blocking_thread {
                // A chunk read back from disk, so this is a blocking-pool thread (see
                // `held_chunk`): write what it pushed out here rather than drop it, so a
                // re-read pays the disk write the writers are behind on, not a refetch.
                for (k, b, d) in dropped {
                    write_chunk(&self.cache, k, &b, d);
                }
                return;
            }
            // Evicted from memory and no room in the write-back queue: let them go.
            self.metrics
                .writeback_dropped
                .fetch_add(dropped.len() as u64, Ordering::Relaxed);
            debug!(
                chunks = dropped.len(),
                "write-back queue full, chunks not cached"
            );
        }
    }

    /// Queues verified chunks for the disk cache's writers, unless their bytes would exceed
    /// [`FetcherOptions::writeback_bytes`]: then nothing is queued and the chunks are handed
    /// back.
    #[allow(clippy::type_complexity)]
    fn store(
        &self,
        chunks: Vec<([u8; 32], Bytes, Dirty)>,
    ) -> Option<Vec<([u8; 32], Bytes, Dirty)>> {
        if chunks.is_empty() {
            return None;
        }
        let bytes: u64 = chunks.iter().map(|(_, b, _)| b.len() as u64).sum();
        let limit = self.opts.writeback_bytes;
        if self
            .writeback
            .bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n + bytes <= limit).then_some(n + bytes)
            })
            .is_err()
        {
            return Some(chunks);
        }
        let spawn = {
            let mut st = self.writeback.lock();
            for (k, b, _) in &chunks {
                st.held.entry(*k).or_insert_with(|| (b.clone(), 0)).1 += 1;
            }
            st.queue.extend(chunks);
            let spawn = st.writers < MAX_WRITEBACK_WRITERS;
            if spawn {
                st.writers += 1;
            }
            spawn
        };
        if spawn {
            let (wb, cache, metrics) = (
                Arc::clone(&self.writeback),
                Arc::clone(&self.cache),
                Arc::clone(&self.metrics),
            );
            tokio::task::spawn_blocking(move || wb.drain(&cache, &metrics));
        }
        None
    }

    /// Waits (for the background prefetch) until the write-back queue is at most half full,
    /// so fetching the rest of a layer runs at the disk's pace instead of having chunks
    /// evicted from memory faster than they can be written, and dropped. Gives up after
    /// [`FLUSH_WAIT`]: a hung disk then costs refetches, not a stuck prefetch.
    pub async fn writeback_room(&self) {
        let deadline = Instant::now() + FLUSH_WAIT;
        while self.writeback.bytes.load(Ordering::SeqCst) > self.opts.writeback_bytes / 2
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Writes chunks still only in memory to the disk cache (as many as the write-back
    /// bounds allow; the rest stay dirty for the next flush) and waits until cache writes
    /// have finished, at most [`FLUSH_WAIT`]. Mounts call it periodically.
    pub async fn flush(&self) {
        self.flush_once(Instant::now() + FLUSH_WAIT).await;
    }

    /// Writes every chunk still only in memory to the disk cache, batch after batch within
    /// the write-back bounds, for at most [`FLUSH_WAIT`] in all. Mounts call it when they
    /// stop: what stays dirty then is lost with the process.
    pub async fn flush_all(&self) {
        let deadline = Instant::now() + FLUSH_WAIT;
        while self.flush_once(deadline).await && Instant::now() < deadline {}
    }

    /// One write-back round; whether it found dirty chunks (there may be more).
    async fn flush_once(&self, deadline: Instant) -> bool {
        let room = self
            .opts
            .writeback_bytes
            .saturating_sub(self.writeback.bytes.load(Ordering::SeqCst));
        let dirty = self.mem.take_dirty(room);
        let found = !dirty.is_empty();
        if let Some(back) = self.store(dirty) {
            // No room in the queue: keep them dirty in memory for the next flush.
            for (k, b, d) in back {
                let lost = self.mem.put(k, b, d).len() as u64;
                self.metrics
                    .writeback_dropped
                    .fetch_add(lost, Ordering::Relaxed);
            }
        }
        while self.writeback.bytes.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                warn!(
                    bytes = self.writeback.bytes.load(Ordering::SeqCst),
                    "chunk cache writes still pending after {} s (slow or full disk?)",
                    FLUSH_WAIT.as_secs()
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        found
    }

    /// Write-back writers running (for tests and diagnostics).
    pub fn writeback_writers(&self) -> usize {
        self.writeback.lock().writers
    }

    /// Bytes queued for the disk cache or being written (for tests and diagnostics).
    pub fn writeback_pending_bytes(&self) -> u64 {
        self.writeback.bytes.load(Ordering::SeqCst)
    }
}

/// The write-back queue: chunks evicted from memory (or flushed) wait here for at most
/// [`MAX_WRITEBACK_WRITERS`] blocking-pool writers.
#[derive(Default)]
struct WriteBack {
    state: Mutex<WriteBackState>,
    /// Bytes queued or being written.
    bytes: AtomicU64,
}

#[derive(Default)]
struct WriteBackState {
    queue: std::collections::VecDeque<([u8; 32], Bytes, Dirty)>,
    /// Every chunk queued or being written, and how many times it is (a chunk evicted,
    /// fetched again and evicted again is queued twice): readers find it here, so a chunk
    /// on its way to disk is never fetched again.
    held: HashMap<[u8; 32], (Bytes, u32)>,
    writers: usize,
}

impl WriteBack {
    fn lock(&self) -> std::sync::MutexGuard<'_, WriteBackState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A chunk queued for the disk cache or being written.
    fn get(&self, k: &[u8; 32]) -> Option<Bytes> {
        self.lock().held.get(k).map(|(b, _)| b.clone())
    }

    fn contains(&self, k: &[u8; 32]) -> bool {
        self.lock().held.contains_key(k)
    }

    /// One writer: writes queued chunks until the queue is empty (checked under the lock
    /// that producers push under, so no chunk is left without a writer).
    fn drain(&self, cache: &ChunkCache, metrics: &Metrics) {
        // Caching is background work: let reads that someone waits for go first.
        let _nice = crate::nice::Niced::lower(10);
        let publish = || {
            let (n, bytes_held) = cache.usage();
            metrics.cache_chunks.store(n as u64, Ordering::Relaxed);
            metrics.cache_bytes.store(bytes_held, Ordering::Relaxed);
        };
        for written in 1u64.. {
            let next = {
                let mut st = self.lock();
                let next = st.queue.pop_front();
                if next.is_none() {
                    st.writers -= 1;
                }
                next
            };
            let Some((k, b, dirty)) = next else {
                break;
            };
            write_chunk(cache, k, &b, dirty);
            {
                let mut st = self.lock();
                if let Some(e) = st.held.get_mut(&k) {
                    e.1 -= 1;
                    if e.1 == 0 {
                        st.held.remove(&k);
                    }
                }
            }
            self.bytes.fetch_sub(b.len() as u64, Ordering::SeqCst);
            if written % 64 == 0 {
                publish();
            }
        }
        publish();
    }
}

/// Writes one verified chunk to the disk cache as its `dirty` says (blocking).
fn write_chunk(cache: &ChunkCache, k: [u8; 32], b: &[u8], dirty: Dirty) {
    let d = arbor_format::Digest::from_bytes(k);
    let r = match dirty {
        Dirty::Background => cache.put_if_room(&d, b).map(|_| ()),
        _ => cache.put(&d, b),
    };
    if let Err(e) = r {
        warn!(chunk = %d, error = %e, "cannot write chunk to the cache");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{encoded_layer, noise};
    use arbor_format::index::IndexEntry;
    use arbor_format::tarstream::EntryKind;

    /// The content of test file `name` of `size` bytes: its name over and over.
    fn content(name: &str, size: u64) -> Vec<u8> {
        name.bytes().cycle().take(size as usize).collect()
    }

    /// A layer of regular files of one chunk each, `size` compressed bytes apiece, in order;
    /// file contents as [`content`] makes them.
    fn layer(files: &[(&str, u64)], unit: u64) -> LayerHandle {
        let mut off = 0;
        let entries = files
            .iter()
            .map(|(name, size)| {
                let mut e = IndexEntry::bare(EntryKind::Regular, name, "");
                e.size = *size;
                e.chunks = vec![Chunk {
                    file_offset: 0,
                    size: *size,
                    blob_offset: off,
                    blob_end: off + size,
                    digest: Some(arbor_format::Digest::of(&content(name, *size))),
                    zeros: false,
                }];
                off += size;
                e
            })
            .collect();
        let index = LayerIndex {
            entries,
            data_end: off,
            arbor: None,
        };
        LayerHandle::new("sha256:00", off, Arc::new(index), Vec::new(), unit)
    }

    #[test]
    fn a_directory_and_its_pycache_are_one_group() {
        let l = layer(
            &[
                ("pkg/__init__.py", 5000),
                ("pkg/__pycache__/__init__.cpython-311.pyc", 5000),
                ("pkg/sub/mod.py", 5000),
                ("pkg/mod.py", 5000),
                ("__pycache__/top.pyc", 5000),
                ("top.py", 5000),
            ],
            4096,
        );
        // One window per file (each is larger than the unit).
        assert_eq!(l.windows().len(), 6);
        assert_eq!(l.group_windows(0), &[0, 1, 3]);
        assert_eq!(l.group_windows(1), &[0, 1, 3]);
        assert_eq!(l.group_windows(2), &[2]);
        assert_eq!(l.group_windows(4), &[4, 5]);
        assert!(l.group_windows(99).is_empty());
    }

    /// More dirty chunks than one write-back round takes: `flush` writes a round's worth,
    /// `flush_all` (at unmount) writes every one, so a new mount finds them on disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flush_all_writes_every_dirty_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(dir.path(), 1 << 30).unwrap());
        let f = Fetcher::new(
            Arc::clone(&cache),
            Arc::new(Metrics::default()),
            FetcherOptions {
                memory_budget: 1 << 30,
                ..FetcherOptions::default()
            },
        );
        let n = (DEFAULT_WRITEBACK_BYTES >> 20) as usize + 16;
        for i in 0..n {
            let data = vec![i as u8; 1 << 20];
            let d = arbor_format::Digest::of(&data);
            f.remember(*d.as_bytes(), Bytes::from(data), Dirty::Urgent);
        }
        f.flush().await;
        let after_one = cache.usage().0;
        assert!(after_one < n, "one round wrote {after_one} of {n}");
        f.flush_all().await;
        assert_eq!(cache.usage().0, n, "every dirty chunk is on disk");
    }

    /// Misses that each come right after fetched windows make a streak; a jump over windows
    /// never fetched (a program moving to another directory) or backwards ends it.
    #[test]
    fn misses_moving_forward_over_fetched_windows_are_sequential() {
        let files: Vec<(String, u64)> = (0..40).map(|i| (format!("f{i:02}"), 5000)).collect();
        let refs: Vec<(&str, u64)> = files.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        let l = layer(&refs, 4096);
        assert_eq!(l.windows().len(), 40);
        assert_eq!(l.note_miss(0), 0);
        l.mark_fetched(0);
        assert_eq!(l.note_miss(1), 1, "right after a fetched window");
        for w in 1..=4 {
            l.mark_fetched(w);
        }
        assert_eq!(l.note_miss(5), 2, "after windows read through");
        assert_eq!(l.note_miss(5), 2, "the same window again changes nothing");
        assert_eq!(
            l.note_miss(8),
            0,
            "windows 6 and 7 were skipped, never fetched"
        );
        l.mark_fetched(8);
        assert_eq!(l.note_miss(9), 1);
        assert_eq!(l.note_miss(3), 0, "backwards");
        for w in 9..=30 {
            l.mark_fetched(w);
        }
        assert_eq!(l.note_miss(31), 0, "too far after the last miss (3)");
    }

    /// A reader that catches up with its read-ahead (a miss on a window of the stretch still
    /// in flight, however far after the last miss) keeps its streak; a jump forgets the
    /// stretch.
    #[test]
    fn misses_inside_the_read_ahead_stretch_are_sequential() {
        let files: Vec<(String, u64)> = (0..60).map(|i| (format!("f{i:02}"), 5000)).collect();
        let refs: Vec<(&str, u64)> = files.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        let l = layer(&refs, 4096);
        assert_eq!(l.note_miss(2), 0);
        l.note_stretch(40);
        assert_eq!(
            l.note_miss(30),
            1,
            "28 windows on, none fetched yet, but asked for by the stretch"
        );
        assert_eq!(l.note_miss(40), 2, "the stretch's last window");
        assert_eq!(
            l.note_miss(45),
            0,
            "past the stretch, over windows never fetched"
        );
        l.note_stretch(44);
        assert_eq!(
            l.note_miss(10),
            0,
            "backwards is a jump even inside a stretch"
        );
        assert_eq!(l.note_miss(30), 0, "and the stretch is forgotten");
    }

    /// A reader going through a layer file by file, in blob order, gets ahead of its misses:
    /// after the first few, the windows after a miss are fetched before it asks, and the
    /// next stretch is fetched when it passes the marker, so it waits far fewer times than
    /// there are windows. Off, every window is a miss.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sequential_reader_is_read_ahead_of() {
        for ahead in [0, DEFAULT_SEQUENTIAL_READ_AHEAD] {
            let (l, src) = encoded_layer(200, 3000, 1);
            let dir = tempfile::tempdir().unwrap();
            let metrics = Arc::new(Metrics::default());
            let f = Fetcher::new(
                Arc::new(ChunkCache::open(dir.path(), 1 << 30).unwrap()),
                Arc::clone(&metrics),
                FetcherOptions {
                    // Each file its own window, none fetched along by its directory.
                    group_read_ahead: 0,
                    sequential_read_ahead: ahead,
                    ..FetcherOptions::default()
                },
            );
            assert_eq!(l.windows().len(), 200);
            for e in 0..200u32 {
                let got = f.read_file(&l, e as usize, 0, 3000).await.unwrap().concat();
                assert_eq!(&got[..], &noise(u64::from(e), 3000)[..], "file {e}");
                // The reader does some work between files.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let read_ahead = metrics.sequential_read_ahead_bytes.load(Ordering::Relaxed);
            let waits = metrics.chunk_fetched.load(Ordering::Relaxed);
            if ahead == 0 {
                assert_eq!(read_ahead, 0);
                assert_eq!(waits, 200, "every window a miss");
            } else {
                assert!(read_ahead > 0, "nothing read ahead");
                assert!(waits < 30, "{waits} of 200 reads waited for a fetch");
            }
            // Nothing is fetched twice, and the read-ahead's windows go in shared requests.
            assert_eq!(src.bytes.load(Ordering::SeqCst), src.blob.len() as u64);
            let requests = src.reads.load(Ordering::SeqCst);
            if ahead == 0 {
                assert_eq!(requests, 200);
            } else {
                assert!(requests < 100, "{requests} requests for 200 windows");
            }
        }
    }

    /// Consecutive windows are cut into runs of at most `max_bytes` (a larger window alone)
    /// and `max_windows`, and a gap starts a new run.
    #[test]
    fn runs_are_consecutive_and_bounded() {
        let (l, _) = encoded_layer(10, 3000, 1);
        let w = l.windows()[0].end - l.windows()[0].start;
        assert!(l.windows().iter().all(|x| x.end - x.start == w));
        assert_eq!(
            runs(&l, &[0, 1, 2, 3, 5, 6, 9], 3 * w, usize::MAX),
            vec![vec![0, 1, 2], vec![3], vec![5, 6], vec![9]]
        );
        assert_eq!(runs(&l, &[4, 5], 1, usize::MAX), vec![vec![4], vec![5]]);
        assert_eq!(
            runs(&l, &[0, 1, 2, 3, 4], u64::MAX, 2),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
        assert_eq!(
            runs(&l, &[7, 99], u64::MAX, usize::MAX),
            vec![vec![7]],
            "no such window"
        );
    }

    /// A run of windows is one request; each window comes back decoded and verified, and a
    /// read of one of them while the run is in flight waits for it instead of fetching.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_of_windows_is_one_request() {
        let (l, src) = encoded_layer(16, 3000, 1);
        let dir = tempfile::tempdir().unwrap();
        let f = Fetcher::new(
            Arc::new(ChunkCache::open(dir.path(), 1 << 30).unwrap()),
            Arc::new(Metrics::default()),
            FetcherOptions {
                // Only the run and the read: no read-ahead of their own.
                group_read_ahead: 0,
                sequential_read_ahead: 0,
                ..FetcherOptions::default()
            },
        );
        let ws: Vec<usize> = (2..10).collect();
        let (f2, l2) = (Arc::clone(&f), Arc::clone(&l));
        let run =
            tokio::spawn(async move { f2.fetch_windows(&l2, &(2..10).collect::<Vec<_>>()).await });
        let got = f.read_file(&l, 5, 0, 3000).await.unwrap().concat();
        assert_eq!(&got[..], &noise(5, 3000)[..]);
        let results = run.await.unwrap();
        assert_eq!(results.len(), ws.len());
        for (w, r) in ws.iter().zip(&results) {
            let chunks = r.as_ref().as_ref().expect("window fetched");
            assert_eq!(chunks.len(), 1);
            assert_eq!(&chunks[0].1[..], &noise(*w as u64, 3000)[..], "window {w}");
            assert!(l.was_fetched(*w));
        }
        // The read of window 5 either waited for the run or (if it came first) fetched
        // window 5 alone; never both: at most two requests, no window's bytes twice over.
        let requests = src.reads.load(Ordering::SeqCst);
        assert!(requests <= 2, "{requests} requests");
        let run_bytes = l.windows()[9].end - l.windows()[2].start;
        assert!(
            src.bytes.load(Ordering::SeqCst)
                <= run_bytes + (l.windows()[5].end - l.windows()[5].start)
        );
        for w in 2..10 {
            let got = f.read_file(&l, w, 0, 3000).await.unwrap().concat();
            assert_eq!(&got[..], &noise(w as u64, 3000)[..]);
        }
        assert_eq!(
            src.reads.load(Ordering::SeqCst),
            requests,
            "all held in memory"
        );
    }

    /// An eager prefetch of the rest (a reader of the whole layer) fetches every window once,
    /// in requests of several windows, and serves the right bytes; the background rest keeps a
    /// request per window.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_eager_rest_goes_in_runs_and_a_background_rest_by_window() {
        for eager in [true, false] {
            let (l, src) = encoded_layer(32, 3000, 1);
            let dir = tempfile::tempdir().unwrap();
            let w = l.windows()[0].end - l.windows()[0].start;
            let f = Fetcher::new(
                Arc::new(ChunkCache::open(dir.path(), 1 << 30).unwrap()),
                Arc::new(Metrics::default()),
                FetcherOptions {
                    max_request: 8 * w,
                    ..FetcherOptions::default()
                },
            );
            crate::prefetch::prefetch_layer(
                Arc::clone(&f),
                Arc::clone(&l),
                crate::prefetch::PrefetchOptions {
                    rest_eager: eager,
                    rest_delay: Duration::ZERO,
                    ..Default::default()
                },
            )
            .await;
            assert!((0..32).all(|x| l.was_fetched(x)), "eager {eager}");
            assert_eq!(src.bytes.load(Ordering::SeqCst), src.blob.len() as u64);
            let requests = src.reads.load(Ordering::SeqCst);
            if eager {
                assert!(requests <= 8, "{requests} requests for 32 windows");
            } else {
                assert_eq!(requests, 32);
            }
            for e in 0..32 {
                let got = f.read_file(&l, e, 0, 3000).await.unwrap().concat();
                assert_eq!(&got[..], &noise(e as u64, 3000)[..]);
            }
            assert_eq!(src.reads.load(Ordering::SeqCst), requests, "all held");
        }
    }

    /// A source that answers a run with fewer bytes than asked fails the run's windows with
    /// an error (no panic, nothing kept), and a later read of them fetches them again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_answer_to_a_run_fails_its_windows() {
        let (l, src) = encoded_layer(8, 3000, 1);
        let short = Arc::new(crate::testutil::MemBlob {
            blob: src.blob[..l.windows()[4].start as usize + 10].to_vec(),
            reads: Default::default(),
            bytes: Default::default(),
            kept: false,
        });
        let shorted = Arc::new(LayerHandle::new(
            "sha256:01",
            l.index.data_end,
            Arc::clone(&l.index),
            vec![short as Arc<dyn BlobSource>],
            1,
        ));
        let dir = tempfile::tempdir().unwrap();
        let f = Fetcher::new(
            Arc::new(ChunkCache::open(dir.path(), 1 << 30).unwrap()),
            Arc::new(Metrics::default()),
            FetcherOptions::default(),
        );
        let results = f.fetch_windows(&shorted, &[2, 3, 4, 5]).await;
        assert_eq!(results.len(), 4);
        assert!(results.iter().all(|r| r.is_err()), "{results:?}");
        assert!((2..6).all(|w| !shorted.was_fetched(w)));
        // Alone, the windows inside what the source has are served.
        let got = f.read_file(&shorted, 2, 0, 3000).await.unwrap().concat();
        assert_eq!(&got[..], &noise(2, 3000)[..]);
        assert!(f.read_file(&shorted, 5, 0, 3000).await.is_err());
    }

    /// A miss on a window the prefetch brings anyway (its start-up set) reads ahead only
    /// within the set; a miss outside the set still fetches the rest of its directory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_miss_in_the_planned_prefetch_reads_ahead_only_within_it() {
        // 40 files of 3000 bytes in one directory, each its own window.
        let (l, src) = encoded_layer(40, 3000, 1);
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let f = Fetcher::new(
            Arc::new(ChunkCache::open(dir.path(), 1 << 30).unwrap()),
            Arc::clone(&metrics),
            FetcherOptions::default(),
        );
        l.plan_prefetch(0..10);
        assert!(l.prefetch_planned(9) && !l.prefetch_planned(10));
        for e in [0usize, 3, 9] {
            let got = f.read_file(&l, e, 0, 3000).await.unwrap().concat();
            assert_eq!(&got[..], &noise(e as u64, 3000)[..]);
        }
        // The set's windows come along; nothing outside it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(0..10).all(|w| l.was_fetched(w)) {
            assert!(
                Instant::now() < deadline,
                "the set's windows were not read ahead"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            (10..40).all(|w| !l.was_fetched(w)),
            "read ahead outside the set"
        );
        assert_eq!(
            metrics.sequential_read_ahead_bytes.load(Ordering::Relaxed),
            0
        );
        let set_bytes = l.windows()[9].end - l.windows()[0].start;
        assert_eq!(
            src.bytes.load(Ordering::SeqCst),
            set_bytes,
            "each window once"
        );
        // Outside the set: the directory's other files come along.
        let got = f.read_file(&l, 20, 0, 3000).await.unwrap().concat();
        assert_eq!(&got[..], &noise(20, 3000)[..]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(10..40).any(|w| w != 20 && l.was_fetched(w)) {
            assert!(
                Instant::now() < deadline,
                "no group read-ahead outside the set"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A layer whose source keeps its blob on disk (a function tree's block store): its chunks
    /// never reach the chunk cache, one evicted from memory is decoded again from the source,
    /// and the background prefetch does not fetch windows already fetched. Without the
    /// source's say, the same reads fill the cache.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_of_a_kept_blob_are_not_written_to_the_chunk_cache() {
        for kept in [true, false] {
            let (_dir, cache, _metrics, f) = writeback_fetcher(64 << 10, 8 << 20);
            let (l, src) = crate::testutil::encoded_layer_kept(8, 16 << 10, 16 << 10, kept);
            for i in 0..8 {
                let got = f.read_file(&l, i, 0, 16 << 10).await.unwrap().concat();
                assert_eq!(&got[..], &noise(i as u64, 16 << 10)[..]);
            }
            f.flush_all().await;
            let reads = src.reads.load(Ordering::SeqCst);
            if !kept {
                assert_eq!(cache.usage().0, 8, "a registry layer's chunks are cached");
                continue;
            }
            assert_eq!(cache.usage(), (0, 0), "nothing written for a kept blob");
            assert!((0..8).all(|w| f.window_cached(&l, w)));
            // Memory holds 64 KiB: the first files were evicted, and are read again from
            // the source (the block store), verified as before.
            let got = f.read_file(&l, 0, 0, 16 << 10).await.unwrap().concat();
            assert_eq!(&got[..], &noise(0, 16 << 10)[..]);
            assert!(src.reads.load(Ordering::SeqCst) > reads, "decoded again");
            // The prefetch of the rest finds everything fetched: no read.
            let before = src.reads.load(Ordering::SeqCst);
            crate::prefetch::prefetch_layer(
                Arc::clone(&f),
                Arc::clone(&l),
                crate::prefetch::PrefetchOptions {
                    rest_eager: true,
                    ..Default::default()
                },
            )
            .await;
            assert_eq!(src.reads.load(Ordering::SeqCst), before);
            assert_eq!(cache.usage(), (0, 0));
        }
    }

    /// A fetcher over a fresh disk cache (1 GiB budget) with these memory and write-back
    /// bounds, its cache and metrics; the directory lives as long as the returned guard.
    fn writeback_fetcher(
        memory_budget: u64,
        writeback_bytes: u64,
    ) -> (
        tempfile::TempDir,
        Arc<ChunkCache>,
        Arc<Metrics>,
        Arc<Fetcher>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(dir.path(), 1 << 30).unwrap());
        let metrics = Arc::new(Metrics::default());
        let f = Fetcher::new(
            Arc::clone(&cache),
            Arc::clone(&metrics),
            FetcherOptions {
                memory_budget,
                writeback_bytes,
                ..FetcherOptions::default()
            },
        );
        (dir, cache, metrics, f)
    }

    /// Far more chunks than memory holds pass through a small write-back queue: a producer
    /// that waits for room (as the rest-prefetch does) loses none of them, two writers drain
    /// the queue, and every chunk ends up on disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_back_applies_backpressure_instead_of_dropping() {
        let (_dir, cache, metrics, f) = writeback_fetcher(1 << 20, 2 << 20);
        let n = 200usize;
        let mut most = 0;
        for i in 0..n {
            f.writeback_room().await;
            let data = vec![i as u8; 256 << 10];
            let d = arbor_format::Digest::of(&data);
            f.remember(*d.as_bytes(), Bytes::from(data), Dirty::Background);
            most = most.max(f.writeback_writers());
            assert!(f.writeback_pending_bytes() <= 2 << 20);
        }
        assert!(
            (1..=MAX_WRITEBACK_WRITERS).contains(&most),
            "{most} writers"
        );
        assert_eq!(metrics.writeback_dropped.load(Ordering::Relaxed), 0);
        f.flush_all().await;
        assert_eq!(cache.usage().0, n, "every chunk is on disk");
        assert_eq!(f.writeback_pending_bytes(), 0);
    }

    /// When the write-back queue is full, a chunk read back from disk (on a blocking thread)
    /// writes the unwritten chunks it pushes out of memory itself; a fetched one cannot wait,
    /// and what it pushes out is dropped.
    #[test]
    fn disk_hits_write_what_they_push_out_when_the_queue_is_full() {
        let (_dir, cache, metrics, f) = writeback_fetcher(16 << 10, 8 << 10);
        // The queue is full (its writers are stuck, say).
        f.writeback.bytes.store(8 << 10, Ordering::SeqCst);
        let chunk = |i: u8| {
            let data = Bytes::from(vec![i; 4096]);
            (*arbor_format::Digest::of(&data).as_bytes(), data)
        };
        // Six unwritten chunks: the budget and the slack the queue's state allows.
        for i in 0..6u8 {
            let (k, b) = chunk(i);
            f.remember(k, b, Dirty::Urgent);
        }
        assert_eq!(
            metrics.writeback_dropped.load(Ordering::Relaxed),
            0,
            "all held"
        );
        let on_disk = |i: u8| {
            let data = vec![i; 4096];
            matches!(
                cache.get(&arbor_format::Digest::of(&data), 4096),
                crate::cache::Lookup::Hit(_)
            )
        };
        let (k, b) = chunk(100);
        f.remember(k, b, Dirty::Clean);
        assert!(
            on_disk(0),
            "the oldest unwritten chunk was written, not dropped"
        );
        assert_eq!(metrics.writeback_dropped.load(Ordering::Relaxed), 0);
        // The clean chunk made room for itself and left: one more fetched chunk is held, the
        // next goes past the slack.
        for i in [101, 102] {
            let (k, b) = chunk(i);
            f.remember(k, b, Dirty::Urgent);
        }
        assert!(!on_disk(1));
        assert_eq!(
            metrics.writeback_dropped.load(Ordering::Relaxed),
            1,
            "a fetched chunk pushes the next one out for good"
        );
        f.writeback.bytes.store(0, Ordering::SeqCst);
    }

    /// A chunk evicted from memory is held by the write-back queue until it is on disk, and
    /// readers find it there: at every moment each chunk is in memory, queued or on disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_on_their_way_to_disk_are_still_served() {
        let (_dir, cache, _, f) =
            writeback_fetcher(1 << 20, FetcherOptions::default().writeback_bytes);
        let chunks: Vec<([u8; 32], Bytes)> = (0..40u8)
            .map(|i| {
                let b = Bytes::from(vec![i; 256 << 10]);
                (*arbor_format::Digest::of(&b).as_bytes(), b)
            })
            .collect();
        for (i, (k, b)) in chunks.iter().enumerate() {
            f.remember(*k, b.clone(), Dirty::Urgent);
            for (k, b) in &chunks[..=i] {
                let d = arbor_format::Digest::from_bytes(*k);
                assert!(
                    f.mem.contains(k)
                        || f.writeback.get(k).is_some_and(|q| q == *b)
                        || cache.contains(&d),
                    "a chunk is in none of memory, the queue and the disk"
                );
            }
        }
        f.flush_all().await;
        assert!(
            f.writeback.lock().held.is_empty(),
            "written chunks leave the queue's index"
        );
        assert_eq!(cache.usage().0, chunks.len());
    }

    /// A chunk read from the disk cache brings the next windows' chunks into memory (and
    /// only those within reach), so the reads that follow need no disk read of their own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_disk_hit_reads_the_next_windows_ahead() {
        let names = ["d/a", "d/b", "d/c", "d/d", "d/e"];
        let files: Vec<(&str, u64)> = names.iter().map(|n| (*n, 5000)).collect();
        let l = Arc::new(layer(&files, 4096));
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(dir.path(), 1 << 20).unwrap());
        for n in names {
            let data = content(n, 5000);
            cache.put(&arbor_format::Digest::of(&data), &data).unwrap();
        }
        let f = Fetcher::new(
            cache,
            Arc::new(Metrics::default()),
            FetcherOptions::default(),
        );
        assert_eq!(l.windows().len(), names.len(), "one window per file");
        let first = f.chunk(&l, ChunkRef { entry: 0, chunk: 0 }).await.unwrap();
        assert_eq!(&first[..], &content("d/a", 5000)[..]);
        let in_memory = |n: &str| {
            f.mem
                .contains(arbor_format::Digest::of(&content(n, 5000)).as_bytes())
        };
        let t = Instant::now();
        while !(in_memory("d/b") && in_memory("d/c")) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the next windows were not read ahead"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !in_memory("d/d") && !in_memory("d/e"),
            "read ahead past its reach"
        );
    }
}
