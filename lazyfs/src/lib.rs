//! A read-only FUSE filesystem per layer, built from the layer's validated TOC, that serves
//! file contents through the [`arbor_fetch::Fetcher`] (cache, then registry) and can be
//! stacked under overlayfs as a lower directory.
//!
//! - [`tree`]: the inode tree, built once at mount (hard links share an inode; whiteouts
//!   become the 0/0 character devices overlayfs expects; opaque directories carry
//!   `trusted.overlay.opaque=y`).
//! - [`abi`]: the FUSE kernel protocol, parsed with bounds checks.
//! - [`session`]: FUSE connections served by one process-wide pool of workers over an epoll
//!   set, that can stop and leave their mount to a successor, or adopt one.
//! - [`holder`]: the fd holder that keeps connections alive between two daemons.
//! - [`fs`]: the request handlers of a layer. Metadata requests are answered from the
//!   immutable tree on the FUSE workers; reads are moved onto the tokio runtime, so the
//!   workers never block on the network.
//! - [`push`]: files a reader going through a directory in order will read next, written
//!   into the kernel's page cache ahead of it.
//! - [`mount`]: mounting, adopting, releasing and unmounting a layer.

pub mod abi;
pub mod fs;
pub mod holder;
pub mod mount;
pub mod overlay;
pub mod push;
pub mod session;
pub mod tree;

pub use abi::Negotiated;
pub use mount::{MountOptions, Mounted, Privileges, adopt_layer, mount_layer, mount_layer_with};
