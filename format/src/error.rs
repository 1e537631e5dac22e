//! Errors of the layer format: every way a blob, TOC or tar stream can be wrong.

use std::io;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong reading or writing a layer. Messages name the entry or offset at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("malformed tar stream at byte {offset}: {reason}")]
    Tar { offset: u64, reason: String },
    #[error("unsafe entry name {name:?}: {reason}")]
    UnsafePath { name: String, reason: &'static str },
    #[error("unsupported tar entry {name:?}: {reason}")]
    Unsupported { name: String, reason: String },
    #[error("malformed footer: {0}")]
    Footer(String),
    #[error("malformed TOC: {0}")]
    Toc(String),
    #[error("TOC too large: {what} is {size} bytes, the limit is {limit}")]
    TocTooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("TOC exceeds a reader limit: more than {limit} {what}")]
    TocLimit { what: &'static str, limit: u64 },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("malformed digest {0:?}")]
    BadDigest(String),
    #[error("malformed annotation {key}={value:?}: {reason}")]
    Annotation {
        key: String,
        value: String,
        reason: &'static str,
    },
    #[error("corrupt chunk of {name:?} at blob offset {offset}: {reason}")]
    Chunk {
        name: String,
        offset: u64,
        reason: String,
    },
    #[error("invalid option: {0}")]
    Options(String),
}

impl Error {
    pub(crate) fn toc(msg: impl Into<String>) -> Self {
        Error::Toc(msg.into())
    }
}
