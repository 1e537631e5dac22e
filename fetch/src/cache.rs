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
//! Eviction policy: chunks that reads or a layer's prefetch section (its start-up set) bring
//! in are stored with [`ChunkCache::put`] and evicted least recently used first. The rest of
//! a layer, prefetched in the background, is stored with [`ChunkCache::put_if_room`]: only
//! into free space, and first in line for eviction. So prefetching a large layer (or many)
//! never evicts the start-up sets of mounted layers to make room for chunks nobody has read,
//! which would then be refetched and evict others in turn.
//!
//! All methods block on the filesystem: call them from a blocking thread.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use arbor_format::Digest;
use arbor_format::writer::MAX_CHUNK_SIZE;

struct State {
    /// digest -> (size, tick of last use)
    entries: HashMap<[u8; 32], (u64, u64)>,
    /// tick -> digest, oldest first
    lru: BTreeMap<u64, [u8; 32]>,
    total: u64,
    /// Ticks of use count up from [`MID_TICK`]; chunks stored by [`ChunkCache::put_if_room`]
    /// get ticks counting down from it, so they are the first to be evicted.
    tick: u64,
    low_tick: u64,
}

const MID_TICK: u64 = 1 << 62;

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

/// Creates `dir` (mode 0700) or makes an existing one 0700.
fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = fs::metadata(dir)?.permissions().mode();
    if mode & 0o777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Makes sure `dir` is a directory: anything else in its place is removed first.
fn repair_dir(dir: &Path) -> io::Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            tracing::warn!(path = %dir.display(), "not a directory in the chunk cache, replacing it");
            remove_any(dir);
        }
        Err(_) => {}
    }
    fs::create_dir(dir).or_else(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() {
            Ok(())
        } else {
            Err(e)
        }
    })
}

/// Removes a file, symlink or directory tree, logging failures.
fn remove_any(p: &Path) {
    let r = match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(_) => return,
    };
    if let Err(e) = r {
        tracing::warn!(path = %p.display(), error = %e, "cannot remove from the chunk cache");
    }
}

impl ChunkCache {
    /// Opens (creating if needed) a cache in `dir` holding at most `budget` bytes.
    ///
    /// The directory is made private (0700): chunk names say which images a node runs, and
    /// chunk contents are image files. Only an unusable `dir` itself is an error: whatever is
    /// wrong inside it (a file where a directory should be, unreadable or foreign entries,
    /// a leftover `tmp`) is logged, removed and recreated, so a damaged cache costs refetches,
    /// never a daemon that does not start.
    pub fn open(dir: &Path, budget: u64) -> io::Result<ChunkCache> {
        private_dir(dir)?;
        let chunks = dir.join("chunks");
        repair_dir(&chunks)?;
        let tmp = dir.join("tmp");
        if fs::symlink_metadata(&tmp).is_ok() {
            remove_any(&tmp);
        }
        repair_dir(&tmp)?;
        let mut found: Vec<(std::time::SystemTime, [u8; 32], u64)> = Vec::new();
        // Prefix directories are made when their first chunk is stored: a fresh cache costs
        // no 256 directories at daemon start. Whatever is at the top of `chunks/` that is not
        // a prefix directory is not ours.
        let prefixes = fs::read_dir(&chunks)
            .map_err(|e| io::Error::new(e.kind(), format!("listing {}: {e}", chunks.display())))?;
        for p in prefixes.flatten() {
            let sub = p.path();
            let name = p.file_name();
            let Some(prefix) = name
                .to_str()
                .filter(|n| {
                    n.len() == 2 && n.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                })
                .and_then(|n| hex::decode(n).ok())
            else {
                remove_any(&sub);
                continue;
            };
            if !fs::symlink_metadata(&sub).is_ok_and(|m| m.is_dir()) {
                tracing::warn!(path = %sub.display(), "not a directory in the chunk cache, removing it");
                remove_any(&sub);
                continue;
            }
            let entries = match fs::read_dir(&sub) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(dir = %sub.display(), error = %e, "cannot list chunk cache directory");
                    continue;
                }
            };
            let lower = hex::encode(&prefix);
            for f in entries {
                let Ok(f) = f else { continue };
                let name = f.file_name();
                let mut d = [0u8; 32];
                let valid = name.to_str().is_some_and(|n| {
                    n.len() == 64
                        && n.starts_with(&lower)
                        && hex::decode_to_slice(n, &mut d).is_ok()
                });
                let meta = fs::symlink_metadata(f.path());
                match meta {
                    Ok(m) if valid && m.is_file() => {
                        found.push((m.modified().unwrap_or(std::time::UNIX_EPOCH), d, m.len()))
                    }
                    _ => {
                        tracing::warn!(path = %f.path().display(), "removing a foreign entry from the chunk cache");
                        remove_any(&f.path());
                    }
                }
            }
        }
        found.sort();
        let mut state = State {
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            total: 0,
            tick: MID_TICK,
            low_tick: MID_TICK,
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
    ///
    /// `size` comes from a TOC, which may lie: a file whose content matches its name but not
    /// `size` is another image's good chunk, so it is a [`Lookup::Miss`] for this caller and
    /// stays (a hostile TOC cannot evict other tenants' chunks). A file that does not match
    /// its name (short, torn, corrupted) is removed and reported [`Lookup::Corrupt`]; the
    /// caller refetches it, which rewrites it. Never reads more than a chunk can hold.
    pub fn get(&self, digest: &Digest, size: u64) -> Lookup {
        let d = *digest.as_bytes();
        let recorded = {
            let mut st = self.lock();
            let Some(&(sz, old)) = st.entries.get(&d) else {
                return Lookup::Miss;
            };
            st.tick += 1;
            let t = st.tick;
            st.lru.remove(&old);
            st.lru.insert(t, d);
            st.entries.insert(d, (sz, t));
            sz
        };
        let path = self.path(&d);
        let limit = size.max(recorded).min(MAX_CHUNK_SIZE);
        let mut data = Vec::with_capacity(size.min(MAX_CHUNK_SIZE) as usize);
        let read = fs::File::open(&path).and_then(|f| f.take(limit + 1).read_to_end(&mut data));
        match read {
            Ok(_) if data.len() as u64 == size && Digest::of(&data) == *digest => Lookup::Hit(data),
            Ok(_) if data.len() as u64 <= MAX_CHUNK_SIZE && Digest::of(&data) == *digest => {
                tracing::debug!(chunk = %digest, size, actual = data.len(), "cached chunk has another size than the TOC says");
                Lookup::Miss
            }
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

    /// Stores a chunk whose content the caller has verified against `digest`, evicting the
    /// least recently used chunks if the budget is exceeded.
    pub fn put(&self, digest: &Digest, data: &[u8]) -> io::Result<()> {
        self.store(digest, data, false).map(|_| ())
    }

    /// Stores a chunk only into free space: never evicts anything, and the chunk is the first
    /// to be evicted later (until it is read). For chunks nobody has asked for yet (the rest of
    /// a layer, prefetched in the background): they must not push out what mounted layers
    /// read or need at start-up. Returns whether it was stored.
    pub fn put_if_room(&self, digest: &Digest, data: &[u8]) -> io::Result<bool> {
        self.store(digest, data, true)
    }

    fn store(&self, digest: &Digest, data: &[u8], only_if_room: bool) -> io::Result<bool> {
        let d = *digest.as_bytes();
        {
            let st = self.lock();
            if st.entries.contains_key(&d) {
                return Ok(true);
            }
            if only_if_room && st.total + data.len() as u64 > self.budget {
                return Ok(false);
            }
        }
        if data.len() as u64 > self.budget {
            return Ok(false);
        }
        // Written in place, not through a temporary name: a torn or half-written file can be
        // seen, but every read verifies length and digest, so it is never served (it is deleted
        // and refetched). This saves a rename per chunk, which dominated the cost of caching.
        let path = self.path(&d);
        let write = || -> io::Result<()> {
            let open = || {
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
            };
            let mut f = match open() {
                // The prefix directory's first chunk (or something else in its place).
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) =>
                {
                    if let Some(sub) = path.parent() {
                        repair_dir(sub)?;
                    }
                    open()?
                }
                r => r?,
            };
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
            let t = if only_if_room {
                st.low_tick -= 1;
                st.low_tick
            } else {
                st.tick += 1;
                st.tick
            };
            match st.entries.insert(d, (data.len() as u64, t)) {
                None => st.total += data.len() as u64,
                Some((_, old)) => {
                    st.lru.remove(&old);
                }
            }
            st.lru.insert(t, d);
        }
        self.evict_to_budget();
        Ok(true)
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
