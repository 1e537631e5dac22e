//! Round trips: tar -> chunked layer -> (a) whole-blob decompression read by the `tar` crate,
//! (b) TOC + per-chunk decoding. Both must give back every entry of the source exactly.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};

use arbor_format::footer::TocPosition;
use arbor_format::index::{LayerIndex, Limits, decode_chunk, locate_toc};
use arbor_format::tarstream::EntryKind;
use arbor_format::writer::{WriterOptions, convert_layer};
use arbor_format::{Digest, toc};
use proptest::prelude::*;

/// What a tar entry means, independent of how it is encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Model {
    kind: char,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    link: String,
    dev: (u32, u32),
    xattrs: BTreeMap<String, Vec<u8>>,
    content: Vec<u8>,
}

#[derive(Clone, Debug)]
enum Spec {
    File(String, Vec<u8>),
    Dir(String),
    Symlink(String, String),
    Hard(String, String),
    Char(String, u32, u32),
    Fifo(String),
}

fn build_tar(specs: &[Spec], gnu: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (i, s) in specs.iter().enumerate() {
        let mut h = if gnu {
            tar::Header::new_gnu()
        } else {
            tar::Header::new_ustar()
        };
        h.set_mtime(1_700_000_000 + i as u64);
        h.set_uid(1000 + i as u64 % 3);
        h.set_gid(100);
        let (name, data): (&str, &[u8]) = match s {
            Spec::File(n, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644 | if i % 7 == 0 { 0o4000 } else { 0 });
                h.set_size(d.len() as u64);
                (n, d)
            }
            Spec::Dir(n) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                (n, &[])
            }
            Spec::Symlink(n, t) | Spec::Hard(n, t) => {
                h.set_entry_type(if matches!(s, Spec::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, n, t).unwrap();
                continue;
            }
            Spec::Char(n, ma, mi) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_device_major(*ma).unwrap();
                h.set_device_minor(*mi).unwrap();
                h.set_mode(0o600);
                h.set_size(0);
                (n, &[])
            }
            Spec::Fifo(n) => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_mode(0o600);
                h.set_size(0);
                (n, &[])
            }
        };
        if i % 5 == 0 && !gnu {
            let key = format!("SCHILY.xattr.user.k{i}");
            b.append_pax_extensions([(key.as_str(), &[0u8, 1, 2, 255][..])])
                .unwrap();
        }
        b.append_data(&mut h, name, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Reads a tar with the `tar` crate (an independent reader) into name -> model.
fn model_of_tar(tar_bytes: &[u8]) -> BTreeMap<String, Model> {
    let mut out = BTreeMap::new();
    let mut a = tar::Archive::new(tar_bytes);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = arbor_format::path::normalize(&e.path().unwrap().to_string_lossy()).unwrap();
        let h = e.header().clone();
        let mut xattrs = BTreeMap::new();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for x in exts {
                let x = x.unwrap();
                if let Some(k) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(k.to_string(), x.value_bytes().to_vec());
                }
            }
        }
        let link = e
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        let kind = match h.entry_type() {
            tar::EntryType::Regular => 'f',
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Link => 'h',
            tar::EntryType::Char => 'c',
            tar::EntryType::Block => 'b',
            tar::EntryType::Fifo => 'p',
            other => panic!("unexpected {other:?}"),
        };
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        let link = if kind == 'h' {
            arbor_format::path::normalize(&link).unwrap()
        } else {
            link
        };
        let dev = if matches!(kind, 'c' | 'b') {
            (
                h.device_major().unwrap().unwrap(),
                h.device_minor().unwrap().unwrap(),
            )
        } else {
            (0, 0)
        };
        out.insert(
            name,
            Model {
                kind,
                mode: h.mode().unwrap() & 0o7777,
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                mtime: h.mtime().unwrap(),
                link,
                dev,
                xattrs,
                content,
            },
        );
    }
    out
}

/// Reads a converted blob through its TOC, decoding every chunk from its frame range.
fn model_of_index(blob: &[u8], index: &LayerIndex) -> BTreeMap<String, Model> {
    let mut out = BTreeMap::new();
    for e in &index.entries {
        let mut content = Vec::new();
        for c in &e.chunks {
            let frame = &blob[c.blob_offset as usize..c.blob_end as usize];
            content.extend(decode_chunk(&e.name, c, frame).unwrap());
        }
        if let Some(d) = &e.digest {
            assert_eq!(&Digest::of(&content), d, "{}", e.name);
        }
        let kind = match e.kind {
            EntryKind::Regular => 'f',
            EntryKind::Dir => 'd',
            EntryKind::Symlink => 'l',
            EntryKind::HardLink => 'h',
            EntryKind::Char => 'c',
            EntryKind::Block => 'b',
            EntryKind::Fifo => 'p',
        };
        out.insert(
            e.name.clone(),
            Model {
                kind,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                mtime: e.mtime.secs as u64,
                link: e.link_name.clone(),
                dev: (e.dev_major, e.dev_minor),
                xattrs: e.xattrs.clone(),
                content,
            },
        );
    }
    out
}

struct Converted {
    blob: Vec<u8>,
    summary: arbor_format::writer::LayerSummary,
}

fn convert(tar_bytes: &[u8], opts: &WriterOptions) -> Converted {
    let (summary, blob) = convert_layer(tar_bytes, Vec::new(), opts).unwrap();
    Converted { blob, summary }
}

fn check_roundtrip(specs: &[Spec], gnu: bool, opts: &WriterOptions) -> Converted {
    let tar_bytes = build_tar(specs, gnu);
    let source = model_of_tar(&tar_bytes);
    let c = convert(&tar_bytes, opts);
    let s = &c.summary;
    assert_eq!(s.blob_digest, Digest::of(&c.blob));
    assert_eq!(s.blob_size, c.blob.len() as u64);

    // (a) Any zstd decoder reads the blob as one tar stream equal to the source.
    let mut plain = Vec::new();
    zstd::stream::read::Decoder::new(&c.blob[..])
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(Digest::of(&plain), s.diff_id);
    assert_eq!(plain.len() as u64, s.uncompressed_size);
    assert_eq!(model_of_tar(&plain), source);

    // (b) The TOC, found by footer and by annotations, gives the same entries.
    let (index, pos) = LayerIndex::read_from(
        &mut Cursor::new(&c.blob),
        s.blob_size,
        None,
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(pos, s.toc_position);
    assert_eq!(model_of_index(&c.blob, &index), source);
    let ann = s.annotations();
    let loc = locate_toc(&ann).unwrap().unwrap();
    assert_eq!(loc.digest.as_ref(), Some(&s.toc_digest));
    LayerIndex::read_from(
        &mut Cursor::new(&c.blob),
        s.blob_size,
        Some(&loc),
        &Limits::default(),
    )
    .unwrap();

    // The block table hashes the data region.
    let arbor = index.arbor.as_ref().unwrap();
    assert_eq!(arbor.data_length, index.data_end);
    for (i, d) in arbor.blocks.iter().enumerate() {
        let start = i * arbor.block_size as usize;
        let end = (start + arbor.block_size as usize).min(arbor.data_length as usize);
        assert_eq!(&Digest::of(&c.blob[start..end]), d, "block {i}");
    }
    c
}

fn corpus() -> Vec<Spec> {
    let big: Vec<u8> = (0..3_500_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut sparse = vec![0u8; 5 << 20];
    sparse[3 << 20..(3 << 20) + 100].fill(7);
    let long_dir = "d".repeat(120);
    let long_name = format!("{long_dir}/{}", "n".repeat(150));
    vec![
        Spec::Dir("etc".into()),
        Spec::File("etc/empty".into(), vec![]),
        Spec::File("etc/one".into(), b"x".to_vec()),
        Spec::File("etc/hosts".into(), b"127.0.0.1 localhost\n".repeat(50)),
        Spec::Dir("bin".into()),
        Spec::File("bin/big".into(), big),
        Spec::File("bin/sparse".into(), sparse),
        Spec::Symlink("bin/sh".into(), "busybox".into()),
        Spec::Symlink("bin/abs".into(), "/usr/bin/env".into()),
        Spec::Hard("bin/big-link".into(), "bin/big".into()),
        Spec::Char("dev-null".into(), 1, 3),
        Spec::Fifo("fifo".into()),
        Spec::Dir(long_dir.clone()),
        Spec::File(long_name.clone(), b"long".to_vec()),
        Spec::Symlink("long-link".into(), long_name),
        Spec::Dir("wh".into()),
        Spec::File("wh/.wh.gone".into(), vec![]),
        Spec::File("wh/.wh..wh..opq".into(), vec![]),
        Spec::File("ünïcödé.txt".into(), "∑".repeat(10).into_bytes()),
    ]
}

#[test]
fn corpus_roundtrips_pax_and_gnu() {
    let opts = WriterOptions {
        chunk_size: 1 << 20,
        ..Default::default()
    };
    check_roundtrip(&corpus(), false, &opts);
    check_roundtrip(&corpus(), true, &opts);
}

#[test]
fn output_is_deterministic_across_thread_counts() {
    let tar_bytes = build_tar(&corpus(), false);
    let one = convert(
        &tar_bytes,
        &WriterOptions {
            threads: 1,
            ..Default::default()
        },
    );
    let four = convert(
        &tar_bytes,
        &WriterOptions {
            threads: 4,
            ..Default::default()
        },
    );
    assert_eq!(one.blob, four.blob);
}

#[test]
fn zero_chunks_are_marked_and_big_files_split() {
    let opts = WriterOptions {
        chunk_size: 1 << 20,
        ..Default::default()
    };
    let c = check_roundtrip(&corpus(), false, &opts);
    let (index, _) = LayerIndex::read_from(
        &mut Cursor::new(&c.blob),
        c.blob.len() as u64,
        None,
        &Limits::default(),
    )
    .unwrap();
    let sparse = index
        .entries
        .iter()
        .find(|e| e.name == "bin/sparse")
        .unwrap();
    assert_eq!(sparse.chunks.len(), 5);
    assert_eq!(sparse.chunks.iter().filter(|c| c.zeros).count(), 4);
    let big = index.entries.iter().find(|e| e.name == "bin/big").unwrap();
    assert_eq!(big.chunks.len(), 4);
    // Each frame holds exactly its chunk: compressed frames never overlap and follow file order.
    assert!(
        big.chunks
            .windows(2)
            .all(|w| w[0].blob_end <= w[1].blob_offset)
    );
}

#[test]
fn prefetch_entries_come_first_in_list_order() {
    let opts = WriterOptions {
        prefetch: vec![
            "etc/hosts".into(),
            "/bin/big".into(),
            "./bin/big-link".into(),
            "no/such/file".into(),
        ],
        ..Default::default()
    };
    let c = check_roundtrip(&corpus(), false, &opts);
    let s = &c.summary;
    assert_eq!(s.prefetch_found, ["etc/hosts", "bin/big", "bin/big-link"]);
    assert_eq!(s.prefetch_missing, ["no/such/file"]);
    let (index, _) = LayerIndex::read_from(
        &mut Cursor::new(&c.blob),
        s.blob_size,
        None,
        &Limits::default(),
    )
    .unwrap();
    let arbor = index.arbor.clone().unwrap();
    assert_eq!(arbor.prefetch, s.prefetch_found);
    assert!(arbor.prefetch_end > 0);
    for e in &index.entries {
        let in_front = e.chunks.iter().all(|c| c.blob_end <= arbor.prefetch_end);
        let want_front = ["etc/hosts", "bin/big"].contains(&e.name.as_str());
        if !e.chunks.is_empty() {
            assert_eq!(in_front, want_front, "{}", e.name);
        }
    }
}

#[test]
fn reconverting_plain_input_is_stable() {
    // The diff ID of the converted layer equals the digest of the tar it decompresses to, and
    // converting that tar again gives the same blob (headers are carried over byte for byte).
    let tar_bytes = build_tar(&corpus(), false);
    let first = convert(&tar_bytes, &WriterOptions::default());
    let mut plain = Vec::new();
    zstd::stream::read::Decoder::new(&first.blob[..])
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    let second = convert(&plain, &WriterOptions::default());
    assert_eq!(first.blob, second.blob);
}

#[test]
fn toc_names_use_zstd_chunked_fields() {
    let c = convert(&build_tar(&corpus(), false), &WriterOptions::default());
    let pos = c.summary.toc_position;
    let compressed = &c.blob[pos.offset as usize..(pos.offset + pos.length) as usize];
    let json: serde_json::Value =
        serde_json::from_slice(&zstd::stream::decode_all(compressed).unwrap()).unwrap();
    assert_eq!(json["version"], 1);
    let big = json["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "bin/big")
        .unwrap();
    for key in [
        "type",
        "name",
        "mode",
        "size",
        "modtime",
        "digest",
        "offset",
        "endOffset",
        "chunkSize",
        "chunkDigest",
    ] {
        assert!(big.get(key).is_some(), "missing {key}: {big}");
    }
    assert_eq!(big["type"], toc::types::REG);
    let _ = TocPosition::default();
}

fn arb_specs() -> impl Strategy<Value = Vec<Spec>> {
    let name = "[a-c]{1,3}(/[a-c]{1,3}){0,2}";
    let file =
        (name, prop::collection::vec(any::<u8>(), 0..20_000)).prop_map(|(n, d)| Spec::File(n, d));
    let zeros = (name, 0usize..40_000).prop_map(|(n, l)| Spec::File(n, vec![0; l]));
    let dir = name.prop_map(Spec::Dir);
    let link = (name, "[ -~]{1,200}").prop_map(|(n, t)| Spec::Symlink(n, t));
    prop::collection::vec(
        prop_oneof![4 => file, 1 => zeros, 1 => dir, 1 => link],
        0..30,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_tar_roundtrips(specs in arb_specs(), chunk in 4096u64..20_000, gnu in any::<bool>(),
                          prefetch_pick in prop::collection::vec(any::<prop::sample::Index>(), 0..4)) {
        // Names may repeat and change type; tar semantics (later wins) apply on both sides.
        // Drop specs whose parent path is a non-directory to keep the tar meaningful.
        let names: Vec<String> = specs.iter().map(|s| match s {
            Spec::File(n, _) | Spec::Dir(n) | Spec::Symlink(n, _) | Spec::Hard(n, _)
            | Spec::Char(n, ..) | Spec::Fifo(n) => n.clone(),
        }).collect();
        let prefetch = if names.is_empty() { vec![] } else {
            prefetch_pick.iter().map(|i| names[i.index(names.len())].clone()).collect()
        };
        let opts = WriterOptions { chunk_size: chunk, block_size: 4096, prefetch, threads: 2, ..Default::default() };
        check_roundtrip(&specs, gnu, &opts);
    }
}

#[test]
fn reads_chunk_ends_the_containers_storage_1_4x_way() {
    // skopeo 1.9 gives chunk entries only an offset and the reg entry the end of the whole
    // file; the reader must derive the same chunk ranges from that.
    let c = convert(&build_tar(&corpus(), false), &WriterOptions::default());
    let pos = c.summary.toc_position;
    let compressed = &c.blob[pos.offset as usize..(pos.offset + pos.length) as usize];
    let mut t: toc::Toc =
        serde_json::from_slice(&zstd::stream::decode_all(compressed).unwrap()).unwrap();
    let mut file_end: std::collections::HashMap<String, i64> = Default::default();
    for e in &t.entries {
        if e.end_offset > 0 {
            file_end.insert(e.name.clone(), e.end_offset);
        }
    }
    for e in t.entries.iter_mut() {
        if e.kind == toc::types::CHUNK {
            e.end_offset = 0;
        } else if e.kind == toc::types::REG && e.end_offset > 0 {
            e.end_offset = file_end[&e.name];
        }
    }
    t.arbor = None;
    let data_end = pos.offset - arbor_format::footer::SKIPPABLE_HEADER_LEN;
    let index = LayerIndex::from_toc(t, data_end).unwrap();
    let original = LayerIndex::read_from(
        &mut Cursor::new(&c.blob),
        c.blob.len() as u64,
        None,
        &Limits::default(),
    )
    .unwrap()
    .0;
    assert_eq!(index.entries, original.entries);
    assert_eq!(
        model_of_index(&c.blob, &index),
        model_of_tar(&build_tar(&corpus(), false))
    );
}
