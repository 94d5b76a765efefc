//! The stateless ACME http-01 responder: the key authorization is `<token>.<thumbprint>`
//! (RFC 8555 §8.3), and the thumbprint of the platform's one account is in the Snapshot, so
//! any node answers any challenge with no per-challenge state. No I/O.

use hyper::StatusCode;
use portcullis_config::Snapshot;

/// Longest token accepted. RFC 8555 asks for at least 128 bits of entropy (22 characters);
/// CAs send 43. Anything much longer is not a token.
pub const MAX_TOKEN_LEN: usize = 128;

/// The status and text/plain body for `GET /.well-known/acme-challenge/<token>` on `host`
/// (`None`: no Host header).
pub fn respond(snapshot: &Snapshot, host: Option<&str>, token: &str) -> (StatusCode, String) {
    let Some(account) = snapshot.account() else {
        return (
            StatusCode::NOT_FOUND,
            "No ACME challenge is answered here: this platform has no ACME account \
             (issuer.kind is not \"acme\").\n"
                .into(),
        );
    };
    let well_formed = !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !well_formed {
        return (
            StatusCode::BAD_REQUEST,
            format!(
                "Not an ACME token: a token is 1 to {MAX_TOKEN_LEN} base64url characters \
                 (A-Z, a-z, 0-9, '-', '_').\n"
            ),
        );
    }
    // The Snapshot's one rule: canonical names and live aliases. A name not yet verified gets
    // its certificate by DNS-01, never through here.
    let managed = host.is_some_and(|h| snapshot.service_for_host(h).is_some());
    if !managed {
        return (
            StatusCode::NOT_FOUND,
            "This platform does not manage that host name, so it answers no challenge for it.\n"
                .into(),
        );
    }
    (StatusCode::OK, format!("{token}.{}", account.thumbprint))
}
