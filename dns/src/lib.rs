//! portcullis-dns: the authoritative DNS responder for the platform zone, answering from the
//! Snapshot only. It knows nothing of ACME or the proxy; it meets them through the Snapshot.
//!
//! The responder itself comes with its own issue; this crate holds its place in the workspace so
//! the dependency direction (config below, the parts beside each other) is fixed from the start.
