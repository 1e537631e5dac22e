//! The node-wide on-disk chunk cache.
//!
//! Chunks are stored decompressed under `chunks/<2 hex>/<64 hex>`, named by the sha256 of
//! their content, so identical chunks in different layers or images are stored once. Every
//! read is verified against the name (length and digest), so a torn write (a crash mid-write)
//! or a file corrupted on disk is detected, deleted and refetched, never served. The cache survives restarts (it is
//! re-scanned at open) and keeps its total size under a byte budget by evicting the least
//! recently used chunks. Eviction cannot break an in-flight read: a reader reads the whole
//! file through its own descriptor, and an unlinked file stays readable until closed.
//!
//! All methods block on the filesystem: call them from a blocking thread.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use arbor_format::Digest;

struct State {
    /// digest -> (size, tick of last use)
    entries: HashMap<[u8; 32], (u64, u64)>,
    /// tick -> digest, oldest first
    lru: BTreeMap<u64, [u8; 32]>,
    total: u64,
    tick: u64,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    Hit(Vec<u8>),
    Miss,
    /// The file existed but did not match its digest; it was deleted.
    Corrupt,
}

/// See the module docs.
pub struct ChunkCache {
    dir: PathBuf,
    budget: u64,
    state: Mutex<State>,
    evicted: AtomicU64,
}

fn hex_name(d: &[u8; 32]) -> String {
    hex::encode(d)
}

impl ChunkCache {
    /// Opens (creating if needed) a cache in `dir` holding at most `budget` bytes.
    pub fn open(dir: &Path, budget: u64) -> io::Result<ChunkCache> {
        fs::create_dir_all(dir.join("chunks"))?;
        for i in 0..=255u8 {
            fs::create_dir_all(dir.join("chunks").join(hex::encode([i])))?;
        }
        let tmp = dir.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        let mut found: Vec<(std::time::SystemTime, [u8; 32], u64)> = Vec::new();
        for sub in fs::read_dir(dir.join("chunks"))? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(sub.path())? {
                let f = f?;
                let name = f.file_name();
                let mut d = [0u8; 32];
                let valid = name
                    .to_str()
                    .is_some_and(|n| n.len() == 64 && hex::decode_to_slice(n, &mut d).is_ok());
                let meta = f.metadata()?;
                if !valid || !meta.is_file() {
                    let _ = fs::remove_file(f.path());
                    continue;
                }
                found.push((
                    meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                    d,
                    meta.len(),
                ));
            }
        }
        found.sort();
        let mut state = State {
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            total: 0,
            tick: 0,
        };
        for (_, d, size) in found {
            state.tick += 1;
            state.entries.insert(d, (size, state.tick));
            state.lru.insert(state.tick, d);
            state.total += size;
        }
        let cache = ChunkCache {
            dir: dir.to_path_buf(),
            budget,
            state: Mutex::new(state),
            evicted: AtomicU64::new(0),
        };
        cache.evict_to_budget();
        Ok(cache)
    }

    fn path(&self, d: &[u8; 32]) -> PathBuf {
        let h = hex_name(d);
        self.dir.join("chunks").join(&h[..2]).join(h)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the cache holds `digest` (without reading or verifying it).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.lock().entries.contains_key(digest.as_bytes())
    }

    /// Reads a chunk, verifying length and digest.
    pub fn get(&self, digest: &Digest, size: u64) -> Lookup {
        let d = *digest.as_bytes();
        {
            let mut st = self.lock();
            let Some(&(sz, old)) = st.entries.get(&d) else {
                return Lookup::Miss;
            };
            st.tick += 1;
            let t = st.tick;
            st.lru.remove(&old);
            st.lru.insert(t, d);
            st.entries.insert(d, (sz, t));
        }
        let path = self.path(&d);
        let mut data = Vec::with_capacity(size as usize);
        let read = fs::File::open(&path).and_then(|f| f.take(size + 1).read_to_end(&mut data));
        match read {
            Ok(_) if data.len() as u64 == size && Digest::of(&data) == *digest => Lookup::Hit(data),
            Ok(_) => {
                tracing::warn!(chunk = %digest, "corrupt chunk in cache, removing it");
                self.remove(&d);
                Lookup::Corrupt
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(&d);
                Lookup::Miss
            }
            Err(e) => {
                tracing::warn!(chunk = %digest, error = %e, "unreadable chunk in cache");
                self.remove(&d);
                Lookup::Corrupt
            }
        }
    }

    /// Stores a chunk whose content the caller has verified against `digest`.
    pub fn put(&self, digest: &Digest, data: &[u8]) -> io::Result<()> {
        let d = *digest.as_bytes();
        if self.lock().entries.contains_key(&d) {
            return Ok(());
        }
        if data.len() as u64 > self.budget {
            return Ok(());
        }
        // Written in place, not through a temporary name: a torn or half-written file can be
        // seen, but every read verifies length and digest, so it is never served (it is deleted
        // and refetched). This saves a rename per chunk, which dominated the cost of caching.
        let path = self.path(&d);
        let write = || -> io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            f.write_all(data)
        };
        match write() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
        }
        {
            let mut st = self.lock();
            st.tick += 1;
            let t = st.tick;
            if st.entries.insert(d, (data.len() as u64, t)).is_none() {
                st.total += data.len() as u64;
            }
            st.lru.insert(t, d);
        }
        self.evict_to_budget();
        Ok(())
    }

    fn forget(&self, d: &[u8; 32]) {
        let mut st = self.lock();
        if let Some((size, t)) = st.entries.remove(d) {
            st.lru.remove(&t);
            st.total -= size;
        }
    }

    fn remove(&self, d: &[u8; 32]) {
        self.forget(d);
        let _ = fs::remove_file(self.path(d));
    }

    fn evict_to_budget(&self) {
        loop {
            let victim = {
                let mut st = self.lock();
                if st.total <= self.budget {
                    return;
                }
                let Some((&t, &d)) = st.lru.iter().next() else {
                    return;
                };
                st.lru.remove(&t);
                if let Some((size, _)) = st.entries.remove(&d) {
                    st.total -= size;
                }
                d
            };
            let _ = fs::remove_file(self.path(&victim));
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (chunks, bytes) currently held.
    pub fn usage(&self) -> (usize, u64) {
        let st = self.lock();
        (st.entries.len(), st.total)
    }

    /// Chunks evicted since open.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_verify_evict_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 3000).unwrap();
        let chunks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000]).collect();
        let digests: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();
        for (d, data) in digests.iter().zip(&chunks) {
            c.put(d, data).unwrap();
            assert!(c.usage().1 <= 3000);
        }
        // The two oldest were evicted; the newest three remain and verify.
        assert!(matches!(c.get(&digests[0], 1000), Lookup::Miss));
        for i in 2..5 {
            assert!(matches!(c.get(&digests[i], 1000), Lookup::Hit(ref v) if v == &chunks[i]));
        }
        // Corrupt one on disk: detected, removed, reported.
        let p = c.path(digests[3].as_bytes());
        fs::write(&p, vec![9u8; 1000]).unwrap();
        assert!(matches!(c.get(&digests[3], 1000), Lookup::Corrupt));
        assert!(!p.exists());
        assert!(matches!(c.get(&digests[3], 1000), Lookup::Miss));
        // Reopen: what is on disk is found again; stray temp files are cleared.
        fs::write(dir.path().join("tmp/leftover"), b"x").unwrap();
        drop(c);
        let c = ChunkCache::open(dir.path(), 3000).unwrap();
        assert_eq!(c.usage(), (2, 2000));
        assert!(matches!(c.get(&digests[4], 1000), Lookup::Hit(_)));
        assert!(!dir.path().join("tmp/leftover").exists());
        // A smaller budget at reopen evicts down to it.
        drop(c);
        let c = ChunkCache::open(dir.path(), 1000).unwrap();
        assert_eq!(c.usage().0, 1);
    }
}
