//! Why a request was not proxied, whose fault that was, and what the visitor is told: one type
//! and one mapping to a status and a page, as pingora records who is at fault and rustls maps
//! each error to one alert. The page is written for the visitor and names nothing of the
//! platform's inside (backend addresses, error chains); those go to the node's log only.

use std::time::Duration;

use hyper::StatusCode;

use crate::proxy_protocol::UpstreamError;

/// Who caused a failure, which decides who it is counted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something unusable: a 4xx, never held against the backend.
    Client,
    /// The backend could not be reached or failed.
    Upstream,
    /// The platform's own configuration or code.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The request body broke off or had bad framing (a malformed chunk, fewer bytes than its
    /// Content-Length) while it was being passed on.
    #[error("the client's request body failed: {0}")]
    ClientBody(String),
    /// More than one Host header (RFC 9112 §3.2: a 400).
    #[error("the request has more than one Host header")]
    RepeatedHost,
    /// A Host header that is not visible ASCII.
    #[error("the request's Host header is not text")]
    MalformedHost,
    /// HTTP/2 `:authority` and Host naming different sites (RFC 9113 §8.3.1).
    #[error("the request's :authority and Host header disagree")]
    ConflictingHost,
    #[error("the service has no backends")]
    NoBackend,
    #[error("no backend is available (health checks or passive ejection took them out)")]
    NoneAvailable,
    #[error("backend {backend} cannot be written as a request URI")]
    BadBackendAddress { backend: String },
    #[error("cannot connect to backend {backend}")]
    Connect {
        backend: String,
        #[source]
        source: UpstreamError,
    },
    #[error("backend {backend} failed to answer")]
    Upstream {
        backend: String,
        #[source]
        source: UpstreamError,
    },
    #[error("backend {backend} sent no response headers within {after:?}")]
    Timeout { backend: String, after: Duration },
}

impl Failure {
    pub fn fault(&self) -> Fault {
        match self {
            Failure::ClientBody(_)
            | Failure::RepeatedHost
            | Failure::MalformedHost
            | Failure::ConflictingHost => Fault::Client,
            Failure::NoBackend | Failure::BadBackendAddress { .. } => Fault::Internal,
            Failure::NoneAvailable
            | Failure::Connect { .. }
            | Failure::Upstream { .. }
            | Failure::Timeout { .. } => Fault::Upstream,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Failure::ClientBody(_)
            | Failure::RepeatedHost
            | Failure::MalformedHost
            | Failure::ConflictingHost => StatusCode::BAD_REQUEST,
            Failure::NoBackend | Failure::NoneAvailable => StatusCode::SERVICE_UNAVAILABLE,
            Failure::BadBackendAddress { .. }
            | Failure::Connect { .. }
            | Failure::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Failure::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// What the visitor reads: what happened and what they can do, in their words.
    pub fn page_text(&self) -> &'static str {
        match self {
            Failure::ClientBody(_) => {
                "The request's body was malformed or ended early, so it was not passed on to \
                 the site. Send the request again.\n"
            }
            Failure::RepeatedHost => {
                "The request has more than one Host header; send exactly one.\n"
            }
            Failure::MalformedHost => "The request's Host header is not a host name.\n",
            Failure::ConflictingHost => {
                "The request's :authority and Host header name different sites; name one.\n"
            }
            Failure::NoBackend => "The site has no servers set up to answer it yet.\n",
            Failure::NoneAvailable => {
                "None of the site's servers is available right now; retry in a few seconds.\n"
            }
            Failure::BadBackendAddress { .. } | Failure::Connect { .. } => {
                "The site's servers could not be reached; retry in a little while.\n"
            }
            Failure::Upstream { .. } => {
                "The site's servers failed while answering; retry in a little while.\n"
            }
            Failure::Timeout { .. } => {
                "The site's servers took too long to answer; retry in a little while.\n"
            }
        }
    }

    /// The backend the failure concerns, for the access log.
    pub fn backend(&self) -> Option<&str> {
        match self {
            Failure::BadBackendAddress { backend }
            | Failure::Connect { backend, .. }
            | Failure::Upstream { backend, .. }
            | Failure::Timeout { backend, .. } => Some(backend),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_name_nothing_inside() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let failures = [
            Failure::ClientBody("invalid chunk size line".into()),
            Failure::BadBackendAddress {
                backend: "10.0.0.5:8080".into(),
            },
            Failure::Connect {
                backend: "10.0.0.5:8080".into(),
                source: UpstreamError::Connect(refused),
            },
            Failure::Timeout {
                backend: "10.0.0.5:8080".into(),
                after: Duration::from_secs(60),
            },
        ];
        for failure in &failures {
            let text = failure.page_text();
            assert!(!text.contains("10.0.0.5"), "{text}");
            assert!(!text.contains("chunk"), "{text}");
        }
        assert_eq!(failures[0].fault(), Fault::Client);
        assert_eq!(failures[0].status(), StatusCode::BAD_REQUEST);
        assert_eq!(failures[3].status(), StatusCode::GATEWAY_TIMEOUT);
    }
}
