//! Why a pull failed.

/// Why an operation of this crate failed. Each message names what was being done and why it
/// failed, the cause included (so `source()` is not also set: printed as a chain, nothing
/// repeats); the cause stays in the variant's fields for callers that look into it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// containerd (or arbord, asked directly) answered an error; `status.code()` says which.
    #[error("{what}: {} ({:?})", status.message(), status.code())]
    Rpc { what: String, status: tonic::Status },
    /// containerd's socket could not be reached.
    #[error("connecting to containerd at {address}: {cause}")]
    Connect {
        address: String,
        cause: tonic::transport::Error,
    },
    /// The image has no manifest for the platforms asked for.
    #[error("{image} has no manifest for {platforms}")]
    NoPlatform { image: String, platforms: String },
    /// What a layer unpacked to does not hash to the diff ID the config names (containerd's
    /// unpacker fails the same way): the config lies, or the blob does.
    #[error(
        "wrong diff id calculated on extraction of layer {index} ({digest}): the image config says {want}, the layer's content is {got}"
    )]
    WrongDiffId {
        index: usize,
        digest: String,
        want: String,
        got: String,
    },
    /// arbord would not let this image share the snapshot holding one of its chain IDs.
    #[error("arbord refused to share it: {0}")]
    Refused(String),
    /// Something about one layer.
    #[error("layer {index} ({digest}): {cause}")]
    Layer {
        index: usize,
        digest: String,
        cause: Box<Error>,
    },
    /// Anything else, with what was being done.
    #[error("{what}: {cause}")]
    Other {
        what: String,
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A request that cannot be made as asked (e.g. a namespace that is not a header value).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The same error, said to be about layer `index` (`digest`).
    pub(crate) fn in_layer(self, index: usize, digest: &str) -> Error {
        Error::Layer {
            index,
            digest: digest.to_string(),
            cause: Box::new(self),
        }
    }
}

/// Adds what was being done to an error.
pub(crate) trait Context<T> {
    fn ctx(self, what: impl Into<String>) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::Other {
            what: what.into(),
            cause: Box::new(e),
        })
    }
}

/// Names the containerd call a [`tonic::Status`] answered.
pub(crate) trait Rpc<T> {
    fn rpc(self, what: impl Into<String>) -> Result<T>;
}

impl<T> Rpc<T> for std::result::Result<T, tonic::Status> {
    fn rpc(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|status| Error::Rpc {
            what: what.into(),
            status,
        })
    }
}
