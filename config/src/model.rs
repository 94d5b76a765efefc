//! The platform's domain model: what is stored, what the Snapshot holds, what the API shows.
//!
//! Values are stored as JSON under the keys of [`crate::keys`]; every struct here round-trips
//! through serde, and every field that comes from a user has a validating constructor.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::ValidationError;
use crate::names::{AliasName, DomainName};

/// Upper bound on backends per service: a pool larger than this is a configuration mistake,
/// and it bounds the memory one API call can make every node hold.
pub const MAX_BACKENDS: usize = 64;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    #[default]
    RoundRobin,
    /// The backend with the fewest requests in flight from this node.
    LeastRequests,
}

/// How the edge talks to a service's backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 without TLS, by prior knowledge (gRPC backends).
    H2c,
}

/// When the edge checks a service's backends actively.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActiveChecks {
    /// Only when the service has more than one backend: with one there is nothing to fail over
    /// to, and passive ejection still notices a backend that refuses connections.
    #[default]
    Auto,
    /// Even with one backend (a dead one then gets a quick `503` instead of a `502`).
    Always,
    Never,
}

impl ActiveChecks {
    pub fn as_str(&self) -> &'static str {
        match self {
            ActiveChecks::Auto => "auto",
            ActiveChecks::Always => "always",
            ActiveChecks::Never => "never",
        }
    }
}

/// Active health checking of a service's backends; defaults like HAProxy's `check`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawHealthCheck")]
pub struct HealthCheck {
    pub active: ActiveChecks,
    /// Requested with GET and the backend's address as Host (one check serves every service
    /// of the backend); 2xx and 3xx are healthy. `None`: `/`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    /// Consecutive successes that bring a backend back.
    pub healthy_threshold: u32,
    /// Consecutive failures that take a backend out.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            active: ActiveChecks::Auto,
            path: None,
            interval_ms: 5_000,
            timeout_ms: 2_000,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

impl HealthCheck {
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }

    /// True when a service with `backends` backends has them checked actively.
    pub fn is_active_for(&self, backends: usize) -> bool {
        match self.active {
            ActiveChecks::Auto => backends > 1,
            ActiveChecks::Always => backends > 0,
            ActiveChecks::Never => false,
        }
    }
}

/// A health check as sent and as stored before `active` existed: `enabled` was the switch, and
/// every stored service says `"enabled": true`, which now means `auto`.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawHealthCheck {
    active: Option<ActiveChecks>,
    enabled: Option<bool>,
    path: Option<String>,
    interval_ms: u32,
    timeout_ms: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl Default for RawHealthCheck {
    fn default() -> Self {
        let d = HealthCheck::default();
        RawHealthCheck {
            active: None,
            enabled: None,
            path: d.path,
            interval_ms: d.interval_ms,
            timeout_ms: d.timeout_ms,
            healthy_threshold: d.healthy_threshold,
            unhealthy_threshold: d.unhealthy_threshold,
        }
    }
}

impl TryFrom<RawHealthCheck> for HealthCheck {
    type Error = String;
    fn try_from(raw: RawHealthCheck) -> Result<Self, Self::Error> {
        let active = match (raw.enabled, raw.active) {
            (Some(false), Some(active)) if active != ActiveChecks::Never => {
                return Err(format!(
                    "`enabled: false` turns active checks off but `active` is `{}`; give only `active` (`auto`, `always` or `never`)",
                    active.as_str()
                ));
            }
            (Some(false), _) => ActiveChecks::Never,
            (_, Some(active)) => active,
            (_, None) => ActiveChecks::Auto,
        };
        Ok(HealthCheck {
            active,
            path: raw.path,
            interval_ms: raw.interval_ms,
            timeout_ms: raw.timeout_ms,
            healthy_threshold: raw.healthy_threshold,
            unhealthy_threshold: raw.unhealthy_threshold,
        })
    }
}

/// How much the node's metrics say about one service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsDetail {
    /// Counted only in the node's totals: a million services cannot each have series.
    #[default]
    Basic,
    /// Series of its own: requests and connect errors by service, certificate expiry by name.
    Detailed,
}

/// How the edge treats a service; every field has a default, so `{}` is valid.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceOptions {
    pub load_balancing: LoadBalancing,
    pub upstream_protocol: UpstreamProtocol,
    pub health_check: HealthCheck,
    /// Serve plain HTTP on the HTTP listener instead of redirecting to HTTPS.
    pub plain_http: bool,
    /// Start each backend connection with a PROXY protocol v2 header naming the client. Such
    /// connections carry one client each, so they are not pooled.
    pub proxy_protocol: bool,
    /// Send `Strict-Transport-Security`. `None`: only with a publicly trusted certificate
    /// (not the dev CA's), like Caddy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hsts: Option<bool>,
    pub metrics: MetricsDetail,
}

impl ServiceOptions {
    pub fn validate(&self) -> Result<(), ValidationError> {
        let hc = &self.health_check;
        let field = |name: &str| format!("options.health_check.{name}");
        if let Some(path) = &hc.path
            && (!path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ValidationError::new(
                field("path"),
                format!("`{path}` is not a request path; start it with / and use no spaces"),
            ));
        }
        if !(100..=3_600_000).contains(&hc.interval_ms) {
            return Err(ValidationError::new(
                field("interval_ms"),
                "give an interval from 100 ms to one hour",
            ));
        }
        if hc.timeout_ms == 0 || hc.timeout_ms > hc.interval_ms {
            return Err(ValidationError::new(
                field("timeout_ms"),
                "the timeout must be above 0 and at most the interval",
            ));
        }
        for (name, v) in [
            ("healthy_threshold", hc.healthy_threshold),
            ("unhealthy_threshold", hc.unhealthy_threshold),
        ] {
            if !(1..=100).contains(&v) {
                return Err(ValidationError::new(
                    field(name),
                    "give a count from 1 to 100",
                ));
            }
        }
        Ok(())
    }
}

/// A service's identity: a UUID v4 that also names its canonical domain `<id>.<zone>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ServiceId(pub Uuid);

impl ServiceId {
    pub fn new_v4() -> Self {
        ServiceId(Uuid::new_v4())
    }

    pub fn canonical_domain(&self, zone: &DomainName) -> String {
        format!("{}.{zone}", self.0.hyphenated())
    }
}

impl FromStr for ServiceId {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(s)
            .map(ServiceId)
            .map_err(|_| ValidationError::new("id", format!("`{s}` is not a service id (a UUID)")))
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Where a backend is: an IP address or a host name, and a port.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Backend {
    pub host: BackendHost,
    pub port: u16,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum BackendHost {
    Ip(IpAddr),
    Name(DomainName),
}

impl Backend {
    pub fn parse(input: &str) -> Result<Self, String> {
        let hint = "write a backend as host:port, e.g. 10.0.0.5:8080, [2001:db8::5]:8080 or vm-1.internal:8080";
        let (host, port) = if let Some(rest) = input.strip_prefix('[') {
            let (ip, port) = rest
                .split_once("]:")
                .ok_or_else(|| format!("`{input}` has no port; {hint}"))?;
            let ip = Ipv6Addr::from_str(ip)
                .map_err(|_| format!("`{ip}` is not an IPv6 address; {hint}"))?;
            (BackendHost::Ip(IpAddr::V6(ip)), port)
        } else {
            let (host, port) = input
                .rsplit_once(':')
                .ok_or_else(|| format!("`{input}` has no port; {hint}"))?;
            if host.contains(':') {
                return Err(format!(
                    "`{input}`: put an IPv6 address in brackets; {hint}"
                ));
            }
            let host = match Ipv4Addr::from_str(host) {
                Ok(ip) => BackendHost::Ip(IpAddr::V4(ip)),
                Err(_) if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') => {
                    return Err(format!("`{host}` is not an IPv4 address; {hint}"));
                }
                Err(_) => BackendHost::Name(
                    DomainName::parse(host).map_err(|why| format!("{why}; {hint}"))?,
                ),
            };
            (host, port)
        };
        let port: u16 =
            port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
                format!("port `{port}` of `{input}` is not a number from 1 to 65535")
            })?;
        Ok(Backend { host, port })
    }
}

impl TryFrom<String> for Backend {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Backend::parse(&value)
    }
}

impl From<Backend> for String {
    fn from(value: Backend) -> Self {
        value.to_string()
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            BackendHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            BackendHost::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            BackendHost::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Validates a list of backends from a request, naming the offending entry.
pub fn validate_backends(field: &str, inputs: &[String]) -> Result<Vec<Backend>, ValidationError> {
    if inputs.is_empty() {
        return Err(ValidationError::new(
            field,
            "a service needs at least one backend (host:port)",
        ));
    }
    if inputs.len() > MAX_BACKENDS {
        return Err(ValidationError::new(
            field,
            format!(
                "{} backends given; a service has at most {MAX_BACKENDS}",
                inputs.len()
            ),
        ));
    }
    let mut out: Vec<Backend> = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let backend =
            Backend::parse(input).map_err(|m| ValidationError::new(format!("{field}[{i}]"), m))?;
        if out.contains(&backend) {
            return Err(ValidationError::new(
                format!("{field}[{i}]"),
                format!("`{backend}` is listed twice"),
            ));
        }
        out.push(backend);
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceStatus {
    /// Routed and answered in DNS.
    Active,
    /// Kept, but not routed: requests get 503 and DNS still answers (so certificates renew).
    Suspended,
}

impl FromStr for ServiceStatus {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(ServiceStatus::Active),
            "suspended" => Ok(ServiceStatus::Suspended),
            other => Err(ValidationError::new(
                "status",
                format!("`{other}` is not a service status; use `active` or `suspended`"),
            )),
        }
    }
}

/// A tenant's service: its canonical domain is derived from the id and the zone, never stored,
/// so a zone rename cannot leave stale names behind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Service {
    pub id: ServiceId,
    pub backends: Vec<Backend>,
    pub status: ServiceStatus,
    #[serde(default)]
    pub options: ServiceOptions,
    /// Its alias domains, so deleting the service frees them without a walk of every domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<AliasName>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// What is left of a deleted service: its id is never given out again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tombstone {
    pub id: ServiceId,
    #[serde(with = "time::serde::rfc3339")]
    pub deleted_at: OffsetDateTime,
}

/// Where an alias domain stands. Only `verified` is routed, answered and certified; the
/// certificate's own status is kept apart, on the certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerificationStatus {
    /// Added, not checked yet.
    Pending,
    Verified,
    /// The last check did not find the name pointing at its service; see the reason.
    Failed,
    /// Verified once, then found pointing elsewhere for longer than `verify.grace`: no longer
    /// routed, answered or renewed, so whoever controls the name now cannot be served as us.
    Moved,
}

impl VerificationStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            VerificationStatus::Pending => "pending",
            VerificationStatus::Verified => "verified",
            VerificationStatus::Failed => "failed",
            VerificationStatus::Moved => "moved",
        }
    }
}

impl fmt::Display for VerificationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What showed that an alias domain points at its service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proof {
    /// A CNAME chain ending at the canonical name.
    Cname,
    /// An alias-mode (priority 0) HTTPS or SVCB record targeting the canonical name.
    HttpsAlias,
    /// A service-mode HTTPS or SVCB record targeting the canonical name.
    HttpsService,
    /// Every address is a node's, and `_portcullis.<name>` holds the domain's token.
    AddressesAndToken,
}

/// An alias domain a service owner brings (e.g. `www.shop.example`), routed to its service
/// once its DNS is seen pointing there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Domain {
    pub name: AliasName,
    pub service: ServiceId,
    pub verification: VerificationStatus,
    /// Only in records written by earlier versions; the certificate's status is on the
    /// certificate record (`certificates/<name>`).
    #[serde(default, skip_serializing)]
    pub certificate: Option<CertificateStatus>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The value a `_portcullis.<name>` TXT record must hold where addresses are the proof.
    #[serde(default)]
    pub token: String,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub verified_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<Proof>,
    /// The last check's verdict when it failed (or, while verified, the failure of a recheck).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub checked_at: Option<OffsetDateTime>,
    /// `None`: checked only by hand (a failed name past `verify.pending_for`).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub next_check_at: Option<OffsetDateTime>,
    /// Failed checks in a row, for the backoff.
    #[serde(default)]
    pub attempts: u32,
    /// A verified name whose rechecks fail since then; it moves after `verify.grace`.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub failing_since: Option<OffsetDateTime>,
    /// `_acme-challenge.<name>` is a CNAME to the name's label under `acme.<zone>`, so the
    /// certificate can be had by DNS-01 before the name points here.
    #[serde(default)]
    pub delegated: bool,
}

impl Domain {
    /// A domain just added: pending, with its ownership token.
    pub fn new(name: AliasName, service: ServiceId, token: String, now: OffsetDateTime) -> Self {
        Domain {
            name,
            service,
            verification: VerificationStatus::Pending,
            certificate: None,
            created_at: now,
            token,
            verified_at: None,
            proof: None,
            reason: None,
            checked_at: None,
            next_check_at: Some(now),
            attempts: 0,
            failing_since: None,
            delegated: false,
        }
    }

    /// The one rule for "this alias is served": DNS answers, routing, SNI and challenges all
    /// ask it (through [`crate::Snapshot::live_alias`]).
    pub fn is_live(&self) -> bool {
        self.verification == VerificationStatus::Verified
    }

    /// Whether the name may have a certificate: live, or proven by DNS-01 delegation before
    /// it points here. Moved names are never renewed.
    pub fn wants_certificate(&self) -> bool {
        self.is_live()
            || (self.delegated
                && matches!(
                    self.verification,
                    VerificationStatus::Pending | VerificationStatus::Failed
                ))
    }
}

/// DNS-01 values the platform zone answers at `<label>.acme.<zone>` while orders run
/// (`dns-challenges/<label>`): several, when orders for a name and its wildcard overlap.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DnsChallenge {
    pub values: Vec<String>,
}

/// One DNS question asked while verifying a domain, and what came back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceStep {
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: String,
    pub resolver: String,
    /// `NOERROR`, `NXDOMAIN`, `SERVFAIL`, ..., or `TIMEOUT` when no resolver answered.
    pub rcode: String,
    /// The answer's records in presentation form.
    pub records: Vec<String>,
    pub took_ms: u64,
}

/// The last verification of a domain, step by step (`domain-checks/<name>`). Kept apart from
/// the domain so the Snapshot every node holds does not carry traces.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainCheck {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The node that ran it.
    pub node: String,
    pub steps: Vec<TraceStep>,
    pub verified: bool,
    /// e.g. "api.example.com CNAME app.other-host.net: not this platform".
    pub verdict: String,
    /// Whether the resolvers could not answer at all: such a check changes no status.
    #[serde(default)]
    pub inconclusive: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum RecordType {
    A,
    Aaaa,
    Cname,
    Txt,
    Mx,
    Srv,
    Caa,
    Https,
    Svcb,
    Ns,
}

impl RecordType {
    pub fn as_str(&self) -> &'static str {
        match self {
            RecordType::A => "A",
            RecordType::Aaaa => "AAAA",
            RecordType::Cname => "CNAME",
            RecordType::Txt => "TXT",
            RecordType::Mx => "MX",
            RecordType::Srv => "SRV",
            RecordType::Caa => "CAA",
            RecordType::Https => "HTTPS",
            RecordType::Svcb => "SVCB",
            RecordType::Ns => "NS",
        }
    }
}

impl FromStr for RecordType {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "A" => RecordType::A,
            "AAAA" => RecordType::Aaaa,
            "CNAME" => RecordType::Cname,
            "TXT" => RecordType::Txt,
            "MX" => RecordType::Mx,
            "SRV" => RecordType::Srv,
            "CAA" => RecordType::Caa,
            "HTTPS" => RecordType::Https,
            "SVCB" => RecordType::Svcb,
            "NS" => RecordType::Ns,
            _ => {
                return Err(ValidationError::new(
                    "type",
                    format!(
                        "`{s}` is not a supported record type; use A, AAAA, CNAME, TXT, MX, SRV, CAA, HTTPS, SVCB or NS"
                    ),
                ));
            }
        })
    }
}

impl fmt::Display for RecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A custom DNS record set: one name and type, its TTL and the RDATA in presentation format.
/// The DNS responder parses the RDATA when it builds its answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The owner name; may start with `*.` for a wildcard (RFC 4592).
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: RecordType,
    pub ttl: u32,
    pub data: Vec<String>,
}

/// An ingress node of the fleet, as it announces itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// Random, kept in the node's state directory: a node restarted on the same directory
    /// takes over its own entry at once, while another process claiming the same id waits for
    /// the entry's lease to end, and is refused if it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// What a node last reported of itself (`status/<id>`, under its lease).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The store revision its Snapshot had applied.
    pub applied_revision: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub reported_at: OffsetDateTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateStatus {
    Pending,
    Ordering,
    Validating,
    Issuing,
    Active,
    Failed,
}

impl fmt::Display for CertificateStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            CertificateStatus::Pending => "pending",
            CertificateStatus::Ordering => "ordering",
            CertificateStatus::Validating => "validating",
            CertificateStatus::Issuing => "issuing",
            CertificateStatus::Active => "active",
            CertificateStatus::Failed => "failed",
        };
        f.write_str(s)
    }
}

/// Who issued a certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IssuerRef {
    /// The node's local development CA.
    Dev,
    Acme {
        directory_url: String,
    },
}

/// The CA's account of why an issuance failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub detail: String,
}

/// A certificate for one or more names. The private key lives apart, under
/// [`Certificate::key_ref`], so listings never carry key material.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Certificate {
    pub domains: Vec<DomainName>,
    pub status: CertificateStatus,
    pub issuer: IssuerRef,
    /// Only in records written by earlier versions, which kept the PEM chain here; the chain
    /// now lives with the private key under `key_ref` (see [`CertificateMaterial`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chain_pem: String,
    /// Store key of the certificate's chain and private key.
    pub key_ref: String,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub not_before: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub not_after: Option<OffsetDateTime>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<Problem>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// The CA's suggested renewal window (ARI, RFC 9773), when it offers one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_window: Option<RenewalWindow>,
    /// The serving leaf's serial number (hex), which each issuance changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

/// A renewal window from the CA (RFC 9773 §4.2), and when to ask for it again (its Retry-After).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewalWindow {
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub end: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub check_after: OffsetDateTime,
}

impl Certificate {
    /// The record of a name the issuer has yet to take up.
    pub fn pending(domain: DomainName, issuer: IssuerRef, key_ref: String) -> Self {
        Certificate {
            domains: vec![domain],
            status: CertificateStatus::Pending,
            issuer,
            chain_pem: String::new(),
            key_ref,
            not_before: None,
            not_after: None,
            attempts: 0,
            last_error: None,
            next_attempt_at: None,
            renewal_window: None,
            serial: None,
        }
    }

    /// True when the certificate can be served now. Validity dates are set only once a chain
    /// was issued, and kept while it serves.
    pub fn is_servable(&self, now: OffsetDateTime) -> bool {
        self.not_before.is_some_and(|t| t <= now) && self.not_after.is_some_and(|t| now < t)
    }
}

/// The ACME account: its credentials are a secret, its thumbprint is public and is all the
/// challenge responder needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AcmeAccount {
    pub directory_url: String,
    pub account_url: String,
    /// RFC 7638 thumbprint of the account key, base64url.
    pub thumbprint: String,
    /// instant-acme's serialized credentials (contain the private key). Empty in the store
    /// when `sealed_credentials` holds them.
    pub credentials_json: String,
    /// The credentials sealed with the fleet key (base64), where one is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_credentials: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// One ECH key: its public ECHConfig is published in HTTPS records, its private key is not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EchKey {
    pub config_id: u8,
    pub public_name: DomainName,
    /// The ECHConfig (RFC 9849 §4), base64.
    pub config_b64: String,
    /// X25519 private key, base64.
    pub private_key_b64: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Set when a newer key is published; the key is still accepted until dropped.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub retired_at: Option<OffsetDateTime>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EchKeys {
    pub keys: Vec<EchKey>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_parse_and_print() {
        for ok in [
            "10.0.0.5:8080",
            "[2001:db8::5]:443",
            "vm-1.internal:3000",
            "localhost:1",
        ] {
            assert_eq!(Backend::parse(ok).unwrap().to_string(), ok);
        }
        for bad in [
            "10.0.0.5",
            "10.0.0.5:0",
            "10.0.0.5:65536",
            "10.0.0.300:80",
            "2001:db8::5:80",
            "[2001:db8::5]",
            "bad_host:80",
            ":80",
        ] {
            assert!(Backend::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn health_check_takes_the_old_switch_and_writes_back_active_only() {
        let check = |json: &str| serde_json::from_str::<HealthCheck>(json);
        assert_eq!(check("{}").unwrap(), HealthCheck::default());
        // Every service stored before `active` says `"enabled": true`: that is `auto` now.
        assert_eq!(
            check(r#"{"enabled": true}"#).unwrap().active,
            ActiveChecks::Auto
        );
        assert_eq!(
            check(r#"{"enabled": false}"#).unwrap().active,
            ActiveChecks::Never
        );
        assert_eq!(
            check(r#"{"enabled": true, "active": "always"}"#)
                .unwrap()
                .active,
            ActiveChecks::Always
        );
        let err = check(r#"{"enabled": false, "active": "always"}"#).unwrap_err();
        assert!(err.to_string().contains("give only `active`"), "{err}");
        assert!(check(r#"{"active": "sometimes"}"#).is_err());
        assert!(check(r#"{"interval": 5}"#).is_err());
        let text = serde_json::to_string(&check(r#"{"enabled": false}"#).unwrap()).unwrap();
        assert!(
            text.contains(r#""active":"never""#) && !text.contains("enabled"),
            "{text}"
        );

        let auto = HealthCheck::default();
        assert!(!auto.is_active_for(1) && auto.is_active_for(2));
        let always = check(r#"{"active": "always"}"#).unwrap();
        assert!(always.is_active_for(1));
    }

    #[test]
    fn metrics_detail_defaults_to_basic() {
        let options: ServiceOptions = serde_json::from_str("{}").unwrap();
        assert_eq!(options.metrics, MetricsDetail::Basic);
        let options: ServiceOptions = serde_json::from_str(r#"{"metrics": "detailed"}"#).unwrap();
        assert_eq!(options.metrics, MetricsDetail::Detailed);
        assert!(serde_json::from_str::<ServiceOptions>(r#"{"metrics": "all"}"#).is_err());
    }

    #[test]
    fn backend_list_errors_name_the_entry() {
        let err = validate_backends("backends", &["1.2.3.4:80".into(), "x:0".into()]).unwrap_err();
        assert_eq!(err.field, "backends[1]");
        let err = validate_backends("backends", &[]).unwrap_err();
        assert_eq!(err.field, "backends");
        let dup = validate_backends("backends", &["1.2.3.4:80".into(), "1.2.3.4:80".into()]);
        assert!(dup.unwrap_err().message.contains("twice"));
    }
}
