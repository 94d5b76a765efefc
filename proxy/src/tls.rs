//! The TLS accept path, in one place: read the ClientHello, refuse names we hold no certificate
//! for, and hand the rest to rustls with the certificate the Snapshot has for the SNI. The ECH
//! path on BoringSSL will branch off here, on the same ClientHello.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use portcullis_config::model::Certificate;
use portcullis_config::names::{MAX_NAME_LEN, normalize_host};
use portcullis_config::{SnapshotHandle, State};
use rustls::ServerConfig;
use rustls::crypto::aws_lc_rs;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::StartHandshake;
use tokio_rustls::server::TlsStream;

/// A fatal `unrecognized_name` alert (RFC 6066 §3) as a plaintext TLS record: what a client
/// gets for a name this node serves no certificate for. No default certificate is ever sent,
/// so a probe learns no tenant's name.
const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];
/// A fatal `internal_error` alert: the name is ours but its key could not be read now.
const INTERNAL_ERROR_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x50];

/// The shared config's resolver, never asked: each connection's copy carries its own key.
#[derive(Debug)]
struct NoKey;

impl ResolvesServerCert for NoKey {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

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
    #[error("certificate for {name:?}: {source}")]
    Load { name: String, source: LoadError },
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
            AcceptError::Load { .. } => "certificate_load",
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
    pub fn new(
        snapshot: SnapshotHandle,
        state: State,
        cache_capacity: usize,
        hello_timeout: Duration,
    ) -> Result<Self, rustls::Error> {
        let resolver = Arc::new(SnapshotResolver::new(snapshot, state, cache_capacity));
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(NoKey));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Stateless tickets (rotated by rustls) plus the default in-memory session cache: TLS 1.3
        // and 1.2 clients resume without a full handshake. Each connection's copy of this
        // config shares them.
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
        let Some(cert) = name
            .as_deref()
            .and_then(|n| self.resolver.certificate_for(n))
        else {
            // Best effort: the client may already be gone.
            let _ = tcp.write_all(&UNRECOGNIZED_NAME_ALERT).await;
            let _ = tcp.shutdown().await;
            return Err(AcceptError::UnknownName(name));
        };
        let key = match self.resolver.certified_key(&cert).await {
            Ok(key) => key,
            Err(e) => {
                tracing::error!(name = name.as_deref().unwrap_or_default(), error = %e, "cannot load a certificate for a handshake");
                let _ = tcp.write_all(&INTERNAL_ERROR_ALERT).await;
                let _ = tcp.shutdown().await;
                return Err(AcceptError::Load {
                    name: name.unwrap_or_default(),
                    source: e,
                });
            }
        };
        let mut buf = [0u8; MAX_NAME_LEN];
        let server_name = name
            .as_deref()
            .and_then(|n| normalize_host(n, &mut buf))
            .unwrap_or_default()
            .to_string();
        // A copy of the shared config that answers with the key just loaded: the resolver rustls
        // calls cannot wait for the store, and a shared cache could evict the key in between.
        let mut config = (*self.config).clone();
        config.cert_resolver = Arc::new(ResolvedKey(key));
        let stream = StartHandshake::from_parts(accepted, tcp)
            .into_stream(Arc::new(config))
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

/// Picks the certificate for a ClientHello: which one from the Snapshot, its chain and key from
/// the store on demand. Parsed keys are kept in a bounded cache (S3-FIFO, `quick_cache`) keyed
/// by name and validity, so a renewed certificate is a new entry, picked up by the next
/// handshake with no invalidation, and the old one ages out. Concurrent handshakes for a name
/// not in the cache wait for one store read between them.
pub struct SnapshotResolver {
    snapshot: SnapshotHandle,
    state: State,
    cache: quick_cache::sync::Cache<KeyId, Arc<CertifiedKey>>,
    /// Made once: a handle per handshake would be a registry lookup on the accept path.
    entries: metrics::Gauge,
    misses: metrics::Counter,
}

/// A certificate as the cache knows it: its primary name and what each issuance changes (the
/// serial; the validity too, for records that predate serials).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyId {
    name: Box<str>,
    serial: Option<Box<str>>,
    not_before: i64,
    not_after: i64,
}

impl KeyId {
    fn of(cert: &Certificate) -> Option<Self> {
        Some(KeyId {
            name: cert.domains.first()?.as_str().into(),
            serial: cert.serial.as_deref().map(Into::into),
            not_before: cert.not_before?.unix_timestamp(),
            not_after: cert.not_after?.unix_timestamp(),
        })
    }
}

impl std::fmt::Debug for SnapshotResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotResolver")
            .field("cached", &self.cache.len())
            .finish()
    }
}

/// Why a known name's certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading the certificate from the store: {0}")]
    Store(#[from] portcullis_config::StateError),
    #[error("the store holds no chain and key under {0}")]
    Missing(String),
    #[error("the stored chain or key does not load: {0}")]
    Key(#[from] KeyError),
}

impl SnapshotResolver {
    pub fn new(snapshot: SnapshotHandle, state: State, capacity: usize) -> Self {
        SnapshotResolver {
            snapshot,
            state,
            cache: quick_cache::sync::Cache::new(capacity.max(1)),
            entries: metrics::gauge!("portcullis_certificate_cache_entries"),
            misses: metrics::counter!("portcullis_certificate_cache_misses_total"),
        }
    }

    /// Parsed keys held now.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The servable certificate for `sni`: an exact name, else a wildcard one label up. Only
    /// for a name the platform serves now (a service's canonical name or a live alias): a
    /// certificate issued ahead of cutover, or kept for a name that moved away, is not shown.
    pub fn certificate_for(&self, sni: &str) -> Option<Arc<Certificate>> {
        let mut buf = [0u8; MAX_NAME_LEN];
        let name = normalize_host(sni, &mut buf)?;
        let snapshot = self.snapshot.load();
        snapshot.service_for_host(name)?;
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

    /// The parsed chain and key of `cert`: from the cache, or read from the store and parsed.
    pub async fn certified_key(&self, cert: &Certificate) -> Result<Arc<CertifiedKey>, LoadError> {
        let id = KeyId::of(cert).ok_or_else(|| LoadError::Missing(cert.key_ref.clone()))?;
        let key = self
            .cache
            .get_or_insert_async(&id, async {
                self.misses.increment(1);
                let material = self
                    .state
                    .certificate_material(cert)
                    .await?
                    .ok_or_else(|| LoadError::Missing(cert.key_ref.clone()))?;
                let key = CertifiedKey::from_der(
                    material.chain_der(),
                    material.key_der(),
                    &aws_lc_rs::default_provider(),
                )
                .map_err(KeyError::Mismatch)?;
                Ok::<_, LoadError>(Arc::new(key))
            })
            .await?;
        self.entries.set(self.cache.len() as f64);
        Ok(key)
    }
}

/// Hands rustls the one key this connection's ClientHello was resolved to.
#[derive(Debug)]
struct ResolvedKey(Arc<CertifiedKey>);

impl ResolvesServerCert for ResolvedKey {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Mismatch(rustls::Error),
}
