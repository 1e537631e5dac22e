//! The shim's errors, and how each reaches containerd (a ttrpc status code containerd maps to
//! its `errdefs`: `NotFound` for a process that is gone, `AlreadyExists` for a reused id...).

use containerd_shim_protos::ttrpc::{self, Code};

/// Everything a task request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No container or exec process with that id in this shim.
    #[error("not found: {0}")]
    NotFound(String),
    /// A container or exec id that this shim already holds.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The request does not fit the process's state (start twice, delete while running...).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A malformed request (bad spec, bad options).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Runtime options of a type this shim does not know.
    #[error(
        "unknown runtime options type {0:?} (want containerd.runc.v1.Options or runtimeoptions.v1.Options)"
    )]
    UnknownOptions(String),
    /// A `runc` invocation failed; carries its output and its JSON log's last error.
    #[error("runc {op}: {source}{log}")]
    Runc {
        op: &'static str,
        #[source]
        source: runc::error::Error,
        /// The last error line of runc's `log.json`, prefixed by ": " (or empty).
        log: String,
    },
    /// An error of the containerd-shim library (mounts, publisher, sockets).
    #[error(transparent)]
    Shim(#[from] containerd_shim::Error),
    /// A system call or file operation.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Nix {
        context: String,
        #[source]
        source: nix::Error,
    },
    #[error("decoding {what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("decoding protobuf {what}: {source}")]
    Protobuf {
        what: &'static str,
        #[source]
        source: containerd_shim_protos::protobuf::Error,
    },
    #[error("parsing runtime options ConfigBody as TOML: {0}")]
    Toml(#[from] toml::de::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub(crate) fn nix(context: impl Into<String>) -> impl FnOnce(nix::Error) -> Error {
        let context = context.into();
        move |source| Error::Nix { context, source }
    }

    fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::InvalidArgument(_)
            | Error::UnknownOptions(_)
            | Error::Json { .. }
            | Error::Protobuf { .. }
            | Error::Toml(_) => Code::INVALID_ARGUMENT,
            Error::Shim(containerd_shim::Error::NotFoundError(_)) => Code::NOT_FOUND,
            _ => Code::UNKNOWN,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_reach_containerd() {
        let status = |e: Error| match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => s.code(),
            other => panic!("{other:?}"),
        };
        assert_eq!(status(Error::NotFound("x".into())), Code::NOT_FOUND);
        assert_eq!(
            status(Error::AlreadyExists("x".into())),
            Code::ALREADY_EXISTS
        );
        assert_eq!(
            status(Error::UnknownOptions("foo".into())),
            Code::INVALID_ARGUMENT
        );
    }
}
