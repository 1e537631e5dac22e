//! Manifest, index and descriptor types (OCI and Docker schema 2), preserving unknown fields
//! so that rewriting an image keeps everything it does not need to change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// OCI annotation naming a tag in an OCI layout's index.
pub const ANN_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Largest manifest or config read into memory.
pub const MAX_CONFIG_OR_MANIFEST: u64 = 8 << 20;

/// Media types accepted when fetching a manifest.
pub const ACCEPT_MANIFESTS: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

/// A content descriptor.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The platform of an index entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Platform {
    /// `os/arch[/variant]`.
    pub fn label(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }

    /// Whether `spec` (`os/arch[/variant]` or `arch`) selects this platform.
    pub fn matches(&self, spec: &str) -> bool {
        let parts: Vec<&str> = spec.split('/').collect();
        match parts.as_slice() {
            [arch] => self.architecture == *arch,
            [os, arch] => self.os == *os && self.architecture == *arch,
            [os, arch, variant] => {
                self.os == *os
                    && self.architecture == *arch
                    && self.variant.as_deref() == Some(*variant)
            }
            _ => false,
        }
    }
}

/// An image manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An image index (or Docker manifest list).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Index {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A fetched manifest document of either kind.
#[derive(Debug, Clone)]
pub enum ManifestKind {
    Image(Box<Manifest>),
    Index(Index),
}

/// Parses manifest bytes, using the declared media type or the document's own field.
pub fn parse_manifest(bytes: &[u8], declared: &str) -> Result<ManifestKind> {
    let malformed = |reason: String| Error::Malformed {
        what: "manifest".into(),
        reason,
    };
    let v: Value = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    let mt = v
        .get("mediaType")
        .and_then(Value::as_str)
        .unwrap_or(declared)
        .to_string();
    let is_index = match mt.as_str() {
        OCI_INDEX | DOCKER_MANIFEST_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        _ => v.get("manifests").is_some(),
    };
    if v.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
        return Err(malformed("schemaVersion must be 2".into()));
    }
    if is_index {
        serde_json::from_value(v)
            .map(ManifestKind::Index)
            .map_err(|e| malformed(e.to_string()))
    } else {
        serde_json::from_value(v)
            .map(|m| ManifestKind::Image(Box::new(m)))
            .map_err(|e| malformed(e.to_string()))
    }
}

/// Serializes a document the way Arbor pushes it (compact JSON; key order as declared).
pub fn to_bytes<T: Serialize>(doc: &T) -> Vec<u8> {
    serde_json::to_vec(doc).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_unknown_fields() {
        let doc = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
          "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:aa","size":3},
          "layers":[{"mediaType":"m","digest":"sha256:bb","size":4,"urls":["u"]}],
          "subject":{"mediaType":"x","digest":"sha256:cc","size":1},"artifactType":"t"}"#;
        let ManifestKind::Image(m) = parse_manifest(doc, "").unwrap() else {
            panic!("not an image")
        };
        assert_eq!(m.layers[0].extra["urls"][0], "u");
        let out: Value = serde_json::from_slice(&to_bytes(&m)).unwrap();
        assert_eq!(out["subject"]["digest"], "sha256:cc");
        assert_eq!(out["artifactType"], "t");
        assert!(parse_manifest(b"{}", OCI_MANIFEST).is_err());
        assert!(parse_manifest(b"not json", OCI_MANIFEST).is_err());
    }

    #[test]
    fn platform_matching() {
        let p = Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            variant: Some("v8".into()),
            extra: Map::new(),
        };
        assert!(p.matches("linux/arm64"));
        assert!(p.matches("arm64"));
        assert!(p.matches("linux/arm64/v8"));
        assert!(!p.matches("linux/amd64"));
        assert_eq!(p.label(), "linux/arm64/v8");
    }
}
