//! A certificate's chain and private key as the store keeps them: DER in one binary value under
//! the certificate's `key_ref`, so the TLS path loads a name with one read and nothing of it
//! stays in memory for names nobody connects to.
//!
//! Layout: `PCM1`, the key's kind (1 PKCS#1, 2 SEC1, 3 PKCS#8), the key's length (u32, big
//! endian) and bytes, the number of certificates (u16), then each certificate's length (u32) and
//! DER, leaf first. Values written by earlier versions hold just the key as PEM; the chain was
//! then in the certificate record (`Certificate::chain_pem`).

use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

const MAGIC: &[u8; 4] = b"PCM1";
const LEGACY_PEM: &[u8] = b"-----BEGIN";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaterialError {
    #[error("certificate chain: {0}")]
    Chain(String),
    #[error("private key: {0}")]
    Key(String),
    #[error("stored value is cut short or not certificate material")]
    Malformed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Pkcs1,
    Sec1,
    Pkcs8,
}

#[derive(Clone, PartialEq, Eq)]
pub struct CertificateMaterial {
    /// DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    pub key_kind: KeyKind,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for CertificateMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateMaterial")
            .field("chain", &self.chain.len())
            .field("key_kind", &self.key_kind)
            .finish_non_exhaustive()
    }
}

impl CertificateMaterial {
    /// From what issuers give: a PEM chain (leaf first) and a PEM private key.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, MaterialError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| MaterialError::Chain(e.to_string()))?;
        if chain.is_empty() {
            return Err(MaterialError::Chain("no certificate in the PEM".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| MaterialError::Key(e.to_string()))?;
        let (key_kind, key) = match &key {
            PrivateKeyDer::Pkcs1(k) => (KeyKind::Pkcs1, k.secret_pkcs1_der().to_vec()),
            PrivateKeyDer::Sec1(k) => (KeyKind::Sec1, k.secret_sec1_der().to_vec()),
            PrivateKeyDer::Pkcs8(k) => (KeyKind::Pkcs8, k.secret_pkcs8_der().to_vec()),
            _ => return Err(MaterialError::Key("unsupported private key format".into())),
        };
        Ok(CertificateMaterial {
            chain,
            key_kind,
            key,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let size =
            4 + 1 + 4 + self.key.len() + 2 + self.chain.iter().map(|c| 4 + c.len()).sum::<usize>();
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(MAGIC);
        out.push(match self.key_kind {
            KeyKind::Pkcs1 => 1,
            KeyKind::Sec1 => 2,
            KeyKind::Pkcs8 => 3,
        });
        out.extend_from_slice(&(self.key.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&(self.chain.len() as u16).to_be_bytes());
        for cert in &self.chain {
            out.extend_from_slice(&(cert.len() as u32).to_be_bytes());
            out.extend_from_slice(cert);
        }
        out
    }

    /// Reads a stored value. `legacy_chain_pem` is the chain of a record written before chains
    /// moved here, used only when the value is a bare PEM key.
    pub fn decode(value: &[u8], legacy_chain_pem: Option<&str>) -> Result<Self, MaterialError> {
        if value.starts_with(LEGACY_PEM) {
            let key = std::str::from_utf8(value).map_err(|_| MaterialError::Malformed)?;
            return Self::from_pem(legacy_chain_pem.unwrap_or_default(), key);
        }
        let mut input = value.strip_prefix(MAGIC).ok_or(MaterialError::Malformed)?;
        let key_kind = match take(&mut input, 1)? {
            [1] => KeyKind::Pkcs1,
            [2] => KeyKind::Sec1,
            [3] => KeyKind::Pkcs8,
            _ => return Err(MaterialError::Malformed),
        };
        let key_len = u32::from_be_bytes(array(take(&mut input, 4)?)?) as usize;
        let key = take(&mut input, key_len)?.to_vec();
        let count = u16::from_be_bytes(array(take(&mut input, 2)?)?) as usize;
        let mut chain = Vec::with_capacity(count.min(8));
        for _ in 0..count {
            let len = u32::from_be_bytes(array(take(&mut input, 4)?)?) as usize;
            chain.push(take(&mut input, len)?.to_vec());
        }
        if chain.is_empty() || !input.is_empty() {
            return Err(MaterialError::Malformed);
        }
        Ok(CertificateMaterial {
            chain,
            key_kind,
            key,
        })
    }

    /// True when `value` is in the layout of earlier versions (a bare PEM key).
    pub fn is_legacy(value: &[u8]) -> bool {
        value.starts_with(LEGACY_PEM)
    }

    pub fn chain_der(&self) -> Vec<CertificateDer<'static>> {
        self.chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect()
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        let key = self.key.clone();
        match self.key_kind {
            KeyKind::Pkcs1 => PrivateKeyDer::Pkcs1(key.into()),
            KeyKind::Sec1 => PrivateKeyDer::Sec1(key.into()),
            KeyKind::Pkcs8 => PrivateKeyDer::Pkcs8(key.into()),
        }
    }

    /// The chain as PEM, leaf first, for the CA's APIs (renewal info, revocation).
    pub fn chain_pem(&self) -> String {
        let mut out = String::new();
        for cert in &self.chain {
            out.push_str("-----BEGIN CERTIFICATE-----\n");
            let encoded = base64::engine::general_purpose::STANDARD.encode(cert);
            for line in encoded.as_bytes().chunks(64) {
                // Base64 output is ASCII.
                out.push_str(std::str::from_utf8(line).unwrap_or_default());
                out.push('\n');
            }
            out.push_str("-----END CERTIFICATE-----\n");
        }
        out
    }
}

fn take<'a>(input: &mut &'a [u8], n: usize) -> Result<&'a [u8], MaterialError> {
    if input.len() < n {
        return Err(MaterialError::Malformed);
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Ok(head)
}

fn array<const N: usize>(bytes: &[u8]) -> Result<[u8; N], MaterialError> {
    bytes.try_into().map_err(|_| MaterialError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEAF: &str = "-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n";
    const ROOT: &str = "-----BEGIN CERTIFICATE-----\nMAMCAQI=\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMAMCAQM=\n-----END PRIVATE KEY-----\n";

    #[test]
    fn round_trips_and_reads_the_old_layout() {
        let chain = format!("{LEAF}{ROOT}");
        let material = CertificateMaterial::from_pem(&chain, KEY).unwrap();
        assert_eq!(material.chain.len(), 2);
        assert_eq!(material.key_kind, KeyKind::Pkcs8);
        let encoded = material.encode();
        assert_eq!(
            CertificateMaterial::decode(&encoded, None).unwrap(),
            material
        );
        assert_eq!(material.chain_pem(), chain);
        let legacy = CertificateMaterial::decode(KEY.as_bytes(), Some(&chain)).unwrap();
        assert_eq!(legacy, material);
    }

    #[test]
    fn refuses_cut_or_foreign_values() {
        let encoded = CertificateMaterial::from_pem(LEAF, KEY).unwrap().encode();
        for len in 0..encoded.len() {
            assert!(
                CertificateMaterial::decode(&encoded[..len], None).is_err(),
                "{len}"
            );
        }
        let mut longer = encoded.clone();
        longer.push(0);
        assert!(CertificateMaterial::decode(&longer, None).is_err());
        assert!(CertificateMaterial::decode(b"PCM1\x09", None).is_err());
        assert!(CertificateMaterial::decode(KEY.as_bytes(), None).is_err());
    }
}
