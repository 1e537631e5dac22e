//! Start-up sets inferred from the image itself, for images converted without a list: the files
//! a container's entrypoint will read first, found by following what the files say they need
//! (an executable's ELF interpreter and shared libraries, a Python program's imports). They
//! become the layers' prefetch sections, as a `--prefetch-list` would, so the very first start
//! of an image nobody has run yet is not a chain of serial misses.
//!
//! [`infer_image`] reads every layer once (a pass before the conversion), builds the merged
//! tree ([`tree`]) and walks it from the config's entrypoint ([`start`]).

pub mod elf;
pub mod python;
pub mod start;
pub mod tree;

use arbor_oci::Store;
use arbor_oci::manifest::Manifest;
use tracing::debug;

use crate::error::{Error, Result};
use crate::image;
pub use start::{Entrypoint, Inferred, Limits};

/// The start-up files of the image `m` (config `config`) at `src`; `None` when its config
/// names no entrypoint or a layer is already in Arbor's format (its files are not scanned).
pub async fn infer_image(
    src: &Store,
    m: &Manifest,
    config: &serde_json::Value,
    limits: Limits,
) -> Result<Option<Inferred>> {
    let Some(ep) = Entrypoint::from_config(config) else {
        return Ok(None);
    };
    if m.layers.iter().any(image::is_arbor_layer) {
        return Ok(None);
    }
    let mut merged = tree::Tree::default();
    for layer in &m.layers {
        let reader = src.blob_reader(&layer.digest, Some(layer.size)).await?;
        let digest = layer.digest.clone();
        let scan = tokio::task::spawn_blocking(move || -> Result<tree::LayerScan> {
            let tar = image::tar_stream(reader)?;
            tree::scan_layer(tar).map_err(|e| Error::Image(format!("layer {digest}: {e}")))
        })
        .await
        .map_err(|e| Error::Image(format!("scanning a layer: {e}")))??;
        merged.apply(scan);
    }
    let inferred = tokio::task::spawn_blocking(move || start::infer(&merged, &ep, limits))
        .await
        .map_err(|e| Error::Image(format!("inferring start-up files: {e}")))?;
    debug!(
        files = inferred.files.len(),
        bytes = inferred.bytes,
        "start-up files inferred"
    );
    Ok(Some(inferred))
}
