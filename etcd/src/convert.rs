//! Keys between the store's names and etcd's (under the prefix), and etcd's records into the
//! store's. etcd is a peer: what it hands back is checked, never trusted to be well-formed.

use etcd_client::ResponseHeader;
use portcullis_config::StoreError;
use portcullis_config::store::{KeyValue, LeaseId, Revision};

/// The prefix every key is stored under.
#[derive(Clone, Debug)]
pub(crate) struct Prefix(String);

impl Prefix {
    pub(crate) fn new(prefix: &str) -> Result<Prefix, StoreError> {
        if prefix.is_empty() {
            return Err(StoreError::Invalid(
                "the etcd key prefix cannot be empty: the store would see every key of the cluster"
                    .into(),
            ));
        }
        Ok(Prefix(prefix.to_string()))
    }

    pub(crate) fn full(&self, key: &str) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.0.len() + key.len());
        full.extend_from_slice(self.0.as_bytes());
        full.extend_from_slice(key.as_bytes());
        full
    }

    /// The store's name of an etcd key; a key outside the prefix or not UTF-8 is corrupt.
    pub(crate) fn strip(&self, full: &[u8]) -> Result<String, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            key: String::from_utf8_lossy(full).into_owned(),
            reason: reason.into(),
        };
        let rest = full
            .strip_prefix(self.0.as_bytes())
            .ok_or_else(|| corrupt("etcd returned a key outside the prefix"))?;
        String::from_utf8(rest.to_vec()).map_err(|_| corrupt("the key is not UTF-8"))
    }
}

/// etcd's range end for every key starting with `start`.
pub(crate) fn range_end(start: &[u8]) -> Vec<u8> {
    let mut end = start.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or nothing): to the end of the key space.
    vec![0]
}

pub(crate) fn header_revision(header: Option<&ResponseHeader>) -> Result<Revision, StoreError> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| StoreError::Backend("etcd answered without a response header".into()))
}

pub(crate) fn key_value(
    prefix: &Prefix,
    kv: etcd_client::KeyValue,
) -> Result<KeyValue, StoreError> {
    let (create_revision, mod_revision, version, lease) = (
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease(),
    );
    let (key, value) = kv.into_key_value();
    Ok(KeyValue {
        key: prefix.strip(&key)?,
        value,
        create_revision,
        mod_revision,
        version,
        lease: (lease != 0).then_some(LeaseId(lease)),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed step fails the test

    use super::*;

    #[test]
    fn range_end_covers_the_prefix() {
        assert_eq!(range_end(b"/p/a"), b"/p/b");
        assert_eq!(range_end(b"/p/\xff"), b"/p0");
        assert_eq!(range_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn keys_outside_the_prefix_are_corrupt_not_a_panic() {
        let p = Prefix::new("/portcullis/").unwrap();
        assert_eq!(p.strip(b"/portcullis/services/1").unwrap(), "services/1");
        assert!(matches!(
            p.strip(b"/other/x"),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            p.strip(b"/portcullis/\xff"),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(Prefix::new("").is_err());
    }
}
