//! Crafted layers from issue #9 ("Hostile images"): each test is named after the attack and
//! checks that the reader (or the converter) refuses it with a clear error, or that the tree a
//! reader builds stays a tree, without crashing or allocating without bound.

use std::io::Cursor;

use arbor_format::footer::{SKIPPABLE_HEADER_LEN, TocPosition, skippable_frame};
use arbor_format::index::{
    Chunk, IndexEntry, LayerIndex, Limits, data_end_of, decode_chunk, decode_toc,
};
use arbor_format::tarstream::EntryKind;
use arbor_format::toc::{Toc, TocEntry, types};
use arbor_format::tree::{LayerTree, NodeKind, OPAQUE_XATTR, ROOT};
use arbor_format::writer::{WriterOptions, convert_layer};
use arbor_format::{Digest, Error};

fn toc_entry(kind: &str, name: &str, link: &str) -> TocEntry {
    TocEntry {
        kind: kind.to_string(),
        name: name.to_string(),
        link_name: link.to_string(),
        mode: 0o755,
        ..TocEntry::default()
    }
}

fn toc(entries: Vec<TocEntry>) -> Toc {
    Toc {
        version: 1,
        entries,
        ..Toc::default()
    }
}

/// An index entry built by hand, bypassing validation (the tree must cope with anything).
fn raw(kind: EntryKind, name: &str, link: &str) -> IndexEntry {
    IndexEntry::bare(kind, name, link)
}

fn index(entries: Vec<IndexEntry>) -> LayerIndex {
    LayerIndex {
        entries,
        data_end: 0,
        arbor: None,
    }
}

fn tree_of(entries: Vec<IndexEntry>) -> LayerTree {
    let t = LayerTree::build(&index(entries));
    t.check().unwrap_or_else(|e| panic!("not a tree: {e}"));
    t
}

fn path(t: &LayerTree, p: &str) -> Option<u64> {
    let mut cur = ROOT;
    for c in p.split('/') {
        cur = t.lookup(cur, c)?;
    }
    Some(cur)
}

/// Compressed TOC bytes and the position that declares them.
fn compressed(json: &[u8]) -> (Vec<u8>, TocPosition) {
    let c = zstd::bulk::compress(json, 1).unwrap();
    let pos = TocPosition {
        offset: 8,
        length: c.len() as u64,
        uncompressed_length: json.len() as u64,
        toc_type: 1,
        ..Default::default()
    };
    (c, pos)
}

fn pax_tar(name: &str, kind: tar::EntryType, link: Option<&str>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut records: Vec<(&str, &[u8])> = vec![("path", name.as_bytes())];
    if let Some(l) = link {
        records.push(("linkpath", l.as_bytes()));
    }
    b.append_pax_extensions(records).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_path("placeholder").unwrap();
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
    b.into_inner().unwrap()
}

fn convert(tar: &[u8]) -> arbor_format::Result<Vec<u8>> {
    convert_layer(tar, Vec::new(), &WriterOptions::default()).map(|(_, blob)| blob)
}

// ---- 1. Deep paths -------------------------------------------------------------------------

#[test]
fn deep_path_toc_is_refused_not_stack_overflow() {
    // ~20 000 components: the old reader accepted it and the tree builder recursed once per
    // component, overflowing arbord's stack.
    let deep = vec!["a"; 20_000].join("/");
    let t = toc(vec![toc_entry(types::DIR, &deep, "")]);
    let e = LayerIndex::from_toc(t, 0).unwrap_err();
    assert!(matches!(e, Error::UnsafePath { .. }), "{e}");
    assert!(e.to_string().contains("512 components"), "{e}");
    assert!(e.to_string().len() < 400, "error not bounded: {e}");

    // Same for a name longer than PATH_MAX, or a component longer than NAME_MAX.
    let long = vec!["b".repeat(200); 30].join("/");
    let e = LayerIndex::from_toc(toc(vec![toc_entry(types::REG, &long, "")]), 0).unwrap_err();
    assert!(e.to_string().contains("PATH_MAX"), "{e}");
    let wide = format!("dir/{}", "c".repeat(256));
    let e = LayerIndex::from_toc(toc(vec![toc_entry(types::REG, &wide, "")]), 0).unwrap_err();
    assert!(e.to_string().contains("NAME_MAX"), "{e}");
    // A hard link target is held to the same rules.
    let e = LayerIndex::from_toc(
        toc(vec![
            toc_entry(types::REG, "f", ""),
            toc_entry(types::HARDLINK, "l", &deep),
        ]),
        0,
    )
    .unwrap_err();
    assert!(matches!(e, Error::UnsafePath { .. }), "{e}");
}

#[test]
fn deep_path_tar_is_refused_at_conversion() {
    let deep = vec!["a"; 20_000].join("/");
    let e = convert(&pax_tar(&deep, tar::EntryType::Regular, None)).unwrap_err();
    assert!(matches!(e, Error::UnsafePath { .. }), "{e}");
    let e = convert(&pax_tar(
        &format!("d/{}", "n".repeat(300)),
        tar::EntryType::Regular,
        None,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("NAME_MAX"), "{e}");
    let e = convert(&pax_tar(
        "sym",
        tar::EntryType::Symlink,
        Some(&"t/".repeat(3000)),
    ))
    .unwrap_err();
    assert!(e.to_string().contains("PATH_MAX"), "{e}");
}

#[test]
fn deep_tree_is_built_without_recursion() {
    // The deepest index the reader accepts, and (built by hand) one 40 times deeper than it
    // allows, both built on a thread with a 256 KiB stack: building is iterative.
    let at_limit = vec!["d"; 512].join("/");
    let beyond = vec!["e"; 20_000].join("/");
    let handle = std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || {
            let idx = LayerIndex::from_toc(
                toc(vec![toc_entry(types::REG, &format!("{at_limit}/f"), "")]),
                0,
            );
            // 513 components with the file: refused; the directory alone is accepted.
            assert!(idx.is_err());
            let idx =
                LayerIndex::from_toc(toc(vec![toc_entry(types::DIR, &at_limit, "")]), 0).unwrap();
            let t = LayerTree::build(&idx);
            t.check().unwrap();
            assert_eq!(t.nodes.len(), 513);

            let t = LayerTree::build(&index(vec![
                raw(EntryKind::Dir, &beyond, ""),
                raw(EntryKind::Regular, &format!("{beyond}/f"), ""),
            ]));
            t.check().unwrap();
            assert_eq!(t.nodes.len(), 20_002);
            // Edges are per component: the deepest file's parent is the 20 000th directory.
            let f = t
                .nodes
                .iter()
                .position(|n| n.kind == NodeKind::Regular)
                .unwrap();
            assert_eq!(t.nodes[t.nodes[f].parent as usize - 1].kind, NodeKind::Dir);
        })
        .unwrap();
    handle
        .join()
        .expect("building a deep tree overflowed or panicked");
}

// ---- 4. TOC memory bombs (the allocation-measuring test is in tests/toc_bomb.rs) ------------

#[test]
fn toc_declaring_more_than_the_limit_is_refused_before_decompressing() {
    let (c, mut pos) = compressed(br#"{"version":1,"entries":[]}"#);
    pos.uncompressed_length = 512 << 20;
    let e = decode_toc(&c, &pos, None, &Limits::default()).unwrap_err();
    assert!(
        matches!(e, Error::TocTooLarge { what: "uncompressed TOC", limit, .. } if limit == 64 << 20),
        "{e}"
    );
}

#[test]
fn toc_with_too_many_entries_is_refused_while_parsing() {
    let mut json = br#"{"version":1,"entries":["#.to_vec();
    for i in 0..1001 {
        if i > 0 {
            json.push(b',');
        }
        json.extend_from_slice(br#"{"type":"dir","name":"a"}"#);
    }
    json.extend_from_slice(b"]}");
    let (c, pos) = compressed(&json);
    let limits = Limits {
        max_entries: 1000,
        ..Limits::default()
    };
    let e = decode_toc(&c, &pos, None, &limits).unwrap_err();
    assert!(
        matches!(
            e,
            Error::TocLimit {
                what: "entries",
                limit: 1000
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("more than 1000 entries"), "{e}");
    // Exactly at the limit is fine.
    let limits = Limits {
        max_entries: 1001,
        ..Limits::default()
    };
    assert_eq!(
        decode_toc(&c, &pos, None, &limits).unwrap().entries.len(),
        1001
    );
}

#[test]
fn toc_with_too_many_xattrs_or_prefetch_names_is_refused() {
    let xattrs: Vec<String> = (0..50).map(|i| format!(r#""user.{i}":"""#)).collect();
    let json = format!(
        r#"{{"version":1,"entries":[{{"type":"dir","name":"a","xattrs":{{{}}}}}]}}"#,
        xattrs.join(",")
    );
    let (c, pos) = compressed(json.as_bytes());
    let limits = Limits {
        max_xattrs: 10,
        ..Limits::default()
    };
    let e = decode_toc(&c, &pos, None, &limits).unwrap_err();
    assert!(matches!(e, Error::TocLimit { what: "xattrs", .. }), "{e}");

    let names = vec![r#""""#; 50].join(",");
    let json = format!(
        r#"{{"version":1,"entries":[],"arbor":{{"version":1,"prefetch":[{names}],"blockSize":4096,"dataLength":0,"blocks":[],"chunkSize":4096}}}}"#
    );
    let (c, pos) = compressed(json.as_bytes());
    let limits = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    let e = decode_toc(&c, &pos, None, &limits).unwrap_err();
    assert!(
        matches!(
            e,
            Error::TocLimit {
                what: "prefetch names",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn toc_with_a_huge_zstd_window_is_refused() {
    // A frame that declares a 1 GiB window and no content size would make the decoder
    // allocate the window; the reader caps it.
    let json = br#"{"version":1,"entries":[]}"#;
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.set_parameter(zstd::zstd_safe::CParameter::EnableLongDistanceMatching(
        true,
    ))
    .unwrap();
    enc.set_parameter(zstd::zstd_safe::CParameter::WindowLog(30))
        .unwrap();
    enc.include_contentsize(false).unwrap();
    enc.include_checksum(false).unwrap();
    std::io::Write::write_all(&mut enc, json).unwrap();
    let c = enc.finish().unwrap();
    let pos = TocPosition {
        offset: 8,
        length: c.len() as u64,
        uncompressed_length: json.len() as u64,
        toc_type: 1,
        ..Default::default()
    };
    let e = decode_toc(&c, &pos, None, &Limits::default()).unwrap_err();
    assert!(e.to_string().contains("decompress"), "{e}");

    // The same for a chunk frame: a 4 KiB chunk may not ask for more than 32 MiB.
    let data = vec![7u8; 4096];
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.set_parameter(zstd::zstd_safe::CParameter::EnableLongDistanceMatching(
        true,
    ))
    .unwrap();
    enc.set_parameter(zstd::zstd_safe::CParameter::WindowLog(28))
        .unwrap();
    enc.include_contentsize(false).unwrap();
    std::io::Write::write_all(&mut enc, &data).unwrap();
    let frame = enc.finish().unwrap();
    let chunk = Chunk {
        file_offset: 0,
        size: 4096,
        blob_offset: 0,
        blob_end: frame.len() as u64,
        digest: Some(Digest::of(&data)),
        zeros: false,
    };
    let e = decode_chunk("f", &chunk, &frame).unwrap_err();
    assert!(matches!(e, Error::Chunk { .. }), "{e}");
    // An ordinary frame of the same content decodes.
    let ok = zstd::bulk::compress(&data, 3).unwrap();
    let chunk = Chunk {
        blob_end: ok.len() as u64,
        ..chunk
    };
    assert_eq!(decode_chunk("f", &chunk, &ok).unwrap(), data);
}

// ---- 9. Offsets, hard links to directories, whiteouts, parents ------------------------------

#[test]
fn toc_offset_below_8_is_an_error() {
    for offset in 0..SKIPPABLE_HEADER_LEN {
        let pos = TocPosition {
            offset,
            length: 10,
            uncompressed_length: 10,
            toc_type: 1,
            ..Default::default()
        };
        let e = pos.check_within(1000).unwrap_err();
        assert!(e.to_string().contains("frame header"), "{e}");
        assert!(data_end_of(&pos).is_err());
    }
    // Through the whole reader, located by an annotation-like locator.
    let json = br#"{"version":1,"entries":[]}"#;
    let c = zstd::bulk::compress(json, 3).unwrap();
    let mut blob = c.clone();
    blob.extend(skippable_frame(&[0u8; 8]));
    let loc = arbor_format::index::TocLocator {
        position: TocPosition {
            offset: 0,
            length: c.len() as u64,
            uncompressed_length: json.len() as u64,
            toc_type: 1,
            ..Default::default()
        },
        digest: None,
    };
    let e = LayerIndex::read_from(
        &mut Cursor::new(&blob),
        blob.len() as u64,
        Some(&loc),
        &Limits::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("frame header"), "{e}");
}

#[test]
fn hard_link_to_directory_is_refused() {
    // In the index.
    for target in ["d", "."] {
        let e = LayerIndex::from_toc(
            toc(vec![
                toc_entry(types::DIR, ".", ""),
                toc_entry(types::DIR, "d", ""),
                toc_entry(types::HARDLINK, "d/loop", target),
            ]),
            0,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("which is a directory"),
            "{target}: {e}"
        );
    }
    // A name that was a directory and is now a file may be linked.
    LayerIndex::from_toc(
        toc(vec![
            toc_entry(types::DIR, "d", ""),
            toc_entry(types::REG, "d", ""),
            toc_entry(types::HARDLINK, "l", "d"),
        ]),
        0,
    )
    .unwrap();

    // At conversion.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    b.append_data(&mut h, "d/", &[][..]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "d/loop", "d").unwrap();
    let e = convert(&b.into_inner().unwrap()).unwrap_err();
    assert!(e.to_string().contains("which is a directory"), "{e}");

    // And in the tree, whatever an index built by hand says: no second name, no cycle.
    let t = tree_of(vec![
        raw(EntryKind::Dir, "d", ""),
        raw(EntryKind::HardLink, "d/loop", "d"),
        raw(EntryKind::HardLink, "d/root", "."),
        raw(EntryKind::HardLink, "top", "d"),
    ]);
    let d = path(&t, "d").unwrap();
    assert!(t.nodes[d as usize - 1].children.is_empty());
    assert_eq!(path(&t, "top"), None);
    assert_eq!(t.nodes.len(), 2);
}

#[test]
fn empty_whiteout_is_ignored() {
    let t = tree_of(vec![
        raw(EntryKind::Dir, "d", ""),
        raw(EntryKind::Regular, "d/.wh.", ""),
        raw(EntryKind::Regular, "d/.wh..", ""),
        raw(EntryKind::Regular, "d/.wh...", ""),
        raw(EntryKind::Regular, ".wh.", ""),
        raw(EntryKind::Regular, "d/.wh.gone", ""),
        raw(EntryKind::Regular, "d/.wh..wh..opq", ""),
    ]);
    let d = path(&t, "d").unwrap();
    let dn = &t.nodes[d as usize - 1];
    let names: Vec<&str> = dn.children.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["gone"]);
    assert!(t.nodes[0].children.iter().all(|(n, _)| n == "d"));
    let w = &t.nodes[dn.children[0].1 as usize - 1];
    assert_eq!((w.kind, w.dev_major, w.dev_minor), (NodeKind::Char, 0, 0));
    assert!(
        dn.xattrs
            .iter()
            .any(|(k, v)| k == OPAQUE_XATTR && v == b"y")
    );
}

#[test]
fn file_as_parent_and_symlinked_parent_keep_a_tree() {
    // File `a`, then `a/b`: `a` becomes a directory. Symlink `s`, then `s/x`: `s` becomes a
    // directory (symlinks are never followed). Repeated names: the later entry wins.
    let t = tree_of(vec![
        raw(EntryKind::Regular, "a", ""),
        raw(EntryKind::Regular, "a/b", ""),
        raw(EntryKind::Symlink, "s", "/etc"),
        raw(EntryKind::Regular, "s/x", ""),
        raw(EntryKind::Regular, "dup", ""),
        raw(EntryKind::Dir, "dup", ""),
        raw(EntryKind::Regular, "dup", ""),
        raw(EntryKind::Regular, "keep", ""),
        raw(EntryKind::HardLink, "keep2", "keep"),
        raw(EntryKind::HardLink, "keep3", "keep2"),
        raw(EntryKind::Dir, "gone", ""),
        raw(EntryKind::HardLink, "gone/l", "keep"),
        raw(EntryKind::Regular, "gone", ""),
        raw(EntryKind::HardLink, "via_file", "a/b/c"),
        raw(EntryKind::HardLink, "via_symlink", "s/x/y"),
    ]);
    assert_eq!(
        t.nodes[path(&t, "a").unwrap() as usize - 1].kind,
        NodeKind::Dir
    );
    assert!(path(&t, "a/b").is_some());
    assert_eq!(
        t.nodes[path(&t, "s").unwrap() as usize - 1].kind,
        NodeKind::Dir
    );
    assert_eq!(
        t.nodes[path(&t, "dup").unwrap() as usize - 1].kind,
        NodeKind::Regular
    );
    // `gone/l` went with the directory: `keep` has three names, not four.
    let keep = path(&t, "keep").unwrap();
    assert_eq!(path(&t, "keep2"), Some(keep));
    assert_eq!(path(&t, "keep3"), Some(keep));
    assert_eq!(t.nodes[keep as usize - 1].nlink, 3);
    assert_eq!(path(&t, "via_file"), None);
    assert_eq!(path(&t, "via_symlink"), None);
    // Nothing unreachable is kept.
    let names: Vec<&str> = t.nodes[0]
        .children
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, ["a", "dup", "gone", "keep", "keep2", "keep3", "s"]);
}

#[test]
fn names_that_are_not_single_components_never_reach_the_tree() {
    // An index built by hand with names no validated index holds.
    let t = tree_of(vec![
        raw(EntryKind::Regular, "", ""),
        raw(EntryKind::Regular, "a//b", ""),
        raw(EntryKind::Regular, "../x", ""),
        raw(EntryKind::Regular, "./y", ""),
        raw(EntryKind::Regular, "z/", ""),
        raw(EntryKind::Regular, "n\0ul", ""),
        raw(EntryKind::Regular, "ok", ""),
    ]);
    let names: Vec<&str> = t.nodes[0]
        .children
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, ["ok"]);
}

// ---- 6. Names that are not UTF-8 ----------------------------------------------------------

#[test]
fn non_utf8_name_is_refused_at_conversion() {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_mode(0o644);
    h.as_old_mut().name[..6].copy_from_slice(b"bad\xff\xfe\0");
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &[][..]).unwrap();
    let e = convert(&b.into_inner().unwrap()).unwrap_err();
    assert!(matches!(e, Error::UnsafePath { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("bad") && msg.contains("UTF-8"), "{msg}");

    // A symlink whose target is not UTF-8.
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_path("sym").unwrap();
    h.as_old_mut().linkname[..4].copy_from_slice(b"t\xff\xfe\0");
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &[][..]).unwrap();
    let e = convert(&b.into_inner().unwrap()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("sym") && msg.contains("UTF-8"), "{msg}");

    // A PAX path that is not UTF-8.
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("path", &b"pax\xff"[..])])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(0);
    h.set_path("placeholder").unwrap();
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
    let e = convert(&b.into_inner().unwrap()).unwrap_err();
    assert!(e.to_string().contains("UTF-8"), "{e}");
}
