//! Custom records: from their stored, presentation form to wire records, and the checks the
//! records API makes before it stores one.

use std::collections::HashSet;

use hickory_proto::op::{Message, OpCode, Query};
use hickory_proto::rr::rdata::svcb::SVCB;
use hickory_proto::rr::rdata::{CNAME, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecoder, Restrict};
use portcullis_config::Snapshot;
use portcullis_config::ValidationError;
use portcullis_config::model::{Record as StoredRecord, RecordType as StoredType};

use crate::text;
use crate::zone::ZoneSettings;

/// Longest TTL accepted for a custom record: a week, as most providers cap it.
pub const MAX_TTL: u32 = 604_800;
/// Values in one record set; more than this is a mistake, and would not fit a UDP answer.
pub const MAX_VALUES: usize = 64;

/// Why the records API refuses a record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// It collides with something the node manages or with another record.
    #[error("{0}")]
    Conflict(String),
}

/// A name from text, absolute whether or not it ends in a dot, lowercase.
pub fn to_name(text: &str) -> Result<Name, String> {
    let mut name =
        Name::from_ascii(text).map_err(|e| format!("`{text}` is not a domain name: {e}"))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

fn hickory_type(t: StoredType) -> RecordType {
    match t {
        StoredType::A => RecordType::A,
        StoredType::Aaaa => RecordType::AAAA,
        StoredType::Cname => RecordType::CNAME,
        StoredType::Txt => RecordType::TXT,
        StoredType::Mx => RecordType::MX,
        StoredType::Srv => RecordType::SRV,
        StoredType::Caa => RecordType::CAA,
        StoredType::Https => RecordType::HTTPS,
        StoredType::Svcb => RecordType::SVCB,
        StoredType::Ns => RecordType::NS,
    }
}

/// Parses a stored record set into wire records. Names in RDATA are taken as absolute, and
/// SvcParams are put in key order, without which the whole answer would fail to encode.
pub fn parse_record(stored: &StoredRecord) -> Result<Vec<Record>, String> {
    let owner = to_name(&stored.name)?;
    stored
        .data
        .iter()
        .map(|text| {
            let rdata = parse_rdata(stored.rtype, text)
                .map_err(|e| format!("`{text}` is not valid {} data: {e}", stored.rtype))?;
            Ok(Record::from_rdata(
                owner.clone(),
                stored.ttl,
                absolute(rdata),
            ))
        })
        .collect()
}

/// One value in zone-file form. Character-strings (TXT, the CAA value) are read by [`text`],
/// since hickory's lexer decodes `\DDD` wrongly; other types have no escapes worth having, so
/// a backslash there is refused rather than misread.
fn parse_rdata(rtype: StoredType, value: &str) -> Result<RData, String> {
    match rtype {
        StoredType::Txt => {
            let strings = text::txt_strings(value)?;
            Ok(RData::TXT(TXT::from_bytes(
                strings.iter().map(Vec::as_slice).collect(),
            )))
        }
        StoredType::Caa => parse_caa(value),
        _ if value.contains('\\') => Err(format!(
            "escapes (`\\`) are not accepted in {rtype} data; write the value plainly"
        )),
        _ => RData::try_from_str(hickory_type(rtype), value).map_err(|e| e.to_string()),
    }
}

/// `flags tag value` (RFC 8659 §4.1.1), decoded from its wire form by hickory so that the value
/// is checked the way hickory reads it from anyone else.
pub(crate) fn parse_caa(value: &str) -> Result<RData, String> {
    let tokens = text::tokens(value)?;
    let [flags, tag, value] = tokens.as_slice() else {
        return Err("CAA is `flags tag value`, e.g. `0 issue \"letsencrypt.org\"`".into());
    };
    let flags = std::str::from_utf8(flags)
        .ok()
        .and_then(|f| f.parse::<u8>().ok())
        .ok_or("CAA flags are a number from 0 to 255")?;
    if tag.is_empty() || tag.len() > 15 || !tag.iter().all(u8::is_ascii_alphanumeric) {
        return Err("a CAA tag is 1 to 15 letters and digits (issue, issuewild, iodef)".into());
    }
    let mut wire = vec![flags, tag.len() as u8];
    wire.extend_from_slice(tag);
    wire.extend_from_slice(value);
    let length = u16::try_from(wire.len()).map_err(|_| "the CAA value is too long")?;
    let mut decoder = BinDecoder::new(&wire);
    RData::read(&mut decoder, RecordType::CAA, Restrict::new(length)).map_err(|e| e.to_string())
}

fn fqdn(mut name: Name) -> Name {
    name.set_fqdn(true);
    name
}

fn absolute(rdata: RData) -> RData {
    match rdata {
        RData::CNAME(c) => RData::CNAME(CNAME(fqdn(c.0))),
        RData::NS(n) => RData::NS(hickory_proto::rr::rdata::NS(fqdn(n.0))),
        RData::MX(mx) => RData::MX(hickory_proto::rr::rdata::MX::new(
            mx.preference,
            fqdn(mx.exchange),
        )),
        RData::SRV(srv) => RData::SRV(hickory_proto::rr::rdata::SRV::new(
            srv.priority,
            srv.weight,
            srv.port,
            fqdn(srv.target),
        )),
        RData::SVCB(svcb) => RData::SVCB(sorted(svcb)),
        RData::HTTPS(https) => RData::HTTPS(hickory_proto::rr::rdata::HTTPS(sorted(https.0))),
        other => other,
    }
}

fn sorted(svcb: SVCB) -> SVCB {
    let mut params = svcb.svc_params;
    params.sort_by_key(|(k, _)| u16::from(*k));
    SVCB::new(svcb.svc_priority, fqdn(svcb.target_name), params)
}

/// Whether the record set goes out in an answer: what hickory parses is not always what it can
/// encode (`alpn=` with no value), and a set past 64 KiB fits no message.
fn encodable(owner: &Name, rtype: StoredType, records: &[Record]) -> Result<(), String> {
    let mut message = Message::response(0, OpCode::Query);
    message.add_query(Query::query(owner.clone(), hickory_type(rtype)));
    message.answers = records.to_vec();
    match message.to_vec() {
        // hickory stops at 65535 bytes and sets TC rather than fail: every record must be in.
        Ok(bytes)
            if bytes.get(2).is_some_and(|flags| flags & 0x02 == 0)
                && bytes.get(6..8) == Some(&(records.len() as u16).to_be_bytes()[..]) =>
        {
            Ok(())
        }
        Ok(_) => Err(
            "the record set does not fit the 65535 bytes of a DNS message; use fewer or \
             shorter values"
                .into(),
        ),
        Err(e) => Err(format!("the record set cannot be sent in an answer: {e}")),
    }
}

/// Checks a record before it is stored: its name inside a zone we serve, its TTL and values,
/// and that it takes nothing from the node (service names, the apex) or from a CNAME.
pub fn check_record(
    record: &StoredRecord,
    settings: &ZoneSettings,
    snapshot: &Snapshot,
) -> Result<(), RecordError> {
    let owner = to_name(&record.name).map_err(|m| ValidationError::new("name", m))?;
    let is_wildcard = owner.is_wildcard();
    if owner.iter().skip(1).any(|l| l == b"*") {
        return Err(
            ValidationError::new("name", "`*` may only be the first label (RFC 4592)").into(),
        );
    }
    let apexes = crate::zone::ZoneView::apex_names(settings);
    let Some(apex) = apexes
        .iter()
        .filter(|a| a.zone_of(&owner))
        .max_by_key(|a| a.num_labels())
    else {
        let zones: Vec<String> = apexes.iter().map(|a| a.to_string()).collect();
        return Err(ValidationError::new(
            "name",
            format!(
                "`{}` is not inside a zone this node serves ({})",
                record.name,
                zones.join(", ")
            ),
        )
        .into());
    };
    if !(1..=MAX_TTL).contains(&record.ttl) {
        return Err(ValidationError::new(
            "ttl",
            format!("ttl must be between 1 and {MAX_TTL} seconds"),
        )
        .into());
    }
    if record.data.is_empty() || record.data.len() > MAX_VALUES {
        return Err(ValidationError::new(
            "data",
            format!("give between 1 and {MAX_VALUES} values"),
        )
        .into());
    }
    let mut seen = HashSet::new();
    for (i, value) in record.data.iter().enumerate() {
        if !seen.insert(value) {
            return Err(ValidationError::new(
                format!("data[{i}]"),
                format!("`{value}` is given twice"),
            )
            .into());
        }
    }
    let parsed = parse_record(record).map_err(|m| {
        let index = record
            .data
            .iter()
            .position(|v| m.contains(v.as_str()))
            .unwrap_or(0);
        ValidationError::new(format!("data[{index}]"), m)
    })?;
    encodable(&owner, record.rtype, &parsed).map_err(|m| ValidationError::new("data", m))?;
    if record.rtype == StoredType::Cname && parsed.len() > 1 {
        return Err(ValidationError::new("data", "a CNAME has exactly one target").into());
    }
    if owner == *apex {
        if matches!(record.rtype, StoredType::Cname | StoredType::Ns) {
            return Err(RecordError::Conflict(format!(
                "the {} at the zone apex `{apex}` is managed by the node (from its config)",
                record.rtype
            )));
        }
        if record.rtype == StoredType::Caa && !settings.caa.is_empty() && *apex == settings.platform
        {
            return Err(RecordError::Conflict(format!(
                "CAA at `{apex}` comes from the node's config (dns.caa)"
            )));
        }
    }
    if is_wildcard && record.rtype == StoredType::Ns {
        return Err(ValidationError::new("name", "a wildcard cannot be a delegation").into());
    }
    // Types that would hide or replace what the node answers at a name it manages: its
    // addresses and HTTPS record, a CNAME in their place, or an NS that delegates the name away.
    let shadowing = matches!(
        record.rtype,
        StoredType::A | StoredType::Aaaa | StoredType::Https | StoredType::Cname | StoredType::Ns
    );
    if shadowing {
        // The Snapshot's own Host lookup knows canonical names and alias domains alike.
        let text = owner.to_ascii();
        let text = text.trim_end_matches('.');
        let service = snapshot.service_for_host(text).is_some();
        let alias = snapshot.domain(text).is_some();
        if service || alias {
            return Err(RecordError::Conflict(format!(
                "the {} records of `{}` are managed by the node for its service",
                record.rtype, record.name
            )));
        }
        if settings.nameservers.contains(&owner) && record.rtype != StoredType::Https {
            return Err(RecordError::Conflict(format!(
                "`{}` is a nameserver of the zone; its addresses are the nodes'",
                record.name
            )));
        }
    }
    if record.rtype == StoredType::Ns {
        // A delegation hides everything below it. Services sit right under the apex, where no
        // delegation can be above them; alias domains may be deeper.
        let hidden = snapshot
            .domains()
            .find(|d| to_name(d.name.as_str()).is_ok_and(|n| n != owner && owner.zone_of(&n)));
        if let Some(domain) = hidden {
            return Err(RecordError::Conflict(format!(
                "an NS at `{}` would delegate away `{}`, a domain the node serves",
                record.name, domain.name
            )));
        }
        if let Some(ns) = settings.nameservers.iter().find(|n| owner.zone_of(n)) {
            return Err(RecordError::Conflict(format!(
                "an NS at `{}` would delegate away `{ns}`, a nameserver of the zone",
                record.name
            )));
        }
    }
    // CNAME is alone at its name (RFC 1034 §3.6.2).
    let others: Vec<StoredType> = snapshot
        .records()
        .filter(|r| to_name(&r.name).is_ok_and(|n| n == owner) && r.rtype != record.rtype)
        .map(|r| r.rtype)
        .collect();
    if record.rtype == StoredType::Cname && !others.is_empty() {
        return Err(RecordError::Conflict(format!(
            "`{}` already has {} records; a CNAME must be alone at its name",
            record.name,
            others
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if others.contains(&StoredType::Cname) {
        return Err(RecordError::Conflict(format!(
            "`{}` has a CNAME, which must be alone at its name; remove it first",
            record.name
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caa(value: &str) -> Result<String, String> {
        parse_caa(value).map(|r| r.to_string())
    }

    #[test]
    fn caa_values_of_every_kind_parse_and_print_back() {
        assert_eq!(
            caa(r#"0 issue "letsencrypt.org""#).unwrap(),
            r#"0 issue "letsencrypt.org""#
        );
        assert_eq!(caa(r#"0 issue ";""#).unwrap(), r#"0 issue ";""#);
        assert_eq!(
            caa(r#"0 issuewild "ca.example""#).unwrap(),
            r#"0 issuewild "ca.example""#
        );
        assert_eq!(
            caa(r#"0 iodef "mailto:sec@example.com""#).unwrap(),
            r#"0 iodef "mailto:sec@example.com""#
        );
        assert!(
            caa(r#"128 issue "ca.example""#)
                .unwrap()
                .starts_with("128 issue")
        );
        assert!(caa("0 issue").is_err());
        assert!(caa(r#"256 issue "x""#).is_err());
        assert!(caa(r#"0 is-sue "x""#).is_err());
    }

    #[test]
    fn escapes_are_refused_where_they_would_be_misread() {
        assert!(parse_rdata(StoredType::A, "10.0.0.\\049").is_err());
        assert!(parse_rdata(StoredType::Mx, "10 mail\\.example.").is_err());
        assert!(parse_rdata(StoredType::Txt, r#""caf\195\169""#).is_ok());
    }
}
