//! The node-wide chunk cache under real mounts: identical chunks of two images are stored
//! once, the byte budget holds under pressure, a restart reads from the cache without the
//! registry, and a corrupted cache file is detected and refetched.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;

use arbor_fetch::fetcher::FetcherOptions;
use arbor_testkit::{Entry, Registry, pseudo_random_bytes};
use common::*;

fn read_all(root: &Path, files: &[(String, Vec<u8>)]) {
    for (name, want) in files {
        let got = std::fs::read(root.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(got == *want, "{name} differs");
    }
}

fn cache_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(dir.join("chunks")).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out
}

#[test]
fn identical_chunks_of_two_images_are_stored_once() {
    if skip("identical_chunks_of_two_images_are_stored_once") {
        return;
    }
    let rt = runtime();
    let reg = Registry::start().unwrap();
    let shared = pseudo_random_bytes(7, (2 << 20) + 100); // 3 chunks
    let a = vec![
        Entry::file("shared.bin", shared.clone()),
        Entry::file("only-a", pseudo_random_bytes(8, 5000)),
    ];
    let b = vec![
        Entry::file("copy/of/shared.bin", shared.clone()),
        Entry::file("only-b", pseudo_random_bytes(9, 7000)),
    ];
    let ra = converted(&rt, &reg, &tar_spec(&a), "cache/a");
    let rb = converted(&rt, &reg, &tar_spec(&b), "cache/b");
    let c = client(2);
    let (sa, sb) = (store(&ra, &c), store(&rb, &c));
    let (la, lb) = (layers(&rt, &sa), layers(&rt, &sb));
    let cache = tempfile::tempdir().unwrap();
    let (f, _) = fetcher(cache.path(), 1 << 30, FetcherOptions::default());
    let (ma, mb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let m1 = mount(
        &rt,
        handle(&sa, &la[0].0, &la[0].1, 512 << 10),
        &f,
        ma.path(),
    );
    let m2 = mount(
        &rt,
        handle(&sb, &lb[0].0, &lb[0].1, 512 << 10),
        &f,
        mb.path(),
    );
    read_all(
        ma.path(),
        &[
            ("shared.bin".into(), shared.clone()),
            ("only-a".into(), pseudo_random_bytes(8, 5000)),
        ],
    );
    read_all(
        mb.path(),
        &[
            ("copy/of/shared.bin".into(), shared),
            ("only-b".into(), pseudo_random_bytes(9, 7000)),
        ],
    );
    rt.block_on(f.flush());
    // 3 shared chunks + one each for the small files.
    assert_eq!(f.cache().usage().0, 5);
    assert_eq!(cache_files(cache.path()).len(), 5);
    drop((m1, m2));
}

#[test]
fn budget_holds_under_pressure() {
    if skip("budget_holds_under_pressure") {
        return;
    }
    let rt = runtime();
    let reg = Registry::start().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..40u64)
        .map(|i| (format!("f{i}"), pseudo_random_bytes(100 + i, 300_000)))
        .collect();
    let entries: Vec<Entry> = files
        .iter()
        .map(|(n, d)| Entry::file(n.clone(), d.clone()))
        .collect();
    let r = converted(&rt, &reg, &tar_spec(&entries), "cache/budget");
    let c = client(2);
    let s = store(&r, &c);
    let l = layers(&rt, &s);
    let cache = tempfile::tempdir().unwrap();
    let budget = 2 << 20;
    let (f, _) = fetcher(
        cache.path(),
        budget,
        FetcherOptions {
            memory_budget: 1 << 20,
            ..Default::default()
        },
    );
    let mnt = tempfile::tempdir().unwrap();
    let m = mount(&rt, handle(&s, &l[0].0, &l[0].1, 512 << 10), &f, mnt.path());
    for _ in 0..2 {
        read_all(mnt.path(), &files); // 12 MB through a 2 MiB cache, twice
        std::fs::write("/proc/sys/vm/drop_caches", "3").ok();
    }
    rt.block_on(f.flush());
    let (n, bytes) = f.cache().usage();
    assert!(
        bytes <= budget,
        "cache holds {bytes} bytes, budget {budget}"
    );
    assert!(n > 0 && f.cache().evicted() > 0);
    let on_disk: u64 = cache_files(cache.path())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(on_disk <= budget, "{on_disk} bytes on disk");
    drop(m);
}

#[test]
fn restart_reuses_the_cache_and_corruption_is_refetched() {
    if skip("restart_reuses_the_cache_and_corruption_is_refetched") {
        return;
    }
    let rt = runtime();
    let reg = Registry::start().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..20u64)
        .map(|i| {
            (
                format!("d/f{i}"),
                pseudo_random_bytes(200 + i, 50_000 + i as usize * 9000),
            )
        })
        .collect();
    let mut entries = vec![Entry::dir("d")];
    entries.extend(files.iter().map(|(n, d)| Entry::file(n.clone(), d.clone())));
    let r = converted(&rt, &reg, &tar_spec(&entries), "cache/restart");
    let c = client(0);
    let s = store(&r, &c);
    let l = layers(&rt, &s);
    let cache = tempfile::tempdir().unwrap();
    {
        let (f, _) = fetcher(cache.path(), 1 << 30, FetcherOptions::default());
        let mnt = tempfile::tempdir().unwrap();
        let m = mount(&rt, handle(&s, &l[0].0, &l[0].1, 512 << 10), &f, mnt.path());
        read_all(mnt.path(), &files);
        rt.block_on(f.flush());
        m.unmount().unwrap();
    }
    // "Restart" with the registry gone: everything comes from the cache.
    drop(reg);
    let (f, metrics) = fetcher(cache.path(), 1 << 30, FetcherOptions::default());
    let mnt = tempfile::tempdir().unwrap();
    let m = mount(&rt, handle(&s, &l[0].0, &l[0].1, 512 << 10), &f, mnt.path());
    read_all(mnt.path(), &files);
    assert_eq!(metrics.source_requests("registry"), 0);
    assert!(metrics.chunk_disk_hits.load(Ordering::Relaxed) >= 20);
    m.unmount().unwrap();

    // Corrupt one cached chunk: detected, removed; with the registry back it is refetched.
    let victim = cache_files(cache.path()).into_iter().next().unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&victim, bytes).unwrap();
    let reg2 = Registry::start().unwrap();
    let r2 = converted(
        &rt,
        &reg2,
        &tar_spec(&{
            let mut e = vec![Entry::dir("d")];
            e.extend(files.iter().map(|(n, d)| Entry::file(n.clone(), d.clone())));
            e
        }),
        "cache/restart",
    );
    let s2 = store(&r2, &c);
    let l2 = layers(&rt, &s2);
    assert_eq!(l2[0].0.digest, l[0].0.digest, "conversion is deterministic");
    let (f, metrics) = fetcher(cache.path(), 1 << 30, FetcherOptions::default());
    let mnt = tempfile::tempdir().unwrap();
    let m = mount(
        &rt,
        handle(&s2, &l2[0].0, &l2[0].1, 512 << 10),
        &f,
        mnt.path(),
    );
    read_all(mnt.path(), &files);
    assert_eq!(metrics.cache_corrupt.load(Ordering::Relaxed), 1);
    assert!(metrics.source_requests("registry") >= 1);
    drop(m);
}
