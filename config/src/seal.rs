//! Sealing of secrets at rest. etcd keeps values in the clear, so private keys (certificates',
//! the ACME account's) are sealed with AES-256-GCM under a fleet key before they are written,
//! and opened after they are read. The store key is the associated data: a sealed value copied
//! under another key does not open.
//!
//! Layout: `PCS1`, the key id's length (u8) and bytes, a 96-bit random nonce, then the
//! ciphertext with its tag. The id lets a fleet add a new key (listed first, so it seals) while
//! values sealed under an older one still open.
//!
//! Key file: one key per line, `<key-id> <base64 of 32 random bytes>`; `#` starts a comment.
//! The first key seals; every key listed opens.

use std::collections::HashMap;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;

const MAGIC: &[u8; 4] = b"PCS1";
const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("cannot read the encryption key file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("encryption key file, line {line}: {reason}")]
    Syntax { line: usize, reason: String },
    #[error("the encryption key file holds no key; make one with `portcullis store new-key`")]
    Empty,
    #[error(
        "`{key}` was sealed with encryption key `{id}`, which is not in store.encryption_key_file; add that key back (after the new one)"
    )]
    UnknownKey { key: String, id: String },
    #[error(
        "`{key}` is sealed but this node has no store.encryption_key_file; give it the fleet's key file"
    )]
    NoKeys { key: String },
    #[error("`{key}` does not open with key `{id}`: it was altered, or sealed for another key")]
    Tampered { key: String, id: String },
    #[error("`{key}` is cut short")]
    Malformed { key: String },
    #[error("no randomness for a nonce")]
    Random,
}

/// The fleet's keys. Cheap to share behind an `Arc`.
pub struct Sealer {
    current: String,
    keys: HashMap<String, LessSafeKey>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("current", &self.current)
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl Sealer {
    pub fn from_file(path: &Path) -> Result<Sealer, SealError> {
        let text = std::fs::read_to_string(path).map_err(|e| SealError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Sealer::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Sealer, SealError> {
        let mut current = None;
        let mut keys = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let syntax = |reason: &str| SealError::Syntax {
                line: i + 1,
                reason: reason.into(),
            };
            let (id, material) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| syntax("write `<key-id> <base64 key>`"))?;
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(syntax("a key id is 1 to 64 printable characters"));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(material.trim())
                .map_err(|_| syntax("the key is not base64"))?;
            if bytes.len() != KEY_LEN {
                return Err(syntax(
                    "a key is 32 bytes (44 base64 characters); make one with `portcullis store new-key`",
                ));
            }
            let key = UnboundKey::new(&AES_256_GCM, &bytes)
                .map_err(|_| syntax("the key is not usable for AES-256-GCM"))?;
            if keys.insert(id.to_string(), LessSafeKey::new(key)).is_some() {
                return Err(syntax("this key id is listed twice"));
            }
            current.get_or_insert_with(|| id.to_string());
        }
        Ok(Sealer {
            current: current.ok_or(SealError::Empty)?,
            keys,
        })
    }

    /// A new key file line with a fresh random key, for `portcullis store new-key`.
    pub fn new_key_line(id: &str) -> Result<String, SealError> {
        let mut key = [0u8; KEY_LEN];
        aws_lc_rs::rand::fill(&mut key).map_err(|_| SealError::Random)?;
        Ok(format!(
            "{id} {}",
            base64::engine::general_purpose::STANDARD.encode(key)
        ))
    }

    /// The id of the key that seals.
    pub fn current_id(&self) -> &str {
        &self.current
    }

    /// Seals `plaintext`, to be stored under `store_key`.
    pub fn seal(&self, store_key: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let key = self
            .keys
            .get(&self.current)
            .ok_or_else(|| SealError::UnknownKey {
                key: store_key.into(),
                id: self.current.clone(),
            })?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut body = plaintext.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(store_key.as_bytes()),
            &mut body,
        )
        .map_err(|_| SealError::Random)?;
        let id = self.current.as_bytes();
        let mut out = Vec::with_capacity(MAGIC.len() + 1 + id.len() + NONCE_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens a value read from `store_key`.
    pub fn open(&self, store_key: &str, value: &[u8]) -> Result<Vec<u8>, SealError> {
        let (id, nonce, body) = split(store_key, value)?;
        let key = self.keys.get(id).ok_or_else(|| SealError::UnknownKey {
            key: store_key.into(),
            id: id.into(),
        })?;
        let mut body = body.to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(store_key.as_bytes()),
                &mut body,
            )
            .map_err(|_| SealError::Tampered {
                key: store_key.into(),
                id: id.into(),
            })?;
        Ok(plain.to_vec())
    }
}

/// The id of the key a sealed value was sealed with.
pub fn sealed_with(value: &[u8]) -> Option<&str> {
    split("", value).ok().map(|(id, _, _)| id)
}

/// Whether a stored value is sealed (values written without a key are not).
pub fn is_sealed(value: &[u8]) -> bool {
    value.starts_with(MAGIC)
}

/// Opens `value` when it is sealed, passes it through when it is not.
pub fn open_if_sealed(
    sealer: Option<&Sealer>,
    store_key: &str,
    value: Vec<u8>,
) -> Result<Vec<u8>, SealError> {
    if !is_sealed(&value) {
        return Ok(value);
    }
    match sealer {
        Some(sealer) => sealer.open(store_key, &value),
        None => Err(SealError::NoKeys {
            key: store_key.into(),
        }),
    }
}

fn split<'a>(
    store_key: &str,
    value: &'a [u8],
) -> Result<(&'a str, [u8; NONCE_LEN], &'a [u8]), SealError> {
    let malformed = || SealError::Malformed {
        key: store_key.into(),
    };
    let rest = value.strip_prefix(MAGIC).ok_or_else(malformed)?;
    let (&len, rest) = rest.split_first().ok_or_else(malformed)?;
    let len = usize::from(len);
    if rest.len() < len + NONCE_LEN {
        return Err(malformed());
    }
    let (id, rest) = rest.split_at(len);
    let id = std::str::from_utf8(id).map_err(|_| malformed())?;
    let (nonce, body) = rest.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| malformed())?;
    Ok((id, nonce, body))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn two_keys() -> (String, String) {
        (
            Sealer::new_key_line("2026-a").unwrap(),
            Sealer::new_key_line("2026-b").unwrap(),
        )
    }

    #[test]
    fn sealed_values_open_under_their_key_only() {
        let (a, _) = two_keys();
        let sealer = Sealer::parse(&a).unwrap();
        let secret = b"-----BEGIN PRIVATE KEY----- not really";
        let sealed = sealer.seal("keys/x.example", secret).unwrap();
        assert!(is_sealed(&sealed));
        assert!(
            !sealed.windows(secret.len()).any(|w| w == secret),
            "the plaintext does not appear"
        );
        assert_eq!(sealer.open("keys/x.example", &sealed).unwrap(), secret);
        assert!(matches!(
            sealer.open("keys/y.example", &sealed),
            Err(SealError::Tampered { .. })
        ));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            sealer.open("keys/x.example", &flipped),
            Err(SealError::Tampered { .. })
        ));
        assert!(matches!(
            sealer.open("keys/x.example", &sealed[..10]),
            Err(SealError::Malformed { .. })
        ));
    }

    #[test]
    fn a_new_key_seals_and_the_old_one_still_opens() {
        let (a, b) = two_keys();
        let old = Sealer::parse(&a).unwrap();
        let sealed_old = old.seal("k", b"one").unwrap();
        let rotated = Sealer::parse(&format!("# rotated\n{b}\n{a}\n")).unwrap();
        assert_eq!(rotated.current_id(), "2026-b");
        assert_eq!(rotated.open("k", &sealed_old).unwrap(), b"one");
        let sealed_new = rotated.seal("k", b"two").unwrap();
        assert!(matches!(
            old.open("k", &sealed_new),
            Err(SealError::UnknownKey { .. })
        ));
    }

    #[test]
    fn bad_key_files_say_what_is_wrong() {
        assert_eq!(Sealer::parse("# nothing\n").unwrap_err(), SealError::Empty);
        assert!(matches!(
            Sealer::parse("k1 c2hvcnQ=").unwrap_err(),
            SealError::Syntax { line: 1, .. }
        ));
        assert!(matches!(
            Sealer::parse("onlyone").unwrap_err(),
            SealError::Syntax { line: 1, .. }
        ));
        let (a, _) = two_keys();
        let twice = format!("{a}\n{a}\n");
        assert!(matches!(
            Sealer::parse(&twice).unwrap_err(),
            SealError::Syntax { line: 2, .. }
        ));
        assert_eq!(
            open_if_sealed(None, "k", b"plain".to_vec()).unwrap(),
            b"plain"
        );
        let sealed = Sealer::parse(&a).unwrap().seal("k", b"x").unwrap();
        assert!(matches!(
            open_if_sealed(None, "k", sealed),
            Err(SealError::NoKeys { .. })
        ));
    }
}
