//! Errors of the config crate. Each says what went wrong and which field or key it concerns, so
//! the binary can turn it into a JSON error, an HTTP status or an exit code without rewording it.

use thiserror::Error;

/// One field of a request or a record that does not pass validation.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The field's path as the user wrote it, e.g. `backends[1]`.
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Failures of a [`crate::store::Store`] backend. `Clone`, because one failed commit of the
/// embedded store answers every write committed with it.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    #[error("the state store cannot be opened at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("state store I/O failed: {0}")]
    Backend(String),
    #[error("stored value at `{key}` is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "revision {requested} was compacted (oldest kept is {compacted_through} + 1); re-read the prefix and watch from its revision"
    )]
    Compacted {
        requested: i64,
        compacted_through: i64,
    },
    #[error("lease {0:#x} does not exist or has expired")]
    LeaseNotFound(i64),
    #[error("the state store is closed")]
    Closed,
    /// The store (etcd) cannot be reached now: no write is made; reads may come from the
    /// node's cached copy. Says which endpoints were tried and why they failed.
    #[error("the state store is unreachable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Invalid(String),
}

/// Failures of the typed operations on platform state (services, certificates, ...).
#[derive(Debug, Error)]
pub enum StateError {
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error("{kind} `{id}` does not exist")]
    NotFound { kind: &'static str, id: String },
    /// It existed and was deleted; its id is never given out again.
    #[error("{kind} `{id}` was deleted")]
    Deleted { kind: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    /// A request refused by a rule with its own code (`400`), e.g. `public_suffix`.
    #[error("{field}: {message}")]
    Invalid {
        code: &'static str,
        field: &'static str,
        message: String,
    },
    /// A request that conflicts with what is stored (`409`), e.g. `domain_taken`.
    #[error("{message}")]
    Claimed { code: &'static str, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot encode or decode `{key}`: {reason}")]
    Codec { key: String, reason: String },
    #[error(transparent)]
    Seal(#[from] crate::seal::SealError),
}

/// An error with its sources, `outer: inner: innermost`: what went wrong down to the cause
/// (e.g. "client error (Connect): tcp connect error: Connection refused").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
