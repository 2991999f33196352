//! The domain error: one enum at the service boundary, its variants named by what the caller
//! should do. Internal causes are logged, never sent to clients.

/// What went wrong, from the caller's point of view.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is wrong: fix it before retrying.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The offending request field, e.g. `note.note_id`.
        field: String,
        /// What is wrong with it, including the limit where one applies.
        reason: String,
    },
    /// Not ready yet (model loading) or shutting down: retry later, maybe elsewhere.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Too much work queued: back off and retry, after about `retry_after_ms`.
    #[error("overloaded: {message}")]
    Overloaded {
        /// What is full.
        message: String,
        /// A hint: roughly when a slot should be free (milliseconds).
        retry_after_ms: u64,
    },
    /// The caller went away or the deadline passed.
    #[error("cancelled")]
    Cancelled,
    /// A bug or a broken dependency (store, model): not the caller's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Wraps an internal failure; the cause is kept for logs.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Error::Internal(cause.to_string())
    }
}

/// Result alias for the domain.
pub type Result<T, E = Error> = std::result::Result<T, E>;
