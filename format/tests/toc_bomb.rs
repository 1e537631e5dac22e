//! TOC memory bombs (issue #9, item 4), measured: this test binary counts every allocation,
//! so it holds only the tests that assert how much memory refusing a bomb takes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use arbor_format::Error;
use arbor_format::footer::TocPosition;
use arbor_format::index::{Limits, decode_toc};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One measured section at a time (tests run on several threads).
static SERIAL: Mutex<()> = Mutex::new(());

/// Bytes allocated at the peak of `f`, above what was allocated before it.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

fn position(compressed: &[u8], uncompressed: u64) -> TocPosition {
    TocPosition {
        offset: 8,
        length: compressed.len() as u64,
        uncompressed_length: uncompressed,
        toc_type: 1,
        ..Default::default()
    }
}

/// `n` minimal entries: 26 bytes of JSON each, ~350 bytes each once deserialized.
fn many_entries(n: usize) -> Vec<u8> {
    let mut json = Vec::with_capacity(n * 26 + 32);
    json.extend_from_slice(br#"{"version":1,"entries":["#);
    for i in 0..n {
        if i > 0 {
            json.push(b',');
        }
        json.extend_from_slice(br#"{"type":"dir","name":"a"}"#);
    }
    json.extend_from_slice(b"]}");
    json
}

#[test]
fn toc_bomb_is_refused_before_allocating() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 1 000 000 entries in 26 MB of JSON (a few hundred KB compressed). The old reader built
    // all of them (~350 MB) before looking at the count; with a 10 000-entry limit the reader
    // must stop at the limit: the JSON, plus ~10 000 entries, plus the decoder.
    let json = many_entries(1_000_000);
    let json_len = json.len();
    let c = zstd::bulk::compress(&json, 1).unwrap();
    drop(json);
    let pos = position(&c, json_len as u64);
    let limits = Limits {
        max_entries: 10_000,
        ..Limits::default()
    };
    let (res, peak) = peak_during(|| decode_toc(&c, &pos, None, &limits));
    let e = res.unwrap_err();
    assert!(
        matches!(
            e,
            Error::TocLimit {
                what: "entries",
                ..
            }
        ),
        "{e}"
    );
    let bound = json_len + (16 << 20);
    assert!(
        peak < bound,
        "refusing the bomb peaked at {peak} bytes, more than {bound}"
    );
}

#[test]
fn toc_lying_about_its_size_is_refused_after_decompressing_at_most_the_declared_length() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 200 MB of JSON that says it is 1 MiB: the reader decompresses 1 MiB + 1 byte and stops.
    let mut json = many_entries(8_000_000);
    json.truncate(200 << 20);
    let c = zstd::bulk::compress(&json, 1).unwrap();
    drop(json);
    let pos = position(&c, 1 << 20);
    let (res, peak) = peak_during(|| decode_toc(&c, &pos, None, &Limits::default()));
    let e = res.unwrap_err();
    assert!(e.to_string().contains("footer says"), "{e}");
    assert!(peak < 16 << 20, "peaked at {peak} bytes");

    // And one that declares more than the limit is refused without decompressing at all.
    let pos = position(&c, 512 << 20);
    let (res, peak) = peak_during(|| decode_toc(&c, &pos, None, &Limits::default()));
    assert!(matches!(res, Err(Error::TocTooLarge { .. })));
    assert!(peak < 1 << 20, "peaked at {peak} bytes");
}
