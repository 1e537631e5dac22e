//! Errors of conversion, inspection and checking.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Oci(#[from] arbor_oci::Error),
    #[error(transparent)]
    Format(#[from] arbor_format::Error),
    #[error(transparent)]
    Toc(#[from] arbor_fetch::toc::TocError),
    #[error("layer {digest}")]
    Layer {
        digest: String,
        #[source]
        source: Box<Error>,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("invalid image: {0}")]
    Image(String),
    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub(crate) fn layer(digest: &str, e: impl Into<Error>) -> Error {
        Error::Layer {
            digest: digest.to_string(),
            source: Box::new(e.into()),
        }
    }

    /// Unwraps I/O errors that carry a library error (as blob readers produce).
    pub(crate) fn from_io(e: std::io::Error) -> Error {
        if e.get_ref().is_none() {
            return Error::Io(e);
        }
        let kind = e.kind();
        let Some(inner) = e.into_inner() else {
            return Error::Io(kind.into());
        };
        match inner.downcast::<arbor_oci::Error>() {
            Ok(o) => Error::Oci(*o),
            Err(inner) => match inner.downcast::<arbor_format::Error>() {
                Ok(f) => Error::Format(*f),
                Err(other) => Error::Io(std::io::Error::new(kind, other)),
            },
        }
    }
}

pub use arbor_oci::error::chain;
