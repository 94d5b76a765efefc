//! portcullis-proxy: listeners, TLS termination, the ACME challenge responder, the Host router
//! and upstream pools, reading certificates and routes from the Snapshot only. It knows nothing
//! of DNS or ACME ordering; it meets them through the Snapshot.
//!
//! The proxy comes with its own issue; this crate holds its place in the workspace so the
//! dependency direction (config below, the parts beside each other) is fixed from the start.
