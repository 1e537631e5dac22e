//! Snapshot labels: containerd's remote-snapshot conventions and Arbor's own keys.
//!
//! containerd forwards to the snapshotter every layer annotation whose key starts with
//! `containerd.io/snapshot/` (`arbor convert` writes the TOC position, TOC digest and blob size
//! there) plus `containerd.io/snapshot.ref`, the chain ID to commit under. What is missing from
//! annotations, the layer digest and the image reference to fetch from, comes from CRI's labels
//! (`disable_snapshot_annotations = false`) or from `arbor pull`, which sets Arbor's keys.

use std::collections::BTreeMap;

use arbor_format::index::locate_toc;

use crate::meta::RemoteLayer;

/// The chain ID a prepared layer is to be committed under.
pub const TARGET: &str = "containerd.io/snapshot.ref";
/// Layer digest, set by `arbor pull`.
pub const ARBOR_LAYER_DIGEST: &str = "containerd.io/snapshot/arbor.layer-digest";
/// Image reference, set by `arbor pull`.
pub const ARBOR_IMAGE_REF: &str = "containerd.io/snapshot/arbor.image-ref";
/// Layer digest, set by containerd's CRI plugin.
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// Image reference, set by containerd's CRI plugin.
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// Set ("true") on snapshots Arbor mounted lazily, so `ctr snapshot info` shows it.
pub const REMOTE: &str = "containerd.io/snapshot/arbor.remote";

/// Why a layer is not mounted lazily.
#[derive(Debug, thiserror::Error)]
pub enum NotRemote {
    /// An ordinary layer: no Arbor annotations.
    #[error("the layer carries no Arbor TOC annotations")]
    Plain,
    /// Converted, but the labels do not say where to fetch it from.
    #[error(
        "no layer digest or image reference label ({ARBOR_LAYER_DIGEST}/{CRI_LAYER_DIGEST}, {ARBOR_IMAGE_REF}/{CRI_IMAGE_REF}); pull with `arbor pull`, or through CRI with disable_snapshot_annotations = false"
    )]
    NoSource,
    /// Annotations that cannot be parsed.
    #[error("bad annotations: {0}")]
    Bad(String),
}

impl NotRemote {
    /// Metric label value.
    pub fn reason(&self) -> &'static str {
        match self {
            NotRemote::Plain => "plain",
            NotRemote::NoSource => "no_source",
            NotRemote::Bad(_) => "bad_annotations",
        }
    }
}

/// Reads what a lazy mount of the prepared layer needs from its labels.
pub fn remote_layer(labels: &BTreeMap<String, String>) -> Result<RemoteLayer, NotRemote> {
    let Some(size) = labels.get(arbor_format::ANN_ARBOR_BLOB_SIZE) else {
        return Err(NotRemote::Plain);
    };
    let locator = match locate_toc(labels) {
        Ok(Some(l)) => l,
        Ok(None) => return Err(NotRemote::Plain),
        Err(e) => return Err(NotRemote::Bad(e.to_string())),
    };
    let blob_size: u64 = size
        .parse()
        .map_err(|_| NotRemote::Bad(format!("blob size {size:?} is not a number")))?;
    let get = |a: &str, b: &str| labels.get(a).or_else(|| labels.get(b)).cloned();
    let (Some(digest), Some(image_ref)) = (
        get(ARBOR_LAYER_DIGEST, CRI_LAYER_DIGEST),
        get(ARBOR_IMAGE_REF, CRI_IMAGE_REF),
    ) else {
        return Err(NotRemote::NoSource);
    };
    arbor_format::Digest::parse(&digest)
        .map_err(|_| NotRemote::Bad(format!("layer digest {digest:?} is not a sha256 digest")))?;
    locator
        .position
        .check_within(blob_size)
        .map_err(|e| NotRemote::Bad(e.to_string()))?;
    Ok(RemoteLayer {
        image_ref,
        digest,
        blob_size,
        toc_position: locator.position.annotation(),
        toc_digest: locator.digest.map(|d| d.to_string()),
    })
}
