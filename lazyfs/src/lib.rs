//! A read-only FUSE filesystem per layer, built from the layer's validated TOC, that serves
//! file contents through the [`arbor_fetch::Fetcher`] (cache, then registry) and can be
//! stacked under overlayfs as a lower directory.
//!
//! - [`tree`]: the inode tree, built once at mount (hard links share an inode; whiteouts
//!   become the 0/0 character devices overlayfs expects; opaque directories carry
//!   `trusted.overlay.opaque=y`).
//! - [`fs`]: the `fuser::Filesystem` implementation. Metadata requests are answered from the
//!   immutable tree on the FUSE threads; reads are moved onto the tokio runtime, so FUSE
//!   threads never block on the network.
//! - [`mount`]: mounting (multi-threaded session, cloned `/dev/fuse` fds) and unmounting.

pub mod fs;
pub mod mount;
pub mod overlay;
pub mod tree;

pub use mount::{MountOptions, Mounted, Privileges, mount_layer, mount_layer_with};
