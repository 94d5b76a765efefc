//! Pebble (Debian `pebble`), Let's Encrypt's test CA, on loopback ports, validating against a
//! node's own DNS and HTTP listeners.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};

/// A running Pebble; stopped on drop.
pub struct Pebble {
    child: Child,
    pub dir: tempfile::TempDir,
    /// The ACME directory URL.
    pub directory: String,
    pub management: SocketAddr,
    /// The CA that signed Pebble's own HTTPS certificate (for `issuer.trust_roots`).
    pub tls_ca: PathBuf,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pebble's TLS: a CA, and a certificate for 127.0.0.1 and localhost signed by it.
fn tls_files(dir: &std::path::Path) -> PathBuf {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pebble test TLS CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pebble");
    let cert = params.signed_by(&key, &issuer).expect("cert");
    std::fs::write(dir.join("cert.pem"), cert.pem()).expect("write");
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("write");
    let ca_path = dir.join("tls-ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write");
    ca_path
}

/// Pebble's ports and TLS files, chosen before the node starts (the node's config names the
/// directory; Pebble's names the node's ports).
pub struct PebblePlan {
    dir: tempfile::TempDir,
    listen: u16,
    management: u16,
    pub directory: String,
    pub tls_ca: PathBuf,
}

impl PebblePlan {
    pub fn new() -> PebblePlan {
        let dir = tempfile::tempdir().expect("temp dir");
        let tls_ca = tls_files(dir.path());
        let listen = super::free_port();
        PebblePlan {
            dir,
            listen,
            management: super::free_port(),
            directory: format!("https://127.0.0.1:{listen}/dir"),
            tls_ca,
        }
    }

    /// The `[issuer]` section of a node using this Pebble.
    pub fn issuer_section(&self) -> String {
        format!(
            "[issuer]\nkind = \"acme\"\ndirectory_url = \"{}\"\ncontact = [\"mailto:ops@example.test\"]\ntrust_roots = [\"{}\"]\n",
            self.directory,
            self.tls_ca.display()
        )
    }

    /// Starts Pebble resolving through `dns` and validating http-01 on `http_port`; `extra`
    /// adds keys to its config (e.g. `, "domainBlocklist": [...]`).
    pub fn start(self, dns: SocketAddr, http_port: u16, extra: &str) -> Pebble {
        let PebblePlan {
            dir,
            listen,
            management,
            directory,
            tls_ca,
        } = self;
        let config = format!(
            r#"{{"pebble": {{
  "listenAddress": "127.0.0.1:{listen}",
  "managementListenAddress": "127.0.0.1:{management}",
  "certificate": "{d}/cert.pem",
  "privateKey": "{d}/key.pem",
  "httpPort": {http_port},
  "tlsPort": {tls},
  "ocspResponderURL": "",
  "externalAccountBindingRequired": false{extra}
}}}}"#,
            d = dir.path().display(),
            tls = super::free_port(),
        );
        let config_path = dir.path().join("pebble.json");
        std::fs::write(&config_path, config).expect("write");
        let log = std::fs::File::create(dir.path().join("pebble.log")).expect("log");
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(dns.to_string())
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            // Some builds print what they store (orders, authorizations) on stdout.
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("pebble (Debian package pebble) is installed by make test");
        let listen_addr = SocketAddr::from(([127, 0, 0, 1], listen));
        let management = SocketAddr::from(([127, 0, 0, 1], management));
        super::poll("Pebble to listen", || {
            (TcpStream::connect(listen_addr).is_ok() && TcpStream::connect(management).is_ok())
                .then_some(())
        });
        Pebble {
            child,
            dir,
            directory,
            management,
            tls_ca,
        }
    }
}

impl Pebble {
    /// The root that issued certificates chain to (it changes at every Pebble start).
    pub fn issuing_root(&self) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(&self.tls_ca)
            .arg(format!(
                "https://127.0.0.1:{}/roots/0",
                self.management.port()
            ))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("PEM")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }
}
