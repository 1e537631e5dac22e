//! Converts OCI images to Arbor's lazy layer format, and inspects and checks converted images.
//!
//! - [`convert::convert_image`]: every layer of every (selected) platform is streamed from the
//!   source, decompressed, rewritten by [`arbor_format::writer::convert_layer`] into a temporary
//!   file, and uploaded; configs get new `rootfs.diff_ids`, manifests and indexes new digests.
//!   Source blobs are verified against their digests and diff IDs on the way.
//! - [`inspect::inspect_image`]: layers, formats, sizes and a TOC summary, reading only TOCs.
//! - [`check::check_images`]: proves two images hold the same files, layer by layer.

pub mod check;
pub mod convert;
pub mod error;
pub mod image;
pub mod infer;
pub mod inspect;
pub mod progress;
pub mod verify;

pub use error::{Error, Result};
