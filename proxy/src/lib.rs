//! portcullis-proxy: the HTTPS edge. Listeners, TLS termination (rustls; the accept path lives
//! in [`tls`] alone, where the BoringSSL path for ECH will branch off), the Host router and the
//! upstream client. It reads certificates and routes only from the Snapshot, and knows nothing
//! of DNS or ACME ordering.

mod challenge;
pub mod conn;
mod failure;
mod health;
mod proxy_protocol;
mod router;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use portcullis_config::{SnapshotHandle, State};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use conn::{Activity, ActivityIo};
pub use health::Health;
pub use router::ProxyBody;
use router::{ConnInfo, Shared};
use tls::TlsAcceptor;

/// The edge's timeouts and sizes: the `[proxy]` section of the configuration, as it is.
pub use portcullis_config::file::ProxySection as Limits;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// The edge's listeners, bound (so port 0 resolves and a taken port fails at start).
pub struct Proxy {
    http: TcpListener,
    https: TcpListener,
    limits: Limits,
    access_log: bool,
    https_public_port: u16,
    health: Arc<Health>,
}

impl Proxy {
    /// `https_public_port`: the port clients use for HTTPS, for redirects (0: the bound port).
    pub async fn bind(
        http: SocketAddr,
        https: SocketAddr,
        https_public_port: u16,
        limits: Limits,
        access_log: bool,
    ) -> Result<Self, ProxyError> {
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ProxyError::Bind { what, addr, source })
        };
        let http = bind("HTTP (listen.http)", http).await?;
        let https = bind("HTTPS (listen.https)", https).await?;
        let https_public_port = match https_public_port {
            0 => https.local_addr().map(|a| a.port()).unwrap_or(443),
            port => port,
        };
        Ok(Proxy {
            http,
            https,
            limits,
            access_log,
            https_public_port,
            health: Arc::new(Health::default()),
        })
    }

    /// What the health checks found, for the admin's metrics.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    pub fn http_addr(&self) -> io::Result<SocketAddr> {
        self.http.local_addr()
    }

    pub fn https_addr(&self) -> io::Result<SocketAddr> {
        self.https.local_addr()
    }

    /// Serves until `shutdown`, then lets in-flight requests finish within the grace period.
    /// `state` is where the TLS path reads certificates' chains and keys on demand.
    pub async fn serve(
        self,
        snapshot: SnapshotHandle,
        state: State,
        shutdown: CancellationToken,
    ) -> Result<(), ProxyError> {
        let acceptor = Arc::new(TlsAcceptor::new(
            snapshot.clone(),
            state,
            self.limits.certificate_cache,
            self.limits.tls_hello_timeout.0,
        )?);
        let shared = Arc::new(Shared::new(
            snapshot.clone(),
            acceptor.resolver().clone(),
            self.health.clone(),
            self.limits.clone(),
            self.access_log,
            self.https_public_port,
        ));
        let connections = TaskTracker::new();
        let probe = Arc::new(health::HttpProbe {
            client: shared.client.clone(),
            h2c_client: shared.h2c_client.clone(),
        });
        let checks = tokio::spawn(health::run_checks(
            snapshot.clone(),
            shared.health.clone(),
            probe,
            self.limits.health_checks_per_second,
            shutdown.clone(),
        ));
        let builder = Arc::new(http_builder(&self.limits));
        let http = tokio::spawn(accept_loop(
            self.http,
            shutdown.clone(),
            connections.clone(),
            builder.clone(),
            shared.clone(),
            None,
        ));
        let https = tokio::spawn(accept_loop(
            self.https,
            shutdown.clone(),
            connections.clone(),
            builder,
            shared,
            Some(acceptor),
        ));
        let _ = tokio::join!(http, https);
        checks.abort();
        // Every connection saw `shutdown` and is finishing its in-flight requests.
        connections.close();
        if tokio::time::timeout(self.limits.shutdown_grace.0, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "in-flight requests still running after {:?}; closing them",
                self.limits.shutdown_grace.0
            );
        }
        Ok(())
    }
}

fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout.0)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    // hyper parses up to its default count on the stack and any other count on the heap (about
    // 5% slower), so it is told only a count that differs.
    if limits.max_headers != portcullis_config::file::DEFAULT_MAX_HEADERS {
        builder.http1().max_headers(limits.max_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        // Extended CONNECT (RFC 8441): WebSocket over HTTP/2, tunnelled by the router.
        .enable_connect_protocol();
    builder
}

async fn accept_loop(
    listener: TcpListener,
    shutdown: CancellationToken,
    connections: TaskTracker,
    builder: Arc<auto::Builder<TokioExecutor>>,
    shared: Arc<Shared>,
    tls: Option<Arc<TlsAcceptor>>,
) {
    while let Some((tcp, peer)) = conn::accept(&listener, &shutdown, "proxy").await {
        let _ = tcp.set_nodelay(true);
        let trusted = shared
            .limits
            .proxy_protocol_from
            .iter()
            .any(|net| net.contains(&peer.ip()));
        let local = tcp.local_addr().unwrap_or(peer);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let shutdown = shutdown.clone();
        let builder = builder.clone();
        let shared = shared.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _open = OpenConnection::start(scheme);
            let mut tcp = tcp;
            let mut peer = peer;
            if trusted {
                let read = proxy_protocol::read_header(&mut tcp);
                match tokio::time::timeout(shared.limits.tls_hello_timeout.0, read).await {
                    Ok(Ok(Some(client))) => peer = client,
                    Ok(Ok(None)) => {} // LOCAL: the balancer's own connection (health checks)
                    Ok(Err(e)) => {
                        tracing::warn!(balancer = %peer, error = %e, "bad PROXY protocol header; closing");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(balancer = %peer, "no PROXY protocol header in time; closing");
                        return;
                    }
                }
            }
            match tls {
                Some(acceptor) => {
                    serve_tls(acceptor, tcp, peer, local, shutdown, builder, shared).await
                }
                None => {
                    let info = ConnInfo {
                        peer,
                        local,
                        sni: None,
                    };
                    let idle = shared.limits.idle_timeout.0;
                    let service =
                        service_fn(move |req| router::plain(shared.clone(), info.clone(), req));
                    let activity = Activity::default();
                    let io = TokioIo::new(ActivityIo::new(tcp, activity.clone()));
                    let conn = builder.serve_connection(io, service).into_owned();
                    if let Err(e) = conn::drive(conn, activity, idle, shutdown).await {
                        tracing::debug!(error = %e, "HTTP connection ended with an error");
                    }
                }
            }
        });
    }
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn serve_tls(
    acceptor: Arc<TlsAcceptor>,
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    shutdown: CancellationToken,
    builder: Arc<auto::Builder<TokioExecutor>>,
    shared: Arc<Shared>,
) {
    let accepted = match acceptor.accept(tcp).await {
        Ok(a) => a,
        Err(e) => {
            metrics::counter!("portcullis_tls_handshakes_total", "version" => "", "outcome" => e.kind())
                .increment(1);
            tracing::debug!(client = %peer, kind = e.kind(), error = %e, "TLS handshake failed");
            return;
        }
    };
    let version = match accepted.stream.get_ref().1.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
        _ => "other",
    };
    metrics::counter!("portcullis_tls_handshakes_total", "version" => version, "outcome" => "ok")
        .increment(1);
    let info = ConnInfo {
        peer,
        local,
        sni: Some(accepted.server_name.into()),
    };
    let shared_idle = shared.limits.idle_timeout.0;
    let service = service_fn(move |req| router::route(shared.clone(), info.clone(), req));
    let activity = Activity::default();
    let io = TokioIo::new(ActivityIo::new(accepted.stream, activity.clone()));
    let idle = shared_idle;
    let conn = builder
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    if let Err(e) = conn::drive(conn, activity, idle, shutdown).await {
        tracing::debug!(client = %peer, error = %e, "HTTPS connection ended with an error");
    }
}

/// Counts an open client connection for as long as it lives.
struct OpenConnection(&'static str);

impl OpenConnection {
    fn start(scheme: &'static str) -> Self {
        metrics::gauge!("portcullis_active_connections", "listener" => scheme).increment(1.0);
        OpenConnection(scheme)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!("portcullis_active_connections", "listener" => self.0).decrement(1.0);
    }
}
