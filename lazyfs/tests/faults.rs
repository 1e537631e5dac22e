//! A registry that fails in every way a real one can — 500s, resets, stalls, truncated and
//! corrupted bodies, wrong Content-Range — behind a fault-injecting proxy: thousands of
//! concurrent reads through the FUSE mount return the right bytes or EIO, never wrong bytes,
//! and the filesystem serves everything once the registry recovers.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arbor_fetch::fetcher::FetcherOptions;
use arbor_testkit::{Entry, Fault, FaultProxy, Registry, XorShift64, pseudo_random_bytes};
use common::*;

#[test]
fn faulty_registry_gives_right_bytes_or_eio_then_recovers() {
    if skip("faulty_registry_gives_right_bytes_or_eio_then_recovers") {
        return;
    }
    let rt = runtime();
    let reg = Registry::start().unwrap();
    // 300 small files and 4 multi-chunk files, so reads hit many different fetch windows.
    let mut entries = vec![Entry::dir("small"), Entry::dir("big")];
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    for i in 0..300u64 {
        let data = pseudo_random_bytes(i, 2000 + (i as usize * 331) % 60_000);
        files.insert(format!("small/{i}"), data.clone());
        entries.push(Entry::file(format!("small/{i}"), data));
    }
    for i in 0..4u64 {
        let data = pseudo_random_bytes(1000 + i, (3 << 20) + 12345);
        files.insert(format!("big/{i}"), data.clone());
        entries.push(Entry::file(format!("big/{i}"), data));
    }
    let spec = tar_spec(&entries);
    let reference = converted(&rt, &reg, &spec, "fs/faults");

    // Read the TOC directly, then serve chunks through the proxy.
    let c = client(1);
    let direct = store(&reference, &c);
    let layers = layers(&rt, &direct);
    let proxy = FaultProxy::start(&reg.addr(), Duration::from_secs(3)).unwrap();
    let via_proxy = store(&reference.replace(&reg.addr(), &proxy.addr()), &c);
    let cache = tempfile::tempdir().unwrap();
    let (f, metrics) = fetcher(
        cache.path(),
        1 << 30,
        FetcherOptions {
            fetch_unit: 64 << 10,
            memory_budget: 4 << 20,
            fetch_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    );
    let (d, idx) = &layers[0];
    let mnt = tempfile::tempdir().unwrap();
    let m = mount(&rt, handle(&via_proxy, d, idx, 64 << 10), &f, mnt.path());

    proxy.chaos(35);
    let files = Arc::new(files);
    let (ok, eio) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let root = mnt.path().to_path_buf();
    let names: Arc<Vec<String>> = Arc::new({
        let mut v: Vec<String> = files.keys().cloned().collect();
        v.sort();
        v
    });
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let (files, names, ok, eio, root) = (
                Arc::clone(&files),
                Arc::clone(&names),
                Arc::clone(&ok),
                Arc::clone(&eio),
                root.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = XorShift64::new(t + 1);
                for _ in 0..160 {
                    let name = &names[(rng.next_u64() % names.len() as u64) as usize];
                    let want = &files[name];
                    let off = rng.next_u64() % want.len() as u64;
                    let len = 1 + rng.next_u64() % 200_000;
                    let f = std::fs::File::open(root.join(name)).unwrap();
                    let mut buf = vec![0u8; len as usize];
                    match f.read_at(&mut buf, off) {
                        Ok(n) => {
                            let end = (off as usize + n).min(want.len());
                            assert_eq!(
                                &buf[..n],
                                &want[off as usize..end],
                                "WRONG BYTES in {name} at {off}"
                            );
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name}: {e}");
                            eio.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a reader saw wrong bytes");
    }
    let (ok_n, eio_n) = (ok.load(Ordering::Relaxed), eio.load(Ordering::Relaxed));
    let counts = proxy.counts();
    eprintln!("reads: {ok_n} correct, {eio_n} EIO; faults injected: {counts:?}");
    eprintln!(
        "{}",
        metrics
            .render()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .take(12)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(ok_n + eio_n, 16 * 160);
    assert!(
        ok_n > 0 && eio_n > 0,
        "chaos should let some reads through and fail others"
    );
    for (fault, n) in &counts {
        assert!(
            *n > 0,
            "fault {fault:?} never injected: the test did not exercise it"
        );
    }
    assert!(
        metrics.verify_failures.load(Ordering::Relaxed) > 0,
        "corruption was never detected"
    );

    // The registry recovers: everything reads back whole and correct.
    proxy.heal();
    std::fs::write("/proc/sys/vm/drop_caches", "3").ok();
    for (name, want) in files.iter() {
        let got = std::fs::read(mnt.path().join(name))
            .unwrap_or_else(|e| panic!("{name} after recovery: {e}"));
        assert!(got == *want, "{name} differs after recovery");
    }
    drop(m);
    let _ = Fault::Pass;
}
