//! The TLS accept path, in one place: read the ClientHello, refuse names we hold no certificate
//! for, and hand the rest to rustls with the certificate the Snapshot has for the SNI. The ECH
//! path on BoringSSL will branch off here, on the same ClientHello.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use portcullis_config::SnapshotHandle;
use portcullis_config::model::Certificate;
use portcullis_config::names::{MAX_NAME_LEN, normalize_host};
use rustls::ServerConfig;
use rustls::crypto::aws_lc_rs;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::StartHandshake;
use tokio_rustls::server::TlsStream;

/// A fatal `unrecognized_name` alert (RFC 6066 §3) as a plaintext TLS record: what a client
/// gets for a name this node serves no certificate for. No default certificate is ever sent,
/// so a probe learns no tenant's name.
const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("no ClientHello within {0:?}")]
    Timeout(Duration),
    #[error("client closed before its ClientHello")]
    Closed,
    #[error("no certificate for {0:?}")]
    UnknownName(Option<String>),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

impl AcceptError {
    /// A label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AcceptError::Timeout(_) => "timeout",
            AcceptError::Closed => "closed",
            AcceptError::UnknownName(_) => "unknown_name",
            AcceptError::Tls(_) => "tls",
            AcceptError::Io(_) => "io",
        }
    }
}

/// A finished handshake and what it settled.
pub struct Accepted {
    pub stream: TlsStream<TcpStream>,
    /// The SNI, lowercased.
    pub server_name: String,
}

pub struct TlsAcceptor {
    config: Arc<ServerConfig>,
    resolver: Arc<SnapshotResolver>,
    hello_timeout: Duration,
}

impl TlsAcceptor {
    pub fn new(snapshot: SnapshotHandle, hello_timeout: Duration) -> Result<Self, rustls::Error> {
        let resolver = Arc::new(SnapshotResolver {
            snapshot,
            cache: DashMap::new(),
        });
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                .with_no_client_auth()
                .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Stateless tickets (rotated by rustls) plus the default in-memory session cache: TLS 1.3
        // and 1.2 clients resume without a full handshake.
        config.ticketer = aws_lc_rs::Ticketer::new()?;
        Ok(TlsAcceptor {
            config: Arc::new(config),
            resolver,
            hello_timeout,
        })
    }

    pub fn resolver(&self) -> &Arc<SnapshotResolver> {
        &self.resolver
    }

    pub async fn accept(&self, mut tcp: TcpStream) -> Result<Accepted, AcceptError> {
        let accepted = tokio::time::timeout(self.hello_timeout, read_client_hello(&mut tcp))
            .await
            .map_err(|_| AcceptError::Timeout(self.hello_timeout))??;
        let hello = accepted.client_hello();
        let name = hello.server_name().map(str::to_string);
        let known = name
            .as_deref()
            .is_some_and(|n| self.resolver.certificate_for(n).is_some());
        if !known {
            // Best effort: the client may already be gone.
            let _ = tcp.write_all(&UNRECOGNIZED_NAME_ALERT).await;
            let _ = tcp.shutdown().await;
            return Err(AcceptError::UnknownName(name));
        }
        let mut buf = [0u8; MAX_NAME_LEN];
        let server_name = name
            .as_deref()
            .and_then(|n| normalize_host(n, &mut buf))
            .unwrap_or_default()
            .to_string();
        let stream = StartHandshake::from_parts(accepted, tcp)
            .into_stream(self.config.clone())
            .await?;
        Ok(Accepted {
            stream,
            server_name,
        })
    }
}

/// Feeds bytes to rustls until it has a whole ClientHello.
async fn read_client_hello(tcp: &mut TcpStream) -> Result<rustls::server::Accepted, AcceptError> {
    let mut acceptor = Acceptor::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Err(AcceptError::Closed);
        }
        let mut input = &buf[..n];
        while !input.is_empty() {
            acceptor.read_tls(&mut input)?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Ok(accepted),
            Ok(None) => continue,
            Err((e, mut alert)) => {
                let mut out = Vec::new();
                let _ = alert.write_all(&mut out);
                let _ = tcp.write_all(&out).await;
                return Err(e.into());
            }
        }
    }
}

/// Picks the certificate for a ClientHello from the Snapshot. Parsed keys are cached per name
/// and keyed by the Snapshot's own `Arc<Certificate>`: a renewed certificate is a new `Arc`, so
/// the next handshake picks it up with no restart and no explicit invalidation.
pub struct SnapshotResolver {
    snapshot: SnapshotHandle,
    cache: DashMap<Box<str>, (Arc<Certificate>, Arc<CertifiedKey>)>,
}

impl std::fmt::Debug for SnapshotResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotResolver")
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl SnapshotResolver {
    /// The servable certificate for `sni`: an exact name, else a wildcard one label up.
    pub fn certificate_for(&self, sni: &str) -> Option<Arc<Certificate>> {
        let mut buf = [0u8; MAX_NAME_LEN];
        let name = normalize_host(sni, &mut buf)?;
        let snapshot = self.snapshot.load();
        let now = OffsetDateTime::now_utc();
        let servable = |c: &Arc<Certificate>| c.is_servable(now);
        if let Some(cert) = snapshot.certificate(name).filter(|c| servable(c)) {
            return Some(cert.clone());
        }
        let (_, parent) = name.split_once('.')?;
        let wildcard = format!("*.{parent}");
        snapshot
            .certificate(&wildcard)
            .filter(|c| servable(c))
            .cloned()
    }

    fn certified_key(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let cert = self.certificate_for(sni)?;
        let primary = cert.domains.first()?.as_str();
        if let Some(entry) = self.cache.get(primary)
            && Arc::ptr_eq(&entry.0, &cert)
        {
            return Some(entry.1.clone());
        }
        let key_pem = self.snapshot.load().private_key(&cert.key_ref)?.clone();
        match certified_key(&cert.chain_pem, &key_pem) {
            Ok(key) => {
                let key = Arc::new(key);
                self.cache.insert(primary.into(), (cert, key.clone()));
                Some(key)
            }
            Err(e) => {
                tracing::error!(domain = primary, error = %e, "stored certificate or key does not load");
                None
            }
        }
    }

    /// Drops cached keys whose certificate is gone or replaced.
    pub fn sweep(&self) {
        let snapshot = self.snapshot.load();
        self.cache.retain(|name, (cert, _)| {
            snapshot
                .certificate(name)
                .is_some_and(|current| Arc::ptr_eq(current, cert))
        });
    }
}

impl ResolvesServerCert for SnapshotResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certified_key(client_hello.server_name()?)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("certificate chain: {0}")]
    Chain(String),
    #[error("private key: {0}")]
    Key(String),
    #[error("{0}")]
    Mismatch(rustls::Error),
}

pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, KeyError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| KeyError::Chain(e.to_string()))?;
    if chain.is_empty() {
        return Err(KeyError::Chain("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| KeyError::Key(e.to_string()))?;
    let provider = aws_lc_rs::default_provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(KeyError::Mismatch)
}
