//! `arbor check`: proves that two images hold the same files with the same content and
//! metadata, layer by layer, and that the target's TOCs tell the truth.
//!
//! For each layer pair it builds a model of the source (streamed and decompressed), of the
//! target read as a plain tar stream (what a stock runtime unpacks), and of the target read
//! through its TOC chunk by chunk (what the lazy filesystem serves, every chunk verified), and
//! names every difference between them. Diff IDs in both configs are checked against the
//! layers' actual uncompressed digests.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;

use arbor_format::index::{LayerIndex, Limits, decode_chunk, locate_toc};
use arbor_format::tarstream::{EntryKind, TarReader, Timestamp};
use arbor_oci::Store;
use arbor_oci::manifest::Descriptor;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::image::{self, HashingReader, PlatformImage};

/// Most differences listed; the count of the rest is given.
const MAX_DIFFERENCES: usize = 2000;

/// What one entry is, independent of its encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    kind: EntryKind,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: Timestamp,
    size: u64,
    content: Option<String>,
    link: String,
    dev: (u32, u32),
    xattrs: BTreeMap<String, Vec<u8>>,
}

type Model = BTreeMap<String, Meta>;

/// The result of [`check_images`].
#[derive(Debug, Clone, Serialize, Default)]
pub struct CheckReport {
    pub images_compared: usize,
    pub layers_compared: usize,
    pub entries_compared: usize,
    /// Every difference found; empty means the images match.
    pub differences: Vec<String>,
    /// Observations that are not differences (e.g. a target layer without a TOC).
    pub notes: Vec<String>,
}

impl CheckReport {
    fn differ(&mut self, msg: String) {
        if self.differences.len() < MAX_DIFFERENCES {
            self.differences.push(msg);
        } else if self.differences.len() == MAX_DIFFERENCES {
            self.differences
                .push("... further differences omitted".into());
        }
    }
}

/// Compares the images at `src` and `dst` (see the module docs).
pub async fn check_images(
    src: &Store,
    dst: &Store,
    platforms: &[String],
    tmp_dir: Option<PathBuf>,
) -> Result<CheckReport> {
    let a = image::resolve(src, platforms).await?;
    let b = image::resolve(dst, platforms).await?;
    let mut report = CheckReport::default();
    let label = |i: &PlatformImage| i.platform.as_ref().map_or("(single)".into(), |p| p.label());
    let mut pairs = Vec::new();
    if a.images.len() == 1 && b.images.len() == 1 {
        pairs.push((&a.images[0], &b.images[0]));
    } else {
        for ia in &a.images {
            match b.images.iter().find(|ib| label(ib) == label(ia)) {
                Some(ib) => pairs.push((ia, ib)),
                None => report.differ(format!("platform {} missing in target", label(ia))),
            }
        }
        for ib in &b.images {
            if !a.images.iter().any(|ia| label(ia) == label(ib)) {
                report.differ(format!("platform {} only in target", label(ib)));
            }
        }
    }
    for (ia, ib) in pairs {
        report.images_compared += 1;
        check_image(src, dst, ia, ib, &label(ia), tmp_dir.clone(), &mut report).await?;
    }
    Ok(report)
}

async fn check_image(
    src: &Store,
    dst: &Store,
    ia: &PlatformImage,
    ib: &PlatformImage,
    platform: &str,
    tmp_dir: Option<PathBuf>,
    report: &mut CheckReport,
) -> Result<()> {
    let mut ca = image::read_config(src, &ia.manifest).await?;
    let mut cb = image::read_config(dst, &ib.manifest).await?;
    let da = image::diff_ids(&ca)?;
    let db = image::diff_ids(&cb)?;
    for c in [&mut ca, &mut cb] {
        if let Some(r) = c.get_mut("rootfs").and_then(|r| r.as_object_mut()) {
            r.remove("diff_ids");
        }
    }
    if let (Some(oa), Some(ob)) = (ca.as_object(), cb.as_object()) {
        let keys: BTreeSet<&String> = oa.keys().chain(ob.keys()).collect();
        for k in keys {
            if oa.get(k) != ob.get(k) {
                report.differ(format!("{platform}: config field {k:?} differs"));
            }
        }
    }
    let (la, lb) = (&ia.manifest.layers, &ib.manifest.layers);
    if la.len() != lb.len() {
        report.differ(format!(
            "{platform}: source has {} layers, target {}",
            la.len(),
            lb.len()
        ));
        return Ok(());
    }
    for (i, (a, b)) in la.iter().zip(lb).enumerate() {
        let what = format!("{platform} layer {i}");
        report.layers_compared += 1;
        let (source, source_diff) = stream_model(src, a).await?;
        if da.get(i) != Some(&source_diff) {
            report.differ(format!(
                "{what}: source diff_id {:?} does not match its content ({source_diff})",
                da.get(i)
            ));
        }
        let tmp = match &tmp_dir {
            Some(d) => tempfile::NamedTempFile::new_in(d)?,
            None => tempfile::NamedTempFile::new()?,
        };
        download(dst, b, tmp.reopen()?).await?;
        let target_file = tmp.reopen()?;
        let (target_stream, target_diff) =
            tokio::task::spawn_blocking(move || model_of_tar(target_file))
                .await
                .map_err(|e| Error::Io(io::Error::other(e)))??;
        if db.get(i) != Some(&target_diff) {
            report.differ(format!(
                "{what}: target diff_id {:?} does not match its content ({target_diff})",
                db.get(i)
            ));
        }
        report.entries_compared += source.len();
        compare(&what, "target (as tar)", &source, &target_stream, report);
        if b.media_type == arbor_format::MEDIA_TYPE_LAYER_ZSTD {
            let file = tmp.reopen()?;
            let desc = b.clone();
            let toc = tokio::task::spawn_blocking(move || model_of_toc(file, &desc))
                .await
                .map_err(|e| Error::Io(io::Error::other(e)))?;
            match toc {
                Ok(m) => compare(&what, "target (through its TOC)", &source, &m, report),
                Err(e) if locate_toc(&b.annotations).ok().flatten().is_some() => report.differ(
                    format!("{what}: target TOC unreadable: {}", crate::error::chain(&e)),
                ),
                Err(e) => report.notes.push(format!(
                    "{what}: target layer has no readable TOC ({})",
                    crate::error::chain(&e)
                )),
            }
        } else {
            report.notes.push(format!(
                "{what}: target layer is {}, not chunked",
                b.media_type
            ));
        }
    }
    Ok(())
}

async fn download(store: &Store, d: &Descriptor, mut out: File) -> Result<()> {
    let mut reader = store.blob_reader(&d.digest, Some(d.size)).await?;
    tokio::task::spawn_blocking(move || io::copy(&mut reader, &mut out).map_err(Error::from_io))
        .await
        .map_err(|e| Error::Io(io::Error::other(e)))??;
    Ok(())
}

async fn stream_model(store: &Store, d: &Descriptor) -> Result<(Model, String)> {
    let reader = store.blob_reader(&d.digest, Some(d.size)).await?;
    tokio::task::spawn_blocking(move || model_of_tar(reader))
        .await
        .map_err(|e| Error::Io(io::Error::other(e)))?
}

/// Models a (compressed) layer stream; returns the model and the uncompressed digest.
fn model_of_tar<R: Read>(blob: R) -> Result<(Model, String)> {
    let tar = image::tar_stream(blob)?;
    let mut hashing = HashingReader::new(tar);
    let mut model = Model::new();
    {
        let mut r = TarReader::new(&mut hashing);
        let mut buf = vec![0u8; 1 << 20];
        while let Some(e) = r.next_entry().map_err(map_format)? {
            let content = if e.kind == EntryKind::Regular && e.size > 0 {
                let mut h = Sha256::new();
                loop {
                    let n = r.read_content(&mut buf).map_err(map_format)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                Some(format!("sha256:{}", hex::encode(h.finalize())))
            } else {
                None
            };
            model.insert(
                e.name.clone(),
                Meta {
                    kind: e.kind,
                    mode: e.mode,
                    uid: e.uid,
                    gid: e.gid,
                    mtime: e.mtime,
                    size: e.size,
                    content,
                    link: e.link_name,
                    dev: (e.dev_major, e.dev_minor),
                    xattrs: e.xattrs,
                },
            );
        }
    }
    let (diff, _) = hashing.finish().map_err(Error::from_io)?;
    Ok((model, diff))
}

fn map_format(e: arbor_format::Error) -> Error {
    match e {
        arbor_format::Error::Io(io) => Error::from_io(io),
        other => Error::Format(other),
    }
}

/// Models a chunked layer through its TOC, decoding and verifying every chunk.
fn model_of_toc(mut file: File, d: &Descriptor) -> Result<Model> {
    let size = file.metadata()?.len();
    let locator = locate_toc(&d.annotations)?;
    let (index, _) = LayerIndex::read_from(&mut file, size, locator.as_ref(), &Limits::default())?;
    let mut model = Model::new();
    for e in &index.entries {
        let content = if e.chunks.is_empty() {
            None
        } else {
            let mut h = Sha256::new();
            for c in &e.chunks {
                let mut frame = vec![0u8; (c.blob_end - c.blob_offset) as usize];
                use std::io::{Seek, SeekFrom};
                file.seek(SeekFrom::Start(c.blob_offset))?;
                file.read_exact(&mut frame)?;
                h.update(decode_chunk(&e.name, c, &frame)?);
            }
            Some(format!("sha256:{}", hex::encode(h.finalize())))
        };
        model.insert(
            e.name.clone(),
            Meta {
                kind: e.kind,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                mtime: e.mtime,
                size: e.size,
                content,
                link: e.link_name.clone(),
                dev: (e.dev_major, e.dev_minor),
                xattrs: e.xattrs.clone(),
            },
        );
    }
    Ok(model)
}

fn compare(what: &str, side: &str, a: &Model, b: &Model, report: &mut CheckReport) {
    for (name, ma) in a {
        let Some(mb) = b.get(name) else {
            report.differ(format!("{what}: {name}: missing in {side}"));
            continue;
        };
        if ma == mb {
            continue;
        }
        let mut fields = Vec::new();
        macro_rules! field {
            ($f:ident) => {
                if ma.$f != mb.$f {
                    fields.push(format!(
                        "{} {:?} in source, {:?} in {side}",
                        stringify!($f),
                        ma.$f,
                        mb.$f
                    ));
                }
            };
        }
        field!(kind);
        field!(mode);
        field!(uid);
        field!(gid);
        field!(mtime);
        field!(size);
        field!(content);
        field!(link);
        field!(dev);
        if ma.xattrs != mb.xattrs {
            let show = |x: &BTreeMap<String, Vec<u8>>| {
                x.iter()
                    .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v).escape_debug()))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            fields.push(format!(
                "xattrs {{{}}} in source, {{{}}} in {side}",
                show(&ma.xattrs),
                show(&mb.xattrs)
            ));
        }
        report.differ(format!("{what}: {name}: {}", fields.join("; ")));
    }
    for name in b.keys() {
        if !a.contains_key(name) {
            report.differ(format!("{what}: {name}: only in {side}"));
        }
    }
}
