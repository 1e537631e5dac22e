//! Background prefetch: the layer's prefetch section first, at full speed, then (optionally,
//! rate-limited) the rest, so a workload that reads most of the image is not slower than a
//! full pull. Prefetch goes through the same windows as demand reads, so a read that needs a
//! window being prefetched waits for that fetch instead of starting another.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::fetcher::{ChunkRef, Fetcher, LayerHandle, pack, runs};

/// What to prefetch and how fast.
#[derive(Debug, Clone)]
pub struct PrefetchOptions {
    /// After the prefetch section, fetch the rest of the layer too.
    pub rest: bool,
    /// Bytes per second for the rest (0: unlimited). The prefetch section is never limited.
    pub rest_rate: u64,
    /// Windows fetched at the same time.
    pub concurrency: usize,
    /// The rest starts no sooner than this after the layer was mounted: a container is
    /// usually created and starts reading a moment after its layers are mounted, and that
    /// gap is not idle time.
    pub rest_delay: Duration,
    /// Fetch the rest at once, `concurrency` windows at a time, as urgently as reads (no
    /// delay, no waiting for reads to pause): for workloads that read most of the image,
    /// as nydusd's whole-blob prefetch does. It takes CPU and link from a starting program.
    pub rest_eager: bool,
}

impl Default for PrefetchOptions {
    fn default() -> Self {
        PrefetchOptions {
            rest: true,
            rest_rate: 0,
            concurrency: 4,
            rest_delay: Duration::from_secs(3),
            rest_eager: false,
        }
    }
}

/// Prefetches `layer` until done (spawn it; abort the task to stop early).
pub async fn prefetch_layer(fetcher: Arc<Fetcher>, layer: Arc<LayerHandle>, opts: PrefetchOptions) {
    prefetch_layer_learned(fetcher, layer, opts, Vec::new()).await
}

/// [`prefetch_layer`] with the windows of a learned start-up set first (in first-read order,
/// urgent like the prefetch section; see [`crate::learn::learned_windows`]).
pub async fn prefetch_layer_learned(
    fetcher: Arc<Fetcher>,
    layer: Arc<LayerHandle>,
    opts: PrefetchOptions,
    learned: Vec<(usize, Vec<ChunkRef>)>,
) {
    let started = Instant::now();
    layer.plan_prefetch(learned.iter().map(|(w, _)| *w));
    if !learned.is_empty() {
        let n = fetch_learned(&fetcher, &layer, learned.clone(), opts.concurrency).await;
        fetcher
            .metrics()
            .learned_prefetch_bytes
            .fetch_add(n, Ordering::Relaxed);
        info!(layer = %layer.digest, windows = learned.len(), bytes = n, seconds = started.elapsed().as_secs_f64(), "learned start-up set fetched");
    }
    let prefetch_end = layer.index.arbor.as_ref().map_or(0, |a| a.prefetch_end);
    // Windows holding at least one chunk the cache lacks, split at the prefetch section's end.
    let (front, rest): (Vec<usize>, Vec<usize>) = layer
        .windows()
        .iter()
        .enumerate()
        .filter(|(_, w)| {
            w.chunks.iter().any(|&r| {
                layer
                    .chunk(r)
                    .and_then(|(_, c)| c.digest.as_ref())
                    .is_some_and(|d| !fetcher.cache().contains(d))
            })
        })
        .map(|(i, _)| i)
        .partition(|&i| layer.windows()[i].start < prefetch_end);
    layer.plan_prefetch(front.iter().copied());
    let mut fetched = 0u64;
    for (phase, list, rate) in [
        ("prefetch section", front, 0u64),
        ("rest", rest, opts.rest_rate),
    ] {
        if phase == "rest" {
            if !opts.rest {
                break;
            }
            let since = started.elapsed();
            if !opts.rest_eager && since < opts.rest_delay {
                tokio::time::sleep(opts.rest_delay - since).await;
            }
        }
        let phase_start = Instant::now();
        let mut phase_bytes = 0u64;
        // An eager rest (a reader of the whole layer) sends consecutive windows in one request
        // each (up to the fetcher's `max_request`), as many at a time as make `concurrency`
        // fetch units: the bytes a batch brings into memory stay what the write-back pacing
        // below was made for. The start-up set and a background rest, which a starting
        // program's misses may queue behind, keep a request per window: with everything
        // merged, starts on demand took 2-4% longer in A/B runs (bench-cold-start, pypi).
        let budget = opts.concurrency.max(1) as u64 * fetcher.options().fetch_unit.max(1);
        let requests = if phase == "rest" && opts.rest_eager {
            fetcher.request_runs(&layer, &list)
        } else {
            list.iter().map(|&w| vec![w]).collect()
        };
        for batch in batches(&layer, requests, budget) {
            if phase == "rest" {
                // The rest outgrows the memory cache: fetch it at the pace the disk cache
                // takes it, or evicted chunks would be dropped and fetched again.
                fetcher.writeback_room().await;
            }
            let mut set = tokio::task::JoinSet::new();
            for run in &batch {
                // A demand read may have fetched some of these since the list was made.
                let run: Vec<usize> = run
                    .iter()
                    .copied()
                    .filter(|&w| !fetcher.window_cached(&layer, w))
                    .collect();
                if run.is_empty() {
                    continue;
                }
                let (f, l) = (Arc::clone(&fetcher), Arc::clone(&layer));
                let background = phase == "rest" && !opts.rest_eager;
                set.spawn(async move {
                    // The prefetch section is what the workload reads first: as urgent as
                    // its own reads. The rest yields to both.
                    let mut n = 0;
                    for part in runs(&l, &run, u64::MAX, usize::MAX) {
                        let results = if background {
                            f.background_windows(&l, &part).await
                        } else {
                            f.fetch_windows(&l, &part).await
                        };
                        for (&w, r) in part.iter().zip(&results) {
                            if r.is_ok() {
                                n += l.windows()[w].end - l.windows()[w].start;
                            }
                        }
                    }
                    (n, n > 0)
                });
            }
            while let Some(Ok((n, ok))) = set.join_next().await {
                if ok {
                    phase_bytes += n;
                    fetcher
                        .metrics()
                        .prefetch_bytes
                        .fetch_add(n, Ordering::Relaxed);
                }
            }
            if rate > 0 {
                let due = Duration::from_secs_f64(phase_bytes as f64 / rate as f64);
                let spent = phase_start.elapsed();
                if due > spent {
                    tokio::time::sleep(due - spent).await;
                }
            }
        }
        debug!(layer = %layer.digest, phase, bytes = phase_bytes, "prefetch phase done");
        fetched += phase_bytes;
    }
    info!(layer = %layer.digest, bytes = fetched, seconds = started.elapsed().as_secs_f64(), "prefetch done");
}

/// `runs` (of consecutive windows) grouped in order into batches of at most `budget` bytes of
/// the blob each (a larger run is a batch of its own).
fn batches(layer: &LayerHandle, runs: Vec<Vec<usize>>, budget: u64) -> Vec<Vec<Vec<usize>>> {
    let sized = runs.into_iter().map(|run| {
        let n: u64 = run
            .iter()
            .filter_map(|&w| layer.windows().get(w))
            .map(|w| w.end - w.start)
            .sum();
        (run, n)
    });
    pack(sized, budget, usize::MAX, |_, _| true)
}

/// Fetches the chunks of a learned set (by window, in first-read order) as urgent work,
/// `concurrency` windows at a time: a window starts as soon as a slot frees, so one slow
/// window does not hold the others. A window the set needs most of is fetched whole (single
/// flight with demand reads); otherwise only the set's chunks, in coalesced ranges
/// ([`Fetcher::fetch_chunks`]): a set learned on a layer converted without it has its chunks
/// scattered among others. Returns the bytes fetched.
async fn fetch_learned(
    fetcher: &Arc<Fetcher>,
    layer: &Arc<LayerHandle>,
    windows: Vec<(usize, Vec<ChunkRef>)>,
    concurrency: usize,
) -> u64 {
    let mut set = tokio::task::JoinSet::new();
    let mut bytes = 0u64;
    let mut collect = |r: Option<Result<(u64, bool), tokio::task::JoinError>>| {
        if let Some(Ok((n, true))) = r {
            bytes += n;
        }
    };
    for (w, refs) in windows {
        if fetcher.window_cached(layer, w) {
            continue;
        }
        while set.len() >= concurrency.max(1) {
            collect(set.join_next().await);
        }
        let (f, l) = (Arc::clone(fetcher), Arc::clone(layer));
        set.spawn(async move {
            let Some(win) = l.windows().get(w) else {
                return (0, false);
            };
            let whole = win.end - win.start;
            let needed: u64 = refs
                .iter()
                .filter_map(|&r| l.chunk(r))
                .map(|(_, c)| c.blob_end - c.blob_offset)
                .sum();
            if needed * 2 >= whole {
                let r = f.window(&l, w).await;
                (whole, r.is_ok())
            } else {
                match f.fetch_chunks(&l, &refs).await {
                    Ok(n) => (n, true),
                    Err(_) => (0, false),
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        collect(Some(r));
    }
    bytes
}
