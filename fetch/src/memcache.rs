//! A small in-memory LRU of verified chunks, keyed by digest, bounded in bytes.
//!
//! FUSE reads arrive in 128 KiB pieces while chunks are up to 1 MiB: without this, every
//! piece would re-read and re-verify the whole chunk from disk. It is also the write-back
//! buffer of the disk cache: freshly fetched chunks are *dirty* until written, and are handed
//! back for writing when evicted or taken by [`MemCache::take_dirty`]. While the writers are
//! behind, [`MemCache::put_holding_dirty`] evicts clean chunks only and lets the cache run
//! over its budget by a bounded slack, rather than hand back dirty chunks nobody can write.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;

/// Whether a chunk still has to be written to the disk cache, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dirty {
    /// On disk already (or never to be written).
    Clean,
    /// Fetched for the rest of a layer in the background: written only into free space of
    /// the disk cache, never evicting anything (see [`crate::cache`]).
    Background,
    /// Fetched for a read or the prefetch section: written, evicting by LRU if needed.
    Urgent,
}

struct State {
    /// digest -> (data, tick of last use, dirty)
    entries: HashMap<[u8; 32], (Bytes, u64, Dirty)>,
    lru: BTreeMap<u64, [u8; 32]>,
    total: u64,
    tick: u64,
}

/// Oldest entries looked at for a clean one to evict while dirty ones are held.
const HOLD_SCAN: usize = 64;

pub struct MemCache {
    budget: u64,
    state: Mutex<State>,
}

impl MemCache {
    pub fn new(budget: u64) -> MemCache {
        MemCache {
            budget,
            state: Mutex::new(State {
                entries: HashMap::new(),
                lru: BTreeMap::new(),
                total: 0,
                tick: 0,
            }),
        }
    }

    pub fn get(&self, key: &[u8; 32]) -> Option<Bytes> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (data, old, dirty) = st.entries.get(key).cloned()?;
        st.tick += 1;
        let t = st.tick;
        st.lru.remove(&old);
        st.lru.insert(t, *key);
        st.entries.insert(*key, (data.clone(), t, dirty));
        Some(data)
    }

    pub fn contains(&self, key: &[u8; 32]) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.entries.contains_key(key)
    }

    /// Inserts a chunk (`dirty`: not yet in the disk cache). Returns the dirty chunks it
    /// evicted, for the caller to write.
    pub fn put(&self, key: [u8; 32], data: Bytes, dirty: Dirty) -> Vec<([u8; 32], Bytes, Dirty)> {
        self.put_holding_dirty(key, data, dirty, 0)
    }

    /// [`MemCache::put`] for when evicted dirty chunks could not be written now: it evicts
    /// only clean chunks (among the [`HOLD_SCAN`] least recently used) and keeps dirty ones,
    /// over the budget if need be, until the cache holds more than the budget plus `slack`
    /// bytes; beyond that it evicts by LRU as `put` does.
    pub fn put_holding_dirty(
        &self,
        key: [u8; 32],
        data: Bytes,
        dirty: Dirty,
        slack: u64,
    ) -> Vec<([u8; 32], Bytes, Dirty)> {
        if data.len() as u64 > self.budget / 4 {
            return if dirty != Dirty::Clean {
                vec![(key, data, dirty)]
            } else {
                Vec::new()
            };
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.tick += 1;
        let t = st.tick;
        let len = data.len() as u64;
        let mut dirty = dirty;
        if let Some((old, ot, was_dirty)) = st.entries.remove(&key) {
            st.lru.remove(&ot);
            st.total -= old.len() as u64;
            dirty = dirty.max(was_dirty);
        }
        st.entries.insert(key, (data, t, dirty));
        st.lru.insert(t, key);
        st.total += len;
        let mut evicted = Vec::new();
        while st.total > self.budget {
            let victim = if st.total <= self.budget.saturating_add(slack) {
                // Holding dirty chunks: a clean one among the oldest, or stay over budget.
                let clean = st
                    .lru
                    .iter()
                    .take(HOLD_SCAN)
                    .find(|(_, k)| st.entries.get(*k).is_some_and(|e| e.2 == Dirty::Clean))
                    .map(|(&t, &k)| (t, k));
                match clean {
                    Some(v) => Some(v),
                    None => break,
                }
            } else {
                st.lru.iter().next().map(|(&t, &k)| (t, k))
            };
            let Some((ot, k)) = victim else {
                break;
            };
            st.lru.remove(&ot);
            if let Some((d, _, was_dirty)) = st.entries.remove(&k) {
                st.total -= d.len() as u64;
                if was_dirty != Dirty::Clean {
                    evicted.push((k, d, was_dirty));
                }
            }
        }
        evicted
    }

    /// Marks dirty chunks of at most `max_bytes` in all clean and returns them (the others
    /// stay dirty for the next call).
    pub fn take_dirty(&self, max_bytes: u64) -> Vec<([u8; 32], Bytes, Dirty)> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for (k, (d, _, dirty)) in st.entries.iter_mut() {
            if *dirty != Dirty::Clean {
                if bytes + d.len() as u64 > max_bytes {
                    continue;
                }
                bytes += d.len() as u64;
                out.push((*k, d.clone(), *dirty));
                *dirty = Dirty::Clean;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_lru() {
        let m = MemCache::new(400);
        let mut evicted = Vec::new();
        for i in 0..10u8 {
            let dirty = if i % 2 == 0 {
                Dirty::Urgent
            } else {
                Dirty::Clean
            };
            evicted.extend(m.put([i; 32], Bytes::from(vec![i; 100]), dirty));
        }
        assert!(m.get(&[0; 32]).is_none());
        // Evicted dirty chunks come back for writing; clean ones just go.
        assert_eq!(
            evicted.iter().map(|(k, _, _)| k[0]).collect::<Vec<_>>(),
            [0, 2, 4]
        );
        // At most 100 bytes per call: one now, the other on the next call.
        let mut dirty: Vec<u8> = m.take_dirty(100).iter().map(|(k, _, _)| k[0]).collect();
        dirty.extend(m.take_dirty(u64::MAX).iter().map(|(k, _, _)| k[0]));
        dirty.sort();
        assert_eq!(dirty, [6, 8]);
        assert!(m.take_dirty(u64::MAX).is_empty());
        assert!(m.get(&[9; 32]).is_some());
        let st = m.state.lock().unwrap();
        assert!(st.total <= 400);
    }

    /// While dirty chunks are held, clean ones make room, the cache runs over its budget
    /// when only dirty ones are left, and past the slack it evicts by LRU again.
    #[test]
    fn dirty_chunks_are_held_within_the_slack() {
        let m = MemCache::new(400);
        for i in 0..4u8 {
            let dirty = if i == 1 { Dirty::Clean } else { Dirty::Urgent };
            assert!(m.put([i; 32], Bytes::from(vec![i; 100]), dirty).is_empty());
        }
        // Full: the clean chunk 1 goes, not the older dirty chunk 0.
        let out = m.put_holding_dirty([4; 32], Bytes::from(vec![4; 100]), Dirty::Clean, 200);
        assert!(out.is_empty());
        assert!(m.contains(&[0; 32]) && !m.contains(&[1; 32]));
        // Chunk 4, newest but the only clean one, makes room for chunk 5.
        let out = m.put_holding_dirty([5; 32], Bytes::from(vec![5; 100]), Dirty::Urgent, 200);
        assert!(out.is_empty());
        assert!(!m.contains(&[4; 32]), "the clean chunk made room");
        // Only dirty chunks now: the cache goes over budget, within the slack.
        for i in 6..8u8 {
            let out = m.put_holding_dirty([i; 32], Bytes::from(vec![i; 100]), Dirty::Urgent, 200);
            assert!(out.is_empty(), "held, not handed back");
        }
        assert_eq!(m.state.lock().unwrap().total, 600);
        // Past budget + slack: LRU eviction hands the oldest dirty chunk back.
        let out = m.put_holding_dirty([8; 32], Bytes::from(vec![8; 100]), Dirty::Urgent, 200);
        assert_eq!(out.iter().map(|(k, _, _)| k[0]).collect::<Vec<_>>(), [0]);
        // Without slack (the writers caught up), back to the budget at once.
        let out = m.put([9; 32], Bytes::from(vec![9; 100]), Dirty::Urgent);
        assert_eq!(out.len(), 3);
        assert_eq!(m.state.lock().unwrap().total, 400);
    }
}
