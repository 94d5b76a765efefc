//! The zones as the responder sees them at one Snapshot, and the RFC 1034 §4.3.2 lookup over them.
//!
//! Services and alias domains are not copied out of the Snapshot: their records are made on the
//! spot from the service index, so a million services cost no memory here. Custom records are
//! few; they are parsed once per change into an index by owner name, together with the empty
//! non-terminals above them, so every existence question is one hash lookup.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use hickory_proto::rr::rdata::svcb::{Alpn, IpHint, SVCB, SvcParamKey, SvcParamValue};
use hickory_proto::rr::rdata::{A, AAAA, HTTPS, NS, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use portcullis_config::Snapshot;
use portcullis_config::file::{AnswerPolicy, DnsSection, NodeConfig};
use portcullis_config::model::RecordType as StoredType;
use portcullis_config::names::uuid_bits;

use crate::clients::{ClientTable, Group};
use crate::records::{parse_record, to_name};
use crate::wire::SoaParts;

/// CNAME links followed inside our zones before giving up (a chain this long is a mistake).
pub const MAX_CNAME_CHAIN: usize = 8;

/// Everything in the config that shapes answers; fixed for the life of the node.
#[derive(Clone, Debug)]
pub struct ZoneSettings {
    pub platform: Name,
    /// Other zones answered from custom records only.
    pub extra: Vec<Name>,
    pub nameservers: Vec<Name>,
    pub hostmaster: Option<Name>,
    pub dns: DnsSection,
    pub caa: Vec<RData>,
    pub self_v4: Vec<Ipv4Addr>,
    pub self_v6: Vec<Ipv6Addr>,
    pub node_id: String,
    /// `[[dns.clients]]` networks, for `policy = "by-client"` (empty otherwise).
    pub clients: ClientTable,
}

impl ZoneSettings {
    /// Reads the node config; fails on a zone or CAA entry hickory cannot represent.
    pub fn from_config(config: &NodeConfig) -> Result<Self, String> {
        let platform = to_name(config.zone.name.as_str())?;
        let extra = config
            .dns
            .zones
            .iter()
            .map(|z| to_name(z.as_str()))
            .collect::<Result<_, _>>()?;
        let nameservers = config
            .zone
            .nameservers
            .iter()
            .map(|n| to_name(n.as_str()))
            .collect::<Result<_, _>>()?;
        let hostmaster = config
            .dns
            .soa
            .hostmaster
            .as_ref()
            .map(|h| to_name(h.as_str()))
            .transpose()?;
        let caa = config
            .dns
            .caa
            .iter()
            .map(|c| crate::records::parse_caa(c).map_err(|e| format!("dns.caa `{c}`: {e}")))
            .collect::<Result<_, _>>()?;
        let by_client = config.dns.policy == AnswerPolicy::ByClient;
        if by_client && config.dns.clients.is_empty() {
            return Err(
                "dns.policy = \"by-client\" needs at least one [[dns.clients]] entry \
                        (networks = [...], with nodes = [...] or addresses = [...])"
                    .into(),
            );
        }
        for (i, group) in config.dns.clients.iter().enumerate() {
            if group.networks.is_empty() || (group.nodes.is_empty() && group.addresses.is_empty()) {
                return Err(format!(
                    "dns.clients[{i}] needs networks and at least one of nodes or addresses"
                ));
            }
        }
        let clients = if by_client {
            ClientTable::new(&config.dns.clients)
        } else {
            ClientTable::default()
        };
        Ok(ZoneSettings {
            node_id: config.node.id.as_str().to_string(),
            clients,
            platform,
            extra,
            nameservers,
            hostmaster,
            dns: config.dns.clone(),
            caa,
            self_v4: config.node.public_ipv4.clone(),
            self_v6: config.node.public_ipv6.clone(),
        })
    }
}

/// One zone's apex data.
#[derive(Debug)]
struct Apex {
    name: Name,
    labels: u8,
    soa: Record,
    /// TTL of negative answers: min(SOA TTL, MINIMUM), RFC 2308 §3.
    negative_soa: Record,
    /// `negative_soa` in parts, for NXDOMAIN answers written directly.
    negative_soa_parts: Option<SoaParts>,
    ns: Vec<Record>,
    caa: Vec<Record>,
    platform: bool,
}

/// The RRsets at one owner name among the custom records; empty for an empty non-terminal.
#[derive(Debug, Default)]
struct Owner {
    sets: Vec<(RecordType, Vec<Record>)>,
}

impl Owner {
    fn get(&self, rtype: RecordType) -> Option<&[Record]> {
        self.sets
            .iter()
            .find(|(t, _)| *t == rtype)
            .map(|(_, r)| r.as_slice())
    }
}

/// Custom records by owner name (lowercase), with the empty non-terminals above them.
#[derive(Debug, Default)]
pub struct CustomRecords {
    owners: HashMap<Name, Owner>,
    /// Owners with an NS set below a zone apex: a delegation to check on the way down.
    has_delegations: bool,
}

impl CustomRecords {
    pub fn build(snapshot: &Snapshot, apexes: &[Name]) -> Self {
        let mut owners: HashMap<Name, Owner> = HashMap::new();
        let mut has_delegations = false;
        for stored in snapshot.records() {
            let records = match parse_record(stored) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(name = %stored.name, rtype = %stored.rtype, error = %e, "skipping a custom record that does not parse");
                    continue;
                }
            };
            let Some(first) = records.first() else {
                continue;
            };
            let owner = first.name.to_lowercase();
            let Some(apex) = apexes
                .iter()
                .filter(|a| a.zone_of(&owner))
                .max_by_key(|a| a.num_labels())
            else {
                continue;
            };
            if stored.rtype == StoredType::Ns && owner != *apex {
                has_delegations = true;
            }
            // Empty non-terminals: every name between the owner and its apex exists.
            let mut parent = owner.base_name();
            while label_count(&parent) > label_count(apex) {
                owners.entry(parent.clone()).or_default();
                parent = parent.base_name();
            }
            let rtype = first.record_type();
            let entry = owners.entry(owner).or_default();
            match entry.sets.iter_mut().find(|(t, _)| *t == rtype) {
                Some((_, set)) => set.extend(records),
                None => entry.sets.push((rtype, records)),
            }
        }
        CustomRecords {
            owners,
            has_delegations,
        }
    }
}

/// The addresses service names resolve to, by the answer policy.
#[derive(Debug, Default, Clone)]
pub struct Addresses {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

impl Addresses {
    fn sorted(mut self) -> Self {
        self.v4.sort();
        self.v4.dedup();
        self.v6.sort();
        self.v6.dedup();
        self
    }

    fn push(&mut self, ip: IpAddr) {
        match ip.to_canonical() {
            IpAddr::V4(v4) => self.v4.push(v4),
            IpAddr::V6(v6) => self.v6.push(v6),
        }
    }
}

/// The addresses of each client group (index 0: everyone not in a listed network).
#[derive(Debug, Default, Clone)]
pub struct AddressBook {
    groups: Vec<Addresses>,
}

impl AddressBook {
    pub fn for_policy(settings: &ZoneSettings, snapshot: &Snapshot) -> Self {
        let this = Addresses {
            v4: settings.self_v4.clone(),
            v6: settings.self_v6.clone(),
        };
        let mut fleet = this.clone();
        for node in snapshot.nodes() {
            fleet.v4.extend(&node.ipv4);
            fleet.v6.extend(&node.ipv6);
        }
        let fleet = fleet.sorted();
        let mut groups = vec![match settings.dns.policy {
            AnswerPolicy::This => this.clone(),
            AnswerPolicy::Fleet | AnswerPolicy::ByClient => fleet,
        }];
        if settings.dns.policy == AnswerPolicy::ByClient {
            for group in &settings.dns.clients {
                let mut addrs = Addresses::default();
                for ip in &group.addresses {
                    addrs.push(*ip);
                }
                for id in &group.nodes {
                    if id.as_str() == settings.node_id {
                        addrs.v4.extend(&this.v4);
                        addrs.v6.extend(&this.v6);
                    }
                    // Only live nodes are in the Snapshot: a group whose nodes are all gone
                    // answers with its static addresses, or NODATA.
                    for node in snapshot.nodes().filter(|n| n.id == id.as_str()) {
                        addrs.v4.extend(&node.ipv4);
                        addrs.v6.extend(&node.ipv6);
                    }
                }
                groups.push(addrs.sorted());
            }
        }
        AddressBook { groups }
    }

    fn get(&self, group: Group) -> &Addresses {
        static NONE: Addresses = Addresses {
            v4: Vec::new(),
            v6: Vec::new(),
        };
        self.groups
            .get(group)
            .or_else(|| self.groups.first())
            .unwrap_or(&NONE)
    }
}

/// One lookup's client-dependent part.
struct Ctx<'a> {
    addresses: &'a Addresses,
    /// Whether the answer used the client's addresses (else the ECS scope is 0).
    tailored: Cell<bool>,
}

/// The responder's whole picture at one Snapshot.
#[derive(Debug)]
pub struct ZoneView {
    pub snapshot: Arc<Snapshot>,
    apexes: Vec<Apex>,
    custom: Arc<CustomRecords>,
    addresses: Arc<AddressBook>,
    settings: Arc<ZoneSettings>,
    serial: u32,
}

/// Where a lookup ended, before it becomes a message.
#[derive(Debug, Default, PartialEq)]
pub struct Lookup {
    pub rcode: Rcode,
    pub authoritative: bool,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
    /// The answer depends on the client's group (by-client policy).
    pub tailored: bool,
    /// Names besides the question's whose records the answer carries (CNAME targets, glue
    /// owners): a cached answer is stale when one of them, or a name above one, changes.
    pub depends_on: Vec<Name>,
}

impl Lookup {
    /// Whether the answer holds the zone's SOA, and with it the serial that every change moves.
    pub fn has_soa(&self) -> bool {
        self.answers
            .iter()
            .chain(&self.authorities)
            .any(|r| r.record_type() == RecordType::SOA)
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    #[default]
    NoError,
    NxDomain,
    Refused,
}

/// What exists at a name.
enum Found<'a> {
    /// Records made from the Snapshot (service, alias, nameserver, apex), plus custom ones.
    Sets(Vec<(RecordType, Vec<Record>)>, Option<&'a Owner>),
    Missing,
}

impl ZoneView {
    pub fn new(
        snapshot: Arc<Snapshot>,
        settings: Arc<ZoneSettings>,
        custom: Arc<CustomRecords>,
        addresses: Arc<AddressBook>,
        serial: u32,
    ) -> Self {
        let soa_cfg = &settings.dns.soa;
        let mut apexes = Vec::new();
        let zones = std::iter::once((&settings.platform, true))
            .chain(settings.extra.iter().map(|z| (z, false)));
        for (zone, platform) in zones {
            let mname = settings
                .nameservers
                .first()
                .cloned()
                .unwrap_or_else(|| prepend(zone, "ns"));
            let rname = settings
                .hostmaster
                .clone()
                .unwrap_or_else(|| prepend(zone, "hostmaster"));
            let soa = SOA::new(
                mname,
                rname,
                serial,
                clamp_i32(soa_cfg.refresh),
                clamp_i32(soa_cfg.retry),
                clamp_i32(soa_cfg.expire),
                soa_cfg.minimum,
            );
            let soa_record = Record::from_rdata(zone.clone(), soa_cfg.ttl, RData::SOA(soa));
            let mut negative_soa = soa_record.clone();
            negative_soa.ttl = soa_cfg.ttl.min(soa_cfg.minimum);
            let negative_soa_parts = SoaParts::new(&negative_soa);
            let ns = settings
                .nameservers
                .iter()
                .map(|n| Record::from_rdata(zone.clone(), soa_cfg.ttl, RData::NS(NS(n.clone()))))
                .collect();
            let caa = if platform {
                settings
                    .caa
                    .iter()
                    .map(|c| Record::from_rdata(zone.clone(), soa_cfg.ttl, c.clone()))
                    .collect()
            } else {
                Vec::new()
            };
            apexes.push(Apex {
                name: zone.clone(),
                labels: zone.num_labels(),
                soa: soa_record,
                negative_soa,
                negative_soa_parts,
                ns,
                caa,
                platform,
            });
        }
        ZoneView {
            snapshot,
            apexes,
            custom,
            addresses,
            settings,
            serial,
        }
    }

    /// The SOA serial of every zone served.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    pub fn apex_names(settings: &ZoneSettings) -> Vec<Name> {
        std::iter::once(settings.platform.clone())
            .chain(settings.extra.iter().cloned())
            .collect()
    }

    /// Answers one question (class IN) for a client of `group`. `qname` may be in any case;
    /// answers carry it as asked.
    pub fn lookup(&self, qname: &Name, qtype: RecordType, group: Group) -> Lookup {
        let ctx = Ctx {
            addresses: self.addresses.get(group),
            tailored: Cell::new(false),
        };
        let mut out = self.lookup_in(qname, qtype, &ctx);
        out.tailored = ctx.tailored.get() && self.settings.dns.policy == AnswerPolicy::ByClient;
        out
    }

    /// Whether our own answers send a resolver (a CA validating) to addresses for `name`: A or
    /// AAAA records at the end of any in-zone CNAME chain, for the default client group.
    /// `None` when the name is not in our zones (someone else's DNS decides).
    pub fn resolves_to_addresses(&self, name: &str) -> Option<bool> {
        let name = to_name(name).ok()?;
        if self.outside(&name) {
            return None;
        }
        let found = [RecordType::A, RecordType::AAAA].iter().any(|t| {
            self.lookup(&name, *t, 0)
                .answers
                .iter()
                .any(|r| matches!(r.data, RData::A(_) | RData::AAAA(_)))
        });
        Some(found)
    }

    pub fn clients(&self) -> &ClientTable {
        &self.settings.clients
    }

    /// The negative-answer SOA of the zone holding `name`, in parts for a direct writer.
    pub fn negative_soa(&self, name: &Name) -> Option<&SoaParts> {
        self.apex_for(name)?.negative_soa_parts.as_ref()
    }

    /// Whether a name is outside every zone we serve (a question for a forwarder, if any).
    pub fn outside(&self, name: &Name) -> bool {
        self.apex_for(name).is_none()
    }

    fn lookup_in(&self, qname: &Name, qtype: RecordType, ctx: &Ctx) -> Lookup {
        let mut out = Lookup::default();
        let Some(apex) = self.apex_for(qname) else {
            out.rcode = Rcode::Refused;
            return out;
        };
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            out.rcode = Rcode::Refused;
            return out;
        }
        out.authoritative = true;
        let mut name = qname.clone();
        let mut apex = apex;
        let mut seen: Vec<Name> = Vec::new();
        loop {
            if let Some(referral) = self.delegation(apex, &name, qtype) {
                // Below a zone cut we are not authoritative: a referral, unless the CNAME chain
                // already gave an authoritative answer.
                if out.answers.is_empty() {
                    out.authoritative = false;
                }
                out.additionals
                    .extend(self.glue(&referral, ctx, &mut out.depends_on));
                out.authorities.extend(referral);
                return out;
            }
            let (sets, owner_name) = match self.find(apex, &name, ctx) {
                Found::Sets(sets, custom) => (merge(sets, custom), name.clone()),
                Found::Missing => match self.wildcard(apex, &name, ctx) {
                    Some(sets) => (sets, name.clone()),
                    None => {
                        out.rcode = Rcode::NxDomain;
                        out.authorities.push(apex.negative_soa.clone());
                        return out;
                    }
                },
            };
            let wanted = if qtype == RecordType::ANY {
                // RFC 8482: one RRset is a full answer to ANY.
                sets.first().map(|(t, _)| *t)
            } else {
                Some(qtype)
            };
            if let Some(set) = wanted.and_then(|t| sets.iter().find(|(st, _)| *st == t)) {
                out.answers
                    .extend(set.1.iter().map(|r| with_owner(r, &owner_name)));
                if qtype == RecordType::NS && label_count(&name) == apex.labels {
                    out.additionals
                        .extend(self.glue(&set.1, ctx, &mut out.depends_on));
                }
                return out;
            }
            let cname = sets.iter().find(|(t, _)| *t == RecordType::CNAME);
            let Some((_, cname)) = cname else {
                out.authorities.push(apex.negative_soa.clone());
                return out;
            };
            let Some(first) = cname.first() else {
                out.authorities.push(apex.negative_soa.clone());
                return out;
            };
            out.answers.push(with_owner(first, &owner_name));
            let RData::CNAME(target) = &first.data else {
                return out;
            };
            let target = target.0.clone();
            seen.push(name.to_lowercase());
            if seen.len() >= MAX_CNAME_CHAIN || seen.contains(&target.to_lowercase()) {
                // A loop or an absurd chain: what we have is the answer; the client gives up.
                return out;
            }
            match self.apex_for(&target) {
                Some(next) => {
                    out.depends_on.push(target.to_lowercase());
                    apex = next;
                    name = target;
                }
                // Out of our zones: the resolver takes it from here.
                None => return out,
            }
        }
    }

    /// The whole zone at `apex` for a transfer (RFC 5936): its SOA first and last, every other
    /// record between, service addresses as the default client group gets them. `None` when
    /// `apex` is not one of our zones.
    pub fn transfer(&self, apex: &Name) -> Option<Vec<Record>> {
        let zone = self.apexes.iter().find(|a| a.name == apex.to_lowercase())?;
        let ctx = Ctx {
            addresses: self.addresses.get(0),
            tailored: Cell::new(false),
        };
        let mut names: Vec<Name> = vec![zone.name.clone()];
        if zone.platform {
            names.extend(
                self.snapshot
                    .services()
                    .map(|s| prepend(&zone.name, &s.id.to_string())),
            );
        }
        for domain in self.snapshot.domains() {
            if domain.is_live()
                && !domain.name.is_wildcard()
                && let Ok(name) = to_name(domain.name.as_str())
            {
                names.push(name);
            }
        }
        names.extend(self.settings.nameservers.iter().cloned());
        names.extend(self.custom.owners.keys().cloned());
        names.retain(|n| self.apex_for(n).is_some_and(|a| a.name == zone.name));
        names.sort();
        names.dedup();
        let mut out = vec![zone.soa.clone()];
        for name in &names {
            if let Found::Sets(sets, custom) = self.find(zone, name, &ctx) {
                for (rtype, set) in merge(sets, custom) {
                    if rtype != RecordType::SOA {
                        out.extend(set);
                    }
                }
            }
        }
        out.push(zone.soa.clone());
        Some(out)
    }

    fn apex_for(&self, name: &Name) -> Option<&Apex> {
        self.apexes
            .iter()
            .filter(|a| a.name.zone_of(name))
            .max_by_key(|a| a.labels)
    }

    /// NS records of a zone cut between the apex (excluded) and `name` (included; excluded for
    /// DS, which lives on the parent side of a cut, RFC 4035 §3.1.4.1). A name the node manages
    /// (a service, an alias, a nameserver) is never a cut: the records API refuses an NS there,
    /// and one written before the name came into use must not take it away.
    fn delegation(&self, apex: &Apex, name: &Name, qtype: RecordType) -> Option<Vec<Record>> {
        if !self.custom.has_delegations {
            return None;
        }
        let last = label_count(name) - u8::from(qtype == RecordType::DS);
        for labels in apex.labels + 1..=last {
            let cut = name.trim_to(labels as usize);
            if let Some(ns) = self
                .custom
                .owners
                .get(&cut)
                .and_then(|o| o.get(RecordType::NS))
                && !self.is_managed(apex, &cut)
            {
                return Some(ns.to_vec());
            }
        }
        None
    }

    /// A/AAAA for the in-zone targets of NS records; the targets are noted in `depends_on`.
    fn glue(&self, ns: &[Record], ctx: &Ctx, depends_on: &mut Vec<Name>) -> Vec<Record> {
        let mut glue = Vec::new();
        for record in ns {
            let RData::NS(target) = &record.data else {
                continue;
            };
            let Some(apex) = self.apex_for(&target.0) else {
                continue;
            };
            depends_on.push(target.0.to_lowercase());
            // A target that only a wildcard covers gets the synthesized addresses, as Knot
            // and BIND give them.
            let sets = match self.find(apex, &target.0, ctx) {
                Found::Sets(sets, custom) => merge(sets, custom),
                Found::Missing => self.wildcard(apex, &target.0, ctx).unwrap_or_default(),
            };
            for (t, set) in sets {
                if matches!(t, RecordType::A | RecordType::AAAA) {
                    glue.extend(set.iter().map(|r| with_owner(r, &target.0)));
                }
            }
        }
        glue
    }

    /// The RRsets that exist at exactly `name`.
    fn find<'a>(&'a self, apex: &Apex, name: &Name, ctx: &Ctx) -> Found<'a> {
        let custom = self.custom.owners.get(name);
        let mut made = Vec::new();
        if label_count(name) == apex.labels {
            made.push((RecordType::SOA, vec![apex.soa.clone()]));
            if !apex.ns.is_empty() {
                made.push((RecordType::NS, apex.ns.clone()));
            }
            if !apex.caa.is_empty() {
                made.push((RecordType::CAA, apex.caa.clone()));
            }
            if self.is_nameserver(name) {
                self.push_addresses(&mut made, name, ctx);
            }
            return Found::Sets(made, custom);
        }
        if apex.platform && self.is_service(apex, name) {
            self.push_addresses(&mut made, name, ctx);
            made.push((RecordType::HTTPS, vec![self.https_record(name, ctx)]));
            return Found::Sets(made, custom);
        }
        // `acme.<zone>` exists (empty) above the challenge labels: resolvers that minimise
        // their questions ask it first, and an NXDOMAIN there would end their search.
        if apex.platform
            && label_count(name) == apex.labels + 1
            && name
                .iter()
                .next()
                .is_some_and(|l| l.eq_ignore_ascii_case(b"acme"))
        {
            return Found::Sets(made, custom);
        }
        if apex.platform
            && let Some(values) = self.dns_challenge(apex, name)
        {
            made.push((RecordType::TXT, values));
            return Found::Sets(made, custom);
        }
        if let Some(service) = self.alias_service(name) {
            self.push_addresses(&mut made, name, ctx);
            // `HTTPS 1 <canonical name>.`: clients that follow it land on the service's name,
            // with the same parameters.
            let target = self
                .apexes
                .iter()
                .find(|a| a.platform)
                .map(|a| prepend(&a.name, &service.to_string()));
            made.push((
                RecordType::HTTPS,
                vec![self.https_record_to(name, target, ctx)],
            ));
            return Found::Sets(made, custom);
        }
        if self.is_nameserver(name) {
            self.push_addresses(&mut made, name, ctx);
            return Found::Sets(made, custom);
        }
        match custom {
            Some(_) => Found::Sets(made, custom),
            None => Found::Missing,
        }
    }

    /// Whether the node makes the records at `name`: the apex, a service, an alias, a nameserver.
    fn is_managed(&self, apex: &Apex, name: &Name) -> bool {
        label_count(name) == apex.labels
            || (apex.platform && self.is_service(apex, name))
            || self.alias_service(name).is_some()
            || self.is_nameserver(name)
    }

    /// RFC 4592: the source of synthesis is `*.<closest encloser>` and nothing else.
    fn wildcard(
        &self,
        apex: &Apex,
        name: &Name,
        ctx: &Ctx,
    ) -> Option<Vec<(RecordType, Vec<Record>)>> {
        // Wildcards are custom records: without any, there is nothing to find.
        if self.custom.owners.is_empty() {
            return None;
        }
        let mut encloser = name.base_name();
        while label_count(&encloser) > apex.labels {
            if !matches!(self.find(apex, &encloser, ctx), Found::Missing) {
                break;
            }
            encloser = encloser.base_name();
        }
        let source = encloser.prepend_label("*").ok()?;
        let owner = self.custom.owners.get(&source)?;
        Some(owner.sets.clone())
    }

    fn is_service(&self, apex: &Apex, name: &Name) -> bool {
        if label_count(name) != apex.labels + 1 {
            return false;
        }
        let Some(label) = name.iter().next() else {
            return false;
        };
        uuid_bits(label).is_some_and(|bits| {
            self.snapshot
                .service(&portcullis_config::ServiceId(uuid::Uuid::from_u128(bits)))
                .is_some()
        })
    }

    /// The service of the live alias domain `name`, if it is one.
    fn alias_service(&self, name: &Name) -> Option<portcullis_config::ServiceId> {
        // Most platforms have few aliases or none: skip the name's text form then.
        self.snapshot.domains().next()?;
        let text = name.to_lowercase().to_ascii();
        self.snapshot
            .live_alias(text.trim_end_matches('.'))
            .map(|d| d.service)
    }

    /// The DNS-01 values at `<label>.acme.<platform zone>`, where owners delegate
    /// `_acme-challenge` of their names by CNAME. TTL 0: each order's values are new.
    fn dns_challenge(&self, apex: &Apex, name: &Name) -> Option<Vec<Record>> {
        if label_count(name) != apex.labels + 2 {
            return None;
        }
        let mut labels = name.iter();
        let label = labels.next()?;
        if !labels.next()?.eq_ignore_ascii_case(b"acme") {
            return None;
        }
        let label = std::str::from_utf8(label).ok()?.to_ascii_lowercase();
        let challenge = self.snapshot.dns_challenge(&label)?;
        Some(
            challenge
                .values
                .iter()
                .map(|v| Record::from_rdata(name.clone(), 0, RData::TXT(TXT::new(vec![v.clone()]))))
                .collect(),
        )
    }

    fn is_nameserver(&self, name: &Name) -> bool {
        self.settings.nameservers.iter().any(|n| n == name)
    }

    fn push_addresses(&self, made: &mut Vec<(RecordType, Vec<Record>)>, name: &Name, ctx: &Ctx) {
        let ttl = self.settings.dns.address_ttl;
        ctx.tailored.set(true);
        let addresses = ctx.addresses;
        if !addresses.v4.is_empty() {
            let a = addresses
                .v4
                .iter()
                .map(|ip| Record::from_rdata(name.clone(), ttl, RData::A(A(*ip))))
                .collect();
            made.push((RecordType::A, a));
        }
        if !addresses.v6.is_empty() {
            let aaaa = addresses
                .v6
                .iter()
                .map(|ip| Record::from_rdata(name.clone(), ttl, RData::AAAA(AAAA(*ip))))
                .collect();
            made.push((RecordType::AAAA, aaaa));
        }
    }

    /// `1 . alpn="h2,http/1.1" ipv4hint=… ipv6hint=…`, SvcParams in key order (RFC 9460 §2.2).
    fn https_record(&self, name: &Name, ctx: &Ctx) -> Record {
        self.https_record_to(name, None, ctx)
    }

    /// An HTTPS record at `name` in service mode, targeting `target` (`.`: the name itself).
    fn https_record_to(&self, name: &Name, target: Option<Name>, ctx: &Ctx) -> Record {
        ctx.tailored.set(true);
        let addresses = ctx.addresses;
        let mut params = vec![(
            SvcParamKey::Alpn,
            SvcParamValue::Alpn(Alpn(vec!["h2".into(), "http/1.1".into()])),
        )];
        if !addresses.v4.is_empty() {
            let hints = addresses.v4.iter().map(|ip| A(*ip)).collect();
            params.push((
                SvcParamKey::Ipv4Hint,
                SvcParamValue::Ipv4Hint(IpHint(hints)),
            ));
        }
        if !addresses.v6.is_empty() {
            let hints = addresses.v6.iter().map(|ip| AAAA(*ip)).collect();
            params.push((
                SvcParamKey::Ipv6Hint,
                SvcParamValue::Ipv6Hint(IpHint(hints)),
            ));
        }
        let svcb = SVCB::new(1, target.unwrap_or_else(Name::root), params);
        Record::from_rdata(
            name.clone(),
            self.settings.dns.https_ttl,
            RData::HTTPS(HTTPS(svcb)),
        )
    }
}

/// Made records first, then custom sets of other types (a custom TXT beside a service's A). At
/// a name the node makes records for, a custom NS is no delegation, and is not served either.
fn merge(
    mut made: Vec<(RecordType, Vec<Record>)>,
    custom: Option<&Owner>,
) -> Vec<(RecordType, Vec<Record>)> {
    let managed = !made.is_empty();
    if let Some(owner) = custom {
        for (t, set) in &owner.sets {
            let made_here = made.iter().any(|(mt, _)| mt == t);
            let hidden_delegation = managed && *t == RecordType::NS;
            if !made_here && !hidden_delegation {
                made.push((*t, set.clone()));
            }
        }
    }
    made
}

fn with_owner(record: &Record, owner: &Name) -> Record {
    let mut r = record.clone();
    r.name = owner.clone();
    r
}

fn prepend(zone: &Name, label: &str) -> Name {
    zone.prepend_label(label).unwrap_or_else(|_| zone.clone())
}

/// Labels in a name, a leading `*` included: hickory's `num_labels` leaves it out (for RRSIG
/// label counts), which would make `*.<zone>` look like the apex.
pub(crate) fn label_count(name: &Name) -> u8 {
    name.num_labels() + u8::from(name.is_wildcard())
}

fn clamp_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}
