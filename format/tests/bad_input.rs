//! Hostile and broken layers: every case must give a clear error, never a panic or wrong bytes.

use std::io::Cursor;

use arbor_format::footer::{SKIPPABLE_HEADER_LEN, TocPosition, skippable_frame};
use arbor_format::index::{LayerIndex, Limits, TocLocator, decode_chunk};
use arbor_format::tarstream::TarReader;
use arbor_format::toc::Toc;
use arbor_format::writer::{WriterOptions, convert_layer};
use arbor_format::{Digest, Error};

fn sample_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, len) in [("a", 10usize), ("dir/b", 70_000), ("dir/c", 0)] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut h = tar::Header::new_ustar();
        h.set_size(len as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn sample_blob() -> (Vec<u8>, TocPosition) {
    let opts = WriterOptions {
        chunk_size: 32 << 10,
        ..Default::default()
    };
    let (s, blob) = convert_layer(&sample_tar()[..], Vec::new(), &opts).unwrap();
    (blob, s.toc_position)
}

fn read(blob: &[u8]) -> arbor_format::Result<LayerIndex> {
    LayerIndex::read_from(
        &mut Cursor::new(blob),
        blob.len() as u64,
        None,
        &Limits::default(),
    )
    .map(|(i, _)| i)
}

fn toc_of(blob: &[u8], pos: &TocPosition) -> Toc {
    let c = &blob[pos.offset as usize..(pos.offset + pos.length) as usize];
    serde_json::from_slice(&zstd::stream::decode_all(c).unwrap()).unwrap()
}

/// Replaces the blob's TOC by `toc` (re-encoded, new footer), keeping the data region.
fn with_toc(blob: &[u8], pos: &TocPosition, toc: &Toc) -> Vec<u8> {
    let data_end = (pos.offset - SKIPPABLE_HEADER_LEN) as usize;
    let json = serde_json::to_vec(toc).unwrap();
    let compressed = zstd::bulk::compress(&json, 3).unwrap();
    let mut out = blob[..data_end].to_vec();
    let new_pos = TocPosition {
        offset: data_end as u64 + SKIPPABLE_HEADER_LEN,
        length: compressed.len() as u64,
        uncompressed_length: json.len() as u64,
        toc_type: 1,
        ..Default::default()
    };
    out.extend(skippable_frame(&compressed));
    out.extend(skippable_frame(&new_pos.encode_footer()));
    out
}

fn assert_toc_err(blob: &[u8], needle: &str) {
    match read(blob) {
        Ok(_) => panic!("accepted a TOC that should fail with {needle:?}"),
        Err(e) => assert!(
            e.to_string().contains(needle),
            "error {e} does not mention {needle:?}"
        ),
    }
}

#[test]
fn truncated_blob_is_refused() {
    let (blob, _) = sample_blob();
    for cut in [0, 1, 10, 40, 72, blob.len() / 2, blob.len() - 1] {
        assert!(read(&blob[..cut]).is_err(), "truncated to {cut} accepted");
    }
}

#[test]
fn corrupt_footer_is_refused() {
    let (blob, _) = sample_blob();
    let n = blob.len();
    let mut bad = blob.clone();
    bad[n - 1] ^= 0xff; // magic
    assert!(matches!(read(&bad), Err(Error::Footer(_))));
    let mut bad = blob.clone();
    bad[n - 64] ^= 0x40; // offset
    assert!(read(&bad).is_err());
    let mut bad = blob.clone();
    bad[n - 64 + 23] = 0x7f; // uncompressed length absurd
    let e = read(&bad).unwrap_err();
    assert!(
        matches!(e, Error::TocTooLarge { .. } | Error::Toc(_)),
        "{e}"
    );
}

#[test]
fn toc_digest_mismatch_is_refused() {
    let (blob, pos) = sample_blob();
    let loc = TocLocator {
        position: pos,
        digest: Some(Digest::of(b"something else")),
    };
    let e = LayerIndex::read_from(
        &mut Cursor::new(&blob),
        blob.len() as u64,
        Some(&loc),
        &Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
}

#[test]
fn absurd_toc_size_is_refused_before_allocation() {
    let (blob, pos) = sample_blob();
    let loc = TocLocator {
        position: TocPosition {
            length: u64::MAX / 2,
            ..pos
        },
        digest: None,
    };
    assert!(
        LayerIndex::read_from(
            &mut Cursor::new(&blob),
            blob.len() as u64,
            Some(&loc),
            &Limits::default()
        )
        .is_err()
    );
    let limits = Limits {
        max_toc_uncompressed: 10,
        ..Limits::default()
    };
    let e = LayerIndex::read_from(&mut Cursor::new(&blob), blob.len() as u64, None, &limits)
        .unwrap_err();
    assert!(matches!(e, Error::TocTooLarge { .. }), "{e}");
}

#[test]
fn lying_tocs_are_refused() {
    let (blob, pos) = sample_blob();
    assert!(read(&blob).is_ok());
    let base = toc_of(&blob, &pos);
    let find = |t: &mut Toc, name: &str| t.entries.iter().position(|e| e.name == name).unwrap();

    let mut t = base.clone();
    let last = t.entries.iter().rposition(|e| e.name == "dir/b").unwrap();
    t.entries[last].end_offset = blob.len() as i64 * 2;
    assert_toc_err(&with_toc(&blob, &pos, &t), "outside the data region");

    let mut t = base.clone();
    let i = find(&mut t, "dir/b");
    let j = find(&mut t, "a");
    t.entries[j].offset = t.entries[i].offset;
    t.entries[j].end_offset = t.entries[i].end_offset;
    assert_toc_err(&with_toc(&blob, &pos, &t), "overlap");

    let mut t = base.clone();
    let i = find(&mut t, "dir/b");
    t.entries[i].size += 1;
    assert_toc_err(&with_toc(&blob, &pos, &t), "cover");

    let mut t = base.clone();
    t.entries[0].name = "../../etc/passwd".into();
    assert_toc_err(&with_toc(&blob, &pos, &t), "..");

    let mut t = base.clone();
    t.entries[0].name = "/etc/passwd".into();
    assert_toc_err(&with_toc(&blob, &pos, &t), "absolute");

    let mut t = base.clone();
    t.entries[0].digest = "sha256:xyz".into();
    assert_toc_err(&with_toc(&blob, &pos, &t), "malformed digest");

    let mut t = base.clone();
    t.entries[0].kind = "socket".into();
    assert_toc_err(&with_toc(&blob, &pos, &t), "unknown entry type");

    let mut t = base.clone();
    let i = find(&mut t, "dir/b");
    t.entries[i].chunk_size = 1 << 40;
    assert_toc_err(&with_toc(&blob, &pos, &t), "size");

    let mut t = base.clone();
    let hl = arbor_format::toc::TocEntry {
        kind: "hardlink".into(),
        name: "x".into(),
        link_name: "nowhere".into(),
        ..Default::default()
    };
    t.entries.insert(0, hl);
    assert_toc_err(&with_toc(&blob, &pos, &t), "not earlier");

    let mut t = base.clone();
    t.arbor.as_mut().unwrap().blocks.pop();
    assert_toc_err(&with_toc(&blob, &pos, &t), "block table");
}

#[test]
fn wrong_chunk_digest_never_yields_bytes() {
    let (blob, pos) = sample_blob();
    let mut t = toc_of(&blob, &pos);
    // Point file "a" at the digest of other content: decoding must fail, not return data.
    let i = t.entries.iter().position(|e| e.name == "a").unwrap();
    t.entries[i].chunk_digest = Digest::of(b"other").to_string();
    t.entries[i].digest = Digest::of(b"other").to_string();
    let bad = with_toc(&blob, &pos, &t);
    let index = read(&bad).unwrap();
    let e = index.entries.iter().find(|e| e.name == "a").unwrap();
    let c = &e.chunks[0];
    let err = decode_chunk(
        &e.name,
        c,
        &bad[c.blob_offset as usize..c.blob_end as usize],
    )
    .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");

    // Corrupted frame bytes: an error, never different content.
    let index = read(&blob).unwrap();
    let e = index.entries.iter().find(|e| e.name == "dir/b").unwrap();
    for c in &e.chunks {
        let mut frame = blob[c.blob_offset as usize..c.blob_end as usize].to_vec();
        let mid = frame.len() / 2;
        frame[mid] ^= 0x5a;
        assert!(decode_chunk(&e.name, c, &frame).is_err());
        assert!(decode_chunk(&e.name, c, &frame[..frame.len() - 1]).is_err());
    }
}

#[test]
fn hostile_tar_streams_are_refused() {
    fn tar_with_name(name: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.as_mut_bytes()[..name.len()].copy_from_slice(name);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend([0u8; 1024]);
        out
    }
    for name in [&b"../evil"[..], b"/etc/passwd", b"a/../../b"] {
        let e = convert_layer(
            &tar_with_name(name)[..],
            Vec::new(),
            &WriterOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(e, Error::UnsafePath { .. }), "{e}");
    }
    // Bad checksum.
    let mut t = tar_with_name(b"ok");
    t[148] = b'7';
    assert!(matches!(
        convert_layer(&t[..], Vec::new(), &WriterOptions::default()).unwrap_err(),
        Error::Tar { .. }
    ));
    // Truncated content.
    let full = sample_tar();
    let e = convert_layer(&full[..2000], Vec::new(), &WriterOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Tar { .. }), "{e}");
    // Garbage.
    let e = convert_layer(&[0x41u8; 1536][..], Vec::new(), &WriterOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Tar { .. }), "{e}");
    // Hard link to a later entry.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "link", "target").unwrap();
    let e = convert_layer(
        &b.into_inner().unwrap()[..],
        Vec::new(),
        &WriterOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("not earlier"), "{e}");
    // Every prefix of a valid tar either converts or errors; none panics.
    for cut in (0..full.len()).step_by(97) {
        let _ = TarReader::new(&full[..cut]).next_entry();
        let _ = convert_layer(&full[..cut], Vec::new(), &WriterOptions::default());
    }
}

/// Regressions found by `fuzz/fuzz_targets/tar.rs`.
#[test]
fn fuzz_regressions_out_of_range_numbers() {
    fn pax_tar(record: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(1);
        h.set_mode(0o644);
        let (k, v) = record.split_once('=').unwrap();
        b.append_pax_extensions([(k, v.as_bytes())]).unwrap();
        b.append_data(&mut h, "f", &b"x"[..]).unwrap();
        b.into_inner().unwrap()
    }
    for record in [
        "mtime=--9223372036854775808",
        "uid=18446744073709551615",
        "gid=4294967296",
    ] {
        let e = convert_layer(&pax_tar(record)[..], Vec::new(), &WriterOptions::default())
            .expect_err(record);
        assert!(matches!(e, Error::Tar { .. }), "{record}: {e}");
    }
    // Whatever the writer accepts, its own reader accepts.
    let ok = pax_tar("uid=4294967295");
    let (_, blob) = convert_layer(&ok[..], Vec::new(), &WriterOptions::default()).unwrap();
    read(&blob).unwrap();
}
