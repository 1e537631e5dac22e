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
    #[serde(deserialize_with = "budget::entries")]
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
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "budget::xattrs"
    )]
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
    #[serde(default, deserialize_with = "budget::prefetch")]
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

/// Counting while deserializing: the number of entries, xattrs and prefetch names a TOC may
/// hold is checked element by element, so a small JSON document of many tiny elements (each
/// costing hundreds of bytes once deserialized) is refused at the limit, not after building
/// it whole. The limits are set for the current thread by [`budget::Scope`] (the reader does
/// this in [`crate::index::decode_toc`]); without a scope nothing is counted.
pub(crate) mod budget {
    use std::cell::Cell;
    use std::collections::BTreeMap;
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

    use super::TocEntry;

    /// Which limit a document went over.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Exceeded {
        Entries,
        Xattrs,
        Prefetch,
    }

    #[derive(Clone, Copy)]
    struct Left {
        entries: usize,
        xattrs: usize,
        prefetch: usize,
    }

    thread_local! {
        static LEFT: Cell<Option<Left>> = const { Cell::new(None) };
        static EXCEEDED: Cell<Option<Exceeded>> = const { Cell::new(None) };
    }

    /// Limits in force on this thread until dropped.
    pub(crate) struct Scope(Option<Left>);

    impl Scope {
        pub(crate) fn new(entries: usize, xattrs: usize, prefetch: usize) -> Scope {
            EXCEEDED.with(|e| e.set(None));
            Scope(LEFT.with(|l| {
                l.replace(Some(Left {
                    entries,
                    xattrs,
                    prefetch,
                }))
            }))
        }

        /// The limit the document went over, if any.
        pub(crate) fn exceeded(&self) -> Option<Exceeded> {
            EXCEEDED.with(Cell::get)
        }
    }

    impl Drop for Scope {
        fn drop(&mut self) {
            LEFT.with(|l| l.set(self.0));
        }
    }

    /// Takes one element of `what`; errors (and records why) when none is left.
    fn take<E: de::Error>(what: Exceeded) -> Result<(), E> {
        LEFT.with(|l| {
            let Some(mut left) = l.get() else {
                return Ok(());
            };
            let n = match what {
                Exceeded::Entries => &mut left.entries,
                Exceeded::Xattrs => &mut left.xattrs,
                Exceeded::Prefetch => &mut left.prefetch,
            };
            if *n == 0 {
                EXCEEDED.with(|e| e.set(Some(what)));
                return Err(E::custom(format!("too many {what:?} in the TOC")));
            }
            *n -= 1;
            l.set(Some(left));
            Ok(())
        })
    }

    struct SeqCounted<T>(Exceeded, PhantomData<T>);

    impl<'de, T: de::Deserialize<'de>> Visitor<'de> for SeqCounted<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            // At most one element past the limit is built (and dropped) before the refusal.
            while let Some(v) = seq.next_element()? {
                take::<A::Error>(self.0)?;
                out.push(v);
            }
            Ok(out)
        }
    }

    pub(super) fn entries<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<TocEntry>, D::Error> {
        d.deserialize_seq(SeqCounted(Exceeded::Entries, PhantomData))
    }

    pub(super) fn prefetch<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_seq(SeqCounted(Exceeded::Prefetch, PhantomData))
    }

    struct XattrMap;

    impl<'de> Visitor<'de> for XattrMap {
        type Value = BTreeMap<String, String>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of xattr names to base64 values")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<String, String>()? {
                take::<A::Error>(Exceeded::Xattrs)?;
                out.insert(k, v);
            }
            Ok(out)
        }
    }

    pub(super) fn xattrs<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, String>, D::Error> {
        d.deserialize_map(XattrMap)
    }
}
