//! A converted layer in a real registry, mounted through the FUSE filesystem on the real
//! kernel, shows every entry of its source exactly: type, mode, owner, mtime, size, content,
//! link target, device numbers, xattrs; hard links share an inode; whiteouts and opaque
//! directories appear the way overlayfs expects. Also for a layer skopeo wrote as zstd:chunked.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use arbor_fetch::fetcher::FetcherOptions;
use arbor_testkit::{Entry, EntryKind, ImageSpec, LayerSource, Registry, corpus, layer_tar};
use common::*;

/// The tree a layer's entries should show through the mount.
fn expected(entries: &[Entry]) -> BTreeMap<String, Meta> {
    let mut m: BTreeMap<String, Meta> = BTreeMap::new();
    for e in entries {
        let path = e
            .path
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        let (dir, base) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
        let join = |name: &str| {
            if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            }
        };
        if base == ".wh..wh..opq" {
            m.get_mut(dir)
                .expect("opaque marker after its directory")
                .xattrs
                .insert("trusted.overlay.opaque".into(), b"y".to_vec());
            continue;
        }
        let mut meta = Meta {
            kind: 'f',
            mode: e.mode & 0o7777,
            uid: e.uid as u32,
            gid: e.gid as u32,
            mtime: e.mtime as i64,
            size: 0,
            rdev: 0,
            content: None,
            link: None,
            xattrs: e.xattrs.iter().cloned().collect(),
        };
        if let Some(hidden) = base.strip_prefix(".wh.") {
            meta.kind = 'c';
            meta.mode = 0;
            meta.xattrs.clear();
            m.insert(join(hidden), meta);
            continue;
        }
        match &e.kind {
            EntryKind::File(d) => {
                meta.size = d.len() as u64;
                meta.content = Some(sha(d));
            }
            EntryKind::Dir => meta.kind = 'd',
            EntryKind::Symlink(t) => {
                meta.kind = 'l';
                meta.size = t.len() as u64;
                meta.link = Some(t.clone());
            }
            EntryKind::HardLink(t) => {
                // The link's own header applies to the shared inode, as containerd unpacks it.
                let target = t.trim_start_matches("./").to_string();
                let mut shared = m[&target].clone();
                shared.mode = meta.mode;
                shared.uid = meta.uid;
                shared.gid = meta.gid;
                shared.mtime = meta.mtime;
                shared.xattrs.remove("security.capability");
                shared.xattrs.extend(meta.xattrs.clone());
                for (p, v) in m.iter_mut() {
                    if *p == target
                        || (v.content == shared.content
                            && v.kind == 'f'
                            && linked(entries, p, &target))
                    {
                        *v = shared.clone();
                    }
                }
                meta = shared;
            }
            EntryKind::CharDev(a, b) => {
                meta.kind = 'c';
                meta.rdev = libc::makedev(*a, *b);
            }
            EntryKind::BlockDev(a, b) => {
                meta.kind = 'b';
                meta.rdev = libc::makedev(*a, *b);
            }
            EntryKind::Fifo => meta.kind = 'p',
        }
        if meta.kind == 'd'
            && let Some(old) = m.get(&path)
        {
            // A directory entry after an opaque marker keeps it.
            if let Some(v) = old.xattrs.get("trusted.overlay.opaque") {
                meta.xattrs
                    .insert("trusted.overlay.opaque".into(), v.clone());
            }
        }
        m.insert(path, meta);
    }
    m
}

/// Whether `path` is a hard link (in `entries`) to `target`.
fn linked(entries: &[Entry], path: &str, target: &str) -> bool {
    entries.iter().any(|e| {
        e.path.trim_start_matches("./") == path
            && matches!(&e.kind, EntryKind::HardLink(t) if t.trim_start_matches("./") == target)
    })
}

fn compare(mount: &Path, want: &BTreeMap<String, Meta>) {
    let got = walk(mount, true);
    let mut problems = Vec::new();
    for (p, w) in want {
        match got.get(p) {
            None => problems.push(format!("{p}: missing")),
            Some(g) if g != w => problems.push(format!("{p}:\n  want {w:?}\n  got  {g:?}")),
            _ => {}
        }
    }
    for (p, g) in &got {
        if !want.contains_key(p) && g.kind != 'd' {
            problems.push(format!("{p}: unexpected {g:?}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{} differences:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

fn corpus_spec() -> (Vec<Entry>, ImageSpec) {
    let entries = corpus();
    let spec = ImageSpec {
        layers: vec![LayerSource::Tar(layer_tar(&entries))],
        cmd: vec!["/bin/true".into()],
        ..Default::default()
    };
    (entries, spec)
}

#[test]
fn layer_mount_shows_every_entry_exactly() {
    if skip("layer_mount_shows_every_entry_exactly") {
        return;
    }
    let rt = runtime();
    let reg = Registry::start().unwrap();
    let (entries, spec) = corpus_spec();
    let reference = converted(&rt, &reg, &spec, "fs/corpus");
    let c = client(2);
    let st = store(&reference, &c);
    let layers = layers(&rt, &st);
    let cache = tempfile::tempdir().unwrap();
    let (f, metrics) = fetcher(cache.path(), 1 << 30, FetcherOptions::default());
    let mnt = tempfile::tempdir().unwrap();
    let (d, idx) = &layers[0];
    let m = mount(&rt, handle(&st, d, idx, 512 << 10), &f, mnt.path());

    compare(mnt.path(), &expected(&entries));
    // Hard links share an inode and count their links.
    for (link, target) in [
        ("corpus/links/hard-4k", "corpus/files/4k"),
        ("corpus/links/hard-random", "corpus/files/random-3m"),
    ] {
        let a = std::fs::metadata(mnt.path().join(link)).unwrap();
        let b = std::fs::metadata(mnt.path().join(target)).unwrap();
        assert_eq!(a.ino(), b.ino(), "{link}");
        assert!(a.nlink() >= 2);
    }
    // Writes are refused: the layer is read-only.
    let err = std::fs::write(mnt.path().join("corpus/files/one"), b"y").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    // Reads at arbitrary offsets across chunk boundaries.
    let big = std::fs::read(mnt.path().join("corpus/files/random-3m")).unwrap();
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(mnt.path().join("corpus/files/random-3m")).unwrap();
    for off in [
        0u64,
        1,
        4095,
        (1 << 20) - 3,
        (2 << 20) + 7,
        big.len() as u64 - 5,
    ] {
        let mut buf = vec![0u8; 300_000];
        let n = file.read_at(&mut buf, off).unwrap();
        assert_eq!(
            &buf[..n],
            &big[off as usize..(off as usize + n)],
            "offset {off}"
        );
    }
    drop(m);
    assert_eq!(
        metrics
            .verify_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(metrics.source_bytes("registry") > 0);
}

#[test]
fn skopeo_zstd_chunked_layer_mounts_too() {
    if skip("skopeo_zstd_chunked_layer_mounts_too") {
        return;
    }
    let rt = runtime();
    let (entries, spec) = corpus_spec();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let chunked = dir.path().join("chunked");
    arbor_testkit::write_oci_layout(&src, "v1", &spec).unwrap();
    let out = std::process::Command::new("skopeo")
        .args([
            "copy",
            "--insecure-policy",
            "--dest-compress",
            "--dest-compress-format=zstd:chunked",
        ])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("oci:{}:v1", chunked.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = client(2);
    let st = store(&format!("oci:{}:v1", chunked.display()), &c);
    let layers = layers(&rt, &st);
    assert!(
        layers[0].1.arbor.is_none(),
        "skopeo wrote no Arbor extension"
    );
    let cache = tempfile::tempdir().unwrap();
    let (f, _) = fetcher(cache.path(), 1 << 30, FetcherOptions::default());
    let mnt = tempfile::tempdir().unwrap();
    let (d, idx) = &layers[0];
    let m = mount(&rt, handle(&st, d, idx, 512 << 10), &f, mnt.path());
    let mut want = expected(&entries);
    // skopeo 1.9's TOC drops xattrs with empty values (its tar stream keeps them).
    for meta in want.values_mut() {
        meta.xattrs
            .retain(|k, v| !(v.is_empty() && k.starts_with("user.")));
    }
    compare(mnt.path(), &want);
    drop(m);
}
