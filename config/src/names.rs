//! Domain names as the platform stores them: lowercase, no trailing dot, RFC 1123 labels.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;

/// Longest name in presentation form without the trailing dot (RFC 1035 §2.3.4 leaves 253).
pub const MAX_NAME_LEN: usize = 253;
pub const MAX_LABEL_LEN: usize = 63;

/// A validated, lowercased DNS host name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DomainName(Box<str>);

impl DomainName {
    /// Accepts any case and one trailing dot; stores lowercase without the dot, because
    /// DNS names compare case-insensitively and every map in the Snapshot is keyed by this form.
    pub fn parse(input: &str) -> Result<Self, String> {
        let name = input.strip_suffix('.').unwrap_or(input);
        if name.is_empty() {
            return Err("a domain name cannot be empty".into());
        }
        if name.len() > MAX_NAME_LEN {
            return Err(format!(
                "`{input}` is {} characters long; a domain name has at most {MAX_NAME_LEN}",
                name.len()
            ));
        }
        for label in name.split('.') {
            check_label(label).map_err(|why| format!("`{input}`: {why}"))?;
        }
        Ok(DomainName(name.to_ascii_lowercase().into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `self` is `zone` or a name below it.
    pub fn is_within(&self, zone: &DomainName) -> bool {
        let (name, zone) = (self.as_str(), zone.as_str());
        name == zone
            || (name.len() > zone.len()
                && name.ends_with(zone)
                && name.as_bytes()[name.len() - zone.len() - 1] == b'.')
    }

    /// `*.base`: the name a wildcard certificate covers, which `parse` refuses as user input.
    pub fn wildcard_of(base: &DomainName) -> DomainName {
        DomainName(format!("*.{}", base.0).into_boxed_str())
    }

    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }

    /// `label.self`, validated.
    pub fn child(&self, label: &str) -> Result<DomainName, String> {
        DomainName::parse(&format!("{label}.{}", self.0))
    }

    pub fn validate(field: &str, input: &str) -> Result<Self, ValidationError> {
        Self::parse(input).map_err(|message| ValidationError::new(field, message))
    }
}

fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("empty label (two dots in a row, or a leading dot)".into());
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(format!(
            "label `{label}` is {} characters long; a label has at most {MAX_LABEL_LEN}",
            label.len()
        ));
    }
    if let Some(bad) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!(
            "label `{label}` contains `{bad}`; use letters, digits and hyphens (RFC 1123)"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!(
            "label `{label}` starts or ends with a hyphen (RFC 1123)"
        ));
    }
    Ok(())
}

impl TryFrom<String> for DomainName {
    type Error = String;
    /// As stored: a wildcard certificate's name (`*.example.com`) too.
    fn try_from(value: String) -> Result<Self, Self::Error> {
        match value.strip_prefix("*.") {
            Some(base) => DomainName::parse(base).map(|b| DomainName::wildcard_of(&b)),
            None => DomainName::parse(&value),
        }
    }
}

impl From<DomainName> for String {
    fn from(value: DomainName) -> Self {
        value.0.into()
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl AsRef<str> for DomainName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// An alias domain's name as stored: the A-label form (UTS 46, so `bücher.example` is
/// `xn--bcher-kva.example`), lowercase, no trailing dot, RFC 1123 labels, at least two labels,
/// and optionally `*.` in front for a wildcard alias.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AliasName(Box<str>);

impl AliasName {
    /// Accepts a name as a user writes it (U-labels, any case, one trailing dot).
    pub fn parse(input: &str) -> Result<Self, String> {
        let trimmed = input.trim();
        let trimmed = trimmed.strip_suffix('.').unwrap_or(trimmed);
        let (wildcard, rest) = match trimmed.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        if rest.contains('*') {
            return Err(format!(
                "`{input}`: a `*` may only stand alone as the first label of a wildcard alias (`*.example.com`)"
            ));
        }
        // UTS 46 with the STD3 rules (letters, digits, hyphens), as browsers map names.
        let ascii = idna::domain_to_ascii_cow(rest.as_bytes(), idna::AsciiDenyList::STD3)
            .map_err(|_| {
                format!(
                    "`{input}` is not a valid internationalized domain name (UTS 46); check its spelling"
                )
            })?;
        let name = DomainName::parse(&ascii)?;
        if !name.as_str().contains('.') {
            return Err(format!(
                "`{input}` is a top-level name; give a name under a registered domain, e.g. `www.example.com`"
            ));
        }
        let full = if wildcard {
            format!("*.{name}")
        } else {
            name.to_string()
        };
        if full.len() > MAX_NAME_LEN {
            return Err(format!(
                "`{input}` is longer than {MAX_NAME_LEN} characters as an A-label"
            ));
        }
        Ok(AliasName(full.into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }

    /// The name without a wildcard's `*.`: the name DNS-01 proves, and the parent of every
    /// name a wildcard covers.
    pub fn base(&self) -> &str {
        self.0.strip_prefix("*.").unwrap_or(&self.0)
    }

    pub fn validate(field: &str, input: &str) -> Result<Self, ValidationError> {
        Self::parse(input).map_err(|message| ValidationError::new(field, message))
    }

    /// The label under `acme.<zone>` where the platform answers this name's DNS-01 challenges
    /// (`_acme-challenge.<base>` is delegated to it by CNAME): a hash of the base name, the
    /// same on every node, and telling nothing about which names a zone serves.
    pub fn acme_label(&self) -> String {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, self.base().as_bytes());
        digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The public suffix (`com`, `co.uk`, `github.io`, ...) when the name is one itself, by the
    /// Public Suffix List compiled into the `psl` crate.
    pub fn public_suffix(&self) -> Option<String> {
        let base = self.base();
        let suffix = psl::suffix(base.as_bytes())?;
        // Names on no list entry match the implicit `*` rule: only a single label is then a
        // suffix, which `parse` already refused.
        (suffix.as_bytes() == base.as_bytes() && suffix.is_known())
            .then(|| base.to_string())
            .or_else(|| {
                // A wildcard directly under a suffix (`*.co.uk`) would cover every domain in it.
                (self.is_wildcard() && suffix.as_bytes() == base.as_bytes())
                    .then(|| base.to_string())
            })
    }
}

impl TryFrom<String> for AliasName {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        AliasName::parse(&value)
    }
}

impl From<AliasName> for String {
    fn from(value: AliasName) -> Self {
        value.0.into()
    }
}

impl fmt::Display for AliasName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AliasName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// The name part of a Host header value: the port and one trailing dot removed, case kept.
/// `None` for what cannot name a service (an IP literal with a port, an empty name).
pub fn host_name(host: &str) -> Option<&str> {
    let host = match host.rsplit_once(':') {
        // An IPv6 literal has colons too, but it never names a service.
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        Some(_) => return None,
        None => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (!host.is_empty() && host.len() <= MAX_NAME_LEN).then_some(host)
}

/// Writes the lowercase form of a Host header value (port and trailing dot removed) into `buf`
/// and returns it, without allocating. `None` when it cannot be a name we serve.
pub fn normalize_host<'a>(host: &str, buf: &'a mut [u8; MAX_NAME_LEN]) -> Option<&'a str> {
    let host = host_name(host)?;
    let out = &mut buf[..host.len()];
    for (o, b) in out.iter_mut().zip(host.bytes()) {
        if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'*') {
            return None;
        }
        *o = b.to_ascii_lowercase();
    }
    // Only ASCII was copied above, so this cannot fail.
    std::str::from_utf8(out).ok()
}

const HEX: [u8; 256] = {
    let mut table = [0xff; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// The 128 bits of a hyphenated UUID (`8-4-4-4-12` hex digits, any case), as a service id in a
/// Host header is written. Kept apart from `uuid`'s parser because it is on the routing path and
/// needs none of the other forms that one accepts.
pub fn uuid_bits(text: &[u8]) -> Option<u128> {
    if text.len() != 36
        || text[8] != b'-'
        || text[13] != b'-'
        || text[18] != b'-'
        || text[23] != b'-'
    {
        return None;
    }
    // Byte by byte from digit pairs: each byte is independent of the others, so the CPU
    // decodes them in parallel instead of through one long shift chain.
    const PAIRS: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    let mut bytes = [0u8; 16];
    let mut bad = 0u8;
    for (out, &at) in bytes.iter_mut().zip(PAIRS.iter()) {
        let (hi, lo) = (HEX[text[at] as usize], HEX[text[at + 1] as usize]);
        bad |= hi | lo;
        *out = (hi << 4) | (lo & 0x0f);
    }
    let bits = u128::from_be_bytes(bytes);
    // Every valid digit is below 16; one invalid byte sets the high bits of `bad`.
    (bad < 16).then_some(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_bits_match_the_uuid_crate() {
        let id = uuid::Uuid::new_v4();
        let text = id.hyphenated().to_string();
        assert_eq!(uuid_bits(text.as_bytes()), Some(id.as_u128()));
        assert_eq!(
            uuid_bits(text.to_uppercase().as_bytes()),
            Some(id.as_u128())
        );
        let mut bad = text.clone().into_bytes();
        bad[3] = b'g';
        assert_eq!(uuid_bits(&bad), None);
        bad = text.clone().into_bytes();
        bad[8] = b'0';
        assert_eq!(uuid_bits(&bad), None);
        assert_eq!(uuid_bits(b"short"), None);
    }

    #[test]
    fn parses_and_lowercases() {
        let n = DomainName::parse("App.Example.TEST.").unwrap();
        assert_eq!(n.as_str(), "app.example.test");
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "",
            ".",
            "a..b",
            "-a.b",
            "a-.b",
            "a_b.c",
            "a b",
            "é.test",
            &"a".repeat(64),
            &format!("{}.x", vec!["a".repeat(63); 4].join(".")),
        ] {
            assert!(DomainName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn within() {
        let zone = DomainName::parse("app.example.test").unwrap();
        assert!(
            DomainName::parse("x.app.example.test")
                .unwrap()
                .is_within(&zone)
        );
        assert!(zone.is_within(&zone));
        assert!(
            !DomainName::parse("xapp.example.test")
                .unwrap()
                .is_within(&zone)
        );
        assert!(!DomainName::parse("example.test").unwrap().is_within(&zone));
    }

    #[test]
    fn normalizes_hosts() {
        let mut buf = [0; MAX_NAME_LEN];
        assert_eq!(
            normalize_host("A.Example:8443", &mut buf),
            Some("a.example")
        );
        assert_eq!(normalize_host("a.example.", &mut buf), Some("a.example"));
        assert_eq!(normalize_host("[::1]:443", &mut buf), None);
        assert_eq!(normalize_host("a.example:x", &mut buf), None);
        assert_eq!(normalize_host("a/b", &mut buf), None);
    }

    #[test]
    fn alias_names_are_stored_as_a_labels() {
        let idn = AliasName::parse("Bücher.Example.").unwrap();
        assert_eq!(idn.as_str(), "xn--bcher-kva.example");
        let wild = AliasName::parse("*.Shop.Example.com").unwrap();
        assert!(wild.is_wildcard());
        assert_eq!(wild.base(), "shop.example.com");
        for bad in [
            "com",
            "a..b",
            "a_b.example",
            "*.*.example.com",
            "a.*.example.com",
            "",
            "*",
        ] {
            assert!(AliasName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn public_suffixes_are_told_apart_from_registered_names() {
        for suffix in ["co.uk", "github.io", "*.co.uk"] {
            let name = AliasName::parse(suffix).unwrap();
            assert!(name.public_suffix().is_some(), "{suffix} not a suffix");
        }
        for name in [
            "example.co.uk",
            "me.github.io",
            "api.example.com",
            "*.example.com",
        ] {
            let name = AliasName::parse(name).unwrap();
            assert_eq!(name.public_suffix(), None, "{name}");
        }
    }
}
