//! `arbor inspect`: what an image holds and in which format, reading only manifests, configs
//! and TOCs (one or two Range requests per layer).

use arbor_format::footer::TocPosition;
use arbor_format::index::{LayerIndex, locate_toc};
use arbor_format::tarstream::EntryKind;
use arbor_oci::Store;
use arbor_oci::manifest::Descriptor;
use serde::Serialize;

use crate::error::Result;
use crate::image;

/// Summary of a chunked layer's TOC.
#[derive(Debug, Clone, Serialize, Default)]
pub struct TocSummary {
    pub toc_offset: u64,
    pub toc_length: u64,
    pub toc_uncompressed_length: u64,
    pub entries: usize,
    pub regular_files: usize,
    pub directories: usize,
    pub symlinks: usize,
    pub hardlinks: usize,
    pub other: usize,
    pub content_bytes: u64,
    pub chunks: usize,
    pub zero_chunks: usize,
    pub largest_chunk: u64,
    /// Arbor's additions (absent for zstd:chunked layers of other writers).
    pub prefetch: Option<Vec<String>>,
    pub prefetch_end: Option<u64>,
    pub block_size: Option<u64>,
    pub blocks: Option<usize>,
}

/// One layer as `inspect` sees it.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// `arbor`, `zstd:chunked`, `gzip`, `zstd` or `tar`.
    pub format: String,
    pub diff_id: Option<String>,
    pub toc: Option<TocSummary>,
    /// Why the TOC could not be read, for a layer that claims to have one.
    pub toc_error: Option<String>,
}

/// One platform image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub platform: Option<String>,
    pub digest: String,
    pub media_type: String,
    pub os: Option<String>,
    pub architecture: Option<String>,
    pub entrypoint: serde_json::Value,
    pub cmd: serde_json::Value,
    pub layers: Vec<LayerInfo>,
}

/// The result of [`inspect_image`].
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub digest: String,
    pub media_type: String,
    pub images: Vec<ImageInfo>,
}

/// Describes the image at `store` (platforms filtered by `platforms`, all when empty).
pub async fn inspect_image(store: &Store, platforms: &[String]) -> Result<InspectReport> {
    let resolved = image::resolve(store, platforms).await?;
    let mut images = Vec::new();
    for img in &resolved.images {
        let config = image::read_config(store, &img.manifest).await?;
        let diff_ids = image::diff_ids(&config).unwrap_or_default();
        let mut layers = Vec::new();
        for (i, l) in img.manifest.layers.iter().enumerate() {
            let mut info = inspect_layer(store, l).await;
            info.diff_id = diff_ids.get(i).cloned();
            layers.push(info);
        }
        let s = |k: &str| config.get(k).and_then(|v| v.as_str()).map(str::to_string);
        images.push(ImageInfo {
            platform: img.platform.as_ref().map(|p| p.label()),
            digest: img.digest.clone(),
            media_type: img.media_type.clone(),
            os: s("os"),
            architecture: s("architecture"),
            entrypoint: config
                .pointer("/config/Entrypoint")
                .cloned()
                .unwrap_or_default(),
            cmd: config.pointer("/config/Cmd").cloned().unwrap_or_default(),
            layers,
        });
    }
    Ok(InspectReport {
        digest: resolved.root_digest,
        media_type: resolved.root_media_type,
        images,
    })
}

async fn inspect_layer(store: &Store, l: &Descriptor) -> LayerInfo {
    let mut info = LayerInfo {
        digest: l.digest.clone(),
        media_type: l.media_type.clone(),
        size: l.size,
        format: match l.media_type.as_str() {
            m if m.ends_with("gzip") => "gzip",
            m if m.ends_with("zstd") => "zstd",
            _ => "tar",
        }
        .to_string(),
        diff_id: None,
        toc: None,
        toc_error: None,
    };
    if info.format != "zstd" {
        return info;
    }
    let claims_toc = locate_toc(&l.annotations).ok().flatten().is_some();
    match arbor_fetch::toc::read_layer_toc(store, l).await {
        Ok((index, pos)) => {
            info.format = if index.arbor.is_some() {
                "arbor"
            } else {
                "zstd:chunked"
            }
            .into();
            info.toc = Some(summarize(&index, &pos));
        }
        Err(e) if claims_toc => info.toc_error = Some(crate::error::chain(&e)),
        Err(_) => {}
    }
    info
}

fn summarize(index: &LayerIndex, pos: &TocPosition) -> TocSummary {
    let mut s = TocSummary {
        toc_offset: pos.offset,
        toc_length: pos.length,
        toc_uncompressed_length: pos.uncompressed_length,
        entries: index.entries.len(),
        ..Default::default()
    };
    for e in &index.entries {
        match e.kind {
            EntryKind::Regular => s.regular_files += 1,
            EntryKind::Dir => s.directories += 1,
            EntryKind::Symlink => s.symlinks += 1,
            EntryKind::HardLink => s.hardlinks += 1,
            _ => s.other += 1,
        }
        s.content_bytes += e.size;
        s.chunks += e.chunks.len();
        s.zero_chunks += e.chunks.iter().filter(|c| c.zeros).count();
        s.largest_chunk = s
            .largest_chunk
            .max(e.chunks.iter().map(|c| c.size).max().unwrap_or(0));
    }
    if let Some(a) = &index.arbor {
        s.prefetch = Some(a.prefetch.clone());
        s.prefetch_end = Some(a.prefetch_end);
        s.block_size = Some(a.block_size);
        s.blocks = Some(a.blocks.len());
    }
    s
}
