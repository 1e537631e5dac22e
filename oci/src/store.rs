//! One interface over where images live: a registry repository or an OCI layout directory.
//!
//! Whole-blob reads are digest-verified: [`Store::blob_reader`] returns a blocking
//! [`std::io::Read`] (for conversion on worker threads) that fails instead of reaching
//! end-of-file if the bytes do not hash to the descriptor's digest or have the wrong size.
//! Registry reads resume with a Range request after a dropped connection.

use std::io::{self, Read};
use std::path::Path;

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tracing::warn;

use crate::error::{Error, Result};
use crate::layout::{OciLayout, sha256_digest};
use crate::manifest::{Descriptor, MAX_CONFIG_OR_MANIFEST};
use crate::reference::{ImageLocation, Reference};
use crate::registry::{Access, RegistryClient};

/// A place images are read from or written to.
#[derive(Clone)]
pub enum Store {
    Registry {
        client: RegistryClient,
        reference: Reference,
    },
    Layout {
        layout: OciLayout,
        tag: Option<String>,
    },
}

impl Store {
    /// Opens `loc`; a layout is created when `create` is set and it does not exist.
    pub fn open(loc: &ImageLocation, client: &RegistryClient, create: bool) -> Result<Store> {
        Ok(match loc {
            ImageLocation::Registry(r) => Store::Registry {
                client: client.clone(),
                reference: r.clone(),
            },
            ImageLocation::Layout { dir, tag } => Store::Layout {
                layout: if create {
                    OciLayout::create(dir)?
                } else {
                    OciLayout::open(dir)?
                },
                tag: tag.clone(),
            },
        })
    }

    /// The manifest or index the location names: bytes, media type, digest.
    pub async fn root_manifest(&self) -> Result<(Bytes, String, String)> {
        match self {
            Store::Registry { client, reference } => client.get_manifest(reference).await,
            Store::Layout { layout, tag } => {
                let desc = layout.resolve(tag.as_deref())?;
                let data = layout.read_blob(&desc.digest, MAX_CONFIG_OR_MANIFEST)?;
                Ok((Bytes::from(data), desc.media_type, desc.digest))
            }
        }
    }

    /// A manifest by digest (children of an index), verified.
    pub async fn manifest(&self, digest: &str) -> Result<(Bytes, String)> {
        match self {
            Store::Registry { client, reference } => {
                let (b, mt, _) = client.get_manifest(&reference.with_digest(digest)).await?;
                Ok((b, mt))
            }
            Store::Layout { layout, .. } => {
                let data = layout.read_blob(digest, MAX_CONFIG_OR_MANIFEST)?;
                Ok((Bytes::from(data), String::new()))
            }
        }
    }

    /// A small blob (a config), verified, at most `max` bytes.
    pub async fn blob_bytes(&self, digest: &str, max: u64) -> Result<Bytes> {
        match self {
            Store::Layout { layout, .. } => Ok(Bytes::from(layout.read_blob(digest, max)?)),
            Store::Registry { .. } => {
                let mut reader = self.blob_reader(digest, None).await?;
                tokio::task::spawn_blocking(move || -> Result<Bytes> {
                    let mut out = Vec::new();
                    (&mut reader)
                        .take(max + 1)
                        .read_to_end(&mut out)
                        .map_err(|e| Error::io("blob", e))?;
                    if out.len() as u64 > max {
                        return Err(Error::Malformed {
                            what: "blob".into(),
                            reason: format!("larger than {max} bytes"),
                        });
                    }
                    Ok(Bytes::from(out))
                })
                .await
                .map_err(|e| Error::io("blob", io::Error::other(e)))?
            }
        }
    }

    /// `len` bytes of a blob from `offset` (not verified: callers check chunk digests).
    pub async fn blob_range(&self, digest: &str, offset: u64, len: u64) -> Result<Bytes> {
        match self {
            Store::Registry { client, reference } => {
                client.get_blob_range(reference, digest, offset, len).await
            }
            Store::Layout { layout, .. } => {
                let p = layout.blob_path(digest)?;
                tokio::task::spawn_blocking(move || -> Result<Bytes> {
                    use std::io::{Seek, SeekFrom};
                    let mut f = std::fs::File::open(&p).map_err(|e| Error::io(p.display(), e))?;
                    f.seek(SeekFrom::Start(offset))
                        .map_err(|e| Error::io(p.display(), e))?;
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact(&mut buf)
                        .map_err(|e| Error::io(p.display(), e))?;
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(|e| Error::io("blob", io::Error::other(e)))?
            }
        }
    }

    /// A blocking reader over a whole blob that verifies digest (and `size`, if known).
    pub async fn blob_reader(&self, digest: &str, size: Option<u64>) -> Result<BlobReader> {
        crate::layout::digest_hex(digest)?;
        match self {
            Store::Layout { layout, .. } => {
                let p = layout.blob_path(digest)?;
                let f = std::fs::File::open(&p).map_err(|e| Error::io(p.display(), e))?;
                Ok(BlobReader::new(Source::File(f), digest, size))
            }
            Store::Registry { client, reference } => {
                // Open here so that "not found" and auth errors surface before any read.
                let first = client.open_blob(reference, digest, 0).await?;
                let (tx, rx) = mpsc::channel::<Result<Bytes>>(16);
                let client = client.clone();
                let reference = reference.clone();
                let d = digest.to_string();
                tokio::spawn(async move {
                    pump(client, reference, d, first, tx).await;
                });
                Ok(BlobReader::new(
                    Source::Channel(rx, Bytes::new()),
                    digest,
                    size,
                ))
            }
        }
    }

    pub async fn has_blob(&self, digest: &str) -> Result<bool> {
        match self {
            Store::Registry { client, reference } => Ok(client
                .blob_size(reference, digest, Access::Push)
                .await?
                .is_some()),
            Store::Layout { layout, .. } => layout.has_blob(digest),
        }
    }

    /// Stores a blob from a local file whose digest is known.
    pub async fn push_blob_file(&self, digest: &str, size: u64, path: &Path) -> Result<()> {
        match self {
            Store::Registry { client, reference } => {
                client.push_blob_file(reference, digest, size, path).await
            }
            Store::Layout { layout, .. } => {
                let (l, d, p) = (layout.clone(), digest.to_string(), path.to_path_buf());
                tokio::task::spawn_blocking(move || l.write_blob_file(&d, &p))
                    .await
                    .map_err(|e| Error::io("blob", io::Error::other(e)))?
            }
        }
    }

    /// Stores a small blob; returns its digest.
    pub async fn push_blob_bytes(&self, data: Bytes) -> Result<String> {
        let digest = sha256_digest(&data);
        match self {
            Store::Registry { client, reference } => {
                client.push_blob_bytes(reference, &digest, data).await?;
            }
            Store::Layout { layout, .. } => {
                layout.write_blob(&data)?;
            }
        }
        Ok(digest)
    }

    /// Copies a blob from another store (a cross-repository mount when possible).
    pub async fn copy_blob_from(&self, src: &Store, desc: &Descriptor) -> Result<()> {
        if self.has_blob(&desc.digest).await? {
            return Ok(());
        }
        if let (
            Store::Registry {
                client, reference, ..
            },
            Store::Registry {
                reference: from, ..
            },
        ) = (self, src)
            && client.mount_blob(reference, from, &desc.digest).await?
        {
            return Ok(());
        }
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("blob");
        let mut reader = src.blob_reader(&desc.digest, Some(desc.size)).await?;
        let p = path.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut f = std::fs::File::create(&p).map_err(|e| Error::io(p.display(), e))?;
            io::copy(&mut reader, &mut f).map_err(|e| Error::io(p.display(), e))?;
            Ok(())
        })
        .await
        .map_err(|e| Error::io("blob", io::Error::other(e)))??;
        self.push_blob_file(&desc.digest, desc.size, &path).await
    }

    /// Stores a manifest (by digest) and, with `tag`, names it. Returns its digest.
    pub async fn push_manifest(
        &self,
        body: Bytes,
        media_type: &str,
        tag: Option<&str>,
    ) -> Result<String> {
        let digest = sha256_digest(&body);
        match self {
            Store::Registry { client, reference } => {
                client
                    .push_manifest(reference, &digest, body.clone(), media_type)
                    .await?;
                if let Some(t) = tag {
                    client
                        .push_manifest(reference, t, body.clone(), media_type)
                        .await?;
                }
            }
            Store::Layout { layout, .. } => {
                layout.write_blob(&body)?;
                if let Some(t) = tag {
                    layout.tag(
                        t,
                        Descriptor {
                            media_type: media_type.to_string(),
                            digest: digest.clone(),
                            size: body.len() as u64,
                            ..Default::default()
                        },
                    )?;
                }
            }
        }
        Ok(digest)
    }

    /// The same repository or layout at tag `tag`.
    pub fn at_tag(&self, tag: &str) -> Store {
        match self {
            Store::Registry { client, reference } => Store::Registry {
                client: client.clone(),
                reference: Reference {
                    tag: Some(tag.to_string()),
                    digest: None,
                    ..reference.clone()
                },
            },
            Store::Layout { layout, .. } => Store::Layout {
                layout: layout.clone(),
                tag: Some(tag.to_string()),
            },
        }
    }

    /// The tag this location names, if any.
    pub fn tag(&self) -> Option<&str> {
        match self {
            Store::Registry { reference, .. } => reference.tag.as_deref(),
            Store::Layout { tag, .. } => tag.as_deref(),
        }
    }
}

/// Streams a registry blob into the channel, resuming after transient failures.
async fn pump(
    client: RegistryClient,
    reference: Reference,
    digest: String,
    first: reqwest::Response,
    tx: mpsc::Sender<Result<Bytes>>,
) {
    let mut received = 0u64;
    let mut resp = Some(first);
    let mut failures = 0u32;
    loop {
        let r = match resp.take() {
            Some(r) => r,
            None => match client.open_blob(&reference, &digest, received).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            },
        };
        let mut stream = r.bytes_stream();
        let mut failed = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(b) => {
                    received += b.len() as u64;
                    if tx.send(Ok(b)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed {
            None => return,
            Some(e) => {
                failures += 1;
                if failures > 4 {
                    let _ = tx
                        .send(Err(Error::Http {
                            url: format!("{reference} blob {digest}"),
                            source: e,
                        }))
                        .await;
                    return;
                }
                warn!(%digest, received, error = %e, "blob download interrupted, resuming");
                tokio::time::sleep(std::time::Duration::from_millis(200 << failures)).await;
            }
        }
    }
}

enum Source {
    File(std::fs::File),
    Channel(mpsc::Receiver<Result<Bytes>>, Bytes),
}

/// A blocking, verifying reader over a blob; see [`Store::blob_reader`].
pub struct BlobReader {
    source: Source,
    hasher: Sha256,
    read: u64,
    digest: String,
    size: Option<u64>,
    verified: bool,
    /// Set once a read failed: later reads fail the same way instead of ending early.
    failed: Option<String>,
}

impl BlobReader {
    fn new(source: Source, digest: &str, size: Option<u64>) -> Self {
        BlobReader {
            source,
            hasher: Sha256::new(),
            read: 0,
            digest: digest.to_string(),
            size,
            verified: false,
            failed: None,
        }
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    fn raw_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.source {
            Source::File(f) => f.read(buf),
            Source::Channel(rx, pending) => {
                while pending.is_empty() {
                    match rx.blocking_recv() {
                        Some(Ok(b)) => *pending = b,
                        Some(Err(e)) => return Err(io::Error::other(e)),
                        None => return Ok(0),
                    }
                }
                let n = pending.len().min(buf.len());
                buf[..n].copy_from_slice(&pending[..n]);
                *pending = pending.slice(n..);
                Ok(n)
            }
        }
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.verified || buf.is_empty() {
            return Ok(0);
        }
        if let Some(f) = &self.failed {
            return Err(io::Error::other(f.clone()));
        }
        let n = match self.raw_read(buf) {
            Ok(n) => n,
            Err(e) => {
                self.failed = Some(format!("reading blob {}: {e}", self.digest));
                return Err(e);
            }
        };
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        if let Some(size) = self.size
            && self.read > size
        {
            return Err(io::Error::other(format!(
                "blob {} is longer than its descriptor's {size} bytes",
                self.digest
            )));
        }
        if n == 0 {
            let actual = format!(
                "sha256:{}",
                hex::encode(std::mem::take(&mut self.hasher).finalize())
            );
            if actual != self.digest {
                return Err(io::Error::other(Error::DigestMismatch {
                    what: "blob".into(),
                    expected: self.digest.clone(),
                    actual,
                }));
            }
            if let Some(size) = self.size
                && self.read != size
            {
                return Err(io::Error::other(format!(
                    "blob {} has {} bytes, its descriptor says {size}",
                    self.digest, self.read
                )));
            }
            self.verified = true;
        }
        Ok(n)
    }
}
