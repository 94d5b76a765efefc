//! The layout of platform state in the store. One prefix per kind, so a watch or a listing can
//! take one kind; the fleet's etcd backend puts its own namespace in front of these.

use crate::model::{RecordType, ServiceId};

pub const SERVICES: &str = "services/";
pub const TOMBSTONES: &str = "tombstones/";
pub const DOMAINS: &str = "domains/";
/// The last verification trace of each alias domain; read by the API, not by the Snapshot.
pub const DOMAIN_CHECKS: &str = "domain-checks/";
/// DNS-01 challenge values the platform zone answers at `<label>.acme.<zone>`.
pub const DNS_CHALLENGES: &str = "dns-challenges/";
pub const RECORDS: &str = "records/";
pub const CERTIFICATES: &str = "certificates/";
/// Private keys, apart from certificates so listings never read them.
pub const KEYS: &str = "keys/";
pub const NODES: &str = "nodes/";
pub const ACME_ACCOUNT: &str = "acme/account";
pub const ECH_KEYS: &str = "ech/keys";
pub const LOCKS: &str = "locks/";
/// Each node's report of the revision it has applied, under its lease; not part of the
/// Snapshot, and not a change the platform's parts react to.
pub const STATUS: &str = "status/";

pub fn status(node_id: &str) -> String {
    format!("{STATUS}{node_id}")
}

pub fn service(id: &ServiceId) -> String {
    format!("{SERVICES}{id}")
}

pub fn tombstone(id: &ServiceId) -> String {
    format!("{TOMBSTONES}{id}")
}

pub fn domain(name: &str) -> String {
    format!("{DOMAINS}{name}")
}

pub fn domain_check(name: &str) -> String {
    format!("{DOMAIN_CHECKS}{name}")
}

pub fn dns_challenge(label: &str) -> String {
    format!("{DNS_CHALLENGES}{label}")
}

pub fn record(name: &str, rtype: RecordType) -> String {
    format!("{RECORDS}{name}/{rtype}")
}

pub fn certificate(domain: &str) -> String {
    format!("{CERTIFICATES}{domain}")
}

pub fn private_key(domain: &str) -> String {
    format!("{KEYS}{domain}")
}

pub fn node(id: &str) -> String {
    format!("{NODES}{id}")
}
