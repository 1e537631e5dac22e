//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/sha256/...`).
//!
//! Blob paths are built only from validated digests, and files are written through a
//! temporary name and renamed, so a crash never leaves a torn blob or index.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::manifest::{ANN_REF_NAME, Descriptor, Index, OCI_INDEX};

/// Checks `sha256:<64 lowercase hex>` and returns the hex part.
pub fn digest_hex(digest: &str) -> Result<&str> {
    let hex_part = digest.strip_prefix("sha256:").unwrap_or("");
    if hex_part.len() == 64
        && hex_part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(hex_part)
    } else {
        Err(Error::Malformed {
            what: "digest".into(),
            reason: format!("{digest:?} is not sha256:<64 lowercase hex>"),
        })
    }
}

/// The sha256 digest string of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// An OCI layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    dir: PathBuf,
}

impl OciLayout {
    /// Opens an existing layout.
    pub fn open(dir: &Path) -> Result<OciLayout> {
        let marker = dir.join("oci-layout");
        if !marker.exists() {
            return Err(Error::NotFound(format!(
                "{} is not an OCI layout (no oci-layout file)",
                dir.display()
            )));
        }
        Ok(OciLayout {
            dir: dir.to_path_buf(),
        })
    }

    /// Opens a layout, creating an empty one if the directory has none.
    pub fn create(dir: &Path) -> Result<OciLayout> {
        std::fs::create_dir_all(dir.join("blobs/sha256"))
            .map_err(|e| Error::io(dir.display(), e))?;
        let l = OciLayout {
            dir: dir.to_path_buf(),
        };
        if !dir.join("oci-layout").exists() {
            l.write_atomic(
                &dir.join("oci-layout"),
                br#"{"imageLayoutVersion":"1.0.0"}"#,
            )?;
        }
        if !dir.join("index.json").exists() {
            let index = Index {
                schema_version: 2,
                media_type: Some(OCI_INDEX.into()),
                manifests: vec![],
                annotations: Default::default(),
                extra: Default::default(),
            };
            l.write_atomic(&dir.join("index.json"), &crate::manifest::to_bytes(&index))?;
        }
        Ok(l)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a blob (the digest is validated first).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.dir.join("blobs/sha256").join(digest_hex(digest)?))
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<()> {
        let parent = path.parent().unwrap_or(&self.dir);
        let mut tmp =
            tempfile::NamedTempFile::new_in(parent).map_err(|e| Error::io(parent.display(), e))?;
        tmp.write_all(data)
            .map_err(|e| Error::io(path.display(), e))?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| Error::io(path.display(), e))?;
        tmp.persist(path)
            .map_err(|e| Error::io(path.display(), e.error))?;
        Ok(())
    }

    pub fn read_index(&self) -> Result<Index> {
        let p = self.dir.join("index.json");
        let data = std::fs::read(&p).map_err(|e| Error::io(p.display(), e))?;
        serde_json::from_slice(&data).map_err(|e| Error::Malformed {
            what: p.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// The descriptor tagged `tag`, or the only one when `tag` is `None`.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor> {
        let index = self.read_index()?;
        match tag {
            Some(t) => index
                .manifests
                .into_iter()
                .find(|d| d.annotations.get(ANN_REF_NAME).map(String::as_str) == Some(t))
                .ok_or_else(|| Error::NotFound(format!("tag {t:?} in {}", self.dir.display()))),
            None if index.manifests.len() == 1 => Ok(index.manifests[0].clone()),
            None => Err(Error::NotFound(format!(
                "{} holds {} images; name one as oci:DIR:TAG",
                self.dir.display(),
                index.manifests.len()
            ))),
        }
    }

    pub fn has_blob(&self, digest: &str) -> Result<bool> {
        Ok(self.blob_path(digest)?.exists())
    }

    /// Reads a whole blob (at most `max` bytes), verifying its digest.
    pub fn read_blob(&self, digest: &str, max: u64) -> Result<Vec<u8>> {
        let p = self.blob_path(digest)?;
        let len = std::fs::metadata(&p)
            .map_err(|e| Error::io(p.display(), e))?
            .len();
        if len > max {
            return Err(Error::Malformed {
                what: digest.to_string(),
                reason: format!("{len} bytes, more than the {max} allowed"),
            });
        }
        let data = std::fs::read(&p).map_err(|e| Error::io(p.display(), e))?;
        let actual = sha256_digest(&data);
        if actual != digest {
            return Err(Error::DigestMismatch {
                what: p.display().to_string(),
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(data)
    }

    /// Stores a blob from a file already known to have `digest` (copied, never moved).
    pub fn write_blob_file(&self, digest: &str, src: &Path) -> Result<()> {
        let dst = self.blob_path(digest)?;
        if dst.exists() {
            return Ok(());
        }
        let parent = dst.parent().unwrap_or(&self.dir);
        let tmp =
            tempfile::NamedTempFile::new_in(parent).map_err(|e| Error::io(parent.display(), e))?;
        std::fs::copy(src, tmp.path()).map_err(|e| Error::io(src.display(), e))?;
        tmp.persist(&dst)
            .map_err(|e| Error::io(dst.display(), e.error))?;
        Ok(())
    }

    /// Stores a blob held in memory.
    pub fn write_blob(&self, data: &[u8]) -> Result<String> {
        let digest = sha256_digest(data);
        let dst = self.blob_path(&digest)?;
        if !dst.exists() {
            self.write_atomic(&dst, data)?;
        }
        Ok(digest)
    }

    /// Points `tag` at `desc` in `index.json` (replacing what the tag named before).
    pub fn tag(&self, tag: &str, mut desc: Descriptor) -> Result<()> {
        let mut index = self.read_index()?;
        index
            .manifests
            .retain(|d| d.annotations.get(ANN_REF_NAME).map(String::as_str) != Some(tag));
        desc.annotations.insert(ANN_REF_NAME.into(), tag.into());
        index.manifests.push(desc);
        self.write_atomic(
            &self.dir.join("index.json"),
            &crate::manifest::to_bytes(&index),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_digests_never_become_paths() {
        let d = tempfile::tempdir().unwrap();
        let l = OciLayout::create(d.path()).unwrap();
        for bad in [
            "sha256:../../etc/passwd",
            "sha256:",
            "md5:abc",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(l.blob_path(bad).is_err(), "{bad}");
        }
        let digest = l.write_blob(b"hello").unwrap();
        assert_eq!(l.read_blob(&digest, 100).unwrap(), b"hello");
        std::fs::write(l.blob_path(&digest).unwrap(), b"jello").unwrap();
        assert!(matches!(
            l.read_blob(&digest, 100),
            Err(Error::DigestMismatch { .. })
        ));
    }
}
