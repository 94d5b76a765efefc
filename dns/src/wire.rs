//! The UDP fast path: read a plain query's cache key straight from the datagram, and turn a
//! cached answer into the answer to this query (its ID, RD/CD and the question's case).
//!
//! Only the commonest shape takes this path: one question, no records, at most an OPT without
//! options and version 0. Anything else (ECS, cookies, odd headers) goes the full way.

/// Where the question name ends in the request (and in every answer to it).
#[derive(Debug, Clone, Copy)]
pub struct FastQuery {
    qname_end: usize,
    /// The request has an OPT (then so does the answer), and its DO bit.
    edns: bool,
    dnssec_ok: bool,
    /// The largest UDP answer this query may get.
    pub limit: u16,
    pub qtype: u16,
    pub qclass: u16,
}

const HEADER: usize = 12;

impl FastQuery {
    /// Whether the question's name has an uppercase letter. hickory's compression against
    /// such a name follows rules the direct writer does not reproduce, so those queries take
    /// the general path (random-name floods are lowercase, and still take the fast one).
    pub fn mixed_case(&self, request: &[u8]) -> bool {
        request
            .get(HEADER..self.qname_end)
            .is_none_or(|name| name.iter().any(u8::is_ascii_uppercase))
    }
}
/// Key bytes after the name: qtype, qclass, EDNS flags, answer size limit, client group.
const KEY_TAIL: usize = 9;

/// Fills `key` and returns the query's shape when the datagram is a plain query.
/// `group` is the client's answer group (by-client policy; 0 otherwise), part of the key.
pub fn parse_query(
    request: &[u8],
    udp_payload: u16,
    group: u16,
    key: &mut Vec<u8>,
) -> Option<FastQuery> {
    key.clear();
    if request.len() < HEADER + 5 {
        return None;
    }
    // QR=0 and OPCODE=0 (QUERY); the other flag bits are echoed or ignored.
    if request[2] & 0xf8 != 0 {
        return None;
    }
    let count = |i: usize| u16::from_be_bytes([request[i], request[i + 1]]);
    let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
    if qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return None;
    }
    let mut i = HEADER;
    loop {
        let len = usize::from(*request.get(i)?);
        if len == 0 {
            key.push(0);
            i += 1;
            break;
        }
        // A compression pointer or a reserved label type in a question: not for the fast path.
        if len > 63 || key.len() + len + 1 > 255 {
            return None;
        }
        let label = request.get(i + 1..i + 1 + len)?;
        key.push(len as u8);
        key.extend(label.iter().map(u8::to_ascii_lowercase));
        i += 1 + len;
    }
    let qname_end = i;
    let question = request.get(i..i + 4)?;
    let qtype = u16::from_be_bytes([question[0], question[1]]);
    let qclass = u16::from_be_bytes([question[2], question[3]]);
    key.extend_from_slice(question);
    i += 4;
    let mut edns = false;
    let mut dnssec_ok = false;
    let (flags, limit) = if ar == 1 {
        // The OPT: root name, type 41, class = payload, TTL = ext-rcode|version|DO..., no RDATA.
        let opt = request.get(i..i + 11)?;
        if opt[0] != 0 || opt[1..3] != [0, 41] || opt[6] != 0 || opt[9..11] != [0, 0] {
            return None;
        }
        if request.len() != i + 11 {
            return None;
        }
        let payload = u16::from_be_bytes([opt[3], opt[4]]);
        edns = true;
        dnssec_ok = opt[7] & 0x80 != 0;
        let limit = payload.min(udp_payload).max(512);
        (1 | (u8::from(dnssec_ok) << 1), limit)
    } else {
        if request.len() != i {
            return None;
        }
        (0, 512)
    };
    key.push(flags);
    key.extend_from_slice(&limit.to_be_bytes());
    key.extend_from_slice(&group.to_be_bytes());
    Some(FastQuery {
        qname_end,
        edns,
        dnssec_ok,
        limit,
        qtype,
        qclass,
    })
}

/// Where the first question ends (after its type and class), for any query with one whose
/// name is not compressed.
pub fn question_end(request: &[u8]) -> Option<usize> {
    if request.len() < HEADER || request[4..6] == [0, 0] {
        return None;
    }
    let mut i = HEADER;
    loop {
        let len = usize::from(*request.get(i)?);
        if len == 0 {
            i += 1;
            break;
        }
        if len > 63 {
            return None;
        }
        i += 1 + len;
    }
    (request.len() >= i + 4).then_some(i + 4)
}

/// Labels in a name in wire form (the root not counted).
pub fn labels(name: &[u8]) -> usize {
    let mut count = 0;
    let mut at = 0;
    while let Some(&len) = name.get(at) {
        if len == 0 {
            break;
        }
        count += 1;
        at += 1 + usize::from(len);
    }
    count
}

/// The question name inside a cache key.
pub fn key_name(key: &[u8]) -> &[u8] {
    &key[..key.len().saturating_sub(KEY_TAIL)]
}

/// Lowercase wire form of a name in text, as cache keys hold it.
pub fn name_key(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 2);
    for label in text
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len().min(63) as u8);
        out.extend(label.bytes().take(63).map(|b| b.to_ascii_lowercase()));
    }
    out.push(0);
    out
}

/// A cached answer made the answer to `request`.
pub fn patch(cached: &[u8], request: &[u8], query: &FastQuery) -> Vec<u8> {
    let mut out = cached.to_vec();
    out[0] = request[0];
    out[1] = request[1];
    // RD and CD are the client's.
    out[2] = (out[2] & !0x01) | (request[2] & 0x01);
    out[3] = (out[3] & !0x10) | (request[3] & 0x10);
    // Names compare without case, but the question goes back as it came (0x20 randomization).
    out[HEADER..query.qname_end].copy_from_slice(&request[HEADER..query.qname_end]);
    out
}

/// The question name of a cache key as a hickory name (lowercase).
pub fn key_to_name(key: &[u8]) -> Option<hickory_proto::rr::Name> {
    let wire = key_name(key);
    let mut labels = Vec::with_capacity(8);
    let mut i = 0;
    while let Some(&len) = wire.get(i) {
        if len == 0 {
            break;
        }
        labels.push(wire.get(i + 1..i + 1 + usize::from(len))?);
        i += 1 + usize::from(len);
    }
    let mut name = hickory_proto::rr::Name::from_labels(labels).ok()?;
    name.set_fqdn(true);
    Some(name)
}

/// A zone's negative-answer SOA in parts, for [`nxdomain`] to write with its names compressed.
#[derive(Debug, Clone)]
pub struct SoaParts {
    /// Owner, MNAME and RNAME, lowercase wire form.
    owner: Vec<u8>,
    mname: Vec<u8>,
    rname: Vec<u8>,
    ttl: u32,
    /// SERIAL, REFRESH, RETRY, EXPIRE and MINIMUM.
    numbers: [u8; 20],
}

impl SoaParts {
    pub fn new(record: &hickory_proto::rr::Record) -> Option<Self> {
        let hickory_proto::rr::RData::SOA(soa) = &record.data else {
            return None;
        };
        let mut numbers = [0u8; 20];
        for (i, n) in [
            soa.serial,
            soa.refresh as u32,
            soa.retry as u32,
            soa.expire as u32,
            soa.minimum,
        ]
        .iter()
        .enumerate()
        {
            numbers[i * 4..i * 4 + 4].copy_from_slice(&n.to_be_bytes());
        }
        Some(SoaParts {
            owner: name_wire(&record.name)?,
            mname: name_wire(&soa.mname)?,
            rname: name_wire(&soa.rname)?,
            ttl: record.ttl,
            numbers,
        })
    }
}

/// Lowercase wire form of a name, uncompressed.
pub fn name_wire(name: &hickory_proto::rr::Name) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(name.len() + 1);
    for label in name.iter() {
        out.push(u8::try_from(label.len()).ok().filter(|l| *l <= 63)?);
        out.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    out.push(0);
    (out.len() <= 255).then_some(out)
}

/// A name already in a message, for compression: its wire form, where it starts, and how many
/// of its octets are labels written out there (after them a pointer, or the end).
type Written<'a> = (&'a [u8], usize, usize);

/// Writes `name` with its longest suffix found in `known` replaced by a pointer, trying
/// suffixes and names in the order hickory's encoder does, so both make the same bytes.
/// Returns how many octets of labels it wrote out.
fn write_name(out: &mut Vec<u8>, name: &[u8], known: &[Written<'_>]) -> usize {
    let mut i = 0;
    while let Some(&len) = name.get(i) {
        if len == 0 {
            break;
        }
        if let Some(at) = find_suffix(&name[i..], known) {
            out.extend_from_slice(&name[..i]);
            out.extend_from_slice(&(0xc000 | at).to_be_bytes());
            return i;
        }
        i += 1 + usize::from(len);
    }
    out.extend_from_slice(name);
    i
}

fn find_suffix(suffix: &[u8], known: &[Written<'_>]) -> Option<u16> {
    for &(name, at, literal) in known {
        let mut j = 0;
        while j < literal {
            let Some(&len) = name.get(j) else { break };
            if len == 0 {
                break;
            }
            if name.get(j..) == Some(suffix) {
                // Pointers reach 14 bits; hickory stores no candidate past that either.
                return u16::try_from(at + j).ok().filter(|p| *p < 0x3fff);
            }
            j += 1 + usize::from(len);
        }
    }
    None
}

/// An NXDOMAIN answer written directly: the request's header and question, the zone's SOA in
/// the authority section with its names compressed against the question (`qname`: the
/// question's name, lowercase wire form), and an OPT when the request had one. The bytes
/// hickory makes for the same answer, without parsing and building messages: random-name
/// floods are all misses and take this path.
pub fn nxdomain(
    request: &[u8],
    query: &FastQuery,
    qname: &[u8],
    soa: &SoaParts,
    udp_payload: u16,
) -> Vec<u8> {
    let question_end = query.qname_end + 4;
    let mut out = Vec::with_capacity(question_end + 64 + 11);
    out.extend_from_slice(&request[..question_end]);
    // QR, opcode QUERY, AA, RD echoed; RA clear; CD echoed; RCODE 3.
    out[2] = 0x80 | 0x04 | (request[2] & 0x01);
    out[3] = (request[3] & 0x10) | 0x03;
    out[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 1, 0, u8::from(query.edns)]);
    let question = (qname, HEADER, qname.len());
    let owner_at = out.len();
    let owner_literal = write_name(&mut out, &soa.owner, &[question]);
    out.extend_from_slice(&[0, 6, 0, 1]);
    out.extend_from_slice(&soa.ttl.to_be_bytes());
    let rdlength_at = out.len();
    out.extend_from_slice(&[0, 0]);
    let owner = (soa.owner.as_slice(), owner_at, owner_literal);
    let mname_at = out.len();
    let mname_literal = write_name(&mut out, &soa.mname, &[question, owner]);
    let mname = (soa.mname.as_slice(), mname_at, mname_literal);
    write_name(&mut out, &soa.rname, &[question, owner, mname]);
    out.extend_from_slice(&soa.numbers);
    let rdlength = u16::try_from(out.len() - rdlength_at - 2).unwrap_or(u16::MAX);
    out[rdlength_at..rdlength_at + 2].copy_from_slice(&rdlength.to_be_bytes());
    if query.edns {
        let payload = udp_payload.max(512).to_be_bytes();
        let flags = if query.dnssec_ok { 0x80 } else { 0 };
        out.extend_from_slice(&[0, 0, 41, payload[0], payload[1], 0, 0, flags, 0, 0, 0]);
    }
    out
}

/// Whether an answer may serve later queries with the same key: NOERROR only, and the
/// question where the patch expects it. NXDOMAIN is left out on purpose: a flood of random
/// names would otherwise fill the cache and push out the answers that real traffic repeats.
pub fn cacheable(reply: &[u8], query: &FastQuery) -> bool {
    let rcode = reply.get(3).map(|b| b & 0x0f);
    rcode == Some(0) && reply.len() >= query.qname_end + 4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &[u8], edns: Option<[u8; 11]>) -> Vec<u8> {
        let mut q = vec![
            0x12,
            0x34,
            0x01,
            0x00,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            u8::from(edns.is_some()),
        ];
        q.extend_from_slice(name);
        q.extend_from_slice(&[0, 1, 0, 1]);
        if let Some(opt) = edns {
            q.extend_from_slice(&opt);
        }
        q
    }

    #[test]
    fn keys_ignore_case_and_carry_edns_and_limit() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        parse_query(&query(b"\x03WwW\x02eX\x00", None), 1232, 0, &mut a).unwrap();
        parse_query(&query(b"\x03www\x02ex\x00", None), 1232, 0, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(key_name(&a), name_key("www.ex."));
        let opt = [0, 0, 41, 0x10, 0x00, 0, 0, 0x80, 0, 0, 0];
        parse_query(&query(b"\x03www\x02ex\x00", Some(opt)), 1232, 0, &mut b).unwrap();
        assert_ne!(a, b);
        assert_eq!(&b[b.len() - 5..], &[3, 0x04, 0xd0, 0, 0]); // EDNS + DO, limit 1232, group 0
        let mut c = Vec::new();
        parse_query(&query(b"\x03www\x02ex\x00", Some(opt)), 1232, 2, &mut c).unwrap();
        assert_ne!(b, c);
        assert_eq!(key_name(&c), name_key("www.ex."));
    }

    #[test]
    fn odd_shapes_take_the_full_path() {
        let mut k = Vec::new();
        // Compression pointer in the question.
        assert!(parse_query(&query(b"\xc0\x0c", None), 1232, 0, &mut k).is_none());
        // A response.
        let mut r = query(b"\x01a\x00", None);
        r[2] |= 0x80;
        assert!(parse_query(&r, 1232, 0, &mut k).is_none());
        // An OPT with an option (e.g. ECS or a cookie).
        let mut o = query(b"\x01a\x00", Some([0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 4]));
        o.extend_from_slice(&[0, 10, 0, 0]);
        assert!(parse_query(&o, 1232, 0, &mut k).is_none());
        // EDNS version 1.
        let v1 = query(b"\x01a\x00", Some([0, 0, 41, 4, 0xd0, 0, 1, 0, 0, 0, 0]));
        assert!(parse_query(&v1, 1232, 0, &mut k).is_none());
        // Trailing garbage and truncation.
        let mut t = query(b"\x01a\x00", None);
        t.push(0);
        assert!(parse_query(&t, 1232, 0, &mut k).is_none());
        assert!(parse_query(&query(b"\x05ab", None)[..15], 1232, 0, &mut k).is_none());
    }

    #[test]
    fn patch_takes_id_flags_and_case_from_the_request() {
        let mut cached = query(b"\x03www\x02ex\x00", None);
        cached[0] = 0;
        cached[1] = 0;
        cached[2] = 0x84; // QR AA, RD clear
        let request = query(b"\x03WwW\x02eX\x00", None);
        let mut k = Vec::new();
        let fast = parse_query(&request, 1232, 0, &mut k).unwrap();
        let out = patch(&cached, &request, &fast);
        assert_eq!(&out[..3], &[0x12, 0x34, 0x85]);
        assert_eq!(&out[12..20], b"\x03WwW\x02eX\x00");
    }
}
