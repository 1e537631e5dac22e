//! Arbor's lazy layer format: reads and writes `tar+zstd` layers in the zstd:chunked layout.
//!
//! A converted layer is an ordinary `application/vnd.oci.image.layer.v1.tar+zstd` blob (any
//! runtime can unpack it) whose regular-file contents sit in independent zstd frames, so a
//! reader can fetch and decompress any file chunk alone with one HTTP Range request. A table of
//! contents (TOC) in a zstd skippable frame near the end lists every entry with the blob offsets
//! and sha256 digests of its chunks; a footer frame at the very end locates the TOC. Arbor adds
//! a prefetch section (the files a function reads at start-up, placed first) and a table of
//! digests of fixed-size blocks of the compressed blob, for verifying blocks relayed by peers.
//!
//! `docs/format.md` in the repository specifies the layout byte by byte. The modules:
//! - [`tarstream`]: a streaming, hostile-input-safe tar parser that keeps each entry's raw headers;
//! - [`writer`]: tar stream in, chunked layer out ([`writer::convert_layer`]);
//! - [`toc`], [`footer`]: the serialized TOC and footer, both footer generations;
//! - [`index`]: a validated view of a TOC for readers, and chunk decoding with verification;
//! - [`tree`]: the directory tree a validated index describes (what the lazy filesystem serves);
//! - [`startup`]: learned start-up sets (which chunks a function reads to start), as stored and
//!   shipped beside an image.

pub mod digest;
pub mod error;
pub mod footer;
pub mod index;
pub mod path;
pub mod startup;
pub mod tarstream;
pub mod toc;
pub mod tree;
pub mod writer;

pub use digest::Digest;
pub use error::{Error, Result};

/// OCI media type of a zstd-compressed tar layer (what a converted layer declares).
pub const MEDIA_TYPE_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// OCI media type of a gzip-compressed tar layer.
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI media type of an uncompressed tar layer.
pub const MEDIA_TYPE_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Docker schema 2 gzip layer.
pub const MEDIA_TYPE_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker schema 2 foreign (non-distributable) gzip layer.
pub const MEDIA_TYPE_DOCKER_FOREIGN_LAYER: &str =
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// Annotation keys that locate the TOC, as written by containers/storage (current generation).
pub const ANN_ZSTD_CHUNKED_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";
/// Digest (sha256 of the compressed TOC bytes), current generation.
pub const ANN_ZSTD_CHUNKED_CHECKSUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";
/// Older containers/storage key for the TOC position.
pub const ANN_ZSTD_CHUNKED_POSITION_OLD: &str = "io.containers.zstd-chunked.manifest-position";
/// Older containers/storage key for the TOC digest.
pub const ANN_ZSTD_CHUNKED_CHECKSUM_OLD: &str = "io.containers.zstd-chunked.manifest-checksum";

/// Prefix under which containerd forwards layer annotations to snapshotters as labels.
pub const SNAPSHOT_LABEL_PREFIX: &str = "containerd.io/snapshot/";
/// Arbor's copy of the TOC position (`offset:length:uncompressedLength:1`).
pub const ANN_ARBOR_TOC_POSITION: &str = "containerd.io/snapshot/arbor.toc-position";
/// Arbor's copy of the TOC digest.
pub const ANN_ARBOR_TOC_DIGEST: &str = "containerd.io/snapshot/arbor.toc-digest";
/// Arbor format version of the layer (`1`).
pub const ANN_ARBOR_VERSION: &str = "containerd.io/snapshot/arbor.version";
/// Size in bytes of the compressed layer blob (containerd does not pass it to snapshotters).
pub const ANN_ARBOR_BLOB_SIZE: &str = "containerd.io/snapshot/arbor.blob-size";
/// Digest of the uncompressed tar (the layer's diff ID).
pub const ANN_ARBOR_DIFF_ID: &str = "containerd.io/snapshot/arbor.diff-id";

/// The Arbor format version written by this crate.
pub const ARBOR_FORMAT_VERSION: u32 = 1;
