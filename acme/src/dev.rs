//! The dev CA: a local certificate authority created in the state directory at first start, so
//! HTTPS works in development with no internet. Trust its root (`portcullis ca root`) and every
//! canonical name of the node verifies.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use portcullis_config::DomainName;
use portcullis_config::model::IssuerRef;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::issuer::{IssueError, Issued, Issuer};

const ROOT_CERT: &str = "root.pem";
const ROOT_KEY: &str = "root.key";
/// As long as the dev CA lives: it never needs renewing in practice.
const ROOT_LIFETIME: Duration = Duration::days(3650);
/// Like a public CA's: long enough to be convenient, short enough to exercise renewal.
const LEAF_LIFETIME: Duration = Duration::days(90);
/// Covers clocks that run a little behind the node's.
const BACKDATE: Duration = Duration::minutes(5);

pub struct DevCa {
    dir: PathBuf,
    root_pem: String,
    issuer: rcgen::Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").field("dir", &self.dir).finish()
    }
}

impl DevCa {
    /// Root certificate file of the CA kept in `dir`.
    pub fn root_path(dir: &Path) -> PathBuf {
        dir.join(ROOT_CERT)
    }

    /// Loads the CA from `dir`, creating it (key file mode 0600) on first use.
    pub fn open_or_create(dir: &Path, node_id: &str) -> Result<Self, IssueError> {
        let fail = |reason: String| IssueError::DevCa {
            path: dir.display().to_string(),
            reason,
        };
        let cert_path = dir.join(ROOT_CERT);
        let key_path = dir.join(ROOT_KEY);
        if !cert_path.exists() || !key_path.exists() {
            create(dir, node_id).map_err(fail)?;
        }
        let root_pem = fs::read_to_string(&cert_path)
            .map_err(|e| fail(format!("cannot read {}: {e}", cert_path.display())))?;
        let key_pem = fs::read_to_string(&key_path)
            .map_err(|e| fail(format!("cannot read {}: {e}", key_path.display())))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| fail(format!("{} is not a private key: {e}", key_path.display())))?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, key).map_err(|e| {
            fail(format!(
                "{} is not a CA certificate: {e}",
                cert_path.display()
            ))
        })?;
        Ok(DevCa {
            dir: dir.to_path_buf(),
            root_pem,
            issuer,
        })
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn issue_now(&self, domains: &[DomainName]) -> Result<Issued, IssueError> {
        let generate = |e: rcgen::Error| IssueError::Generate(e.to_string());
        let names: Vec<String> = domains.iter().map(|d| d.to_string()).collect();
        let mut params = CertificateParams::new(names).map_err(generate)?;
        let now = OffsetDateTime::now_utc();
        // Whole seconds: X.509 times have no fractions, and the stored times must match.
        let not_before = (now - BACKDATE).replace_nanosecond(0).unwrap_or(now);
        let not_after = not_before + LEAF_LIFETIME;
        params.not_before = not_before;
        params.not_after = not_after;
        let mut dn = DistinguishedName::new();
        if let Some(first) = domains.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(generate)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(generate)?;
        Ok(Issued {
            chain_pem: cert.pem(),
            private_key_pem: key.serialize_pem(),
            not_before,
            not_after,
        })
    }
}

fn create(dir: &Path, node_id: &str) -> Result<(), String> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create the directory: {e}"))?;
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Portcullis development");
    dn.push(DnType::CommonName, format!("Portcullis dev CA ({node_id})"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + ROOT_LIFETIME;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    // The key first, created 0600 from the start so it is never readable by others; the
    // certificate last, because its presence is what marks the CA as complete.
    write_new(&dir.join(ROOT_KEY), key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&dir.join(ROOT_CERT), cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[async_trait]
impl Issuer for DevCa {
    fn reference(&self) -> IssuerRef {
        IssuerRef::Dev
    }

    async fn issue(
        &self,
        domains: &[DomainName],
        _replacing: Option<&str>,
        _progress: &dyn crate::issuer::Progress,
        _challenge: crate::issuer::Challenge<'_>,
    ) -> Result<Issued, IssueError> {
        // Key generation and signing take well under a millisecond: not worth a thread hop.
        self.issue_now(domains)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_once_and_issues_certificates_chaining_to_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("dev-ca");
        let ca = DevCa::open_or_create(&ca_dir, "t").unwrap();
        let mode = fs::metadata(ca_dir.join(ROOT_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = DevCa::open_or_create(&ca_dir, "t").unwrap();
        assert_eq!(
            ca.root_pem(),
            again.root_pem(),
            "the CA is reused, not recreated"
        );

        let name = DomainName::parse("abc.app.localhost").unwrap();
        let issued = again.issue_now(std::slice::from_ref(&name)).unwrap();
        let leaf_der = x509_parser::pem::parse_x509_pem(issued.chain_pem.as_bytes())
            .unwrap()
            .1;
        let leaf = leaf_der.parse_x509().unwrap();
        let root_der = x509_parser::pem::parse_x509_pem(ca.root_pem().as_bytes())
            .unwrap()
            .1;
        let root = root_der.parse_x509().unwrap();
        assert_eq!(leaf.issuer(), root.subject());
        leaf.verify_signature(Some(root.public_key())).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            "[DNSName(\"abc.app.localhost\")]"
        );
        assert_eq!(
            leaf.validity().not_after.timestamp(),
            issued.not_after.unix_timestamp()
        );
    }
}
