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
    fn try_from(value: String) -> Result<Self, Self::Error> {
        DomainName::parse(&value)
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

/// Writes the lowercase form of a Host header value (port and trailing dot removed) into `buf`
/// and returns it, without allocating. `None` when it cannot be a name we serve.
pub fn normalize_host<'a>(host: &str, buf: &'a mut [u8; MAX_NAME_LEN]) -> Option<&'a str> {
    let host = match host.rsplit_once(':') {
        // An IPv6 literal has colons too, but it never names a service.
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        Some(_) => return None,
        None => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > MAX_NAME_LEN {
        return None;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
