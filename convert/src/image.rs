//! Shared image plumbing: resolving a location to its platform manifests, and opening a layer
//! blob as a tar stream whatever its compression.

use std::io::{BufRead, BufReader, Read};

use arbor_oci::Store;
use arbor_oci::manifest::{Descriptor, Index, Manifest, ManifestKind, Platform, parse_manifest};
use bytes::Bytes;

use crate::error::{Error, Result};

/// One image manifest of a location, with its platform when it came from an index.
#[derive(Debug, Clone)]
pub struct PlatformImage {
    pub platform: Option<Platform>,
    /// The index entry's descriptor (annotations kept), when it came from an index.
    pub index_entry: Option<Descriptor>,
    pub digest: String,
    pub media_type: String,
    pub bytes: Bytes,
    pub manifest: Manifest,
}

/// A location's root document and its (selected) image manifests.
pub struct Resolved {
    pub root_digest: String,
    pub root_media_type: String,
    pub root_bytes: Bytes,
    /// Set when the root is an index.
    pub index: Option<Index>,
    pub images: Vec<PlatformImage>,
}

/// Whether an index entry is an attestation or other non-runnable manifest.
fn is_unknown_platform(d: &Descriptor) -> bool {
    d.platform
        .as_ref()
        .is_some_and(|p| p.os == "unknown" || p.architecture == "unknown")
}

/// Reads the root manifest and the image manifests it names, keeping only `platforms` (all
/// runnable platforms when empty).
pub async fn resolve(store: &Store, platforms: &[String]) -> Result<Resolved> {
    let (bytes, media_type, digest) = store.root_manifest().await?;
    match parse_manifest(&bytes, &media_type)? {
        ManifestKind::Image(m) => {
            let media_type = m.media_type.clone().unwrap_or(media_type);
            Ok(Resolved {
                root_digest: digest.clone(),
                root_media_type: media_type.clone(),
                root_bytes: bytes.clone(),
                index: None,
                images: vec![PlatformImage {
                    platform: None,
                    index_entry: None,
                    digest,
                    media_type,
                    bytes,
                    manifest: *m,
                }],
            })
        }
        ManifestKind::Index(index) => {
            let mut images = Vec::new();
            for d in &index.manifests {
                if is_unknown_platform(d) {
                    continue;
                }
                if !platforms.is_empty()
                    && !d
                        .platform
                        .as_ref()
                        .is_some_and(|p| platforms.iter().any(|s| p.matches(s)))
                {
                    continue;
                }
                let (b, mt) = store.manifest(&d.digest).await?;
                match parse_manifest(&b, &mt)? {
                    ManifestKind::Image(m) => images.push(PlatformImage {
                        platform: d.platform.clone(),
                        index_entry: Some(d.clone()),
                        digest: d.digest.clone(),
                        media_type: m.media_type.clone().unwrap_or(d.media_type.clone()),
                        bytes: b,
                        manifest: *m,
                    }),
                    ManifestKind::Index(_) => {
                        return Err(Error::Image(format!(
                            "nested index {} is not supported",
                            d.digest
                        )));
                    }
                }
            }
            if images.is_empty() {
                return Err(Error::Usage(format!(
                    "no manifest matches platform {platforms:?}"
                )));
            }
            Ok(Resolved {
                root_digest: digest,
                root_media_type: index.media_type.clone().unwrap_or(media_type),
                root_bytes: bytes,
                index: Some(index),
                images,
            })
        }
    }
}

/// Wraps a layer blob in the decompressor its first bytes call for (gzip, zstd or none), so
/// a layer with a wrong media type is still read right.
pub fn tar_stream<'a, R: Read + 'a>(blob: R) -> Result<Box<dyn Read + 'a>> {
    let mut buf = BufReader::with_capacity(1 << 20, blob);
    let head = buf.fill_buf().map_err(Error::from_io)?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(buf)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(buf)?))
    } else {
        Ok(Box::new(buf))
    }
}

/// Reads the image config (a JSON object) of a manifest.
pub async fn read_config(store: &Store, m: &Manifest) -> Result<serde_json::Value> {
    let b = store
        .blob_bytes(
            &m.config.digest,
            arbor_oci::manifest::MAX_CONFIG_OR_MANIFEST,
        )
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&b)
        .map_err(|e| Error::Image(format!("config {}: {e}", m.config.digest)))?;
    if !v.is_object() {
        return Err(Error::Image(format!(
            "config {} is not an object",
            m.config.digest
        )));
    }
    Ok(v)
}

/// `rootfs.diff_ids` of a config.
pub fn diff_ids(config: &serde_json::Value) -> Result<Vec<String>> {
    config
        .pointer("/rootfs/diff_ids")
        .and_then(|v| v.as_array())
        .ok_or_else(|| Error::Image("config has no rootfs.diff_ids".into()))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| Error::Image("diff_id is not a string".into()))
        })
        .collect()
}

/// Whether a layer descriptor says it is already in Arbor's format.
pub fn is_arbor_layer(d: &Descriptor) -> bool {
    d.media_type == arbor_format::MEDIA_TYPE_LAYER_ZSTD
        && d.annotations.contains_key(arbor_format::ANN_ARBOR_VERSION)
        && d.annotations
            .contains_key(arbor_format::ANN_ARBOR_TOC_DIGEST)
}

/// A reader that hashes and counts what passes through it.
pub struct HashingReader<R> {
    pub inner: R,
    hasher: sha2::Sha256,
    pub count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        use sha2::Digest as _;
        HashingReader {
            inner,
            hasher: sha2::Sha256::new(),
            count: 0,
        }
    }

    /// Reads to the end and returns the `sha256:` digest of everything read.
    pub fn finish(mut self) -> std::io::Result<(String, u64)> {
        use sha2::Digest as _;
        std::io::copy(&mut self, &mut std::io::sink())?;
        Ok((
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
        ))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}
