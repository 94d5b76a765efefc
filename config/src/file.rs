//! The node's configuration file (TOML), parsed once at start into plain per-part structs.
//!
//! Every error names the file, the line and the key, so an operator can go straight to it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::names::DomainName;

/// What every part of the node needs to know, fixed for the life of the process.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node: NodeSection,
    #[serde(default)]
    pub listen: ListenSection,
    pub zone: ZoneSection,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub issuer: IssuerSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub dns: DnsSection,
    #[serde(default)]
    pub verify: VerifySection,
    #[serde(default)]
    pub limits: LimitsSection,
}

/// How alias domains are verified through public DNS.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifySection {
    /// Recursive resolvers to ask (`ip` or `ip:port`). Empty: the system's, from
    /// `/etc/resolv.conf`. Never this node's own authoritative data.
    pub resolvers: Vec<String>,
    /// How long one question may take before the next resolver is tried.
    pub timeout: Duration,
    /// A pending or failed domain is re-checked with backoff for this long after it was
    /// added; then it stays failed until checked by hand (`domain verify`).
    pub pending_for: Duration,
    /// The first retry of a failed check; each next one doubles, up to `max_retry`.
    pub first_retry: Duration,
    pub max_retry: Duration,
    /// How often a verified domain is checked again.
    pub recheck_interval: Duration,
    /// How long a verified domain may point elsewhere before it is `moved`.
    pub grace: Duration,
    /// Checks running at once on this node.
    pub concurrent_checks: usize,
}

impl Default for VerifySection {
    fn default() -> Self {
        VerifySection {
            resolvers: Vec::new(),
            timeout: secs(5),
            pending_for: secs(7 * 86_400),
            first_retry: secs(5),
            max_retry: secs(3600),
            recheck_interval: secs(3600),
            grace: secs(86_400),
            concurrent_checks: 64,
        }
    }
}

/// Bounds on what one tenant can make every node hold.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub domains_per_service: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            domains_per_service: 100,
        }
    }
}

/// A duration written as a number and a unit: `500ms`, `60s`, `5m`, `1h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Duration(pub std::time::Duration);

impl TryFrom<String> for Duration {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        let text = value.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let n: u64 = number.parse().map_err(|_| {
            format!("`{value}` is not a duration; write a number and a unit: 500ms, 60s, 5m, 1h")
        })?;
        let d = match unit.trim() {
            "ms" => std::time::Duration::from_millis(n),
            "s" => std::time::Duration::from_secs(n),
            "m" => std::time::Duration::from_secs(n * 60),
            "h" => std::time::Duration::from_secs(n * 3600),
            "d" => std::time::Duration::from_secs(n * 86_400),
            _ => {
                return Err(format!(
                    "`{value}` has no known unit; write a number and ms, s, m, h or d"
                ));
            }
        };
        if d.is_zero() {
            return Err(format!("`{value}`: a timeout must be longer than zero"));
        }
        Ok(Duration(d))
    }
}

const fn secs(n: u64) -> Duration {
    Duration(std::time::Duration::from_secs(n))
}

/// The HTTPS edge's limits; defaults follow nginx where nginx has one.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    /// Time for a client to send its TLS ClientHello.
    pub tls_hello_timeout: Duration,
    /// Time for a client to send a request's headers (slowloris); nginx: 60s.
    pub header_read_timeout: Duration,
    /// Largest request head in bytes; nginx: 4 x 8 KiB.
    pub max_header_bytes: usize,
    /// Most header fields in a request, over HTTP/1 and HTTP/2 alike; hyper, Envoy, HAProxy: 100.
    #[serde(deserialize_with = "at_least_one")]
    pub max_headers: usize,
    /// HTTP/2 streams per connection; nginx: 128.
    pub max_concurrent_streams: u32,
    /// Connecting to a backend.
    pub connect_timeout: Duration,
    /// Waiting for a backend's response headers; nginx's proxy_read_timeout: 60s.
    pub response_timeout: Duration,
    /// How long in-flight requests may finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// A client connection with no traffic this long is closed; nginx: 75s.
    pub idle_timeout: Duration,
    /// Load balancers in front (CIDRs) whose connections start with a PROXY protocol v2 header
    /// carrying the real client address. Only these may send one, and they must.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// Certificates whose parsed chain and key are kept in memory; others are read from the
    /// store at their next handshake (one read). Each takes a few KiB. 0 counts as 1.
    pub certificate_cache: usize,
    /// Active health checks this node sends per second at most, over all backends: with more
    /// backends than fit at their intervals, every interval is stretched alike.
    #[serde(deserialize_with = "positive_rate")]
    pub health_checks_per_second: u32,
}

/// hyper's own limit on HTTP/1 header lines, which Envoy and HAProxy share.
pub const DEFAULT_MAX_HEADERS: usize = 100;

/// A count where 0 would refuse every request.
fn at_least_one<'de, D: serde::Deserializer<'de>>(de: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(de)?;
    if n == 0 {
        return Err(serde::de::Error::custom(
            "must be at least 1: a request always has a Host header",
        ));
    }
    Ok(n)
}

/// A rate where 0 would stop every health check for good; `active = "never"` is the way to.
fn positive_rate<'de, D: serde::Deserializer<'de>>(de: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(de)?;
    if n == 0 {
        return Err(serde::de::Error::custom(
            "must be at least 1; turn checks off per service with options.health_check.active = \"never\"",
        ));
    }
    Ok(n)
}

impl Default for ProxySection {
    fn default() -> Self {
        ProxySection {
            tls_hello_timeout: secs(10),
            header_read_timeout: secs(60),
            max_header_bytes: 32 * 1024,
            max_headers: DEFAULT_MAX_HEADERS,
            max_concurrent_streams: 128,
            connect_timeout: secs(5),
            response_timeout: secs(60),
            shutdown_grace: secs(30),
            idle_timeout: secs(75),
            proxy_protocol_from: Vec::new(),
            certificate_cache: 10_000,
            health_checks_per_second: 200,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawNodeSection")]
pub struct NodeSection {
    pub id: NodeId,
    /// Threads serving HTTP and HTTPS connections, each with its own listeners (SO_REUSEPORT),
    /// single-threaded runtime and upstream connections; 0: one per CPU.
    pub workers: usize,
    pub public_ipv4: Vec<Ipv4Addr>,
    pub public_ipv6: Vec<Ipv6Addr>,
    /// The node's entry in the store (`nodes/<id>`) lives this long without a keep-alive: a
    /// node that dies leaves DNS answers within it.
    pub lease_ttl: Duration,
}

/// etcd rounds lease TTLs to whole seconds; below 2 s a keep-alive every third of it races
/// the expiry.
const MIN_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeSection {
    id: NodeId,
    #[serde(default)]
    workers: usize,
    #[serde(default)]
    public_ipv4: Vec<Ipv4Addr>,
    #[serde(default)]
    public_ipv6: Vec<Ipv6Addr>,
    #[serde(default = "default_lease_ttl")]
    lease_ttl: Duration,
}

fn default_lease_ttl() -> Duration {
    secs(10)
}

impl TryFrom<RawNodeSection> for NodeSection {
    type Error = String;
    fn try_from(raw: RawNodeSection) -> Result<Self, Self::Error> {
        if raw.public_ipv4.is_empty() && raw.public_ipv6.is_empty() {
            return Err(
                "a node needs at least one public address: set node.public_ipv4 or node.public_ipv6 (the DNS answers point clients at them)"
                    .into(),
            );
        }
        if raw.lease_ttl.0 < MIN_LEASE_TTL {
            return Err("node.lease_ttl must be at least 2s: the lease is kept alive every third of it, in whole seconds".into());
        }
        Ok(NodeSection {
            id: raw.id,
            workers: raw.workers,
            public_ipv4: raw.public_ipv4,
            public_ipv6: raw.public_ipv6,
            lease_ttl: raw.lease_ttl,
        })
    }
}

/// A node's name in the fleet: one DNS label, so it can name a host too.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct NodeId(String);

impl NodeId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        let ok = !value.is_empty()
            && value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !value.starts_with('-')
            && !value.ends_with('-');
        if ok {
            Ok(NodeId(value))
        } else {
            Err(format!(
                "`{value}` is not a node id; use 1 to 63 lowercase letters, digits and inner hyphens, e.g. edge-1"
            ))
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// UDP and TCP on each.
    #[serde(default = "default_dns")]
    pub dns: Vec<SocketAddr>,
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    #[serde(default = "default_https")]
    pub https: SocketAddr,
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
}

fn default_dns() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], 53))]
}
fn default_http() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 80))
}
fn default_https() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9080))
}

impl Default for ListenSection {
    fn default() -> Self {
        ListenSection {
            dns: default_dns(),
            http: default_http(),
            https: default_https(),
            admin: default_admin(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneSection {
    /// The platform zone: every service's canonical name is `<service-id>.<name>`.
    pub name: DomainName,
    #[serde(default)]
    pub nameservers: Vec<DomainName>,
}

/// Which ingress nodes a service's A/AAAA answers and HTTPS hints name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerPolicy {
    /// This node's public addresses: the one-node default.
    #[default]
    #[serde(rename = "self")]
    This,
    /// Every live node of the fleet (this one included).
    Fleet,
    /// By the client's network (EDNS Client Subnet when present, else the source address), from
    /// `[[dns.clients]]`; clients in no listed network get the fleet.
    #[serde(rename = "by-client")]
    ByClient,
}

/// With `policy = "by-client"`: clients in `networks` are sent to `addresses` and to the
/// addresses of the live nodes named in `nodes`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientGroup {
    pub networks: Vec<IpNet>,
    #[serde(default)]
    pub nodes: Vec<NodeId>,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
}

/// Forwarding of names outside our zones, for the networks that use this node as their
/// resolver (VMs asking for `web-server.internal` and for everything else).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardSection {
    /// Client networks allowed to resolve other names through this node. Empty: nobody.
    pub allow_from: Vec<IpNet>,
    /// Resolvers asked, in order (`10.0.0.2:53`).
    pub upstreams: Vec<SocketAddr>,
    /// Answers from upstream kept, apart from our own data.
    pub cache_size: u64,
    /// Milliseconds to wait for one upstream before trying the next.
    pub timeout_ms: u64,
}

impl Default for ForwardSection {
    fn default() -> Self {
        ForwardSection {
            allow_from: Vec::new(),
            upstreams: Vec::new(),
            cache_size: 10_000,
            timeout_ms: 2_000,
        }
    }
}

/// Response rate limiting over UDP per client prefix, so the node is no use for reflection
/// attacks: over the rate, answers are dropped, and every `slip`-th one goes out as an empty
/// truncated answer so a real client retries over TCP.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSection {
    /// Answers per second per client prefix; 0 turns limiting off.
    pub responses_per_second: u32,
    /// Every n-th limited answer is sent truncated; 0: none are.
    pub slip: u32,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Networks never limited. Loopback by default: a spoofed source cannot be loopback.
    pub exempt: Vec<IpNet>,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        RateLimitSection {
            responses_per_second: 1000,
            slip: 2,
            ipv4_prefix: 24,
            ipv6_prefix: 56,
            exempt: vec![
                IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
                IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
            ],
        }
    }
}

/// The authoritative DNS responder: the platform zone, its SOA and TTLs, other zones it serves.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSection {
    pub policy: AnswerPolicy,
    /// TTL of A/AAAA answers for services and nameservers.
    pub address_ttl: u32,
    /// TTL of the HTTPS record of every service.
    pub https_ttl: u32,
    pub soa: SoaSection,
    /// CAA records at the zone apex, in presentation format: `0 issue "letsencrypt.org"`.
    pub caa: Vec<String>,
    /// Largest UDP answer when the client offers more (EDNS0); 1232 avoids fragmentation.
    pub udp_payload: u16,
    /// More zones answered from custom records only, e.g. `internal` for VMs' names.
    pub zones: Vec<DomainName>,
    /// Finished answers kept for reuse, by name and type, per UDP worker; 0 turns it off.
    pub answer_cache: usize,
    /// Threads answering UDP; 0: one per CPU.
    pub udp_workers: usize,
    /// Client networks and where they are sent, for `policy = "by-client"`.
    pub clients: Vec<ClientGroup>,
    pub forward: ForwardSection,
    pub rate_limit: RateLimitSection,
    /// Networks allowed to transfer our zones (AXFR over TCP). Empty: nobody.
    pub transfer_from: Vec<IpNet>,
}

impl Default for DnsSection {
    fn default() -> Self {
        DnsSection {
            policy: AnswerPolicy::This,
            address_ttl: 300,
            https_ttl: 3600,
            soa: SoaSection::default(),
            caa: Vec::new(),
            udp_payload: 1232,
            zones: Vec::new(),
            answer_cache: 100_000,
            udp_workers: 0,
            clients: Vec::new(),
            forward: ForwardSection::default(),
            rate_limit: RateLimitSection::default(),
            transfer_from: Vec::new(),
        }
    }
}

/// The SOA of every zone served. The serial is the store revision, so it rises with every change.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SoaSection {
    /// TTL of the SOA and NS records.
    pub ttl: u32,
    /// Mailbox in name form; default `hostmaster.<zone>`.
    pub hostmaster: Option<DomainName>,
    pub refresh: u32,
    pub retry: u32,
    pub expire: u32,
    /// Caps the TTL of negative answers (RFC 2308).
    pub minimum: u32,
}

impl Default for SoaSection {
    fn default() -> Self {
        SoaSection {
            ttl: 3600,
            hostmaster: None,
            refresh: 14400,
            retry: 3600,
            expire: 1_209_600,
            minimum: 300,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// One node, state in a redb file under `store.path`.
    #[default]
    Embedded,
    /// A fleet: state in etcd (`[store.etcd]`), each node keeping its last copy under
    /// `store.path` to serve from when etcd is away.
    Etcd,
}

/// Where the fleet's etcd is, and how to talk to it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdSection {
    /// Client URLs or host:port of the members; a request that fails on one goes to the next.
    pub endpoints: Vec<String>,
    /// Every key lives under it, so several platforms (or tests) can share one cluster.
    pub prefix: String,
    /// CA that signs the members' certificates (client TLS); with `cert` and `key` for mutual
    /// TLS.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    /// A file holding the password (kept out of the config file).
    pub password_file: Option<PathBuf>,
    /// Connecting to one member.
    pub dial_timeout: Duration,
    /// One request, over every retry and member; past it a write answers 503
    /// `store_unavailable`.
    pub request_timeout: Duration,
}

impl Default for EtcdSection {
    fn default() -> Self {
        EtcdSection {
            endpoints: Vec::new(),
            prefix: "/portcullis/".into(),
            ca: None,
            cert: None,
            key: None,
            user: None,
            password_file: None,
            dial_timeout: secs(2),
            request_timeout: secs(5),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    #[serde(default)]
    pub kind: StoreKind,
    /// The node's state directory: the store file, the dev CA, the admin token by default.
    #[serde(default = "default_state_dir")]
    pub path: PathBuf,
    /// Revisions of change history kept (etcd's compaction retention): a watcher that falls
    /// further behind reloads everything. The file's size is bounded by it under churn.
    #[serde(default = "default_history", deserialize_with = "at_least_one_u64")]
    pub history: u64,
    /// How long a deleted service's id stays reserved (its tombstone): longer than any cache
    /// of its name (DNS, clients' TLS sessions) lives, bounded so churn alone does not grow the
    /// store.
    #[serde(default = "default_tombstone_retention")]
    pub tombstone_retention: Duration,
    #[serde(default)]
    pub etcd: EtcdSection,
    /// Keys that seal private keys (certificates', the ACME account's) before they are stored:
    /// one `<key-id> <base64 of 32 bytes>` per line, the first seals, all open. Required with
    /// `kind = "etcd"`, which keeps values unencrypted.
    #[serde(default)]
    pub encryption_key_file: Option<PathBuf>,
}

fn default_tombstone_retention() -> Duration {
    secs(30 * 86_400)
}

fn default_history() -> u64 {
    crate::store::DEFAULT_HISTORY
}

fn at_least_one_u64<'de, D: serde::Deserializer<'de>>(de: D) -> Result<u64, D::Error> {
    let n = u64::deserialize(de)?;
    if n == 0 {
        return Err(serde::de::Error::custom(
            "must be at least 1: watchers resume from the history",
        ));
    }
    Ok(n)
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/portcullis")
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            kind: StoreKind::Embedded,
            path: default_state_dir(),
            history: default_history(),
            tombstone_retention: default_tombstone_retention(),
            etcd: EtcdSection::default(),
            encryption_key_file: None,
        }
    }
}

impl StoreSection {
    pub fn database_file(&self) -> PathBuf {
        self.path.join("state.redb")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssuerKind {
    /// A local CA in the state directory: certificates with no internet, trusted by whoever
    /// trusts its root (`portcullis ca root`).
    #[default]
    Dev,
    /// An ACME CA (RFC 8555): Let's Encrypt, ZeroSSL, Pebble in tests.
    Acme,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerSection {
    #[serde(default)]
    pub kind: IssuerKind,
    /// With `kind = "acme"`: the CA's directory URL.
    pub directory_url: Option<String>,
    /// `mailto:` URLs given to the CA for the account.
    #[serde(default)]
    pub contact: Vec<String>,
    /// PEM files whose certificates are trusted for the directory's TLS (e.g. Pebble's CA);
    /// empty: the system's roots.
    #[serde(default)]
    pub trust_roots: Vec<PathBuf>,
    /// The account's key (PEM, PKCS#8, ECDSA P-256), for nodes that must share one account
    /// without sharing a store; absent: a key is made and kept in the store.
    pub account_key_file: Option<PathBuf>,
    /// External account binding, when the CA asks for one (ZeroSSL, Google).
    pub eab_key_id: Option<String>,
    /// The EAB HMAC key, base64url as the CA hands it out.
    pub eab_hmac_key: Option<String>,
    /// Directories tried in order after repeated failures at `directory_url`.
    #[serde(default)]
    pub fallback_directories: Vec<String>,
    /// Consecutive failures for a name before its next order goes to the next directory.
    #[serde(default = "default_fallback_after")]
    pub fallback_after_failures: u32,
    /// Orders in flight at once: on this node alone, across the fleet on a shared store.
    #[serde(default = "default_max_concurrent_orders")]
    pub max_concurrent_orders: usize,
}

fn default_max_concurrent_orders() -> usize {
    32
}

fn default_fallback_after() -> u32 {
    3
}

impl Default for IssuerSection {
    fn default() -> Self {
        IssuerSection {
            kind: IssuerKind::default(),
            directory_url: None,
            contact: Vec::new(),
            trust_roots: Vec::new(),
            account_key_file: None,
            eab_key_id: None,
            eab_hmac_key: None,
            fallback_directories: Vec::new(),
            fallback_after_failures: default_fallback_after(),
            max_concurrent_orders: default_max_concurrent_orders(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Bearer token for the admin API; generated (mode 0600) when the file does not exist.
    /// Default: `<store.path>/admin.token`.
    pub token_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `portcullis=debug,info`.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// One event per proxied request (target `portcullis::access`).
    #[serde(default = "default_true")]
    pub access: bool,
}

fn default_true() -> bool {
    true
}

fn default_log_level() -> String {
    "info".into()
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Text,
            level: default_log_level(),
            access: true,
        }
    }
}

/// A configuration file that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// Dotted path of the key, e.g. `listen.http`.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: None,
            message: format!("cannot read the configuration file: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses `text`; `file` only names it in errors.
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let error = |span: Option<std::ops::Range<usize>>, key: Option<String>, message: &str| {
            ConfigError {
                file: file.to_path_buf(),
                line: span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1),
                key,
                message: message.trim().to_string(),
            }
        };
        let de = toml::Deserializer::parse(text).map_err(|e| error(e.span(), None, e.message()))?;
        let config: NodeConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let key = (path != ".").then_some(path);
            let inner = e.into_inner();
            error(inner.span(), key, inner.message())
        })?;
        config
            .check_store()
            .and_then(|()| config.check_names())
            .map_err(|(key, message)| error(None, Some(key.into()), &message))?;
        Ok(config)
    }

    /// Zone names are names, never patterns (stored names may be wildcards, these may not).
    fn check_names(&self) -> Result<(), (&'static str, String)> {
        let named = [("zone.name", &self.zone.name)]
            .into_iter()
            .chain(
                self.zone
                    .nameservers
                    .iter()
                    .map(|n| ("zone.nameservers", n)),
            )
            .chain(self.dns.zones.iter().map(|n| ("dns.zones", n)));
        for (key, name) in named {
            if name.is_wildcard() {
                return Err((key, format!("`{name}` is a wildcard; give a domain name")));
            }
        }
        Ok(())
    }

    /// What the store section needs beyond its types: an etcd store needs somewhere to go,
    /// and a key to seal private keys with before they leave the node.
    fn check_store(&self) -> Result<(), (&'static str, String)> {
        if self.store.kind != StoreKind::Etcd {
            return Ok(());
        }
        if self.store.etcd.endpoints.is_empty() {
            return Err((
                "store.etcd.endpoints",
                "with store.kind = \"etcd\", list the etcd members' client addresses, e.g. [\"10.0.0.1:2379\", \"10.0.0.2:2379\"]".into(),
            ));
        }
        if self.store.encryption_key_file.is_none() {
            return Err((
                "store.encryption_key_file",
                "etcd keeps values unencrypted, so a fleet seals private keys with a key of its own: make one with `portcullis store new-key > /etc/portcullis/store.key` and give the same file to every node".into(),
            ));
        }
        Ok(())
    }

    /// The configuration of `serve --dev`: loopback high ports, zone `app.localhost` (names under
    /// `.localhost` resolve to loopback in curl and browsers), state in `state_dir`.
    pub fn dev(state_dir: &Path) -> Self {
        let lo4 = Ipv4Addr::LOCALHOST;
        NodeConfig {
            node: NodeSection {
                id: NodeId("dev".into()),
                workers: 0,
                public_ipv4: vec![lo4],
                public_ipv6: vec![Ipv6Addr::LOCALHOST],
                lease_ttl: default_lease_ttl(),
            },
            listen: ListenSection {
                dns: vec![SocketAddr::from((lo4, 8053))],
                http: SocketAddr::from((lo4, 8080)),
                https: SocketAddr::from((lo4, 8443)),
                admin: SocketAddr::from((lo4, 9080)),
            },
            zone: ZoneSection {
                // A literal that passes validation; the test below keeps it so.
                name: DomainName::parse("app.localhost").unwrap_or_else(|_| unreachable!()),
                nameservers: Vec::new(),
            },
            store: StoreSection {
                path: state_dir.to_path_buf(),
                ..StoreSection::default()
            },
            issuer: IssuerSection::default(),
            admin: AdminSection {
                token_file: Some(state_dir.join("admin.token")),
            },
            proxy: ProxySection::default(),
            log: LogSection::default(),
            dns: DnsSection::default(),
            verify: VerifySection::default(),
            limits: LimitsSection::default(),
        }
    }

    pub fn admin_token_file(&self) -> PathBuf {
        self.admin
            .token_file
            .clone()
            .unwrap_or_else(|| self.store.path.join("admin.token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../portcullis.example.toml");

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(Path::new("t.toml"), text)
    }

    #[test]
    fn example_parses() {
        let cfg = parse(EXAMPLE).unwrap();
        assert_eq!(cfg.node.id.as_str(), "edge-1");
        assert_eq!(cfg.zone.name.as_str(), "app.example.test");
        assert_eq!(cfg.listen.admin, "127.0.0.1:9080".parse().unwrap());
    }

    #[test]
    fn an_etcd_store_needs_endpoints_and_a_sealing_key() {
        let etcd = EXAMPLE.replacen("kind = \"embedded\"", "kind = \"etcd\"", 1);
        let err = parse(&etcd).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("store.etcd.endpoints"), "{err}");
        let with_endpoints =
            etcd.replacen("# [store.etcd]\n# endpoints", "[store.etcd]\nendpoints", 1);
        let err = parse(&with_endpoints).unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("store.encryption_key_file"),
            "{err}"
        );
        assert!(
            err.to_string().contains("portcullis store new-key"),
            "{err}"
        );
        let complete = with_endpoints.replacen("# encryption_key_file", "encryption_key_file", 1);
        let cfg = parse(&complete).unwrap();
        assert_eq!(cfg.store.kind, StoreKind::Etcd);
        assert_eq!(cfg.store.etcd.endpoints.len(), 3);
        assert_eq!(cfg.store.etcd.prefix, "/portcullis/");
        assert_eq!(cfg.node.lease_ttl.0, std::time::Duration::from_secs(10));
        let short = complete.replacen("# lease_ttl = \"10s\"", "lease_ttl = \"1s\"", 1);
        let err = parse(&short).unwrap_err();
        assert!(err.to_string().contains("at least 2s"), "{err}");
    }

    #[test]
    fn dev_config_is_valid() {
        let cfg = NodeConfig::dev(Path::new("/tmp/x"));
        assert_eq!(cfg.zone.name.as_str(), "app.localhost");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = EXAMPLE.replacen("[listen]\n", "[listen]\nhttps_port = 4\n", 1);
        let err = parse(&text).unwrap_err();
        let line = text
            .lines()
            .position(|l| l.starts_with("https_port"))
            .unwrap()
            + 1;
        assert_eq!(err.line, Some(line), "{err}");
        assert!(err.to_string().contains("https_port"), "{err}");
        assert_eq!(err.key.as_deref(), Some("listen.https_port"));
    }

    #[test]
    fn bad_value_names_key_and_line() {
        let text = EXAMPLE.replacen("http = \"0.0.0.0:80\"", "http = \"0.0.0.0:eighty\"", 1);
        assert_ne!(text, EXAMPLE);
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("listen.http"), "{err}");
        let line = text.lines().position(|l| l.contains("eighty")).unwrap() + 1;
        assert_eq!(err.line, Some(line), "{err}");
    }

    #[test]
    fn bad_zone_name_is_explained() {
        let text = EXAMPLE.replacen("name = \"app.example.test\"", "name = \"app..test\"", 1);
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("zone.name"), "{err}");
        assert!(err.message.contains("empty label"), "{err}");
    }

    #[test]
    fn durations_parse_with_units() {
        let set = |key: &str, from: &str, to: &str| {
            let text = EXAMPLE.replacen(
                &format!("{key} = \"{from}\""),
                &format!("{key} = \"{to}\""),
                1,
            );
            assert_ne!(text, EXAMPLE, "{key} not in the example");
            parse(&text)
        };
        let cfg = set("response_timeout", "60s", "1500ms").unwrap();
        assert_eq!(cfg.proxy.response_timeout.0.as_millis(), 1500);
        assert_eq!(cfg.proxy.connect_timeout.0.as_secs(), 5);
        let cfg = set("header_read_timeout", "60s", "2m").unwrap();
        assert_eq!(cfg.proxy.header_read_timeout.0.as_secs(), 120);
        let err = set("response_timeout", "60s", "soon").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("proxy.response_timeout"), "{err}");
        let err = set("connect_timeout", "5s", "0s").unwrap_err();
        assert!(err.message.contains("longer than zero"), "{err}");
        let minimal =
            "[node]\nid = \"a\"\npublic_ipv4 = [\"192.0.2.1\"]\n[zone]\nname = \"z.test\"\n";
        assert_eq!(parse(minimal).unwrap().proxy, ProxySection::default());
    }

    #[test]
    fn health_check_budget_is_positive() {
        let set = |n: &str| {
            let text = EXAMPLE.replacen(
                "health_checks_per_second = 200",
                &format!("health_checks_per_second = {n}"),
                1,
            );
            assert_ne!(text, EXAMPLE, "health_checks_per_second not in the example");
            parse(&text)
        };
        assert_eq!(ProxySection::default().health_checks_per_second, 200);
        assert_eq!(set("20").unwrap().proxy.health_checks_per_second, 20);
        let err = set("0").unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("proxy.health_checks_per_second"),
            "{err}"
        );
        assert!(err.message.contains("at least 1"), "{err}");
    }

    #[test]
    fn max_headers_must_be_at_least_one() {
        let set = |n: &str| {
            let text = EXAMPLE.replacen("max_headers = 100", &format!("max_headers = {n}"), 1);
            assert_ne!(text, EXAMPLE, "max_headers not in the example");
            parse(&text)
        };
        assert_eq!(parse(EXAMPLE).unwrap().proxy.max_headers, 100);
        assert_eq!(set("7").unwrap().proxy.max_headers, 7);
        let err = set("0").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("proxy.max_headers"), "{err}");
        assert!(err.message.contains("at least 1"), "{err}");
    }

    #[test]
    fn node_without_address_is_refused() {
        let text = "[node]\nid = \"a\"\n[zone]\nname = \"z.test\"\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("node"), "{err}");
        assert!(err.message.contains("public address"), "{err}");
    }
}
