//! Issue #9, hostile images and damaged nodes, at the chunk cache: a damaged cache never
//! stops a start and never serves a wrong chunk; a lying TOC cannot evict another image's
//! chunk; the directory is private; background prefetch never evicts.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use arbor_fetch::ChunkCache;
use arbor_fetch::cache::Lookup;
use arbor_format::Digest;

fn chunk_path(dir: &Path, d: &Digest) -> PathBuf {
    let h = hex::encode(d.as_bytes());
    dir.join("chunks").join(&h[..2]).join(h)
}

fn chunk(i: u8, len: usize) -> (Digest, Vec<u8>) {
    let data: Vec<u8> = (0..len).map(|j| (j as u8).wrapping_mul(31) ^ i).collect();
    (Digest::of(&data), data)
}

#[test]
fn short_cache_file_is_refetched_not_returned() {
    let dir = tempfile::tempdir().unwrap();
    let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    let (d, data) = chunk(1, 5000);
    c.put(&d, &data).unwrap();
    let p = chunk_path(dir.path(), &d);
    // Truncated (a crash mid-write, a full disk): never returned, removed.
    std::fs::write(&p, &data[..1000]).unwrap();
    assert!(matches!(c.get(&d, 5000), Lookup::Corrupt));
    assert!(!p.exists());
    assert!(matches!(c.get(&d, 5000), Lookup::Miss));
    // The refetched chunk is written again and served.
    c.put(&d, &data).unwrap();
    assert!(matches!(c.get(&d, 5000), Lookup::Hit(ref v) if *v == data));
    // Longer than it should be (garbage appended): the same.
    let mut long = data.clone();
    long.extend_from_slice(b"junk");
    std::fs::write(&p, &long).unwrap();
    assert!(matches!(c.get(&d, 5000), Lookup::Corrupt));
    // Found short at start-up: also a miss when read, never a hit.
    c.put(&d, &data).unwrap();
    std::fs::write(&p, &data[..10]).unwrap();
    drop(c);
    let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    assert!(matches!(c.get(&d, 5000), Lookup::Corrupt));
}

#[test]
fn toc_lying_about_chunk_size_cannot_evict_other_images_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    let (d, data) = chunk(2, 4096);
    c.put(&d, &data).unwrap();
    // Another image's TOC names the same digest with another size (shorter, longer, absurd).
    for size in [100, 8192, u64::MAX / 2] {
        assert!(matches!(c.get(&d, size), Lookup::Miss), "size {size}");
    }
    assert!(chunk_path(dir.path(), &d).exists());
    assert!(matches!(c.get(&d, 4096), Lookup::Hit(ref v) if *v == data));
}

#[test]
fn cache_dir_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("new/cache");
    ChunkCache::open(&fresh, 1 << 20).unwrap();
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    // An existing world-readable cache (from an older version) is made private.
    let old = dir.path().join("old");
    std::fs::create_dir(&old).unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    ChunkCache::open(&old, 1 << 20).unwrap();
    let mode = std::fs::metadata(&old).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    // Another user cannot list it (root only: needs setpriv to become nobody).
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 || which("setpriv").is_none() {
        eprintln!("cache_dir_is_private: skipping the nobody check (needs root and setpriv)");
        return;
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (d, data) = chunk(3, 100);
    let c = ChunkCache::open(&old, 1 << 20).unwrap();
    c.put(&d, &data).unwrap();
    for target in [old.clone(), chunk_path(&old, &d)] {
        let st = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ls"])
            .arg(&target)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(!st.success(), "nobody listed {}", target.display());
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(program))
            .find(|f| f.is_file())
    })
}

#[test]
fn corrupt_cache_dir_does_not_stop_start() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let c = ChunkCache::open(root, 1 << 20).unwrap();
    let (good, good_data) = chunk(4, 3000);
    c.put(&good, &good_data).unwrap();
    drop(c);
    let chunks = root.join("chunks");
    // Every kind of damage at once: a file in place of a prefix directory, a directory and a
    // symlink in place of chunk files, foreign names, a file in place of tmp/, junk at the top.
    let _ = std::fs::remove_dir_all(chunks.join("00"));
    std::fs::write(chunks.join("00"), b"not a dir").unwrap();
    let (dd, _) = chunk(5, 10);
    std::fs::create_dir_all(chunk_path(root, &dd).join("inner")).unwrap();
    let (ds, _) = chunk(6, 10);
    std::fs::create_dir_all(chunk_path(root, &ds).parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", chunk_path(root, &ds)).unwrap();
    std::fs::create_dir_all(chunks.join("ff")).unwrap();
    std::fs::write(chunks.join("ff").join("not-a-chunk"), b"x").unwrap();
    std::fs::write(chunks.join("zz"), b"x").unwrap();
    // An upper-case prefix is not one the cache makes (its chunks would be listed but
    // looked up elsewhere): removed with what it holds.
    std::fs::create_dir_all(chunks.join("AB")).unwrap();
    std::fs::write(chunks.join("AB").join("ab".repeat(32)), b"x").unwrap();
    std::fs::remove_dir_all(root.join("tmp")).unwrap();
    std::fs::write(root.join("tmp"), b"x").unwrap();
    let c = ChunkCache::open(root, 1 << 20).expect("a damaged cache must open");
    // The file in place of a prefix directory is gone (the directory is made when its first
    // chunk is stored).
    assert!(std::fs::symlink_metadata(chunks.join("00")).is_err());
    assert!(root.join("tmp").is_dir());
    assert!(!chunks.join("zz").exists());
    assert!(!chunks.join("AB").exists());
    assert!(!chunks.join("ff").join("not-a-chunk").exists());
    assert!(std::fs::symlink_metadata(chunk_path(root, &ds)).is_err());
    assert!(!c.contains(&dd) && !c.contains(&ds));
    assert_eq!(c.usage(), (1, 3000));
    assert!(matches!(c.get(&good, 3000), Lookup::Hit(ref v) if *v == good_data));
    // It works: the chunks whose places were damaged can be stored and read.
    for i in [5u8, 6] {
        let (d, data) = chunk(i, 10);
        c.put(&d, &data).unwrap();
        assert!(matches!(c.get(&d, 10), Lookup::Hit(ref v) if *v == data));
    }
    // Damage after open: a file where a chunk's prefix directory is to be made, and a
    // prefix directory removed under the running cache. Both chunks are stored all the same.
    let (d7, data7) = chunk(7, 10);
    let p7 = chunk_path(root, &d7);
    let _ = std::fs::remove_dir_all(p7.parent().unwrap());
    std::fs::write(p7.parent().unwrap(), b"x").unwrap();
    c.put(&d7, &data7).unwrap();
    assert!(matches!(c.get(&d7, 10), Lookup::Hit(ref v) if *v == data7));
    let (d8, data8) = chunk(8, 10);
    let p8 = chunk_path(root, &d8);
    let _ = std::fs::remove_dir_all(p8.parent().unwrap());
    c.put(&d8, &data8).unwrap();
    assert!(matches!(c.get(&d8, 10), Lookup::Hit(ref v) if *v == data8));
    // `chunks` itself a file.
    drop(c);
    std::fs::remove_dir_all(&chunks).unwrap();
    std::fs::write(&chunks, b"x").unwrap();
    let c = ChunkCache::open(root, 1 << 20).expect("a damaged cache must open");
    assert_eq!(c.usage(), (0, 0));
}

#[test]
fn background_prefetch_never_evicts_read_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let c = ChunkCache::open(dir.path(), 10_000).unwrap();
    let read: Vec<_> = (0..3u8).map(|i| chunk(i, 3000)).collect();
    for (d, data) in &read {
        c.put(d, data).unwrap();
    }
    // 1,000 bytes free: one background chunk of 1,000 fits, the next does not.
    let (b1, b1d) = chunk(10, 1000);
    assert!(c.put_if_room(&b1, &b1d).unwrap());
    let (b2, b2d) = chunk(11, 1000);
    assert!(!c.put_if_room(&b2, &b2d).unwrap());
    for (d, _) in &read {
        assert!(
            c.contains(d),
            "a read chunk was evicted for a prefetched one"
        );
    }
    // A read chunk needing room evicts the prefetched one first, not older read chunks.
    let (n, nd) = chunk(20, 1000);
    c.put(&n, &nd).unwrap();
    assert!(!c.contains(&b1));
    for (d, _) in &read {
        assert!(c.contains(d));
    }
}
