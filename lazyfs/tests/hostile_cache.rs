//! Issue #9 at the fetcher, with real layers from a real registry: a slow or frozen disk
//! cannot make write-back grow without bound, and a TOC lying about a chunk's size gets an
//! error, never a panic, a truncated chunk or another image's chunk evicted.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arbor_fetch::LayerHandle;
use arbor_fetch::fetcher::{FetcherOptions, MAX_WRITEBACK_WRITERS};
use arbor_testkit::{Entry, ImageSpec, LayerSource, Registry, layer_tar, pseudo_random_bytes};
use common::*;

fn spec(entries: Vec<Entry>) -> ImageSpec {
    ImageSpec {
        layers: vec![LayerSource::Tar(layer_tar(&entries))],
        ..Default::default()
    }
}

/// A small ext4 filesystem on a loop device, frozen on request; unfrozen and unmounted on
/// drop.
struct Disk {
    dir: tempfile::TempDir,
    mnt: PathBuf,
}

fn run(cmd: &mut Command) {
    let st = cmd.status().unwrap();
    assert!(st.success(), "{cmd:?}");
}

impl Disk {
    fn new() -> Disk {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(256 << 20).unwrap();
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        Disk { dir, mnt }
    }

    fn freeze(&self, on: bool) {
        run(Command::new("fsfreeze")
            .arg(if on { "-f" } else { "-u" })
            .arg(&self.mnt));
    }

    fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.mnt)
            .stderr(std::process::Stdio::null())
            .status();
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = &self.dir;
    }
}

#[test]
fn write_back_queue_is_bounded() {
    let t = "write_back_queue_is_bounded";
    if skip(t) || arbor_testkit::skip_unless_tools(t, &["mkfs.ext4", "fsfreeze", "losetup"]) {
        return;
    }
    let rt = runtime();
    let reg = Registry::start().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..80u64)
        .map(|i| (format!("f/{i}"), pseudo_random_bytes(100 + i, 600 << 10)))
        .collect();
    let entries = std::iter::once(Entry::dir("f"))
        .chain(files.iter().map(|(n, d)| Entry::file(n.clone(), d.clone())))
        .collect();
    let r = converted(&rt, &reg, &spec(entries), "hostile/writeback");
    let c = client(2);
    let s = store(&r, &c);
    let ls = layers(&rt, &s);
    let disk = Disk::new();
    // A memory cache far smaller than the data: every fetched chunk is written back at once.
    let (f, metrics) = fetcher(
        &disk.path().join("cache"),
        1 << 30,
        FetcherOptions {
            memory_budget: 256 << 10,
            // Less than the files' 48 MiB: the queue fills while the disk is frozen.
            writeback_bytes: 8 << 20,
            ..Default::default()
        },
    );
    let h = handle(&s, &ls[0].0, &ls[0].1, 256 << 10);
    // The disk stops answering writes (a hung or full disk).
    disk.freeze(true);
    let (mut most, mut queued) = (0, 0);
    rt.block_on(async {
        for (name, want) in &files {
            let e = h
                .index
                .entries
                .iter()
                .position(|e| e.name.trim_start_matches("./") == name)
                .unwrap();
            let got = tokio::time::timeout(
                Duration::from_secs(60),
                f.read_file(&h, e, 0, want.len() as u64),
            )
            .await
            .expect("reads must not wait for a frozen disk")
            .unwrap()
            .concat();
            assert!(got == *want, "{name}");
            most = most.max(f.writeback_writers());
            queued = queued.max(f.writeback_pending_bytes());
        }
    });
    assert!(
        most <= MAX_WRITEBACK_WRITERS,
        "{most} write-back writers (threads) at once"
    );
    assert!(queued <= 8 << 20, "{queued} bytes queued for a frozen disk");
    let dropped = metrics.writeback_dropped.load(Ordering::Relaxed);
    assert!(
        dropped > 0,
        "nothing was dropped although the disk was frozen"
    );
    assert!(
        metrics
            .render()
            .contains(&format!("arbor_cache_writeback_dropped_total {dropped}"))
    );
    // The disk comes back: what was queued is written, and caching works again.
    disk.freeze(false);
    rt.block_on(f.flush());
    assert_eq!(f.writeback_pending_bytes(), 0);
    // The writers leave once they find the queue empty.
    let t = std::time::Instant::now();
    while f.writeback_writers() > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "write-back writers stay"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(f.cache().usage().0 > 0);
}

#[test]
fn lying_toc_chunk_size_is_an_error_not_a_panic() {
    let t = "lying_toc_chunk_size_is_an_error_not_a_panic";
    if skip(t) {
        return;
    }
    let rt = runtime();
    let reg = Registry::start().unwrap();
    let data = pseudo_random_bytes(42, 100_000);
    let r = converted(
        &rt,
        &reg,
        &spec(vec![Entry::file("a", data.clone())]),
        "hostile/lying-size",
    );
    let c = client(2);
    let s = store(&r, &c);
    let ls = layers(&rt, &s);
    let cache = tempfile::tempdir().unwrap();
    let (f, metrics) = fetcher(cache.path(), 1 << 30, FetcherOptions::default());
    let honest = handle(&s, &ls[0].0, &ls[0].1, 1 << 20);
    let e = honest
        .index
        .entries
        .iter()
        .position(|e| e.name.trim_start_matches("./") == "a")
        .unwrap();
    let len = data.len() as u64;
    // The honest image reads the chunk: it is in memory, then on disk.
    let got = rt
        .block_on(f.read_file(&honest, e, 0, len))
        .unwrap()
        .concat();
    assert!(got == data);
    rt.block_on(f.flush());
    // Another image's TOC names the same chunk digest with a larger, then a smaller size.
    for delta in [4096i64, -4096] {
        let mut idx = ls[0].1.clone();
        let entry = &mut idx.entries[e];
        entry.chunks[0].size = (entry.chunks[0].size as i64 + delta) as u64;
        entry.size = (entry.size as i64 + delta) as u64;
        let size = entry.size;
        let lying = Arc::new(LayerHandle::new(
            &ls[0].0.digest,
            ls[0].0.size,
            Arc::new(idx),
            vec![],
            1 << 20,
        ));
        let r = rt.block_on(f.read_file(&lying, e, 0, size));
        assert!(
            r.is_err(),
            "delta {delta}: a chunk of the wrong size was served"
        );
        // Nor is the honest chunk in memory served to it on a FUSE worker.
        assert!(
            f.read_file_held(&lying, e, 0, size).is_none(),
            "delta {delta}: a chunk of the wrong size was served from memory"
        );
    }
    // The honest image's chunk is still served, from memory and from disk.
    let hits = metrics.chunk_mem_hits.load(Ordering::Relaxed);
    assert!(
        rt.block_on(f.read_file(&honest, e, 0, len))
            .unwrap()
            .concat()
            == data
    );
    assert!(metrics.chunk_mem_hits.load(Ordering::Relaxed) > hits);
    let (f2, m2) = fetcher(cache.path(), 1 << 30, FetcherOptions::default());
    // On the calling thread only from memory: not the new fetcher's, until a read (from
    // its disk cache) put it there.
    assert!(f2.read_file_held(&honest, e, 0, len).is_none());
    assert!(
        rt.block_on(f2.read_file(&honest, e, 0, len))
            .unwrap()
            .concat()
            == data
    );
    assert!(
        f2.read_file_held(&honest, e, 1, len)
            .expect("in memory now")
            .unwrap()
            .concat()
            == data[1..]
    );
    assert!(m2.chunk_disk_hits.load(Ordering::Relaxed) > 0);
    assert_eq!(m2.cache_corrupt.load(Ordering::Relaxed), 0);
}
