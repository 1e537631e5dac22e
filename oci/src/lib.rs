//! OCI image access for Arbor: image references, manifest types, a registry client (auth from
//! `~/.docker/config.json`, bearer-token refresh, retries, ranged reads, streaming uploads) and
//! OCI layout directories, behind one [`store::Store`] type.
//!
//! The registry client is also the lazy fetcher's registry source: it answers
//! [`registry::RegistryClient::get_blob_range`] with exactly the requested bytes or an error.

pub mod auth;
pub mod error;
pub mod layout;
pub mod manifest;
pub mod reference;
pub mod referrers;
pub mod registry;
pub mod store;

pub use error::{Error, Result};
pub use reference::{ImageLocation, Reference};
pub use store::Store;

/// Installs the process-wide TLS crypto provider (ring). Idempotent.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
