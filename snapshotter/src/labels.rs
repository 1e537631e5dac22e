//! Snapshot labels: containerd's remote-snapshot conventions and Arbor's own keys, and which
//! of them are trusted to say where a layer's bytes are fetched from.
//!
//! containerd forwards to the snapshotter every layer annotation whose key starts with
//! `containerd.io/snapshot/` (`arbor convert` writes the TOC position, TOC digest and blob size
//! there) plus `containerd.io/snapshot.ref`, the chain ID to commit under. What is missing from
//! annotations, the layer digest and the image reference to fetch from, comes from CRI's labels
//! (`disable_snapshot_annotations = false`) or from `arbor pull`, which sets Arbor's keys.
//!
//! **Trust.** Every one of those keys can also be written by an image's author as a layer
//! annotation, and containerd forwards it unchanged. So the *source* of a lazy mount (layer
//! digest and image reference: what arbord fetches, with the node's credentials) is taken only
//! from:
//!
//! * Arbor's keys with a valid [`PULL_MAC`]: an HMAC-SHA256, under the node's pull key
//!   (`<root>/pull.key`, created 0600 by arbord, readable by root only), over (layer digest,
//!   image reference, chain ID). `arbor pull` runs as root on the node and computes it; an
//!   image cannot.
//! * CRI's keys, when [`Trust::cri_labels`] is on: containerd's CRI plugin overwrites
//!   `cri.image-ref`, `cri.layer-digest`, `cri.manifest-digest` and `cri.image-layers` on
//!   every layer descriptor from the pull request itself (containerd 1.6
//!   `pkg/cri/server/image_pull.go` `appendInfoHandlerWrapper`, 1.7+ `pkg/snapshotters`), so an
//!   image cannot choose them *in a CRI pull*. Pulls by other clients (`ctr`, nerdctl,
//!   containerd client libraries) forward the image's own `cri.*` annotations: on a node where
//!   untrusted images may be pulled into the `arbor` snapshotter by such clients, turn
//!   `registry.trust_cri_labels` off.
//!
//! Whatever the source, its registry must be in [`Trust::allow`] (empty: any registry).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use arbor_format::index::locate_toc;
use sha2::{Digest as _, Sha256};

use crate::meta::RemoteLayer;

/// The chain ID a prepared layer is to be committed under.
pub const TARGET: &str = "containerd.io/snapshot.ref";
/// Layer digest, set by `arbor pull`.
pub const ARBOR_LAYER_DIGEST: &str = "containerd.io/snapshot/arbor.layer-digest";
/// Image reference, set by `arbor pull`.
pub const ARBOR_IMAGE_REF: &str = "containerd.io/snapshot/arbor.image-ref";
/// `arbor pull`'s proof that it set the two labels above: hex HMAC-SHA256 (see [`pull_mac`]).
pub const PULL_MAC: &str = "containerd.io/snapshot/arbor.pull-mac";
/// Layer digest, set by containerd's CRI plugin.
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// The image manifest digest CRI prepares a layer for (containerd's snapshotter labels).
pub const CRI_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The image manifest digest `arbor pull` prepares a layer for.
pub const ARBOR_MANIFEST: &str = "containerd.io/snapshot/arbor.manifest-digest";
/// The function a layer is prepared for (`arbor pull --function`, or the runtime shim): names
/// the function tree the node joins for it.
pub const ARBOR_FUNCTION: &str = "containerd.io/snapshot/arbor.function";
/// Image reference, set by containerd's CRI plugin.
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// Set ("true") on snapshots Arbor mounted lazily, so `ctr snapshot info` shows it.
pub const REMOTE: &str = "containerd.io/snapshot/arbor.remote";
/// Label on a lazily mounted snapshot: `true` once its blob is proved, `false` once it lied
/// (see `snapshotter::verify`).
pub const VERIFIED: &str = "containerd.io/snapshot/arbor.verified";
/// Labels only arbord sets: a client's (or an image annotation's) value for them is dropped,
/// so that nobody can mark an unproved layer proved.
pub const OWN: [&str; 2] = [REMOTE, VERIFIED];

/// Drops the labels only arbord may set ([`OWN`]) from a client's `labels`; returns the keys
/// it dropped.
pub fn strip_own(labels: &mut BTreeMap<String, String>) -> Vec<&'static str> {
    OWN.into_iter()
        .filter(|k| labels.remove(*k).is_some())
        .collect()
}

/// File under arbord's root holding the key of [`PULL_MAC`].
pub const PULL_KEY_FILE: &str = "pull.key";
const PULL_KEY_LEN: usize = 32;

/// What the snapshotter trusts to name a lazy layer's source.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// The node's pull key (`None`: Arbor's labels are never trusted).
    pub pull_key: Option<Vec<u8>>,
    /// Trust containerd's CRI labels (see the module documentation).
    pub cri_labels: bool,
    /// Registries (`host`, `host:port`) or repository prefixes (`host/path`) lazy layers
    /// may be fetched from; empty: any.
    pub allow: Vec<String>,
}

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
    /// Arbor's source labels without a valid `arbor pull` MAC: set by the image, not by
    /// `arbor pull`.
    #[error(
        "the layer's {ARBOR_LAYER_DIGEST}/{ARBOR_IMAGE_REF} labels carry no valid {PULL_MAC} (image annotations, or arbor pull without access to arbord's pull key): not trusted to choose the fetch source"
    )]
    Unauthenticated,
    /// The source's registry is not in `registry.allow`.
    #[error("registry of {0:?} is not in registry.allow")]
    NotAllowed(String),
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
            NotRemote::Unauthenticated => "unauthenticated",
            NotRemote::NotAllowed(_) => "registry_not_allowed",
            NotRemote::Bad(_) => "bad_annotations",
        }
    }
}

/// HMAC-SHA256 (RFC 2104) of (layer digest, image reference, chain ID) under `key`, hex.
pub fn pull_mac(key: &[u8], layer_digest: &str, image_ref: &str, chain_id: &str) -> String {
    const B: usize = 64;
    let mut k = [0u8; B];
    if key.len() > B {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |x: u8| k.iter().map(|b| b ^ x).collect::<Vec<u8>>();
    let mut inner = Sha256::new();
    inner.update(pad(0x36));
    // Each field length-prefixed, so no two (digest, ref, chain) triples share an input.
    for part in ["arbor-pull-v1", layer_digest, image_ref, chain_id] {
        inner.update((part.len() as u64).to_be_bytes());
        inner.update(part.as_bytes());
    }
    let mut outer = Sha256::new();
    outer.update(pad(0x5c));
    outer.update(inner.finalize());
    hex::encode(outer.finalize())
}

fn eq_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the pull key under arbord's `root` (what `arbor pull` does; root only).
pub fn read_pull_key(root: &Path) -> std::io::Result<Vec<u8>> {
    let p = root.join(PULL_KEY_FILE);
    let mut k = Vec::new();
    std::fs::File::open(&p)?.read_to_end(&mut k)?;
    if k.len() != PULL_KEY_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} holds {} bytes, not {PULL_KEY_LEN}",
                p.display(),
                k.len()
            ),
        ));
    }
    Ok(k)
}

/// The pull key under `root`, created (random, mode 0600) when missing or unusable.
pub fn ensure_pull_key(root: &Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let p: PathBuf = root.join(PULL_KEY_FILE);
    if let Ok(k) = read_pull_key(root) {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        return Ok(k);
    }
    let mut k = vec![0u8; PULL_KEY_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut k)?;
    let tmp = root.join(format!("{PULL_KEY_FILE}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&k)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &p)?;
    Ok(k)
}

/// Whether `image_ref`'s registry (or repository) is in `allow` (empty: everything is).
pub fn registry_allowed(allow: &[String], image_ref: &str) -> bool {
    if allow.is_empty() {
        return true;
    }
    let Ok(r) = arbor_oci::reference::Reference::parse(image_ref) else {
        return false;
    };
    let repo = format!("{}/{}", r.registry, r.repository);
    allow.iter().any(|a| {
        let a = a.trim_end_matches('/');
        a == r.registry || repo == a || repo.starts_with(&format!("{a}/"))
    })
}

/// Reads what a lazy mount of the prepared layer needs from its labels, trusting only the
/// sources `trust` allows.
pub fn remote_layer(
    labels: &BTreeMap<String, String>,
    trust: &Trust,
) -> Result<RemoteLayer, NotRemote> {
    let toc = layer_toc(labels)?;
    let (digest, image_ref) = source(labels, trust)?;
    let mut layer = toc.layer(digest, image_ref, &trust.allow)?;
    layer.manifest = manifest_digest(labels);
    layer.function = function_name(labels);
    Ok(layer)
}

/// Where a lazy layer's TOC is, as its annotations (a Prepare's labels, or the layer's
/// descriptor in its manifest) say: the part of [`remote_layer`] that does not depend on who
/// asks.
pub struct LayerToc {
    blob_size: u64,
    locator: arbor_format::index::TocLocator,
    toc_digest: String,
}

/// Reads a layer's TOC location from its annotations: `Plain` for a layer that is not lazy.
pub fn layer_toc(annotations: &BTreeMap<String, String>) -> Result<LayerToc, NotRemote> {
    let Some(size) = annotations.get(arbor_format::ANN_ARBOR_BLOB_SIZE) else {
        return Err(NotRemote::Plain);
    };
    let locator = match locate_toc(annotations) {
        Ok(Some(l)) => l,
        Ok(None) => return Err(NotRemote::Plain),
        Err(e) => return Err(NotRemote::Bad(e.to_string())),
    };
    // The TOC decides what a lazy mount shows; it is trusted only through a digest that the
    // manifest (which the image reference pins) binds it to.
    let Some(toc_digest) = locator.digest.as_ref().map(|d| d.to_string()) else {
        return Err(NotRemote::Bad(
            "no TOC digest annotation: the TOC would not be bound to the manifest".into(),
        ));
    };
    let blob_size: u64 = size
        .parse()
        .map_err(|_| NotRemote::Bad(format!("blob size {size:?} is not a number")))?;
    Ok(LayerToc {
        blob_size,
        locator,
        toc_digest,
    })
}

impl LayerToc {
    /// The lazy layer of blob `digest` fetched through `image_ref` (no manifest or function
    /// named), if the digest is well-formed, the registry allowed and the TOC within the blob.
    pub fn layer(
        self,
        digest: String,
        image_ref: String,
        allow: &[String],
    ) -> Result<RemoteLayer, NotRemote> {
        arbor_format::Digest::parse(&digest).map_err(|_| {
            NotRemote::Bad(format!("layer digest {digest:?} is not a sha256 digest"))
        })?;
        if !registry_allowed(allow, &image_ref) {
            return Err(NotRemote::NotAllowed(image_ref));
        }
        self.locator
            .position
            .check_within(self.blob_size)
            .map_err(|e| NotRemote::Bad(e.to_string()))?;
        Ok(RemoteLayer {
            image_ref,
            digest,
            blob_size: self.blob_size,
            toc_position: self.locator.position.annotation(),
            toc_digest: Some(self.toc_digest),
            manifest: None,
            function: None,
        })
    }
}

/// The function a layer is prepared for, if the label names one well-formed: 1 to 128
/// characters of `A-Z a-z 0-9 . _ - / : @` (a name, not a path: it only keys a tree).
pub fn function_name(labels: &BTreeMap<String, String>) -> Option<String> {
    labels
        .get(ARBOR_FUNCTION)
        .filter(|f| is_function_name(f))
        .cloned()
}

/// Whether `f` is a well-formed function name (see [`function_name`]).
pub fn is_function_name(f: &str) -> bool {
    (1..=128).contains(&f.len())
        && f.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
}

/// The image manifest a layer is prepared for: `arbor pull`'s label, else CRI's. Only a
/// well-formed digest counts; it only selects a learned start-up set (a hint).
pub fn manifest_digest(labels: &BTreeMap<String, String>) -> Option<String> {
    [ARBOR_MANIFEST, CRI_MANIFEST]
        .iter()
        .filter_map(|k| labels.get(*k))
        .find(|d| arbor_format::Digest::parse(d).is_ok())
        .cloned()
}

/// (layer digest, image reference) from a trusted source, never mixing two sources.
fn source(labels: &BTreeMap<String, String>, trust: &Trust) -> Result<(String, String), NotRemote> {
    let arbor = match (labels.get(ARBOR_LAYER_DIGEST), labels.get(ARBOR_IMAGE_REF)) {
        (Some(d), Some(r)) => Some((d, r)),
        _ => None,
    };
    if let (Some((d, r)), Some(key)) = (arbor, &trust.pull_key) {
        let chain = labels.get(TARGET).map_or("", String::as_str);
        let want = pull_mac(key, d, r, chain);
        if labels
            .get(PULL_MAC)
            .is_some_and(|m| eq_constant_time(m.as_bytes(), want.as_bytes()))
        {
            return Ok((d.clone(), r.clone()));
        }
    }
    if trust.cri_labels {
        if let (Some(d), Some(r)) = (labels.get(CRI_LAYER_DIGEST), labels.get(CRI_IMAGE_REF)) {
            return Ok((d.clone(), r.clone()));
        }
    }
    if arbor.is_some() {
        return Err(NotRemote::Unauthenticated);
    }
    Err(NotRemote::NoSource)
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

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn trust() -> Trust {
        Trust {
            pull_key: Some(KEY.to_vec()),
            cri_labels: true,
            allow: vec![],
        }
    }

    fn toc() -> BTreeMap<String, String> {
        labels(&[
            (arbor_format::ANN_ARBOR_TOC_POSITION, "1000:200:800:1"),
            (arbor_format::ANN_ARBOR_TOC_DIGEST, D2),
            (arbor_format::ANN_ARBOR_BLOB_SIZE, "2000"),
            (TARGET, D1),
        ])
    }

    #[test]
    fn toc_without_a_digest_bound_to_the_manifest_is_not_mounted() {
        let mut l = pulled(D1, "r.example/a:1");
        assert!(remote_layer(&l, &trust()).is_ok());
        l.remove(arbor_format::ANN_ARBOR_TOC_DIGEST);
        match remote_layer(&l, &trust()) {
            Err(NotRemote::Bad(why)) => assert!(why.contains("no TOC digest"), "{why}"),
            other => panic!("mounted a TOC bound to nothing: {other:?}"),
        }
    }

    /// The labels `arbor pull` sets (with its MAC).
    fn pulled(digest: &str, image: &str) -> BTreeMap<String, String> {
        let mut l = toc();
        l.extend(labels(&[
            (ARBOR_LAYER_DIGEST, digest),
            (ARBOR_IMAGE_REF, image),
            (PULL_MAC, &pull_mac(KEY, digest, image, D1)),
        ]));
        l
    }

    #[test]
    fn what_makes_a_layer_remote() {
        let t = trust();
        assert!(matches!(
            remote_layer(&labels(&[(TARGET, D1)]), &t),
            Err(NotRemote::Plain)
        ));
        assert!(matches!(remote_layer(&toc(), &t), Err(NotRemote::NoSource)));
        let mut l = pulled(D1, "r.example/a:1");
        let r = remote_layer(&l, &t).unwrap();
        assert_eq!(
            (r.digest.as_str(), r.blob_size, r.image_ref.as_str()),
            (D1, 2000, "r.example/a:1")
        );
        // CRI's labels alone (containerd's own in a CRI pull).
        let mut c = toc();
        c.extend(labels(&[
            (CRI_LAYER_DIGEST, D2),
            (CRI_IMAGE_REF, "r.example/b:1"),
        ]));
        let r = remote_layer(&c, &t).unwrap();
        assert_eq!(
            (r.digest.as_str(), r.image_ref.as_str()),
            (D2, "r.example/b:1")
        );
        // A TOC outside the blob, a bad size or digest: refused.
        l.insert(arbor_format::ANN_ARBOR_BLOB_SIZE.into(), "1100".into());
        assert!(matches!(remote_layer(&l, &t), Err(NotRemote::Bad(_))));
        l.insert(arbor_format::ANN_ARBOR_BLOB_SIZE.into(), "x".into());
        assert!(matches!(remote_layer(&l, &t), Err(NotRemote::Bad(_))));
        c.insert(CRI_LAYER_DIGEST.into(), "sha256:zz".into());
        assert!(matches!(remote_layer(&c, &t), Err(NotRemote::Bad(_))));
    }

    /// An image's own `containerd.io/snapshot/arbor.*` annotations (forwarded by containerd
    /// as labels) must not make arbord fetch another blob, from another host.
    #[test]
    fn image_annotations_cannot_choose_fetch_source() {
        let t = trust();
        let mut l = toc();
        l.extend(labels(&[
            (ARBOR_LAYER_DIGEST, D2),
            (ARBOR_IMAGE_REF, "victim.example/private/app:1"),
        ]));
        assert!(matches!(
            remote_layer(&l, &t),
            Err(NotRemote::Unauthenticated)
        ));
        // Nor when the node has no pull key at all.
        let no_key = Trust {
            pull_key: None,
            ..trust()
        };
        assert!(matches!(
            remote_layer(&pulled(D1, "r.example/a:1"), &no_key),
            Err(NotRemote::Unauthenticated)
        ));
        // In a CRI pull the image's annotations ride along, but CRI's labels (overwritten by
        // containerd from the pull request) are what is used, never a mix of the two.
        l.extend(labels(&[
            (CRI_LAYER_DIGEST, D1),
            (CRI_IMAGE_REF, "r.example/a:1"),
        ]));
        let r = remote_layer(&l, &t).unwrap();
        assert_eq!(
            (r.digest.as_str(), r.image_ref.as_str()),
            (D1, "r.example/a:1")
        );
        l.remove(CRI_IMAGE_REF);
        assert!(matches!(
            remote_layer(&l, &t),
            Err(NotRemote::Unauthenticated)
        ));
        // With CRI labels distrusted (non-CRI clients pull untrusted images), even a full set
        // of `cri.*` annotations chooses nothing.
        let strict = Trust {
            cri_labels: false,
            ..trust()
        };
        let mut c = toc();
        c.extend(labels(&[
            (CRI_LAYER_DIGEST, D2),
            (CRI_IMAGE_REF, "victim.example/private/app:1"),
        ]));
        assert!(matches!(
            remote_layer(&c, &strict),
            Err(NotRemote::NoSource)
        ));
        // `arbor pull`'s labels still work there.
        assert!(remote_layer(&pulled(D1, "r.example/a:1"), &strict).is_ok());
    }

    /// A MAC computed for another layer, image, chain, or with another key is refused.
    #[test]
    fn forged_pull_label_is_refused() {
        let t = trust();
        let good = pulled(D1, "r.example/a:1");
        assert!(remote_layer(&good, &t).is_ok());
        let forged = |k: &str, v: &str| {
            let mut l = good.clone();
            l.insert(k.into(), v.into());
            remote_layer(&l, &t)
        };
        // The same MAC with another digest, image or chain ID.
        for (k, v) in [
            (ARBOR_LAYER_DIGEST, D2),
            (ARBOR_IMAGE_REF, "victim.example/private/app:1"),
            (TARGET, D2),
        ] {
            assert!(
                matches!(forged(k, v), Err(NotRemote::Unauthenticated)),
                "{k}"
            );
        }
        // A MAC under another key, truncated, or empty.
        let other = pull_mac(b"another key entirely, 32 bytes!!", D1, "r.example/a:1", D1);
        for m in [other.as_str(), &good[PULL_MAC][..63], ""] {
            assert!(matches!(
                forged(PULL_MAC, m),
                Err(NotRemote::Unauthenticated)
            ));
        }
        // Field boundaries are part of the MAC's input: no shifting bytes between fields.
        assert_ne!(
            pull_mac(KEY, "a", "b\0c", "d"),
            pull_mac(KEY, "a\0b", "c", "d")
        );
    }

    #[test]
    fn registry_outside_allowlist_is_refused() {
        let t = Trust {
            allow: vec!["r.example".into(), "other.example:5000/team/".into()],
            ..trust()
        };
        assert!(remote_layer(&pulled(D1, "r.example/a:1"), &t).is_ok());
        assert!(remote_layer(&pulled(D1, "other.example:5000/team/x:1"), &t).is_ok());
        for bad in [
            "evil.example/a:1",
            "r.example.evil.example/a:1",
            "other.example:5000/teamx/x:1",
            "other.example/team/x:1",
        ] {
            assert!(
                matches!(
                    remote_layer(&pulled(D1, bad), &t),
                    Err(NotRemote::NotAllowed(_))
                ),
                "{bad}"
            );
        }
        // CRI's sources are checked the same way.
        let mut c = toc();
        c.extend(labels(&[
            (CRI_LAYER_DIGEST, D2),
            (CRI_IMAGE_REF, "evil.example/a:1"),
        ]));
        assert!(matches!(
            remote_layer(&c, &t),
            Err(NotRemote::NotAllowed(_))
        ));
        assert!(registry_allowed(&[], "anything.example/x:1"));
    }

    #[test]
    fn pull_key_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        assert!(read_pull_key(d.path()).is_err());
        let k = ensure_pull_key(d.path()).unwrap();
        assert_eq!(k.len(), PULL_KEY_LEN);
        let mode = std::fs::metadata(d.path().join(PULL_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ensure_pull_key(d.path()).unwrap(), k);
        assert_eq!(read_pull_key(d.path()).unwrap(), k);
        // A truncated key is replaced.
        std::fs::write(d.path().join(PULL_KEY_FILE), b"short").unwrap();
        assert_ne!(ensure_pull_key(d.path()).unwrap(), k);
    }
}
