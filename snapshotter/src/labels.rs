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
    // CRI's labels are set by containerd itself; Arbor's come from `arbor pull` (which sets
    // them over any same-named annotation of the image). An image's own annotations must not
    // redirect CRI's pull to another blob or registry, so CRI's win.
    let get = |a: &str, b: &str| labels.get(a).or_else(|| labels.get(b)).cloned();
    let (Some(digest), Some(image_ref)) = (
        get(CRI_LAYER_DIGEST, ARBOR_LAYER_DIGEST),
        get(CRI_IMAGE_REF, ARBOR_IMAGE_REF),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn what_makes_a_layer_remote() {
        let toc = [
            (arbor_format::ANN_ARBOR_TOC_POSITION, "1000:200:800:1"),
            (arbor_format::ANN_ARBOR_BLOB_SIZE, "2000"),
        ];
        assert!(matches!(
            remote_layer(&labels(&[(TARGET, D1)])),
            Err(NotRemote::Plain)
        ));
        assert!(matches!(
            remote_layer(&labels(&toc)),
            Err(NotRemote::NoSource)
        ));
        let mut l = labels(&toc);
        l.extend(labels(&[
            (ARBOR_LAYER_DIGEST, D1),
            (ARBOR_IMAGE_REF, "r.example/a:1"),
        ]));
        let r = remote_layer(&l).unwrap();
        assert_eq!((r.digest.as_str(), r.blob_size), (D1, 2000));
        // CRI's labels (containerd's own) win over same-named image annotations.
        l.extend(labels(&[
            (CRI_LAYER_DIGEST, D2),
            (CRI_IMAGE_REF, "r.example/b:1"),
        ]));
        let r = remote_layer(&l).unwrap();
        assert_eq!(
            (r.digest.as_str(), r.image_ref.as_str()),
            (D2, "r.example/b:1")
        );
        // A TOC outside the blob, a bad size or digest: refused.
        l.insert(arbor_format::ANN_ARBOR_BLOB_SIZE.into(), "1100".into());
        assert!(matches!(remote_layer(&l), Err(NotRemote::Bad(_))));
        l.insert(arbor_format::ANN_ARBOR_BLOB_SIZE.into(), "x".into());
        assert!(matches!(remote_layer(&l), Err(NotRemote::Bad(_))));
        l.insert(arbor_format::ANN_ARBOR_BLOB_SIZE.into(), "2000".into());
        l.insert(CRI_LAYER_DIGEST.into(), "sha256:zz".into());
        assert!(matches!(remote_layer(&l), Err(NotRemote::Bad(_))));
    }
}
