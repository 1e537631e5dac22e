//! A small in-memory LRU of verified chunks, keyed by digest, bounded in bytes.
//!
//! FUSE reads arrive in 128 KiB pieces while chunks are up to 1 MiB: without this, every
//! piece would re-read and re-verify the whole chunk from disk.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;

struct State {
    entries: HashMap<[u8; 32], (Bytes, u64)>,
    lru: BTreeMap<u64, [u8; 32]>,
    total: u64,
    tick: u64,
}

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
        let (data, old) = st.entries.get(key).cloned()?;
        st.tick += 1;
        let t = st.tick;
        st.lru.remove(&old);
        st.lru.insert(t, *key);
        st.entries.insert(*key, (data.clone(), t));
        Some(data)
    }

    pub fn contains(&self, key: &[u8; 32]) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.entries.contains_key(key)
    }

    pub fn put(&self, key: [u8; 32], data: Bytes) {
        if data.len() as u64 > self.budget / 4 {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.tick += 1;
        let t = st.tick;
        let len = data.len() as u64;
        if let Some((old, ot)) = st.entries.insert(key, (data, t)) {
            st.lru.remove(&ot);
            st.total -= old.len() as u64;
        }
        st.lru.insert(t, key);
        st.total += len;
        while st.total > self.budget {
            let Some((&ot, &k)) = st.lru.iter().next() else {
                break;
            };
            st.lru.remove(&ot);
            if let Some((d, _)) = st.entries.remove(&k) {
                st.total -= d.len() as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_lru() {
        let m = MemCache::new(400);
        for i in 0..10u8 {
            m.put([i; 32], Bytes::from(vec![i; 100]));
        }
        assert!(m.get(&[0; 32]).is_none());
        assert!(m.get(&[9; 32]).is_some());
        let st = m.state.lock().unwrap();
        assert!(st.total <= 400);
    }
}
