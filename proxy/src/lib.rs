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
mod upstream;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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

/// After shutdown (a stop or a reload), how long an idle HTTP/1 keep-alive connection stays
/// open for a request that may be on its way; its answer then closes it.
const LINGER: Duration = Duration::from_secs(1);

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

/// The edge's listeners, bound (so port 0 resolves and a taken port fails at start): one pair
/// per worker, sharing their addresses (`SO_REUSEPORT`), the kernel spreading connections.
pub struct Proxy {
    workers: Vec<WorkerListeners>,
    limits: Limits,
    access_log: bool,
    https_public_port: u16,
    health: Arc<Health>,
}

struct WorkerListeners {
    http: std::net::TcpListener,
    https: std::net::TcpListener,
}

impl Proxy {
    /// `https_public_port`: the port clients use for HTTPS, for redirects (0: the bound port).
    /// `workers`: threads serving connections, each with its own listeners, runtime and
    /// upstream connections (0: one per CPU).
    pub async fn bind(
        http: SocketAddr,
        https: SocketAddr,
        https_public_port: u16,
        limits: Limits,
        access_log: bool,
        workers: usize,
    ) -> Result<Self, ProxyError> {
        let count = match workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let shared_port = count > 1;
        let bind = |what, addr| {
            portcullis_config::sockets::tcp_listener(what, addr, shared_port)
                .map_err(|source| ProxyError::Bind { what, addr, source })
        };
        let mut listeners = Vec::with_capacity(count);
        let (mut http, mut https) = (http, https);
        for _ in 0..count {
            let pair = WorkerListeners {
                http: bind("http", http)?,
                https: bind("https", https)?,
            };
            // Port 0: every worker's listener on the port the first was given.
            http = pair.http.local_addr().unwrap_or(http);
            https = pair.https.local_addr().unwrap_or(https);
            listeners.push(pair);
        }
        let https_public_port = match https_public_port {
            0 => https.port(),
            port => port,
        };
        Ok(Proxy {
            workers: listeners,
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
        self.workers[0].http.local_addr()
    }

    pub fn https_addr(&self) -> io::Result<SocketAddr> {
        self.workers[0].https.local_addr()
    }

    /// Serves until `shutdown`, then lets in-flight requests finish within the grace period.
    /// `state` is where the TLS path reads certificates' chains and keys on demand. The first
    /// worker runs on the caller's runtime; each other worker on a thread of its own with a
    /// single-threaded runtime: no work stealing, no cross-core wakeups, and its own upstream
    /// connections. The Snapshot, the certificate resolver and the health state are shared.
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
        let builder = Arc::new(http_builder(&self.limits));
        let make_shared = || {
            Arc::new(Shared::new(
                snapshot.clone(),
                acceptor.resolver().clone(),
                self.health.clone(),
                self.limits.clone(),
                self.access_log,
                self.https_public_port,
                shutdown.clone(),
            ))
        };
        let mut workers = self.workers.into_iter();
        let Some(first) = workers.next() else {
            return Ok(());
        };
        let mut threads = Vec::new();
        for (index, listeners) in workers.enumerate() {
            let worker = Worker {
                listeners,
                shared: make_shared(),
                builder: builder.clone(),
                acceptor: acceptor.clone(),
                // Its own token: every connection polls it on each wakeup, and a token's waiters
                // sit behind one lock, which a shared token would make every core contend for.
                shutdown: shutdown.child_token(),
            };
            let (done, finished) = tokio::sync::oneshot::channel::<()>();
            let spawned = std::thread::Builder::new()
                .name(format!("proxy-{}", index + 1))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime.block_on(worker.run()),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start a proxy worker's runtime")
                        }
                    }
                    let _ = done.send(());
                });
            match spawned {
                Ok(_) => threads.push(finished),
                Err(e) => tracing::error!(error = %e, "cannot start a proxy worker thread"),
            }
        }
        let shared = make_shared();
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
        Worker {
            listeners: first,
            shared,
            builder,
            acceptor,
            shutdown: shutdown.child_token(),
        }
        .run()
        .await;
        checks.abort();
        for finished in threads {
            let _ = finished.await;
        }
        Ok(())
    }
}

/// One worker's share of the edge.
struct Worker {
    listeners: WorkerListeners,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    acceptor: Arc<TlsAcceptor>,
    shutdown: CancellationToken,
}

impl Worker {
    /// Accepts until shutdown, then lets in-flight requests finish within the grace period.
    async fn run(self) {
        let grace = self.shared.limits.shutdown_grace.0;
        let listener = |l: std::net::TcpListener| match TcpListener::from_std(l) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!(error = %e, "cannot register a listener with the runtime");
                None
            }
        };
        let connections = TaskTracker::new();
        let tasks: Vec<_> = [
            (self.listeners.http, None),
            (self.listeners.https, Some(self.acceptor.clone())),
        ]
        .into_iter()
        .filter_map(|(l, tls)| {
            let l = listener(l)?;
            Some(tokio::spawn(accept_loop(
                l,
                self.shutdown.clone(),
                connections.clone(),
                self.builder.clone(),
                self.shared.clone(),
                tls,
            )))
        })
        .collect();
        for task in tasks {
            let _ = task.await;
        }
        // Every connection saw `shutdown` and is finishing its in-flight requests.
        connections.close();
        if tokio::time::timeout(grace, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!("in-flight requests still running after {grace:?}; closing them");
        }
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
        // Windows sized for uploads (the 64 KiB default stalls a stream every 64 KiB until the
        // proxy's WINDOW_UPDATE arrives); fixed, not adaptive, so a connection's buffering is
        // bounded by them. hyper's limit on streams reset before being accepted (rapid reset,
        // CVE-2023-44487) stays at its default.
        .initial_stream_window_size(1024 * 1024)
        .initial_connection_window_size(2 * 1024 * 1024)
        .adaptive_window(false)
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
                        trusted_certificate: false,
                    };
                    let idle = shared.limits.idle_timeout.0;
                    let service =
                        service_fn(move |req| router::plain(shared.clone(), info.clone(), req));
                    let activity = Activity::default();
                    let io = TokioIo::new(ActivityIo::new(tcp, activity.clone()));
                    let conn = builder.serve_connection(io, service).into_owned();
                    if let Err(e) = conn::drive(conn, activity, idle, LINGER, shutdown).await {
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
    let handshaking = conn::Handshaking::start();
    let accepted = acceptor.accept(tcp).await;
    drop(handshaking);
    let accepted = match accepted {
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
    let trusted_certificate = shared
        .resolver
        .certificate_for(&accepted.server_name)
        .is_some_and(|c| c.issuer != portcullis_config::model::IssuerRef::Dev);
    let info = ConnInfo {
        peer,
        local,
        sni: Some(accepted.server_name.into()),
        trusted_certificate,
    };
    let idle = shared.limits.idle_timeout.0;
    // HTTP/2's GOAWAY ends a connection without a lost request; HTTP/1 lingers (see drive).
    let linger = match accepted.stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => Duration::ZERO,
        _ => LINGER,
    };
    let service = service_fn(move |req| router::route(shared.clone(), info.clone(), req));
    let activity = Activity::default();
    let io = TokioIo::new(ActivityIo::new(accepted.stream, activity.clone()));
    let conn = builder
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    if let Err(e) = conn::drive(conn, activity, idle, linger, shutdown).await {
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
