//! Alias domain verification: does a name, as the public DNS shows it, point at its service?
//!
//! The check asks a recursive resolver (never our own authoritative data) a few questions and
//! keeps every question and answer as a trace. Accepted proofs, in the order tried: a CNAME
//! chain ending at the canonical name; an HTTPS or SVCB record (alias or service mode)
//! targeting it; at an apex with A/AAAA, every address a node's and the `_portcullis` TXT
//! token. The questions go through [`Resolve`], so the logic is tested without a network.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use portcullis_config::AliasName;
use portcullis_config::model::{Proof, TraceStep};

/// Longest CNAME chain followed (resolvers give up around 8 to 16).
const MAX_CHAIN: usize = 8;

/// The label asked under a wildcard alias's parent: any name the wildcard covers must point
/// here, and one no one would create on its own shows what the wildcard does.
const WILDCARD_PROBE: &str = "portcullis-wildcard-check";

/// How a question ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rcode {
    /// An answer came (possibly empty: NODATA).
    NoError,
    NxDomain,
    /// The resolver answered with another code (SERVFAIL, REFUSED, ...).
    Failed(String),
    /// No resolver answered in time.
    Unreachable(String),
}

impl Rcode {
    fn text(&self) -> String {
        match self {
            Rcode::NoError => "NOERROR".into(),
            Rcode::NxDomain => "NXDOMAIN".into(),
            Rcode::Failed(code) => code.clone(),
            Rcode::Unreachable(_) => "TIMEOUT".into(),
        }
    }
}

/// One record of an answer, as the check needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    Cname {
        owner: String,
        target: String,
    },
    /// HTTPS or SVCB: priority 0 is alias mode.
    Svcb {
        owner: String,
        priority: u16,
        target: String,
    },
    Address {
        owner: String,
        ip: IpAddr,
    },
    Txt {
        owner: String,
        text: String,
    },
    Other(String),
}

impl Found {
    fn presentation(&self, rtype: &str) -> String {
        match self {
            Found::Cname { owner, target } => format!("{owner} CNAME {target}"),
            Found::Svcb {
                owner,
                priority,
                target,
            } => format!("{owner} {rtype} {priority} {target}"),
            Found::Address { owner, ip } => {
                let t = if ip.is_ipv4() { "A" } else { "AAAA" };
                format!("{owner} {t} {ip}")
            }
            Found::Txt { owner, text } => format!("{owner} TXT {text:?}"),
            Found::Other(text) => text.clone(),
        }
    }
}

/// What a resolver said to one question.
#[derive(Clone, Debug)]
pub struct Answer {
    pub resolver: String,
    pub rcode: Rcode,
    pub records: Vec<Found>,
    pub took: Duration,
}

/// Asks one question of the public DNS.
#[async_trait]
pub trait Resolve: Send + Sync {
    async fn query(&self, name: &str, rtype: RecordType) -> Answer;
}

/// What one check found.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// `Some`: the name points at the service, by this proof.
    pub proof: Option<Proof>,
    /// What was found, in a sentence, with what to do when it failed.
    pub text: String,
    /// The resolvers could not answer: nothing was learnt about the name.
    pub inconclusive: bool,
    /// `_acme-challenge.<name>` is delegated to the platform.
    pub delegated: bool,
    pub steps: Vec<TraceStep>,
}

/// What the name must point at, and what else counts as the platform.
pub struct Expect<'a> {
    /// `<id>.<zone>`, lowercase, no trailing dot.
    pub canonical: &'a str,
    /// `<label>.acme.<zone>`, lowercase, no trailing dot.
    pub acme_target: &'a str,
    pub token: &'a str,
    /// Every address of the fleet's nodes.
    pub node_addresses: &'a HashSet<IpAddr>,
}

fn same_name(a: &str, b: &str) -> bool {
    a.trim_end_matches('.')
        .eq_ignore_ascii_case(b.trim_end_matches('.'))
}

struct Tracer<'r> {
    dns: &'r dyn Resolve,
    steps: Vec<TraceStep>,
}

impl Tracer<'_> {
    async fn ask(&mut self, name: &str, rtype: RecordType) -> Answer {
        let answer = self.dns.query(name, rtype).await;
        let type_text = rtype.to_string();
        self.steps.push(TraceStep {
            name: name.to_string(),
            rtype: type_text.clone(),
            resolver: answer.resolver.clone(),
            rcode: answer.rcode.text(),
            records: answer
                .records
                .iter()
                .map(|r| r.presentation(&type_text))
                .collect(),
            took_ms: answer.took.as_millis() as u64,
        });
        answer
    }
}

/// Checks `name` against `expect`. Pure but for the questions asked of `dns`.
pub async fn check(dns: &dyn Resolve, name: &AliasName, expect: &Expect<'_>) -> Verdict {
    let mut tracer = Tracer {
        dns,
        steps: Vec::new(),
    };
    let base = name.base();
    let challenge = format!("_acme-challenge.{base}");
    let delegation = tracer.ask(&challenge, RecordType::CNAME).await;
    let delegated = delegation.records.iter().any(
        |r| matches!(r, Found::Cname { owner, target } if same_name(owner, &challenge) && same_name(target, expect.acme_target)),
    );
    let probe = if name.is_wildcard() {
        format!("{WILDCARD_PROBE}.{base}")
    } else {
        base.to_string()
    };
    let (mut proof, mut text, inconclusive) = prove(&mut tracer, name, &probe, expect).await;
    if name.is_wildcard() && proof.is_some() && !delegated {
        // Only DNS-01 issues a wildcard certificate, and only the delegation lets us answer it.
        proof = None;
        text = format!(
            "{text}, but a wildcard alias also needs `{challenge} CNAME {}.` (its certificate can only be had by DNS-01)",
            expect.acme_target
        );
    }
    Verdict {
        proof,
        text,
        inconclusive,
        delegated,
        steps: tracer.steps,
    }
}

async fn prove(
    tracer: &mut Tracer<'_>,
    name: &AliasName,
    probe: &str,
    expect: &Expect<'_>,
) -> (Option<Proof>, String, bool) {
    let canonical = expect.canonical;
    let create = if name.is_wildcard() {
        format!("create `{name} CNAME {canonical}.`")
    } else {
        format!(
            "create `{name} CNAME {canonical}.` (or, at a zone apex, `{name} HTTPS 0 {canonical}.`)"
        )
    };
    // 1. A CNAME chain.
    let mut at = probe.to_string();
    let mut chain: Vec<String> = Vec::new();
    for _ in 0..MAX_CHAIN {
        let answer = tracer.ask(&at, RecordType::CNAME).await;
        match &answer.rcode {
            Rcode::Unreachable(why) => {
                return (
                    None,
                    format!("no resolver answered for {at}: {why}; the check is repeated"),
                    true,
                );
            }
            // The chain leads to a name that does not resolve: wherever it was meant to go,
            // it is not here (a canonical name answers, and has no CNAME).
            Rcode::NxDomain | Rcode::Failed(_) if !chain.is_empty() => {
                return (
                    None,
                    format!(
                        "{probe} CNAME {}: not this platform ({at} answers {}); change it to `{canonical}.`",
                        chain.join(" -> "),
                        answer.rcode.text()
                    ),
                    false,
                );
            }
            Rcode::NxDomain => {
                return (
                    None,
                    format!("{probe} does not exist (NXDOMAIN): {create}"),
                    false,
                );
            }
            Rcode::Failed(code) => {
                return (
                    None,
                    format!(
                        "the DNS servers of {at} fail ({code}): fix them, then {}",
                        create.replacen("create", "point it at us with", 1)
                    ),
                    false,
                );
            }
            Rcode::NoError => {}
        }
        let next = answer.records.iter().find_map(|r| match r {
            Found::Cname { owner, target } if same_name(owner, &at) => Some(target.clone()),
            _ => None,
        });
        let Some(target) = next else { break };
        let target = target.trim_end_matches('.').to_ascii_lowercase();
        chain.push(target.clone());
        if same_name(&target, canonical) {
            return (
                Some(Proof::Cname),
                format!("{probe} CNAME {}: this service", chain.join(" -> ")),
                false,
            );
        }
        at = target;
    }
    if !chain.is_empty() {
        return (
            None,
            format!(
                "{probe} CNAME {}: not this platform; change it to `{canonical}.`",
                chain.join(" -> ")
            ),
            false,
        );
    }
    // 2. HTTPS, then SVCB.
    let mut foreign = Vec::new();
    for rtype in [RecordType::HTTPS, RecordType::SVCB] {
        let answer = tracer.ask(probe, rtype).await;
        if let Rcode::Unreachable(why) = &answer.rcode {
            return (
                None,
                format!("no resolver answered for {probe} {rtype}: {why}; the check is repeated"),
                true,
            );
        }
        for record in &answer.records {
            if let Found::Svcb {
                owner,
                priority,
                target,
            } = record
                && same_name(owner, probe)
            {
                if same_name(target, canonical) {
                    let proof = if *priority == 0 {
                        Proof::HttpsAlias
                    } else {
                        Proof::HttpsService
                    };
                    return (
                        Some(proof),
                        format!("{probe} {rtype} {priority} {target}: this service"),
                        false,
                    );
                }
                foreign.push(format!("{probe} {rtype} {priority} {target}"));
            }
        }
    }
    // 3. Addresses, with the token.
    let mut addresses = Vec::new();
    for rtype in [RecordType::A, RecordType::AAAA] {
        let answer = tracer.ask(probe, rtype).await;
        if let Rcode::Unreachable(why) = &answer.rcode {
            return (
                None,
                format!("no resolver answered for {probe} {rtype}: {why}; the check is repeated"),
                true,
            );
        }
        addresses.extend(answer.records.iter().filter_map(|r| match r {
            Found::Address { ip, .. } => Some(*ip),
            _ => None,
        }));
    }
    if let Some(elsewhere) = foreign.first() {
        return (
            None,
            format!("{elsewhere}: not this platform; {create}"),
            false,
        );
    }
    if addresses.is_empty() {
        return (
            None,
            format!("{probe} has no CNAME, HTTPS or address records: {create}"),
            false,
        );
    }
    if let Some(other) = addresses
        .iter()
        .find(|ip| !expect.node_addresses.contains(&ip.to_canonical()))
    {
        let t = if other.is_ipv4() { "A" } else { "AAAA" };
        return (
            None,
            format!(
                "{probe} {t} {other}: not an address of this platform's nodes; {create}, or use only the nodes' addresses"
            ),
            false,
        );
    }
    if name.is_wildcard() {
        return (
            None,
            format!(
                "{probe} has this platform's addresses, but a wildcard alias needs `{name} CNAME {canonical}.`"
            ),
            false,
        );
    }
    let owner = format!("_portcullis.{probe}");
    let answer = tracer.ask(&owner, RecordType::TXT).await;
    if let Rcode::Unreachable(why) = &answer.rcode {
        return (
            None,
            format!("no resolver answered for {owner} TXT: {why}; the check is repeated"),
            true,
        );
    }
    let has_token = answer
        .records
        .iter()
        .any(|r| matches!(r, Found::Txt { text, .. } if text.trim() == expect.token));
    if has_token {
        return (
            Some(Proof::AddressesAndToken),
            format!("{probe} has only this platform's addresses and {owner} holds the token"),
            false,
        );
    }
    (
        None,
        format!(
            "{probe} points at this platform's addresses, but {owner} has no TXT record \"{}\": create it to show the name is this service's (addresses alone do not say which service)",
            expect.token
        ),
        false,
    )
}

/// The system's or the configured recursive resolvers, asked one after the other.
pub struct PublicDns {
    resolvers: Vec<(String, TokioResolver)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolverSetupError {
    #[error("verify.resolvers: `{0}` is not an IP address or ip:port")]
    BadAddress(String),
    #[error(
        "verify.resolvers is empty and the system's resolvers cannot be read ({0}); list resolvers in verify.resolvers"
    )]
    System(String),
    #[error("verify: cannot set up the resolver: {0}")]
    Build(String),
}

impl PublicDns {
    /// `resolvers`: `ip` or `ip:port` each; empty: the system's (`/etc/resolv.conf`).
    pub fn new(resolvers: &[String], timeout: Duration) -> Result<Self, ResolverSetupError> {
        let mut servers: Vec<std::net::SocketAddr> = Vec::new();
        for text in resolvers {
            let addr = text
                .parse::<std::net::SocketAddr>()
                .or_else(|_| text.parse::<IpAddr>().map(|ip| (ip, 53).into()))
                .map_err(|_| ResolverSetupError::BadAddress(text.clone()))?;
            servers.push(addr);
        }
        if servers.is_empty() {
            let (config, _) = hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| ResolverSetupError::System(e.to_string()))?;
            for server in config.name_servers() {
                let port = server.connections.first().map_or(53, |c| c.port);
                servers.push((server.ip, port).into());
            }
            servers.dedup();
            if servers.is_empty() {
                return Err(ResolverSetupError::System("it lists no nameserver".into()));
            }
        }
        let mut out = Vec::new();
        for server in servers {
            let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                .into_iter()
                .map(|mut c| {
                    c.port = server.port();
                    c
                })
                .collect();
            let mut options = ResolverOpts::default();
            // Each check must see the DNS as it is now: no cache of our own.
            options.cache_size = 0;
            options.timeout = timeout;
            options.attempts = 1;
            options.use_hosts_file = ResolveHosts::Never;
            options.preserve_intermediates = true;
            options.num_concurrent_reqs = 1;
            options.ndots = 0;
            let resolver = TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![NameServerConfig::new(
                    server.ip(),
                    true,
                    connections,
                )]),
                TokioRuntimeProvider::default(),
            )
            .with_options(options)
            .build()
            .map_err(|e| ResolverSetupError::Build(e.to_string()))?;
            out.push((server.to_string(), resolver));
        }
        Ok(PublicDns { resolvers: out })
    }

    pub fn resolvers(&self) -> Vec<String> {
        self.resolvers.iter().map(|(a, _)| a.clone()).collect()
    }
}

fn found(record: &hickory_proto::rr::Record) -> Found {
    let owner = record.name.to_ascii().trim_end_matches('.').to_string();
    match &record.data {
        RData::CNAME(target) => Found::Cname {
            owner,
            target: target.0.to_ascii().trim_end_matches('.').to_string(),
        },
        RData::HTTPS(https) => Found::Svcb {
            owner,
            priority: https.0.svc_priority,
            target: https.0.target_name.to_ascii(),
        },
        RData::SVCB(svcb) => Found::Svcb {
            owner,
            priority: svcb.svc_priority,
            target: svcb.target_name.to_ascii(),
        },
        RData::A(a) => Found::Address {
            owner,
            ip: IpAddr::V4(a.0),
        },
        RData::AAAA(aaaa) => Found::Address {
            owner,
            ip: IpAddr::V6(aaaa.0),
        },
        RData::TXT(txt) => Found::Txt {
            owner,
            text: txt
                .txt_data
                .iter()
                .map(|part| String::from_utf8_lossy(part))
                .collect(),
        },
        other => Found::Other(format!("{owner} {} {other}", record.record_type())),
    }
}

#[async_trait]
impl Resolve for PublicDns {
    async fn query(&self, name: &str, rtype: RecordType) -> Answer {
        let started = Instant::now();
        let fqdn = match Name::from_ascii(format!("{}.", name.trim_end_matches('.'))) {
            Ok(n) => n,
            Err(e) => {
                return Answer {
                    resolver: String::new(),
                    rcode: Rcode::Failed(format!("BADNAME ({e})")),
                    records: Vec::new(),
                    took: started.elapsed(),
                };
            }
        };
        let mut last = None;
        for (address, resolver) in &self.resolvers {
            let started = Instant::now();
            let rcode_records = match resolver.lookup(fqdn.clone(), rtype).await {
                Ok(lookup) => Ok((Rcode::NoError, lookup.answers().iter().map(found).collect())),
                Err(NetError::Dns(DnsError::NoRecordsFound(none))) => {
                    Ok((rcode_of(none.response_code), Vec::new()))
                }
                Err(NetError::Dns(DnsError::ResponseCode(code))) => {
                    Ok((rcode_of(code), Vec::new()))
                }
                Err(e) => Err(e.to_string()),
            };
            match rcode_records {
                Ok((rcode, records)) => {
                    return Answer {
                        resolver: address.clone(),
                        rcode,
                        records,
                        took: started.elapsed(),
                    };
                }
                // This resolver did not answer: the next one may.
                Err(why) => last = Some((address.clone(), why)),
            }
        }
        let (resolver, why) = last.unwrap_or_default();
        Answer {
            resolver,
            rcode: Rcode::Unreachable(why),
            records: Vec::new(),
            took: started.elapsed(),
        }
    }
}

/// Stands in for resolvers that could not be set up: every question is unanswered, and says
/// why.
pub struct NoResolvers(pub String);

#[async_trait]
impl Resolve for NoResolvers {
    async fn query(&self, _name: &str, _rtype: RecordType) -> Answer {
        Answer {
            resolver: String::new(),
            rcode: Rcode::Unreachable(self.0.clone()),
            records: Vec::new(),
            took: Duration::ZERO,
        }
    }
}

fn rcode_of(code: ResponseCode) -> Rcode {
    match code {
        ResponseCode::NoError => Rcode::NoError,
        ResponseCode::NXDomain => Rcode::NxDomain,
        // The mnemonics of RFC 1035 and RFC 6895, as dig prints them.
        ResponseCode::ServFail => Rcode::Failed("SERVFAIL".into()),
        ResponseCode::Refused => Rcode::Failed("REFUSED".into()),
        ResponseCode::FormErr => Rcode::Failed("FORMERR".into()),
        ResponseCode::NotImp => Rcode::Failed("NOTIMP".into()),
        other => Rcode::Failed(format!("RCODE{}", u16::from(other))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A zone as a resolver would answer for it.
    #[derive(Default)]
    struct World {
        answers: HashMap<(String, RecordType), Vec<Found>>,
        missing: HashSet<String>,
        down: bool,
    }

    #[async_trait]
    impl Resolve for World {
        async fn query(&self, name: &str, rtype: RecordType) -> Answer {
            let rcode = if self.down {
                Rcode::Unreachable("timed out".into())
            } else if self.missing.contains(name) {
                Rcode::NxDomain
            } else {
                Rcode::NoError
            };
            Answer {
                resolver: "192.0.2.53:53".into(),
                rcode,
                records: self
                    .answers
                    .get(&(name.to_string(), rtype))
                    .cloned()
                    .unwrap_or_default(),
                took: Duration::from_millis(1),
            }
        }
    }

    const CANONICAL: &str = "0b5f0c2e-1b6a-4b8e-9a43-1d1f3c6a7e10.app.edge.example";

    fn cname(owner: &str, target: &str) -> Found {
        Found::Cname {
            owner: owner.into(),
            target: target.into(),
        }
    }

    fn run(world: &World, name: &str) -> Verdict {
        let nodes: HashSet<IpAddr> = ["192.0.2.10".parse().unwrap()].into();
        let expect = Expect {
            canonical: CANONICAL,
            acme_target: "abc.acme.app.edge.example",
            token: "portcullis-token",
            node_addresses: &nodes,
        };
        let name = AliasName::parse(name).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(check(world, &name, &expect))
    }

    #[test]
    fn a_cname_chain_to_the_canonical_name_verifies() {
        let mut world = World::default();
        world.answers.insert(
            ("api.example.com".into(), RecordType::CNAME),
            vec![cname("api.example.com", "lb.example.net")],
        );
        world.answers.insert(
            ("lb.example.net".into(), RecordType::CNAME),
            vec![cname("lb.example.net", CANONICAL)],
        );
        let v = run(&world, "api.example.com");
        assert_eq!(v.proof, Some(Proof::Cname), "{}", v.text);
        assert_eq!(v.steps.len(), 3, "{:?}", v.steps);
        assert!(!v.delegated);
    }

    #[test]
    fn a_cname_elsewhere_fails_naming_the_target() {
        let mut world = World::default();
        world.answers.insert(
            ("api.example.com".into(), RecordType::CNAME),
            vec![cname("api.example.com", "app.other-host.net")],
        );
        let v = run(&world, "api.example.com");
        assert_eq!(v.proof, None);
        assert!(
            v.text
                .starts_with("api.example.com CNAME app.other-host.net: not this platform"),
            "{}",
            v.text
        );
    }

    #[test]
    fn an_apex_alias_mode_https_record_verifies() {
        let mut world = World::default();
        world.answers.insert(
            ("example.com".into(), RecordType::HTTPS),
            vec![Found::Svcb {
                owner: "example.com".into(),
                priority: 0,
                target: format!("{CANONICAL}."),
            }],
        );
        assert_eq!(run(&world, "example.com").proof, Some(Proof::HttpsAlias));
    }

    #[test]
    fn addresses_need_the_token_too() {
        let mut world = World::default();
        world.answers.insert(
            ("example.com".into(), RecordType::A),
            vec![Found::Address {
                owner: "example.com".into(),
                ip: "192.0.2.10".parse().unwrap(),
            }],
        );
        let v = run(&world, "example.com");
        assert_eq!(v.proof, None);
        assert!(
            v.text.contains("_portcullis.example.com has no TXT record"),
            "{}",
            v.text
        );
        world.answers.insert(
            ("_portcullis.example.com".into(), RecordType::TXT),
            vec![Found::Txt {
                owner: "_portcullis.example.com".into(),
                text: "portcullis-token".into(),
            }],
        );
        assert_eq!(
            run(&world, "example.com").proof,
            Some(Proof::AddressesAndToken)
        );
        // A foreign address among ours is not this platform, token or not.
        world.answers.insert(
            ("example.com".into(), RecordType::AAAA),
            vec![Found::Address {
                owner: "example.com".into(),
                ip: "2001:db8::1".parse().unwrap(),
            }],
        );
        let v = run(&world, "example.com");
        assert_eq!(v.proof, None);
        assert!(v.text.contains("AAAA 2001:db8::1"), "{}", v.text);
    }

    #[test]
    fn nxdomain_and_silence_are_told_apart() {
        let mut world = World::default();
        world.missing.insert("gone.example.com".into());
        let v = run(&world, "gone.example.com");
        assert!(!v.inconclusive);
        assert!(v.text.contains("NXDOMAIN"), "{}", v.text);
        world.down = true;
        let v = run(&world, "gone.example.com");
        assert!(v.inconclusive, "{}", v.text);
        assert_eq!(v.proof, None);
    }

    #[test]
    fn a_wildcard_is_proven_through_a_probe_name_and_delegation_is_seen() {
        let mut world = World::default();
        let probe = format!("{WILDCARD_PROBE}.shop.example.com");
        world.answers.insert(
            (probe.clone(), RecordType::CNAME),
            vec![cname(&probe, CANONICAL)],
        );
        world.answers.insert(
            ("_acme-challenge.shop.example.com".into(), RecordType::CNAME),
            vec![cname(
                "_acme-challenge.shop.example.com",
                "abc.acme.app.edge.example.",
            )],
        );
        let v = run(&world, "*.shop.example.com");
        assert_eq!(v.proof, Some(Proof::Cname), "{}", v.text);
        assert!(v.delegated);
    }
}
