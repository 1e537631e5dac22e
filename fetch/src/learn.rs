//! Learning what a function reads to start: a [`Recorder`] on a freshly mounted layer notes
//! each chunk the first time a file read asks for it (FUSE reads only: prefetch and proofs do
//! not count), with the time since the mount. Every read of a fresh mount reaches the daemon
//! (the kernel's page cache belongs to the mount), so the record is complete whatever the
//! chunk caches hold. [`learned_windows`] turns a learned set back into the windows of a
//! layer to fetch first.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use arbor_format::startup::StartupSet;

use crate::fetcher::{ChunkRef, LayerHandle};

/// First reads of one mounted layer.
pub struct Recorder {
    started: Instant,
    started_wall: SystemTime,
    max_reads: usize,
    max_age: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    seen: HashSet<ChunkRef>,
    /// (milliseconds since the mount, chunk), in first-read order.
    order: Vec<(u64, ChunkRef)>,
}

impl Recorder {
    /// Records at most `max_reads` chunks, for at most `max_age` after now.
    pub fn new(max_reads: usize, max_age: Duration) -> Recorder {
        Recorder {
            started: Instant::now(),
            started_wall: SystemTime::now(),
            max_reads,
            max_age,
            state: Mutex::new(State::default()),
        }
    }

    /// When recording started (the layer was mounted).
    pub fn started(&self) -> SystemTime {
        self.started_wall
    }

    /// Whether reads are still being noted (not past `max_age`, not full).
    pub fn is_recording(&self) -> bool {
        self.started.elapsed() <= self.max_age
            && self
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .order
                .len()
                < self.max_reads
    }

    /// Notes chunks `chunks` of entry `entry` (those already seen are ignored).
    pub fn note(&self, entry: u32, chunks: std::ops::Range<u32>) {
        let age = self.started.elapsed();
        if age > self.max_age {
            return;
        }
        let ms = age.as_millis() as u64;
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for chunk in chunks {
            if s.order.len() >= self.max_reads {
                return;
            }
            let r = ChunkRef { entry, chunk };
            if s.seen.insert(r) {
                s.order.push((ms, r));
            }
        }
    }

    /// Milliseconds since the recorder started of wall-clock time `t` (0 if before).
    fn offset(&self, t: SystemTime) -> u64 {
        t.duration_since(self.started_wall)
            .map_or(0, |d| d.as_millis() as u64)
    }

    /// Chunks first read from `from` to `until` (wall clock), in first-read order, each with
    /// the milliseconds since the Unix epoch of its first read (to merge several layers).
    pub fn reads_between(&self, from: SystemTime, until: SystemTime) -> Vec<(u64, ChunkRef)> {
        if until < self.started_wall {
            return Vec::new();
        }
        let (lo, hi) = (self.offset(from), self.offset(until));
        let base = self
            .started_wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.order
            .iter()
            .skip_while(|(ms, _)| *ms < lo)
            .take_while(|(ms, _)| *ms <= hi)
            .map(|(ms, r)| (base + ms, *r))
            .collect()
    }

    /// Whether anything was read before `t`: then this mount served someone else first, and
    /// its record of a start from `t` on is not complete (page-cache hits never reach us).
    pub fn read_before(&self, t: SystemTime) -> bool {
        let lo = self.offset(t);
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        t > self.started_wall && s.order.first().is_some_and(|(ms, _)| *ms < lo)
    }

    /// Chunks recorded so far.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .order
            .len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What applying a set to a layer found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Windows to fetch from, in first-read order, each once, with the set's chunks in each
    /// (see [`crate::Fetcher::fetch_chunks`]).
    pub windows: Vec<(usize, Vec<ChunkRef>)>,
    /// Chunks of the set that this layer has.
    pub chunks: usize,
    /// Reads naming a file this layer lacks, or chunks past a file's end: ignored.
    pub ignored: usize,
}

/// The windows of `layer` holding the chunks `set` names for it, in first-read order. Names
/// the layer's TOC does not have are ignored (counted in [`Applied::ignored`]): a stale or
/// wrong set costs nothing but what it names that exists.
pub fn learned_windows(layer: &LayerHandle, set: &StartupSet) -> Applied {
    let mut out = Applied::default();
    let mut reads = set.reads_of(&layer.digest).peekable();
    if reads.peek().is_none() {
        return out;
    }
    let by_name: std::collections::HashMap<&str, usize> = layer
        .index
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.name.trim_start_matches("./").trim_end_matches('/'), i))
        .collect();
    let mut slot: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    for (path, chunks) in reads {
        let Some(&entry) = by_name.get(path.trim_start_matches("./").trim_end_matches('/')) else {
            out.ignored += 1;
            continue;
        };
        let n = layer.index.entries[entry].chunks.len();
        for &c in chunks {
            if c as usize >= n {
                out.ignored += 1;
                continue;
            }
            out.chunks += 1;
            let r = ChunkRef {
                entry: entry as u32,
                chunk: c,
            };
            if let Some(w) = layer.window_index(r) {
                let i = *slot.entry(w).or_insert_with(|| {
                    out.windows.push((w, Vec::new()));
                    out.windows.len() - 1
                });
                out.windows[i].1.push(r);
            }
        }
    }
    out
}

/// Builds a start-up set's reads from several layers' records: each `(layer, reads)` as
/// [`Recorder::reads_between`] gave them, merged in first-read order; layer `i` of `layers`
/// is index `i` of the set's layer list.
pub fn merge_reads(set: &mut StartupSet, layers: &[(&LayerHandle, Vec<(u64, ChunkRef)>)]) {
    let mut all: Vec<(u64, usize, ChunkRef)> = layers
        .iter()
        .enumerate()
        .flat_map(|(i, (_, reads))| reads.iter().map(move |(t, r)| (*t, i, *r)))
        .collect();
    // Stable: reads of one layer at the same millisecond keep their order.
    all.sort_by_key(|(t, _, _)| *t);
    for (_, i, r) in all {
        if let Some(e) = layers[i].0.index.entries.get(r.entry as usize) {
            set.push(i, &e.name, r.chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_reads_in_order_with_bounds() {
        let r = Recorder::new(5, Duration::from_secs(60));
        r.note(1, 0..2);
        r.note(0, 0..1);
        r.note(1, 1..3); // chunk 1 again: not recorded twice
        r.note(2, 0..10); // only two more fit
        let later = SystemTime::now() + Duration::from_secs(1);
        let got = r.reads_between(r.started(), later);
        let pairs: Vec<(u32, u32)> = got.iter().map(|(_, c)| (c.entry, c.chunk)).collect();
        assert_eq!(pairs, vec![(1, 0), (1, 1), (0, 0), (1, 2), (2, 0)]);
        assert!(got.windows(2).all(|w| w[0].0 <= w[1].0));
        assert_eq!(r.len(), 5);
        // Nothing before the recorder started; nothing after a time past the reads.
        assert!(
            r.reads_between(r.started(), r.started() - Duration::from_secs(1))
                .is_empty()
        );
        assert!(r.reads_between(later, later).is_empty());
        assert!(!r.read_before(r.started()));
        assert!(r.read_before(later));
        let old = Recorder::new(5, Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        old.note(0, 0..1);
        assert!(old.is_empty());
    }
}
