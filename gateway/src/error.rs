//! The gateway's errors, each with the HTTP status it answers with.

/// What can go wrong serving a function request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad definition, name or request (400).
    #[error("{0}")]
    Invalid(String),
    /// No such function (404).
    #[error("no function {0:?}")]
    NotFound(String),
    /// Missing or wrong bearer token (401).
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// The request body is over the limit (413).
    #[error("the request body is over the limit of {0} bytes")]
    TooLarge(usize),
    /// The queue of waiting requests is full (429).
    #[error("function {function}: {waiting} requests already wait for an instance (queue_limit)")]
    QueueFull { function: String, waiting: usize },
    /// No instance became free in time (503).
    #[error("function {0}: no instance became free within queue_timeout_secs")]
    QueueTimeout(String),
    /// The function could not be started (502): why.
    #[error("function {function} failed to start: {why}")]
    StartFailed { function: String, why: String },
    /// The instance failed while serving (502).
    #[error("instance {instance} failed while serving the request: {why}")]
    InstanceFailed { instance: String, why: String },
    /// The instance took too long (504).
    #[error("instance {instance} did not answer within {secs} s")]
    Timeout { instance: String, secs: u64 },
    /// The function is being removed (409).
    #[error("function {0} is being removed")]
    Removing(String),
    /// Our own failure (500).
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> u16 {
        match self {
            Error::Invalid(_) => 400,
            Error::Unauthorized => 401,
            Error::NotFound(_) => 404,
            Error::Removing(_) => 409,
            Error::TooLarge(_) => 413,
            Error::QueueFull { .. } => 429,
            Error::Internal(_) => 500,
            Error::StartFailed { .. } | Error::InstanceFailed { .. } => 502,
            Error::QueueTimeout(_) => 503,
            Error::Timeout { .. } => 504,
        }
    }

    /// A short machine-readable kind, for JSON error bodies and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid",
            Error::Unauthorized => "unauthorized",
            Error::NotFound(_) => "not_found",
            Error::Removing(_) => "removing",
            Error::TooLarge(_) => "too_large",
            Error::QueueFull { .. } => "queue_full",
            Error::Internal(_) => "internal",
            Error::StartFailed { .. } => "start_failed",
            Error::InstanceFailed { .. } => "instance_failed",
            Error::QueueTimeout(_) => "queue_timeout",
            Error::Timeout { .. } => "timeout",
        }
    }

    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |e| Error::Internal(format!("{what}: {e}"))
    }
}
