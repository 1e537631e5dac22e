//! OCI artifacts attached to an image: pushing one with a `subject`, and finding an image's
//! referrers of one artifact type, through the referrers API or, where the registry lacks it
//! (docker-registry 2.8), the referrers tag schema of the OCI distribution spec: an image
//! index tagged `sha256-<hex of the subject digest>` that lists the referrers.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::manifest::{Descriptor, Index, OCI_INDEX, OCI_MANIFEST};
use crate::store::Store;

/// The empty config of an artifact manifest (`{}`).
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// Most referrers considered per subject.
pub const MAX_REFERRERS: usize = 1024;

/// The tag the referrers tag schema uses for `subject`.
pub fn fallback_tag(subject: &str) -> Result<String> {
    let hex = subject
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| Error::Malformed {
            what: "subject digest".into(),
            reason: format!("{subject:?} is not a sha256 digest"),
        })?;
    Ok(format!("sha256-{hex}"))
}

fn artifact_type(d: &Descriptor) -> Option<&str> {
    d.extra.get("artifactType").and_then(Value::as_str)
}

fn parse_index(bytes: &[u8]) -> Result<Index> {
    serde_json::from_slice(bytes).map_err(|e| Error::Malformed {
        what: "referrers index".into(),
        reason: e.to_string(),
    })
}

/// Referrers of manifest `subject` with artifact type `kind`, newest last (as listed).
pub async fn referrers(store: &Store, subject: &str, kind: &str) -> Result<Vec<Descriptor>> {
    let tag = fallback_tag(subject)?;
    let index = match store {
        Store::Registry { client, reference } => {
            match client.get_referrers(reference, subject, kind).await? {
                Some(bytes) => Some(parse_index(&bytes)?),
                None => fallback_index(store, &tag).await?,
            }
        }
        Store::Layout { .. } => fallback_index(store, &tag).await?,
    };
    Ok(index
        .map(|i| i.manifests)
        .unwrap_or_default()
        .into_iter()
        .take(MAX_REFERRERS)
        .filter(|d| artifact_type(d) == Some(kind))
        .collect())
}

/// The index behind the fallback tag, if there is one.
async fn fallback_index(store: &Store, tag: &str) -> Result<Option<Index>> {
    let at = store.at_tag(tag);
    match at.root_manifest().await {
        Ok((bytes, _, _)) => Ok(Some(parse_index(&bytes)?)),
        Err(Error::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Pushes an artifact of type `kind` holding `blob` (media type `blob_type`) with `subject`
/// as its subject, and lists it in the fallback tag's index too (registries with the
/// referrers API find it by its subject; the others through the tag). Returns the artifact
/// manifest's digest.
pub async fn push_artifact(
    store: &Store,
    subject: &Descriptor,
    kind: &str,
    blob_type: &str,
    blob: Bytes,
    annotations: BTreeMap<String, String>,
) -> Result<String> {
    let empty = store.push_blob_bytes(Bytes::from_static(b"{}")).await?;
    let blob_len = blob.len();
    let blob_digest = store.push_blob_bytes(blob).await?;
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": kind,
        "config": { "mediaType": EMPTY_MEDIA_TYPE, "digest": empty, "size": 2 },
        "layers": [ { "mediaType": blob_type, "digest": blob_digest, "size": blob_len } ],
        "subject": { "mediaType": subject.media_type, "digest": subject.digest, "size": subject.size },
    });
    if !annotations.is_empty() {
        manifest["annotations"] = json!(annotations);
    }
    let body = Bytes::from(serde_json::to_vec(&manifest).map_err(|e| Error::Malformed {
        what: "artifact manifest".into(),
        reason: e.to_string(),
    })?);
    let size = body.len() as u64;
    let digest = store.push_manifest(body, OCI_MANIFEST, None).await?;
    // The tag schema, kept up to date whatever the registry is: cheap, and registries that
    // have the API ignore it.
    let tag = fallback_tag(&subject.digest)?;
    let mut index = fallback_index(store, &tag).await?.unwrap_or(Index {
        schema_version: 2,
        media_type: Some(OCI_INDEX.into()),
        manifests: Vec::new(),
        annotations: BTreeMap::new(),
        extra: Default::default(),
    });
    index.manifests.retain(|d| d.digest != digest);
    let mut desc = Descriptor {
        media_type: OCI_MANIFEST.into(),
        digest: digest.clone(),
        size,
        annotations,
        ..Default::default()
    };
    desc.extra.insert("artifactType".into(), json!(kind));
    index.manifests.push(desc);
    let body = Bytes::from(serde_json::to_vec(&index).map_err(|e| Error::Malformed {
        what: "referrers index".into(),
        reason: e.to_string(),
    })?);
    store.push_manifest(body, OCI_INDEX, Some(&tag)).await?;
    Ok(digest)
}

/// The blob of the newest referrer of `subject` of type `kind` whose one layer has media type
/// `blob_type`, at most `max` bytes (verified against its digest); `None` if there is none.
pub async fn newest_artifact_blob(
    store: &Store,
    subject: &str,
    kind: &str,
    blob_type: &str,
    max: u64,
) -> Result<Option<(String, Bytes)>> {
    let Some(desc) = referrers(store, subject, kind).await?.pop() else {
        return Ok(None);
    };
    let (bytes, _) = store.manifest(&desc.digest).await?;
    let m: crate::manifest::Manifest =
        serde_json::from_slice(&bytes).map_err(|e| Error::Malformed {
            what: "artifact manifest".into(),
            reason: e.to_string(),
        })?;
    let subject_ok = m
        .extra
        .get("subject")
        .and_then(|s| s.get("digest"))
        .and_then(Value::as_str)
        == Some(subject);
    let Some(layer) = m.layers.first().filter(|l| l.media_type == blob_type) else {
        return Err(Error::Malformed {
            what: "artifact manifest".into(),
            reason: format!("{} has no {blob_type} layer", desc.digest),
        });
    };
    if !subject_ok {
        return Err(Error::Malformed {
            what: "artifact manifest".into(),
            reason: format!("{} names another subject", desc.digest),
        });
    }
    if layer.size > max {
        return Err(Error::Malformed {
            what: "artifact".into(),
            reason: format!("{} bytes, more than {max}", layer.size),
        });
    }
    let blob = store.blob_bytes(&layer.digest, max).await?;
    Ok(Some((desc.digest, blob)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_tags() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            fallback_tag(&d).unwrap(),
            format!("sha256-{}", "ab".repeat(32))
        );
        assert!(fallback_tag("sha256:../x").is_err());
        assert!(fallback_tag("md5:00").is_err());
    }

    #[tokio::test]
    async fn push_and_find_in_a_layout() {
        let dir = tempfile::tempdir().unwrap();
        let layout = crate::layout::OciLayout::create(dir.path()).unwrap();
        let store = Store::Layout { layout, tag: None };
        let subject_body = Bytes::from_static(b"{\"schemaVersion\":2}");
        let subject_digest = store
            .push_manifest(subject_body.clone(), OCI_MANIFEST, Some("v1"))
            .await
            .unwrap();
        let subject = Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: subject_digest.clone(),
            size: subject_body.len() as u64,
            ..Default::default()
        };
        let kind = "application/vnd.example.test";
        assert!(
            referrers(&store, &subject_digest, kind)
                .await
                .unwrap()
                .is_empty()
        );
        for body in ["one", "two"] {
            push_artifact(
                &store,
                &subject,
                kind,
                "application/json",
                Bytes::from(body),
                BTreeMap::new(),
            )
            .await
            .unwrap();
        }
        assert_eq!(
            referrers(&store, &subject_digest, kind)
                .await
                .unwrap()
                .len(),
            2
        );
        assert!(
            referrers(&store, &subject_digest, "other")
                .await
                .unwrap()
                .is_empty()
        );
        let (_, blob) =
            newest_artifact_blob(&store, &subject_digest, kind, "application/json", 100)
                .await
                .unwrap()
                .unwrap();
        assert_eq!(&blob[..], b"two");
        // Too large for the caller's bound: an error, not a read.
        assert!(
            newest_artifact_blob(&store, &subject_digest, kind, "application/json", 1)
                .await
                .is_err()
        );
    }
}
