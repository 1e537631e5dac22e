//! Proving a lazily mounted layer: the whole blob, streamed once, must hash to the layer digest,
//! its tar stream must hash to the diff ID the chain ID was computed from, and every tar header
//! and every chunk of file content must agree with the TOC the layer was mounted from.
//!
//! A lazy mount serves files from the TOC alone (names, modes, owners, xattrs, devices, link
//! targets) and content chunk by chunk, each chunk checked against the TOC's chunk digest. What
//! that does not prove is that the TOC describes the tar a stock runtime would unpack, nor that
//! the tar is the one whose diff ID containerd committed the snapshot under. [`verify_layer`]
//! proves both, so a daemon can run it in the background (it reads the whole blob) and drop a
//! layer that lies (containers/storage checks a partial layer's TOC against its tar-split the
//! same way).

use std::collections::HashMap;
use std::io::Read;

use arbor_format::index::{IndexEntry, LayerIndex};
use arbor_format::tarstream::{EntryKind, TarReader};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::image::{HashingReader, tar_stream};

/// Most differences reported; one is enough to refuse the layer.
const MAX_DIFFERENCES: usize = 16;

/// What [`verify_layer`] established about a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerProof {
    /// `sha256:` of the blob as streamed (must equal the layer digest).
    pub compressed_digest: String,
    /// `sha256:` of the uncompressed tar stream (the layer's diff ID).
    pub diff_id: String,
    /// Bytes of the blob read.
    pub compressed_size: u64,
    /// Tar entries compared with the TOC.
    pub entries: usize,
    /// Every way the tar and the TOC disagree (at most a few); empty when they agree.
    pub differences: Vec<String>,
}

impl LayerProof {
    /// True when the blob is the one named `digest`, its tar is `diff_id` and the TOC agrees
    /// with the tar.
    pub fn proves(&self, digest: &str, diff_id: &str) -> bool {
        self.compressed_digest == digest && self.diff_id == diff_id && self.differences.is_empty()
    }
}

/// containerd's chain ID of a layer over `parent` (the chain ID of the layers below, `None` for
/// the bottom layer): `sha256(parent + " " + diff_id)`, or the diff ID itself at the bottom.
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    match parent {
        None => diff_id.to_string(),
        Some(p) => format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{p} {diff_id}").as_bytes()))
        ),
    }
}

/// Streams `blob` (a compressed layer) to its end and compares it with `index` (see the module
/// docs). Blocking: run it on a blocking thread. An unreadable or undecodable stream is an
/// error; a stream that decodes but disagrees with the TOC is a proof with differences.
pub fn verify_layer<R: Read>(blob: R, index: &LayerIndex) -> Result<LayerProof> {
    let by_name: HashMap<&str, &IndexEntry> =
        index.entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let mut compressed = HashingReader::new(blob);
    let mut differences = Vec::new();
    let mut seen: HashMap<String, ()> = HashMap::new();
    let mut entries = 0usize;
    let diff_id = {
        let tar = tar_stream(&mut compressed)?;
        let mut hashing = HashingReader::new(tar);
        {
            let mut r = TarReader::new(&mut hashing);
            let mut buf = vec![0u8; 1 << 20];
            while let Some(e) = r.next_entry().map_err(map_format)? {
                entries += 1;
                let Some(t) = by_name.get(e.name.as_str()) else {
                    note(
                        &mut differences,
                        format!("{}: in the tar, not in the TOC", e.name),
                    );
                    skip_content(&mut r, &mut buf)?;
                    continue;
                };
                seen.insert(e.name.clone(), ());
                let mut fields = Vec::new();
                let mut field = |what: &str, tar: String, toc: String| {
                    if tar != toc {
                        fields.push(format!("{what} {tar} in the tar, {toc} in the TOC"));
                    }
                };
                field("kind", format!("{:?}", e.kind), format!("{:?}", t.kind));
                field("mode", format!("{:o}", e.mode), format!("{:o}", t.mode));
                field("uid", e.uid.to_string(), t.uid.to_string());
                field("gid", e.gid.to_string(), t.gid.to_string());
                field("mtime", format!("{:?}", e.mtime), format!("{:?}", t.mtime));
                field("size", e.size.to_string(), t.size.to_string());
                field(
                    "link",
                    format!("{:?}", e.link_name),
                    format!("{:?}", t.link_name),
                );
                field(
                    "device",
                    format!("{}:{}", e.dev_major, e.dev_minor),
                    format!("{}:{}", t.dev_major, t.dev_minor),
                );
                if e.xattrs != t.xattrs {
                    let keys = |x: &std::collections::BTreeMap<String, Vec<u8>>| {
                        x.keys().cloned().collect::<Vec<_>>().join(",")
                    };
                    fields.push(format!(
                        "xattrs {{{}}} in the tar, {{{}}} in the TOC (or values differ)",
                        keys(&e.xattrs),
                        keys(&t.xattrs)
                    ));
                }
                if e.kind == EntryKind::Regular && e.size > 0 && fields.is_empty() {
                    if let Some(why) = content_differs(&mut r, &mut buf, t)? {
                        fields.push(why);
                    }
                } else {
                    skip_content(&mut r, &mut buf)?;
                }
                if !fields.is_empty() {
                    note(
                        &mut differences,
                        format!("{}: {}", e.name, fields.join("; ")),
                    );
                }
            }
        }
        let (diff_id, _) = hashing.finish().map_err(Error::from_io)?;
        diff_id
    };
    for e in &index.entries {
        if !seen.contains_key(&e.name) {
            note(
                &mut differences,
                format!("{}: in the TOC, not in the tar", e.name),
            );
        }
    }
    let (compressed_digest, compressed_size) = compressed.finish().map_err(Error::from_io)?;
    Ok(LayerProof {
        compressed_digest,
        diff_id,
        compressed_size,
        entries,
        differences,
    })
}

fn note(differences: &mut Vec<String>, d: String) {
    if differences.len() < MAX_DIFFERENCES {
        differences.push(d);
    }
}

fn map_format(e: arbor_format::Error) -> Error {
    match e {
        arbor_format::Error::Io(io) => Error::from_io(io),
        other => Error::Format(other),
    }
}

fn skip_content<R: Read>(r: &mut TarReader<R>, buf: &mut [u8]) -> Result<()> {
    while r.read_content(buf).map_err(map_format)? > 0 {}
    Ok(())
}

/// Reads one file's content and checks it chunk by chunk against the TOC entry's chunks (the
/// bytes a lazy mount serves): `Some(reason)` where they differ.
fn content_differs<R: Read>(
    r: &mut TarReader<R>,
    buf: &mut [u8],
    t: &IndexEntry,
) -> Result<Option<String>> {
    let mut whole = Sha256::new();
    let mut chunks = t.chunks.iter().peekable();
    let mut chunk_hash = Sha256::new();
    let mut chunk_zeros = true;
    let mut pos = 0u64;
    let mut bad: Option<String> = None;
    if let Some(c) = chunks.peek()
        && c.file_offset != 0
    {
        bad = Some(format!("the TOC's first chunk starts at {}", c.file_offset));
    }
    loop {
        let n = r.read_content(buf).map_err(map_format)?;
        if n == 0 {
            break;
        }
        let mut data = &buf[..n];
        whole.update(data);
        while !data.is_empty() {
            let Some(c) = chunks.peek() else {
                bad.get_or_insert_with(|| format!("content beyond the TOC's chunks at {pos}"));
                break;
            };
            let end = c.file_offset.saturating_add(c.size);
            if end <= pos {
                bad.get_or_insert_with(|| format!("empty or overlapping chunk at {pos}"));
                chunks.next();
                continue;
            }
            let take = usize::try_from(end - pos).map_or(data.len(), |t| t.min(data.len()));
            let (part, rest) = data.split_at(take);
            chunk_hash.update(part);
            chunk_zeros &= part.iter().all(|&b| b == 0);
            pos += part.len() as u64;
            data = rest;
            if pos == end {
                let got = format!("sha256:{}", hex::encode(chunk_hash.finalize_reset()));
                let ok = match &c.digest {
                    Some(d) => d.to_string() == got && (!c.zeros || chunk_zeros),
                    None => chunk_zeros,
                };
                if !ok {
                    bad.get_or_insert_with(|| {
                        format!(
                            "chunk at {} ({} bytes) differs from the TOC",
                            c.file_offset, c.size
                        )
                    });
                }
                chunk_zeros = true;
                chunks.next();
                if let Some(next) = chunks.peek()
                    && next.file_offset != pos
                {
                    bad.get_or_insert_with(|| {
                        format!("the TOC's chunks leave a gap or overlap at {pos}")
                    });
                }
            }
        }
    }
    if chunks.peek().is_some() {
        bad.get_or_insert_with(|| format!("the TOC has chunks past the content's end ({pos})"));
    }
    if bad.is_none()
        && let Some(d) = &t.digest
    {
        let got = format!("sha256:{}", hex::encode(whole.finalize()));
        if d.to_string() != got {
            bad = Some(format!("content digest {got} in the tar, {d} in the TOC"));
        }
    }
    Ok(bad.map(|b| format!("content: {b}")))
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use arbor_format::Digest;
    use arbor_format::index::Limits;
    use arbor_format::writer::{WriterOptions, convert_layer};

    use super::*;

    /// A small layer: a directory, a file over several chunks, a small file, a symlink.
    fn layer() -> (Vec<u8>, LayerIndex, String, String) {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, mode: u32, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_mtime(1_700_000_000);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, data).unwrap();
        };
        add(
            "bin/tool",
            0o755,
            &(0..300_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
        );
        add("etc/conf", 0o644, b"key = value\n");
        let tar = b.into_inner().unwrap();
        let opts = WriterOptions {
            chunk_size: 64 << 10,
            ..WriterOptions::default()
        };
        let (summary, blob) = convert_layer(&tar[..], Vec::new(), &opts).unwrap();
        let (index, _) = LayerIndex::read_from(
            &mut Cursor::new(&blob),
            blob.len() as u64,
            None,
            &Limits::default(),
        )
        .unwrap();
        (
            blob,
            index,
            summary.blob_digest.to_string(),
            summary.diff_id.to_string(),
        )
    }

    #[test]
    fn an_honest_layer_is_proved() {
        let (blob, index, digest, diff_id) = layer();
        assert!(index.entries.iter().any(|e| e.chunks.len() > 1));
        let p = verify_layer(&blob[..], &index).unwrap();
        assert_eq!(p.differences, Vec::<String>::new());
        assert!(p.proves(&digest, &diff_id), "{p:?}");
        assert_eq!(p.compressed_size, blob.len() as u64);
    }

    #[test]
    fn toc_that_adds_setuid_to_a_file_is_caught() {
        let (blob, mut index, digest, diff_id) = layer();
        let e = index
            .entries
            .iter_mut()
            .find(|e| e.name == "etc/conf")
            .unwrap();
        e.mode |= 0o4000;
        let p = verify_layer(&blob[..], &index).unwrap();
        assert!(!p.proves(&digest, &diff_id));
        assert!(
            p.differences[0].contains("etc/conf: mode"),
            "{:?}",
            p.differences
        );
    }

    #[test]
    fn toc_chunk_digest_for_other_bytes_is_caught() {
        let (blob, mut index, _, _) = layer();
        let e = index
            .entries
            .iter_mut()
            .find(|e| e.name == "bin/tool")
            .unwrap();
        e.chunks[2].digest = Some(Digest::of(b"other bytes"));
        let p = verify_layer(&blob[..], &index).unwrap();
        assert!(
            p.differences
                .iter()
                .any(|d| d.contains("bin/tool: content: chunk at")),
            "{:?}",
            p.differences
        );
    }

    #[test]
    fn toc_entry_missing_from_the_tar_is_caught() {
        let (blob, mut index, _, _) = layer();
        let mut ghost = index.entries[index.entries.len() - 1].clone();
        ghost.name = "etc/shadow-ghost".into();
        index.entries.push(ghost);
        let p = verify_layer(&blob[..], &index).unwrap();
        assert!(
            p.differences
                .iter()
                .any(|d| d.contains("in the TOC, not in the tar")),
            "{:?}",
            p.differences
        );
    }

    #[test]
    fn lying_diff_id_and_chain_id_are_caught() {
        let (blob, index, digest, diff_id) = layer();
        let p = verify_layer(&blob[..], &index).unwrap();
        let lie = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
        assert!(!p.proves(&digest, lie));
        assert!(!p.proves(lie, &diff_id));
        // containerd's chain IDs: the bottom layer's is its diff ID; above, sha256("P D").
        assert_eq!(chain_id(None, &diff_id), diff_id);
        let above = chain_id(Some(lie), &diff_id);
        let expect = Sha256::digest(format!("{lie} {diff_id}").as_bytes());
        assert_eq!(above, format!("sha256:{}", hex::encode(expect)));
    }

    #[test]
    fn truncated_blob_is_an_error_not_a_proof() {
        let (blob, index, _, _) = layer();
        assert!(verify_layer(&blob[..blob.len() / 2], &index).is_err());
    }
}
