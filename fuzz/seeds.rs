//! Writes seed corpora for the fuzz targets: small tar streams built with the `tar` crate go to
//! `<out>/tar/`, the layers `convert_layer` makes of them to `<out>/toc/`, and their TOCs'
//! JSON (plus hand-written hostile TOCs and raw entry lists) to `<out>/tree/`.
//!
//! Usage: `cargo run --manifest-path fuzz/Cargo.toml --bin seeds [-- OUT_DIR]`
//! (`OUT_DIR` defaults to `fuzz/corpus`). Output names are fixed, so reruns overwrite.

use std::io::Cursor;
use std::path::PathBuf;

use arbor_format::index::{LayerIndex, Limits, decode_chunk};
use arbor_format::writer::{WriterOptions, convert_layer};

/// Deterministic, moderately compressible bytes.
fn content(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|i| {
            if i % 64 < 40 {
                b"the quick brown fox jumps over the lazy dog\n"[i % 44]
            } else {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            }
        })
        .collect()
}

struct Tar(tar::Builder<Vec<u8>>, u64);

impl Tar {
    fn new() -> Self {
        Tar(tar::Builder::new(Vec::new()), 0)
    }

    fn header(&mut self, kind: tar::EntryType, mode: u32, ustar: bool) -> tar::Header {
        let mut h = if ustar {
            tar::Header::new_ustar()
        } else {
            tar::Header::new_gnu()
        };
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000 + self.1);
        h.set_size(0);
        self.1 += 1;
        h
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        let mut h = self.header(tar::EntryType::Regular, 0o644, false);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, name, data).unwrap();
        self
    }

    fn dir(&mut self, name: &str) -> &mut Self {
        let mut h = self.header(tar::EntryType::Directory, 0o755, false);
        self.0.append_data(&mut h, name, &[][..]).unwrap();
        self
    }

    fn link(&mut self, kind: tar::EntryType, name: &str, target: &str) -> &mut Self {
        let mut h = self.header(kind, 0o777, false);
        self.0.append_link(&mut h, name, target).unwrap();
        self
    }

    fn special(&mut self, kind: tar::EntryType, name: &str) -> &mut Self {
        let mut h = self.header(kind, 0o600, true);
        if kind == tar::EntryType::Char {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        self.0.append_data(&mut h, name, &[][..]).unwrap();
        self
    }

    /// A file with a PAX header carrying an xattr and a fractional mtime.
    fn pax_file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.0
            .append_pax_extensions([
                ("SCHILY.xattr.user.test", &b"\x00\x01value\xff"[..]),
                ("mtime", &b"1700000000.25"[..]),
            ])
            .unwrap();
        let mut h = self.header(tar::EntryType::Regular, 0o4755, true);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, name, data).unwrap();
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

fn main() {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/corpus").to_string()),
    );
    let long_name = format!("deep/{}/file.txt", "d".repeat(120));
    let tars: Vec<(&str, Vec<u8>, Vec<String>)> = vec![
        (
            "file",
            Tar::new().file("hello.txt", b"hello, world\n").finish(),
            vec![],
        ),
        (
            "multichunk",
            Tar::new()
                .file("big.bin", &content(3 * 4096 + 123, 1))
                .finish(),
            vec![],
        ),
        (
            "symlink",
            Tar::new()
                .link(tar::EntryType::Symlink, "sh", "/bin/busybox")
                .finish(),
            vec![],
        ),
        (
            "dir",
            Tar::new().dir("etc/").dir("etc/ssl").finish(),
            vec![],
        ),
        (
            "mixed",
            Tar::new()
                .dir("usr/")
                .dir("usr/bin/")
                .file("usr/bin/tool", &content(5000, 2))
                .link(tar::EntryType::Link, "usr/bin/tool2", "usr/bin/tool")
                .link(tar::EntryType::Symlink, "usr/bin/t", "tool")
                .file("empty", b"")
                .file("zeros", &vec![0u8; 9000])
                .pax_file("usr/bin/suid", &content(100, 3))
                .file(&long_name, b"long name\n")
                .special(tar::EntryType::Fifo, "run/fifo")
                .special(tar::EntryType::Char, "dev/null")
                .finish(),
            vec![],
        ),
        (
            "prefetch",
            Tar::new()
                .dir("app/")
                .file("app/lib.so", &content(6000, 4))
                .file("app/main", &content(700, 5))
                .file("app/data", &content(300, 6))
                .finish(),
            vec!["/app/main".to_string(), "app/lib.so".to_string()],
        ),
    ];
    std::fs::create_dir_all(out.join("tar")).unwrap();
    std::fs::create_dir_all(out.join("toc")).unwrap();
    std::fs::create_dir_all(out.join("tree")).unwrap();
    for (name, seed) in tree_seeds() {
        std::fs::write(out.join("tree").join(format!("seed-{name}")), seed).unwrap();
    }
    for (name, tar_bytes, prefetch) in tars {
        let opts = WriterOptions {
            chunk_size: 4096,
            block_size: 4096,
            threads: 1,
            prefetch,
            ..WriterOptions::default()
        };
        let (summary, blob) = convert_layer(&tar_bytes[..], Vec::new(), &opts)
            .unwrap_or_else(|e| panic!("converting seed {name}: {e}"));
        // Sanity: the seed layer reads back and every chunk verifies.
        let (index, _) = LayerIndex::read_from(
            &mut Cursor::new(&blob),
            blob.len() as u64,
            None,
            &Limits::default(),
        )
        .unwrap_or_else(|e| panic!("reading seed {name}: {e}"));
        let mut chunks = 0;
        for e in &index.entries {
            for c in &e.chunks {
                decode_chunk(
                    &e.name,
                    c,
                    &blob[c.blob_offset as usize..c.blob_end as usize],
                )
                .unwrap_or_else(|err| panic!("seed {name}, {}: {err}", e.name));
                chunks += 1;
            }
        }
        std::fs::write(out.join("tar").join(format!("seed-{name}.tar")), &tar_bytes).unwrap();
        std::fs::write(out.join("toc").join(format!("seed-{name}.blob")), &blob).unwrap();
        let position = summary.toc_position;
        let toc = &blob[position.offset as usize..(position.offset + position.length) as usize];
        let json = zstd::stream::decode_all(toc).unwrap();
        std::fs::write(out.join("tree").join(format!("seed-{name}.json")), &json).unwrap();
        println!(
            "seed {name}: tar {} bytes, layer {} bytes, {} entries, {chunks} chunks",
            tar_bytes.len(),
            summary.blob_size,
            index.entries.len()
        );
    }
}

/// Hostile TOCs (JSON) and raw entry lists (`KIND NAME [LINK]` lines) for the `tree` target.
fn tree_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let entry = |kind: &str, name: &str, link: &str| {
        format!(r#"{{"type":"{kind}","name":"{name}","linkName":"{link}","mode":493}}"#)
    };
    let toc = |entries: &[String]| format!(r#"{{"version":1,"entries":[{}]}}"#, entries.join(","));
    let deep = vec!["a"; 600].join("/");
    vec![
        (
            "hostile-links.json",
            toc(&[
                entry("dir", ".", ""),
                entry("dir", "d", ""),
                entry("reg", "f", ""),
                entry("hardlink", "d/loop", "d"),
                entry("hardlink", "d/f", "f"),
                entry("hardlink", "up", "."),
            ])
            .into_bytes(),
        ),
        (
            "hostile-whiteouts.json",
            toc(&[
                entry("reg", ".wh.", ""),
                entry("reg", "d/.wh..", ""),
                entry("reg", "d/.wh...", ""),
                entry("reg", "d/.wh.x", ""),
                entry("reg", "d/.wh..wh..opq", ""),
                entry("reg", "x/y", ""),
            ])
            .into_bytes(),
        ),
        (
            "hostile-parents.json",
            toc(&[
                entry("reg", "a", ""),
                entry("reg", "a/b", ""),
                entry("symlink", "s", "/etc"),
                entry("reg", "s/passwd", ""),
                entry("dir", "dup", ""),
                entry("reg", "dup", ""),
                entry("hardlink", "l", "dup"),
            ])
            .into_bytes(),
        ),
        ("hostile-deep.json", toc(&[entry("dir", &deep, "")]).into_bytes()),
        (
            "raw-entries.txt",
            b"d d\nh d/loop d\nh up .\nf a\nf a/b\ns s /etc\nf s/x\nf .wh.\nf d/.wh..\nf d/.wh.y\nf d/.wh..wh..opq\nh l a/b\nf a\nd a\n"
                .to_vec(),
        ),
    ]
}
