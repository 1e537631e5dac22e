//! Learned start-up sets: which chunks of which layer files a function read, in first-read
//! order, from its container's start until it was ready (see `docs/format.md`, "Start-up
//! sets").
//!
//! arbord learns a set from a cold start on its node; `arbor trace push` attaches it to the
//! image in its registry as an OCI artifact (media type [`MEDIA_TYPE`], artifact type
//! [`ARTIFACT_TYPE`], subject: the image manifest), from where `arbor pull` and arbord fetch it
//! for later cold starts on other nodes, and `arbor convert --prefetch-from` bakes its files
//! into a converted image's prefetch sections.
//!
//! A set is a hint: it is checked against the image it is applied to ([`StartupSet::parse`]
//! bounds its size; [`StartupSet::check_manifest`] refuses a set learned on another image
//! digest) and every read it names is looked up in the layer's own TOC before anything is
//! fetched, so a wrong or stale set may only cost bandwidth, never correctness.

use serde::{Deserialize, Serialize};

/// Media type of a start-up set document (the artifact's one layer).
pub const MEDIA_TYPE: &str = "application/vnd.arbor.startup-set.v1+json";
/// `artifactType` of the OCI artifact manifest that carries a start-up set.
pub const ARTIFACT_TYPE: &str = "application/vnd.arbor.startup-set.v1";
/// The document's schema version.
pub const SCHEMA_VERSION: u32 = 1;
/// Largest document accepted (bytes).
pub const MAX_DOCUMENT: usize = 16 << 20;
/// Most reads (runs of chunks of one file) a set may name.
pub const MAX_READS: usize = 1 << 20;
/// Most chunks a set may name in all.
pub const MAX_CHUNKS: usize = 4 << 20;
/// Most layers a set may name.
pub const MAX_LAYERS: usize = 256;

/// Why a start-up set was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetError {
    #[error("start-up set is {0} bytes, more than the {MAX_DOCUMENT} allowed")]
    TooLarge(usize),
    #[error("start-up set is not valid JSON of schema {SCHEMA_VERSION}: {0}")]
    Syntax(String),
    #[error("start-up set has schema version {0}; this arbor reads {SCHEMA_VERSION}")]
    Version(u32),
    #[error("start-up set names {what} {n}, more than the {max} allowed")]
    Limit {
        what: &'static str,
        n: usize,
        max: usize,
    },
    #[error("start-up set read {read} names layer {layer}, but the set lists {layers} layers")]
    BadLayer {
        read: usize,
        layer: usize,
        layers: usize,
    },
    #[error("start-up set was learned on image {learned}, not {wanted}")]
    OtherImage { learned: String, wanted: String },
    #[error("start-up set names {0:?}, which is not a sha256 digest")]
    BadDigest(String),
}

/// One learned start-up set (the JSON document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartupSet {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// Digest of the image manifest the set was learned on; it is used for that image only.
    pub manifest: String,
    /// The function it was learned from (`arbor.io/function`), if it had a name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// When it was learned (RFC 3339).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub learned: String,
    /// Milliseconds from the container's start to ready, when it was learned.
    #[serde(default, rename = "readyMs", skip_serializing_if = "Option::is_none")]
    pub ready_ms: Option<u64>,
    /// Layer digests (compressed blobs) the reads refer to by index.
    pub layers: Vec<String>,
    /// Reads in first-read order.
    pub reads: Vec<Read>,
}

/// Chunks of one file of one layer, read one after another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Read {
    /// Index into [`StartupSet::layers`].
    pub layer: usize,
    /// The file's name in the layer's TOC.
    pub path: String,
    /// Chunk indexes within the file, in first-read order.
    pub chunks: Vec<u32>,
}

fn check_digest(d: &str) -> Result<(), SetError> {
    crate::Digest::parse(d)
        .map(|_| ())
        .map_err(|_| SetError::BadDigest(d.to_string()))
}

impl StartupSet {
    /// Parses and bounds a document; reads are not checked against any layer here.
    pub fn parse(bytes: &[u8]) -> Result<StartupSet, SetError> {
        if bytes.len() > MAX_DOCUMENT {
            return Err(SetError::TooLarge(bytes.len()));
        }
        let set: StartupSet =
            serde_json::from_slice(bytes).map_err(|e| SetError::Syntax(e.to_string()))?;
        set.validate()?;
        Ok(set)
    }

    /// Checks the version, the limits, the digests and the layer indexes.
    pub fn validate(&self) -> Result<(), SetError> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(SetError::Version(self.schema_version));
        }
        check_digest(&self.manifest)?;
        let limit = |what, n, max| {
            if n > max {
                Err(SetError::Limit { what, n, max })
            } else {
                Ok(())
            }
        };
        limit("layers", self.layers.len(), MAX_LAYERS)?;
        limit("reads", self.reads.len(), MAX_READS)?;
        let chunks: usize = self.reads.iter().map(|r| r.chunks.len()).sum();
        limit("chunks", chunks, MAX_CHUNKS)?;
        for l in &self.layers {
            check_digest(l)?;
        }
        for (i, r) in self.reads.iter().enumerate() {
            if r.layer >= self.layers.len() {
                return Err(SetError::BadLayer {
                    read: i,
                    layer: r.layer,
                    layers: self.layers.len(),
                });
            }
        }
        Ok(())
    }

    /// Refuses a set learned on another image.
    pub fn check_manifest(&self, manifest: &str) -> Result<(), SetError> {
        if self.manifest == manifest {
            Ok(())
        } else {
            Err(SetError::OtherImage {
                learned: self.manifest.clone(),
                wanted: manifest.to_string(),
            })
        }
    }

    /// The reads of layer `digest`: (path, chunk indexes), in first-read order.
    pub fn reads_of<'a>(&'a self, digest: &str) -> impl Iterator<Item = (&'a str, &'a [u32])> {
        let idx = self.layers.iter().position(|l| l == digest);
        self.reads
            .iter()
            .filter(move |r| Some(r.layer) == idx)
            .map(|r| (r.path.as_str(), r.chunks.as_slice()))
    }

    /// The files the set reads, in first-read order, each once (what `arbor convert
    /// --prefetch-from` makes a prefetch list of).
    pub fn paths(&self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        self.reads
            .iter()
            .filter(|r| seen.insert(r.path.as_str()))
            .map(|r| r.path.clone())
            .collect()
    }

    /// Number of chunks named.
    pub fn chunk_count(&self) -> usize {
        self.reads.iter().map(|r| r.chunks.len()).sum()
    }

    /// The JSON document.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Appends chunk `chunk` of `path` in layer `layer` (index), extending the last read when
    /// it is of the same file.
    pub fn push(&mut self, layer: usize, path: &str, chunk: u32) {
        match self.reads.last_mut() {
            Some(r) if r.layer == layer && r.path == path => r.chunks.push(chunk),
            _ => self.reads.push(Read {
                layer,
                path: path.to_string(),
                chunks: vec![chunk],
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const L: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn set() -> StartupSet {
        let mut s = StartupSet {
            schema_version: SCHEMA_VERSION,
            manifest: M.into(),
            function: Some("f".into()),
            learned: String::new(),
            ready_ms: Some(5),
            layers: vec![L.into()],
            reads: Vec::new(),
        };
        s.push(0, "usr/bin/python3", 0);
        s.push(0, "usr/bin/python3", 1);
        s.push(0, "app/main.py", 0);
        s.push(0, "usr/bin/python3", 3);
        s
    }

    #[test]
    fn round_trips_and_merges_runs() {
        let s = set();
        assert_eq!(s.reads.len(), 3);
        assert_eq!(s.reads[0].chunks, vec![0, 1]);
        assert_eq!(s.chunk_count(), 4);
        let back = StartupSet::parse(&s.to_json()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.paths(), vec!["usr/bin/python3", "app/main.py"]);
        let of: Vec<_> = back.reads_of(L).collect();
        assert_eq!(of.len(), 3);
        assert_eq!(back.reads_of(M).count(), 0);
    }

    #[test]
    fn refuses_bad_documents() {
        assert!(matches!(StartupSet::parse(b"{}"), Err(SetError::Syntax(_))));
        let mut s = set();
        s.schema_version = 2;
        assert_eq!(StartupSet::parse(&s.to_json()), Err(SetError::Version(2)));
        let mut s = set();
        s.reads[1].layer = 3;
        assert!(matches!(
            StartupSet::parse(&s.to_json()),
            Err(SetError::BadLayer { layer: 3, .. })
        ));
        let mut s = set();
        s.layers[0] = "sha256:../../etc".into();
        assert!(matches!(
            StartupSet::parse(&s.to_json()),
            Err(SetError::BadDigest(_))
        ));
        assert!(matches!(
            StartupSet::parse(&vec![b' '; MAX_DOCUMENT + 1]),
            Err(SetError::TooLarge(_))
        ));
        let mut s = set();
        s.reads = (0..MAX_READS + 1)
            .map(|i| Read {
                layer: 0,
                path: format!("f{i}"),
                chunks: vec![],
            })
            .collect();
        assert!(matches!(
            s.validate(),
            Err(SetError::Limit { what: "reads", .. })
        ));
        assert!(set().check_manifest(M).is_ok());
        assert!(matches!(
            set().check_manifest(L),
            Err(SetError::OtherImage { .. })
        ));
    }
}
