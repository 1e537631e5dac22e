//! Image references: `REGISTRY/REPO[:TAG][@DIGEST]` (Docker's normalization rules), with an
//! optional `docker://` prefix, and OCI layouts as `oci:DIR[:TAG]`.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// Docker Hub's registry name in references.
pub const DOCKER_HUB: &str = "docker.io";
/// Docker Hub's API endpoint.
pub const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";

/// A reference to an image in a registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host\[:port\] as named (`docker.io` for Docker Hub).
    pub registry: String,
    /// Repository path, e.g. `library/python`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    /// Parses a reference; a bare name gets Docker Hub and `latest` as Docker does.
    pub fn parse(s: &str) -> Result<Reference> {
        let bad = |reason: &str| Error::Reference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        let s2 = s.strip_prefix("docker://").unwrap_or(s);
        if s2.is_empty() {
            return Err(bad("empty"));
        }
        let (rest, digest) = match s2.split_once('@') {
            Some((r, d)) => {
                if !d.starts_with("sha256:")
                    || d.len() != 71
                    || !d[7..]
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                {
                    return Err(bad("digest must be sha256:<64 lowercase hex>"));
                }
                (r, Some(d.to_string()))
            }
            None => (s2, None),
        };
        // A tag is after the last ':' that comes after the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (
                &rest[..last_slash + i],
                Some(rest[last_slash + i + 1..].to_string()),
            ),
            None => (rest, None),
        };
        if let Some(t) = &tag
            && (t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                || t.starts_with(['.', '-']))
        {
            return Err(bad("invalid tag"));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.is_empty()
            || !repository.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            })
        {
            return Err(bad("repository must be lowercase path components"));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// Host to connect to (Docker Hub's endpoint for `docker.io`).
    pub fn endpoint(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_ENDPOINT
        } else {
            &self.registry
        }
    }

    /// What to ask the registry for: the digest if given, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The same repository at another tag or digest.
    pub fn with_digest(&self, digest: &str) -> Reference {
        Reference {
            digest: Some(digest.to_string()),
            tag: None,
            ..self.clone()
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Where an image lives: a registry or an OCI layout directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLocation {
    Registry(Reference),
    /// `oci:DIR[:TAG]`; without a tag the layout must hold exactly one image.
    Layout {
        dir: PathBuf,
        tag: Option<String>,
    },
}

impl ImageLocation {
    /// Parses `oci:DIR[:TAG]`, `docker://REF` or a plain registry reference.
    pub fn parse(s: &str) -> Result<ImageLocation> {
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') => (d, Some(t.to_string())),
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(Error::Reference {
                    reference: s.to_string(),
                    reason: "oci: needs a directory".into(),
                });
            }
            return Ok(ImageLocation::Layout {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        Reference::parse(s).map(ImageLocation::Registry)
    }
}

impl fmt::Display for ImageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageLocation::Registry(r) => write!(f, "{r}"),
            ImageLocation::Layout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            ImageLocation::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_normalization() {
        let r = Reference::parse("python").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/python", Some("latest"))
        );
        assert_eq!(r.endpoint(), "registry-1.docker.io");
        let r = Reference::parse("127.0.0.1:5000/fn/app:v1").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "fn/app");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("docker://localhost/x@{d}")).unwrap();
        assert_eq!(r.manifest_ref(), d);
        assert_eq!(r.tag, None);
        let r = Reference::parse("localhost:5000/a/b").unwrap();
        assert_eq!(r.to_string(), "localhost:5000/a/b:latest");
        for bad in ["", "UPPER/x", "a//b", "x:", "x@sha256:12", "x:-bad"] {
            assert!(Reference::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn layout_locations() {
        assert_eq!(
            ImageLocation::parse("oci:/tmp/l:v1").unwrap(),
            ImageLocation::Layout {
                dir: "/tmp/l".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImageLocation::parse("oci:./dir").unwrap(),
            ImageLocation::Layout {
                dir: "./dir".into(),
                tag: None
            }
        );
        assert!(matches!(
            ImageLocation::parse("127.0.0.1:5000/a:b").unwrap(),
            ImageLocation::Registry(_)
        ));
    }
}
