//! The table of contents as serialized in the blob: zstd:chunked's JSON plus Arbor's extension.
//!
//! Field names and types follow containers/storage (`pkg/chunked/internal`), so its readers
//! read Arbor layers and Arbor reads theirs. Unknown fields are ignored on input; Arbor's own
//! data lives under the top-level key `arbor`, which zstd:chunked readers ignore.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// `type` values of TOC entries.
pub mod types {
    pub const REG: &str = "reg";
    pub const CHUNK: &str = "chunk";
    pub const HARDLINK: &str = "hardlink";
    pub const SYMLINK: &str = "symlink";
    pub const DIR: &str = "dir";
    pub const CHAR: &str = "char";
    pub const BLOCK: &str = "block";
    pub const FIFO: &str = "fifo";
}

/// `chunkType` of a chunk whose content is all zeros (readers need not fetch it).
pub const CHUNK_TYPE_ZEROS: &str = "zeros";

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

/// The whole TOC document.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Toc {
    pub version: i64,
    pub entries: Vec<TocEntry>,
    #[serde(
        rename = "tarSplitDigest",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub tar_split_digest: String,
    /// Arbor's additions; absent in layers written by other tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arbor: Option<ArborExtension>,
}

/// One TOC entry (a file, or one further chunk of a file).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TocEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    #[serde(rename = "linkName", default, skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub mode: i64,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub size: i64,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub uid: i64,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub gid: i64,
    #[serde(rename = "userName", default, skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    #[serde(
        rename = "groupName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub group_name: String,
    /// RFC 3339 with nanoseconds, as Go's `time.Time` marshals.
    #[serde(rename = "modtime", default, skip_serializing_if = "Option::is_none")]
    pub mod_time: Option<String>,
    #[serde(rename = "devMajor", default, skip_serializing_if = "is_zero_i64")]
    pub dev_major: i64,
    #[serde(rename = "devMinor", default, skip_serializing_if = "is_zero_i64")]
    pub dev_minor: i64,
    /// Extended attributes, values base64 (standard alphabet, padded).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// sha256 of the whole file's content (regular files with content).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Blob offset of the first byte of this chunk's zstd frame(s).
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub offset: i64,
    /// Blob offset one past the last byte of this chunk's frame(s).
    #[serde(rename = "endOffset", default, skip_serializing_if = "is_zero_i64")]
    pub end_offset: i64,
    #[serde(rename = "chunkSize", default, skip_serializing_if = "is_zero_i64")]
    pub chunk_size: i64,
    #[serde(rename = "chunkOffset", default, skip_serializing_if = "is_zero_i64")]
    pub chunk_offset: i64,
    #[serde(
        rename = "chunkDigest",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub chunk_digest: String,
    #[serde(
        rename = "chunkType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub chunk_type: String,
}

/// What Arbor records beyond zstd:chunked.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ArborExtension {
    /// Format version ([`crate::ARBOR_FORMAT_VERSION`]).
    pub version: u32,
    /// Names of the prefetch entries in start-up order; their frames form the blob's first
    /// `prefetchEnd` bytes.
    #[serde(default)]
    pub prefetch: Vec<String>,
    /// End offset of the prefetch section (0 when there is none).
    #[serde(rename = "prefetchEnd", default)]
    pub prefetch_end: u64,
    /// Size of the blocks the block table covers.
    #[serde(rename = "blockSize")]
    pub block_size: u64,
    /// Length of the region the block table covers: the blob up to the TOC's skippable frame.
    #[serde(rename = "dataLength")]
    pub data_length: u64,
    /// sha256 of each `blockSize` block of that region (the last may be shorter).
    pub blocks: Vec<Digest>,
    /// Chunk size the writer used.
    #[serde(rename = "chunkSize")]
    pub chunk_size: u64,
}
