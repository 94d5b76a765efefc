//! A request message in, a response message out: header rules, EDNS, and truncation. No I/O.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::{DNSClass, Name, RecordType};

use crate::zone::{Rcode, ZoneView};

/// Without EDNS a UDP answer is at most 512 bytes (RFC 1035 §4.2.1).
pub const CLASSIC_UDP_SIZE: u16 = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What an answer was made from besides its question, for the answer cache to know when a
/// change makes it stale.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Provenance {
    /// The answer holds the zone's SOA, so its serial: every change to the zone moves it.
    pub has_soa: bool,
    /// Other names whose records the answer carries (CNAME targets, glue owners), lowercase.
    pub depends_on: Vec<Name>,
}

/// The response to `request` from `client`, or `None` when nothing must be sent (the request
/// was a response).
pub fn respond(
    view: &ZoneView,
    request: &Message,
    udp_payload: u16,
    client: IpAddr,
) -> Option<Message> {
    respond_with_provenance(view, request, udp_payload, client).map(|(m, _)| m)
}

/// [`respond`], with what the answer was made from.
pub fn respond_with_provenance(
    view: &ZoneView,
    request: &Message,
    udp_payload: u16,
    client: IpAddr,
) -> Option<(Message, Provenance)> {
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.checking_disabled = request.metadata.checking_disabled;
    response.add_queries(request.queries.iter().cloned());
    if let Some(edns) = &request.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(udp_payload.max(CLASSIC_UDP_SIZE));
        ours.set_dnssec_ok(edns.flags().dnssec_ok);
        response.set_edns(ours);
        if edns.version() > 0 {
            // RFC 6891 §6.1.3: we speak version 0 only.
            response.metadata.response_code = ResponseCode::BADVERS;
            return Some((response, Provenance::default()));
        }
    }
    if request.metadata.op_code != OpCode::Query {
        response.metadata.response_code = ResponseCode::NotImp;
        return Some((response, Provenance::default()));
    }
    let [query] = request.queries.as_slice() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return Some((response, Provenance::default()));
    };
    if query.query_class() != DNSClass::IN {
        response.metadata.response_code = ResponseCode::Refused;
        return Some((response, Provenance::default()));
    }
    let subnet = client_subnet(request);
    let (group, scope) = match subnet {
        Some(Ok(subnet)) => view
            .clients()
            .classify(subnet.addr(), subnet.source_prefix()),
        Some(Err(())) => {
            response.metadata.response_code = ResponseCode::FormErr;
            return Some((response, Provenance::default()));
        }
        None => (view.clients().group_of(client), 0),
    };
    let lookup = view.lookup(query.name(), query.query_type(), group);
    if let (Some(Ok(subnet)), Some(edns)) = (subnet, response.edns.as_mut()) {
        // RFC 7871 §7.2.1: echo family, source and address; the scope says for how wide a
        // network the answer holds, 0 when it holds for everyone.
        let scope = if lookup.tailored { scope } else { 0 };
        edns.options_mut()
            .insert(EdnsOption::Subnet(ClientSubnet::new(
                subnet.addr(),
                subnet.source_prefix(),
                scope,
            )));
    }
    response.metadata.response_code = match lookup.rcode {
        Rcode::NoError => ResponseCode::NoError,
        Rcode::NxDomain => ResponseCode::NXDomain,
        Rcode::Refused => ResponseCode::Refused,
    };
    response.metadata.authoritative = lookup.authoritative;
    let provenance = Provenance {
        has_soa: lookup.has_soa(),
        depends_on: lookup.depends_on,
    };
    response.answers = lookup.answers;
    response.authorities = lookup.authorities;
    response.additionals = lookup.additionals;
    Some((response, provenance))
}

/// The request's EDNS Client Subnet; `Err` when it is malformed (address bits set past the
/// source prefix, RFC 7871 §7.1.2), which is a FORMERR.
fn client_subnet(request: &Message) -> Option<Result<ClientSubnet, ()>> {
    let Some(EdnsOption::Subnet(subnet)) = request.edns.as_ref()?.option(EdnsCode::Subnet) else {
        return None;
    };
    let (bits, width) = match subnet.addr() {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32u32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    };
    let source = u32::from(subnet.source_prefix());
    if source > width {
        return Some(Err(()));
    }
    let host_bits = width - source;
    let mask = if host_bits == 0 {
        0
    } else {
        u128::MAX >> (128 - host_bits)
    };
    if bits & mask != 0 {
        return Some(Err(()));
    }
    Some(Ok(*subnet))
}

/// The question to forward, when `request` asks a standard question about a name outside our
/// zones (for clients allowed to resolve through us).
pub fn forwardable(view: &ZoneView, request: &Message) -> Option<hickory_proto::op::Query> {
    if request.metadata.message_type != MessageType::Query
        || request.metadata.op_code != OpCode::Query
    {
        return None;
    }
    let [query] = request.queries.as_slice() else {
        return None;
    };
    let zone_transfer = matches!(query.query_type(), RecordType::AXFR | RecordType::IXFR);
    (query.query_class() == DNSClass::IN && !zone_transfer && view.outside(query.name()))
        .then(|| query.clone())
}

/// NXDOMAIN for a plain query, written without building messages (a flood of random names is
/// all misses). `None`: any other outcome, for the general path.
/// Labels a question may have for [`fast_nxdomain`], well under hickory's 64 compression
/// candidates, so the SOA's names find theirs too.
const MAX_FAST_LABELS: u8 = 48;

pub fn fast_nxdomain(
    zone: &ZoneView,
    request: &[u8],
    fast: &crate::wire::FastQuery,
    key: &[u8],
    udp_payload: u16,
) -> Option<Vec<u8>> {
    if fast.qclass != u16::from(DNSClass::IN) || fast.mixed_case(request) {
        return None;
    }
    let name = crate::wire::key_to_name(key)?;
    // hickory keeps at most 64 names to compress against (one per label of what it wrote
    // first, the question): past that it writes a suffix out where this writer would point to
    // it. Names that long are not real ones; the general path answers them.
    if name.num_labels() > MAX_FAST_LABELS {
        return None;
    }
    let lookup = zone.lookup(&name, RecordType::from(fast.qtype), 0);
    if lookup.rcode != Rcode::NxDomain || !lookup.answers.is_empty() {
        return None;
    }
    let soa = zone.negative_soa(&name)?;
    let qname = crate::wire::key_name(key);
    let reply = crate::wire::nxdomain(request, fast, qname, soa, udp_payload);
    (reply.len() <= usize::from(fast.limit)).then_some(reply)
}

/// The largest UDP answer for this request: what the client offers, capped by our own payload
/// size, never under 512.
pub fn udp_limit(request: &Message, udp_payload: u16) -> usize {
    let offered = request
        .edns
        .as_ref()
        .map_or(CLASSIC_UDP_SIZE, |e| e.max_payload());
    usize::from(offered.min(udp_payload).max(CLASSIC_UDP_SIZE))
}

/// Encodes a response; over UDP one that does not fit `limit` goes out as Knot and NSD send it:
/// TC set, the question and OPT kept, no records, so the client retries over TCP.
pub fn encode(response: &Message, limit: Option<usize>) -> Option<Vec<u8>> {
    let bytes = match response.to_vec() {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::warn!(error = %e, "an answer failed to encode; sending SERVFAIL");
            return servfail(response);
        }
    };
    match limit {
        Some(limit) if bytes.len() > limit => {
            let mut truncated = Message::response(response.metadata.id, response.metadata.op_code);
            truncated.metadata = response.metadata;
            truncated.metadata.truncation = true;
            truncated.add_queries(response.queries.iter().cloned());
            truncated.edns = response.edns.clone();
            let bytes = truncated.to_vec().ok()?;
            if bytes.len() <= limit {
                return Some(bytes);
            }
            // Only questions can still be too many (a FORMERR echoing 17 of them): drop them.
            truncated.queries.clear();
            truncated.to_vec().ok()
        }
        _ => Some(bytes),
    }
}

fn servfail(response: &Message) -> Option<Vec<u8>> {
    let mut failed = Message::response(response.metadata.id, response.metadata.op_code);
    failed.metadata.recursion_desired = response.metadata.recursion_desired;
    failed.metadata.response_code = ResponseCode::ServFail;
    failed.add_queries(response.queries.iter().cloned());
    failed.edns = response.edns.clone();
    failed.to_vec().ok()
}

/// Whole path for one datagram or TCP message, bytes to bytes: what the fuzz target drives.
/// `None`: send nothing (not a query, or too mangled to answer even with FORMERR).
pub fn answer_bytes(
    view: &ZoneView,
    request: &[u8],
    transport: Transport,
    udp_payload: u16,
    client: IpAddr,
) -> Option<Vec<u8>> {
    let message = match Message::from_vec(request) {
        Ok(m) => m,
        Err(_) => return formerr(request),
    };
    answer_message(view, message, transport, udp_payload, client).map(|(bytes, _)| bytes)
}

/// [`answer_bytes`] for a request already parsed, with what the answer was made from.
///
/// The answer is made for the question in lowercase and then given the question's own case
/// back, as the answer cache patches its answers: so names compress the same whatever case a
/// client asks in (0x20 randomization), and a cached answer is byte for byte a fresh one.
pub fn answer_message(
    view: &ZoneView,
    mut message: Message,
    transport: Transport,
    udp_payload: u16,
    client: IpAddr,
) -> Option<(Vec<u8>, Provenance)> {
    let asked = message.queries.first_mut().map(|q| {
        let name = q.name().clone();
        q.set_name(name.to_lowercase());
        name
    });
    let (response, provenance) = respond_with_provenance(view, &message, udp_payload, client)?;
    let limit = match transport {
        Transport::Udp => Some(udp_limit(&message, udp_payload)),
        Transport::Tcp => None,
    };
    let mut bytes = encode(&response, limit)?;
    if let Some(asked) = asked
        && bytes.get(4..6).is_some_and(|qd| qd != [0, 0])
    {
        // The question is the message's first name, written out at offset 12.
        let mut at = 12;
        for label in asked.iter() {
            let Some(slot) = bytes.get_mut(at + 1..at + 1 + label.len()) else {
                break;
            };
            slot.copy_from_slice(label);
            at += 1 + label.len();
        }
    }
    Some((bytes, provenance))
}

/// FORMERR for a request whose header at least parses and is a query (RFC 1035 §4.1.1).
pub fn formerr(request: &[u8]) -> Option<Vec<u8>> {
    if request.len() < 12 || request[2] & 0x80 != 0 {
        return None;
    }
    let mut out = request[..12].to_vec();
    // QR=1, keep opcode and RD; AA/TC cleared; RA=0, RCODE=1; no sections.
    out[2] = 0x80 | (request[2] & 0x79);
    out[3] = 1;
    out[4..12].fill(0);
    Some(out)
}
