//! `arbor trace`: the start-up sets arbord learns from real cold starts, shown, saved and
//! published to the registry beside their image (an OCI artifact whose subject is the image
//! manifest; see `arbor_oci::referrers` and docs/format.md, "Start-up sets").

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use arbor_format::startup::{ARTIFACT_TYPE, MAX_DOCUMENT, MEDIA_TYPE, StartupSet};
use arbor_oci::Store;
use arbor_oci::manifest::Descriptor;
use bytes::Bytes;

/// The platform manifest of `store`'s image for `platforms` (what a set's `manifest` names).
pub async fn image_manifest(store: &Store, platforms: &[String]) -> Result<Descriptor> {
    let platforms = if platforms.is_empty() {
        vec![arbor_client::pull::default_platform()]
    } else {
        platforms.to_vec()
    };
    let resolved = arbor_convert::image::resolve(store, &platforms).await?;
    let img = resolved
        .images
        .first()
        .with_context(|| format!("the image has no manifest for {}", platforms.join(", ")))?;
    Ok(Descriptor {
        media_type: img.media_type.clone(),
        digest: img.digest.clone(),
        size: img.bytes.len() as u64,
        ..Default::default()
    })
}

/// The set arbord holds for `manifest`, if any.
pub async fn from_arbord(t: &arbor_client::Target, manifest: &str) -> Result<Option<StartupSet>> {
    match arbor_client::pull::arbord_startup_set(t, manifest).await? {
        Some(bytes) => Ok(Some(StartupSet::parse(&bytes)?)),
        None => Ok(None),
    }
}

/// The newest set attached to `manifest` in the registry, if any.
pub async fn from_registry(store: &Store, manifest: &str) -> Result<Option<(String, StartupSet)>> {
    let found = arbor_oci::referrers::newest_artifact_blob(
        store,
        manifest,
        ARTIFACT_TYPE,
        MEDIA_TYPE,
        MAX_DOCUMENT as u64,
    )
    .await?;
    match found {
        Some((artifact, bytes)) => Ok(Some((artifact, StartupSet::parse(&bytes)?))),
        None => Ok(None),
    }
}

/// Reads a set from a JSON file.
pub fn from_file(path: &Path) -> Result<StartupSet> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    StartupSet::parse(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// Attaches `set` to the image `subject` in `store`; returns the artifact's digest.
pub async fn push(store: &Store, subject: &Descriptor, set: &StartupSet) -> Result<String> {
    if set.manifest != subject.digest {
        bail!(
            "the start-up set was learned on image {}, not {}: it would never be used",
            set.manifest,
            subject.digest
        );
    }
    let mut ann = BTreeMap::new();
    if let Some(f) = &set.function {
        ann.insert("io.arbor.function".to_string(), f.clone());
    }
    if !set.learned.is_empty() {
        ann.insert(
            "org.opencontainers.image.created".to_string(),
            set.learned.clone(),
        );
    }
    Ok(arbor_oci::referrers::push_artifact(
        store,
        subject,
        ARTIFACT_TYPE,
        MEDIA_TYPE,
        Bytes::from(set.to_json()),
        ann,
    )
    .await?)
}

/// A summary of a set, for people.
pub fn describe(set: &StartupSet) -> String {
    let mut out = format!(
        "start-up set of {}{}: {} files, {} chunks in {} layers",
        set.manifest,
        set.function
            .as_ref()
            .map(|f| format!(" (function {f})"))
            .unwrap_or_default(),
        set.paths().len(),
        set.chunk_count(),
        set.layers.len()
    );
    if let Some(ms) = set.ready_ms {
        out += &format!(", ready {:.2} s after start", ms as f64 / 1000.0);
    }
    if !set.learned.is_empty() {
        out += &format!(", learned {}", set.learned);
    }
    out.push('\n');
    for (i, p) in set.paths().iter().take(10).enumerate() {
        out += &format!("  {:>3}. {p}\n", i + 1);
    }
    if set.paths().len() > 10 {
        out += "  ...\n";
    }
    out
}
