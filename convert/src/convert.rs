//! Image conversion: source location in, Arbor image out. See the crate docs for the flow.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use arbor_format::writer::{LayerSummary, WriterOptions};
use arbor_oci::Store;
use arbor_oci::manifest::{self, Descriptor, Index, Manifest};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use tracing::{Instrument, info, info_span};

use crate::error::{Error, Result};
use crate::image::{self, HashingReader, PlatformImage};
use crate::progress::{Event, Progress};

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Layer writer settings (chunk size, block size, level, threads, prefetch list).
    pub writer: WriterOptions,
    /// Platforms to convert (`os/arch[/variant]`); all when empty.
    pub platforms: Vec<String>,
    /// Layers converted at once.
    pub jobs: usize,
    /// Where converted layers wait for upload (default: the system temp dir).
    pub tmp_dir: Option<PathBuf>,
    /// Without a prefetch list, infer the start-up files from each image's entrypoint
    /// ([`crate::infer`]; one more read of every layer) and make them the prefetch list. Off
    /// in [`Default`]; `arbor convert` turns it on unless `--no-infer`.
    pub infer: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            writer: WriterOptions::default(),
            platforms: Vec::new(),
            jobs: 3,
            tmp_dir: None,
            infer: false,
        }
    }
}

/// What one layer became.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub source_digest: String,
    pub source_media_type: String,
    pub source_size: u64,
    pub target_digest: String,
    pub target_size: u64,
    pub diff_id: String,
    pub uncompressed_size: u64,
    pub toc_digest: Option<String>,
    pub entries: usize,
    pub regular_files: usize,
    pub prefetch: Vec<String>,
    /// False when the layer was already in Arbor's format and kept.
    pub converted: bool,
    pub seconds: f64,
}

/// What one platform image became.
#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    pub platform: Option<String>,
    pub source_digest: String,
    pub target_digest: String,
    pub layers: Vec<LayerReport>,
    /// Prefetch names found in no layer of this image.
    pub prefetch_missing: Vec<String>,
    /// The start-up files inferred from the entrypoint, when they made the prefetch list.
    pub inferred: Option<InferredReport>,
}

/// What [`crate::infer`] found for one image.
#[derive(Debug, Clone, Serialize)]
pub struct InferredReport {
    /// The entrypoint followed (`Entrypoint` + `Cmd`).
    pub entrypoint: Vec<String>,
    pub files: usize,
    pub bytes: u64,
    pub notes: Vec<String>,
}

/// The result of [`convert_image`].
#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    pub source: String,
    pub target: String,
    pub source_digest: String,
    pub target_digest: String,
    pub media_type: String,
    /// Every layer was already in Arbor's format: nothing was rewritten.
    pub already_converted: bool,
    pub images: Vec<ImageReport>,
    pub seconds: f64,
    /// Uncompressed bytes of all converted layers (the conversion's input volume).
    pub uncompressed_bytes: u64,
    pub source_bytes: u64,
    pub target_bytes: u64,
}

/// Layers converted in this run, by source digest (a layer shared by platforms is done once).
type LayerCache = HashMap<String, (Descriptor, String, LayerReport)>;

/// Converts the image at `src` and writes it to `dst`. With `same_location`, an image that is
/// already converted is left untouched.
pub async fn convert_image(
    src: &Store,
    dst: &Store,
    same_location: bool,
    opts: &ConvertOptions,
    progress: Arc<dyn Progress>,
) -> Result<ConvertReport> {
    let started = Instant::now();
    let resolved = image::resolve(src, &opts.platforms).await?;
    let already = resolved
        .images
        .iter()
        .all(|i| i.manifest.layers.iter().all(image::is_arbor_layer))
        && (resolved.index.is_none() || opts.platforms.is_empty());
    if already {
        progress.event(Event::Message(
            "image is already in Arbor's format; nothing to convert".into(),
        ));
    }
    let mut cache = LayerCache::new();
    let mut images = Vec::new();
    let mut converted = Vec::new();
    for img in &resolved.images {
        let tag = if resolved.index.is_none() {
            dst.tag()
        } else {
            None
        };
        let (desc, report) = convert_one(
            src,
            dst,
            img,
            tag,
            same_location && already,
            opts,
            &progress,
            &mut cache,
        )
        .instrument(info_span!("convert_image", manifest = %img.digest))
        .await?;
        converted.push(desc);
        images.push(report);
    }
    let (target_digest, media_type) = match &resolved.index {
        None => (converted[0].digest.clone(), converted[0].media_type.clone()),
        Some(index) if already => {
            if !same_location {
                dst.push_manifest(
                    resolved.root_bytes.clone(),
                    &resolved.root_media_type,
                    dst.tag(),
                )
                .await?;
            }
            (
                resolved.root_digest.clone(),
                resolved.root_media_type.clone(),
            )
        }
        Some(index) => {
            let manifests = resolved
                .images
                .iter()
                .zip(converted)
                .map(|(img, d)| {
                    let mut entry = img.index_entry.clone().unwrap_or_default();
                    entry.media_type = d.media_type;
                    entry.digest = d.digest;
                    entry.size = d.size;
                    entry
                })
                .collect();
            let new_index = Index {
                schema_version: 2,
                media_type: Some(manifest::OCI_INDEX.into()),
                manifests,
                annotations: index.annotations.clone(),
                extra: index.extra.clone(),
            };
            let body = Bytes::from(manifest::to_bytes(&new_index));
            let d = dst
                .push_manifest(body, manifest::OCI_INDEX, dst.tag())
                .await?;
            (d, manifest::OCI_INDEX.to_string())
        }
    };
    let layers = images.iter().flat_map(|i| &i.layers);
    let (mut uncompressed, mut source_bytes, mut target_bytes) = (0, 0, 0);
    let mut seen = BTreeSet::new();
    for l in layers {
        if seen.insert(&l.source_digest) {
            uncompressed += l.uncompressed_size;
            source_bytes += l.source_size;
            target_bytes += l.target_size;
        }
    }
    Ok(ConvertReport {
        source: String::new(),
        target: String::new(),
        source_digest: resolved.root_digest,
        target_digest,
        media_type,
        already_converted: already,
        images,
        seconds: started.elapsed().as_secs_f64(),
        uncompressed_bytes: uncompressed,
        source_bytes,
        target_bytes,
    })
}

#[allow(clippy::too_many_arguments)]
async fn convert_one(
    src: &Store,
    dst: &Store,
    img: &PlatformImage,
    tag: Option<&str>,
    skip_push: bool,
    opts: &ConvertOptions,
    progress: &Arc<dyn Progress>,
    cache: &mut LayerCache,
) -> Result<(Descriptor, ImageReport)> {
    let m = &img.manifest;
    let config = image::read_config(src, m).await?;
    let diff_ids = image::diff_ids(&config)?;
    let mut inferred = None;
    let with_inferred;
    let opts = if opts.infer && opts.writer.prefetch.is_empty() {
        // Inference is a hint: a layer it cannot read (the conversion itself then says why,
        // or converts it) leaves every file on demand instead of failing the conversion.
        let found = crate::infer::infer_image(src, m, &config, crate::infer::Limits::default())
            .await
            .unwrap_or_else(|e| {
                progress.event(Event::Message(format!("start-up files not inferred: {e}")));
                None
            });
        match found {
            Some(found) if !found.files.is_empty() => {
                let entrypoint = crate::infer::Entrypoint::from_config(&config)
                    .map(|e| e.argv)
                    .unwrap_or_default();
                progress.event(Event::Message(format!(
                    "start-up set inferred from {}: {} files, {:.1} MB",
                    entrypoint.join(" "),
                    found.files.len(),
                    found.bytes as f64 / 1e6
                )));
                inferred = Some(InferredReport {
                    entrypoint,
                    files: found.files.len(),
                    bytes: found.bytes,
                    notes: found.notes.clone(),
                });
                let mut o = opts.clone();
                o.writer.prefetch = found.files;
                with_inferred = o;
                &with_inferred
            }
            _ => opts,
        }
    } else {
        opts
    };
    if diff_ids.len() != m.layers.len() {
        return Err(Error::Image(format!(
            "manifest {} has {} layers but its config lists {} diff_ids",
            img.digest,
            m.layers.len(),
            diff_ids.len()
        )));
    }
    let results: Vec<Result<(Descriptor, String, LayerReport)>> =
        futures_util::stream::iter(m.layers.iter().zip(&diff_ids).map(|(layer, diff_id)| {
            let cached = cache.get(&layer.digest).cloned();
            async move {
                match cached {
                    Some(c) => Ok(c),
                    None => convert_layer(src, dst, layer, diff_id, skip_push, opts, progress)
                        .instrument(info_span!("convert_layer", digest = %layer.digest))
                        .await
                        .map_err(|e| Error::layer(&layer.digest, e)),
                }
            }
        }))
        .buffered(opts.jobs.max(1))
        .collect()
        .await;
    let mut layers = Vec::new();
    let mut new_diff_ids = Vec::new();
    let mut reports = Vec::new();
    for r in results {
        let (d, diff, rep) = r?;
        cache.insert(
            rep.source_digest.clone(),
            (d.clone(), diff.clone(), rep.clone()),
        );
        layers.push(d);
        new_diff_ids.push(diff);
        reports.push(rep);
    }
    let found: BTreeSet<&String> = reports.iter().flat_map(|r| &r.prefetch).collect();
    let prefetch_missing = opts
        .writer
        .prefetch
        .iter()
        .filter(|p| {
            let n = arbor_format::path::normalize_image_path(p).unwrap_or_default();
            !found.contains(&n)
        })
        .cloned()
        .collect();
    let unchanged = reports.iter().all(|r| !r.converted);
    let desc = if unchanged {
        // Keep the original documents byte for byte: the image is already converted.
        if !skip_push {
            dst.copy_blob_from(src, &m.config).await?;
            dst.push_manifest(img.bytes.clone(), &img.media_type, tag)
                .await?;
        }
        Descriptor {
            media_type: img.media_type.clone(),
            digest: img.digest.clone(),
            size: img.bytes.len() as u64,
            ..Default::default()
        }
    } else {
        let mut config = config;
        if let Some(rootfs) = config.get_mut("rootfs").and_then(|r| r.as_object_mut()) {
            rootfs.insert("diff_ids".into(), serde_json::json!(new_diff_ids));
        }
        let config_bytes = Bytes::from(serde_json::to_vec(&config).map_err(io::Error::other)?);
        let config_size = config_bytes.len() as u64;
        let config_digest = dst.push_blob_bytes(config_bytes).await?;
        let new = Manifest {
            schema_version: 2,
            media_type: Some(manifest::OCI_MANIFEST.into()),
            config: Descriptor {
                media_type: manifest::OCI_CONFIG.into(),
                digest: config_digest,
                size: config_size,
                annotations: m.config.annotations.clone(),
                ..Default::default()
            },
            layers,
            annotations: m.annotations.clone(),
            extra: m.extra.clone(),
        };
        let body = Bytes::from(manifest::to_bytes(&new));
        let size = body.len() as u64;
        let digest = dst.push_manifest(body, manifest::OCI_MANIFEST, tag).await?;
        Descriptor {
            media_type: manifest::OCI_MANIFEST.into(),
            digest,
            size,
            ..Default::default()
        }
    };
    Ok((
        desc.clone(),
        ImageReport {
            platform: img.platform.as_ref().map(|p| p.label()),
            source_digest: img.digest.clone(),
            target_digest: desc.digest,
            layers: reports,
            prefetch_missing,
            inferred,
        },
    ))
}

/// Counts compressed source bytes for progress reporting.
struct ProgressReader<R> {
    inner: R,
    read: u64,
    reported: u64,
    digest: String,
    progress: Arc<dyn Progress>,
}

impl<R: Read> Read for ProgressReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read - self.reported >= 1 << 20 || n == 0 {
            self.reported = self.read;
            self.progress.event(Event::LayerRead {
                digest: self.digest.clone(),
                bytes: self.read,
            });
        }
        Ok(n)
    }
}

async fn convert_layer(
    src: &Store,
    dst: &Store,
    layer: &Descriptor,
    expected_diff_id: &str,
    skip_push: bool,
    opts: &ConvertOptions,
    progress: &Arc<dyn Progress>,
) -> Result<(Descriptor, String, LayerReport)> {
    let started = Instant::now();
    if image::is_arbor_layer(layer) {
        if !skip_push {
            dst.copy_blob_from(src, layer).await?;
        }
        progress.event(Event::LayerKept {
            digest: layer.digest.clone(),
        });
        let report = LayerReport {
            source_digest: layer.digest.clone(),
            source_media_type: layer.media_type.clone(),
            source_size: layer.size,
            target_digest: layer.digest.clone(),
            target_size: layer.size,
            diff_id: expected_diff_id.to_string(),
            uncompressed_size: 0,
            toc_digest: layer
                .annotations
                .get(arbor_format::ANN_ARBOR_TOC_DIGEST)
                .cloned(),
            entries: 0,
            regular_files: 0,
            prefetch: Vec::new(),
            converted: false,
            seconds: started.elapsed().as_secs_f64(),
        };
        return Ok((layer.clone(), expected_diff_id.to_string(), report));
    }
    progress.event(Event::LayerStarted {
        digest: layer.digest.clone(),
        size: layer.size,
    });
    let reader = src.blob_reader(&layer.digest, Some(layer.size)).await?;
    let tmp = match &opts.tmp_dir {
        Some(d) => tempfile::NamedTempFile::new_in(d)?,
        None => tempfile::NamedTempFile::new()?,
    };
    let file = tmp.reopen()?;
    let wopts = opts.writer.clone();
    let counting = ProgressReader {
        inner: reader,
        read: 0,
        reported: 0,
        digest: layer.digest.clone(),
        progress: Arc::clone(progress),
    };
    let (summary, source_diff_id): (LayerSummary, String) =
        tokio::task::spawn_blocking(move || -> Result<_> {
            let mut counting = counting;
            let converted = (|| -> Result<_> {
                let tar = image::tar_stream(&mut counting)?;
                let mut hashing = HashingReader::new(tar);
                let out = BufWriter::with_capacity(1 << 20, file);
                let (summary, out) = arbor_format::writer::convert_layer(&mut hashing, out, &wopts)
                    .map_err(|e| match e {
                        arbor_format::Error::Io(io) => Error::from_io(io),
                        other => Error::Format(other),
                    })?;
                let mut file = out.into_inner().map_err(|e| e.into_error())?;
                file.flush()?;
                // Read what follows the end-of-archive marker so the blob's digest is checked.
                let (diff, _) = hashing.finish().map_err(Error::from_io)?;
                Ok((summary, diff))
            })();
            // Read the source to its end either way: a blob that does not match its digest
            // is the real cause of whatever went wrong reading it.
            let drained = io::copy(&mut counting, &mut io::sink()).map_err(Error::from_io);
            match (converted, drained) {
                (Ok(r), Ok(_)) => Ok(r),
                (_, Err(e)) => Err(e),
                (Err(e), Ok(_)) => Err(e),
            }
        })
        .await
        .map_err(|e| Error::Io(io::Error::other(e)))??;
    if source_diff_id != expected_diff_id {
        return Err(Error::Image(format!(
            "uncompressed layer has digest {source_diff_id}, but the config's diff_id is {expected_diff_id}"
        )));
    }
    let digest = summary.blob_digest.to_string();
    if !skip_push {
        dst.push_blob_file(&digest, summary.blob_size, tmp.path())
            .await?;
    }
    drop(tmp);
    let mut annotations = layer.annotations.clone();
    annotations.retain(|k, _| {
        !k.starts_with("io.github.containers.zstd-chunked.")
            && !k.starts_with("io.containers.zstd-chunked.")
            && !k.starts_with("containerd.io/snapshot/arbor.")
    });
    annotations.extend(summary.annotations());
    let mut extra = layer.extra.clone();
    extra.remove("urls");
    let desc = Descriptor {
        media_type: arbor_format::MEDIA_TYPE_LAYER_ZSTD.into(),
        digest: digest.clone(),
        size: summary.blob_size,
        platform: None,
        annotations,
        extra,
    };
    progress.event(Event::LayerDone {
        digest: layer.digest.clone(),
    });
    info!(
        source = %layer.digest, target = %digest, size = summary.blob_size,
        seconds = started.elapsed().as_secs_f64(), "layer converted"
    );
    let report = LayerReport {
        source_digest: layer.digest.clone(),
        source_media_type: layer.media_type.clone(),
        source_size: layer.size,
        target_digest: digest,
        target_size: summary.blob_size,
        diff_id: summary.diff_id.to_string(),
        uncompressed_size: summary.uncompressed_size,
        toc_digest: Some(summary.toc_digest.to_string()),
        entries: summary.entries,
        regular_files: summary.regular_files,
        prefetch: summary.prefetch_found.clone(),
        converted: true,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((desc, summary.diff_id.to_string(), report))
}
