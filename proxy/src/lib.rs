//! portcullis-proxy: the HTTPS edge. Listeners, TLS termination (rustls; the accept path lives
//! in [`tls`] alone, where the BoringSSL path for ECH will branch off), the Host router and the
//! upstream client. It reads certificates and routes only from the Snapshot, and knows nothing
//! of DNS or ACME ordering.

mod challenge;
pub mod conn;
mod failure;
pub mod h1;
mod health;
mod proxy_protocol;
mod router;
pub mod tls;
mod upstream;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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
        let builder = Arc::new(http2_builder(&self.limits));
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
    builder: Arc<http2::Builder<TokioExecutor>>,
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

/// The HTTP/2 server's settings. HTTP/1 is served by [`h1`].
fn http2_builder(limits: &Limits) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
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

fn h1_options(limits: &Limits) -> h1::Options {
    h1::Options {
        max_head_bytes: limits.max_header_bytes.max(1024),
        max_headers: limits.max_headers,
        header_read_timeout: limits.header_read_timeout.0,
    }
}

/// A connection being served, on the heap: a task holds only this pointer, and a connection
/// waiting between requests holds only what it needs to.
type Serving = std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<()>> + Send>>;

/// An HTTP/2 connection as [`conn::drive`] drives it.
type Http2Conn = std::pin::Pin<
    Box<dyn conn::Graceful<Error = hyper::Error, Output = Result<(), hyper::Error>> + Send>,
>;

/// Starts serving one client connection: HTTP/2 where ALPN chose it, HTTP/1.x otherwise (and
/// HTTP/2 after all when the client opens with its preface), each request answered by
/// `answer`. Not `async`: `io` moves straight into the future that serves it, so no second copy
/// of a TLS connection's state is kept in an outer future.
#[allow(clippy::too_many_arguments)] // two call sites; a struct would only rename them
fn serve_connection<T, A, F>(
    io: T,
    http2: bool,
    answer: A,
    builder: Arc<http2::Builder<TokioExecutor>>,
    options: h1::Options,
    activity: Activity,
    idle: Duration,
    shutdown: CancellationToken,
) -> Serving
where
    T: h1::Transport,
    A: Fn(Request<h1::RequestBody>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<hyper::Response<ProxyBody>, std::convert::Infallible>>
        + Send
        + 'static,
{
    let as_h2 = {
        let answer = answer.clone();
        move |req: Request<Incoming>| answer(req.map(h1::RequestBody::Hyper))
    };
    if http2 {
        let conn = builder.serve_connection(TokioIo::new(io), service_fn(as_h2));
        // HTTP/2's GOAWAY ends a connection without a lost request: no linger.
        let driven = conn::drive(conn, activity, idle, Duration::ZERO, shutdown);
        return Box::pin(async move { driven.await.map_err(io::Error::other) });
    }
    let closing = h1::Closing::default();
    let served = h1::serve(io, answer, options, closing.clone());
    let to_h2 = Box::new(move |io: h1::Upgraded| -> Http2Conn {
        Box::pin(builder.serve_connection(TokioIo::new(io), service_fn(as_h2)))
    });
    let conn = H1Conn {
        h1: Some(Box::pin(served)),
        h2: None,
        to_h2: Some(to_h2),
        closing,
        asked: false,
    };
    Box::pin(conn::drive(conn, activity, idle, LINGER, shutdown))
}

/// An HTTP/1 connection, or the HTTP/2 connection it turned out to be. Asked to finish, it
/// raises its [`h1::Closing`] flag, which the HTTP/1 server reads the next time [`conn::drive`]
/// polls it (right after asking).
struct H1Conn<F> {
    h1: Option<std::pin::Pin<Box<F>>>,
    h2: Option<Http2Conn>,
    to_h2: Option<Box<dyn FnOnce(h1::Upgraded) -> Http2Conn + Send>>,
    closing: h1::Closing,
    /// The HTTP/2 connection was asked to finish.
    asked: bool,
}

impl<F: std::future::Future<Output = io::Result<h1::Ended>>> std::future::Future for H1Conn<F> {
    type Output = io::Result<()>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(h1) = this.h1.as_mut() {
            match std::task::ready!(h1.as_mut().poll(cx)) {
                Ok(h1::Ended::Closed) => return std::task::Poll::Ready(Ok(())),
                Err(e) => return std::task::Poll::Ready(Err(e)),
                Ok(h1::Ended::Http2(io)) => {
                    this.h1 = None;
                    let Some(to_h2) = this.to_h2.take() else {
                        return std::task::Poll::Ready(Ok(()));
                    };
                    this.h2 = Some(to_h2(io));
                }
            }
        }
        let Some(h2) = this.h2.as_mut() else {
            return std::task::Poll::Ready(Ok(()));
        };
        if this.closing.is_set() && !this.asked {
            this.asked = true;
            h2.as_mut().graceful_shutdown();
        }
        h2.as_mut().poll(cx).map_err(io::Error::other)
    }
}

impl<F: std::future::Future<Output = io::Result<h1::Ended>>> conn::Graceful for H1Conn<F> {
    type Error = io::Error;

    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        self.closing.close();
    }
}

async fn accept_loop(
    listener: TcpListener,
    shutdown: CancellationToken,
    connections: TaskTracker,
    builder: Arc<http2::Builder<TokioExecutor>>,
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
        let task = async move {
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
                    let options = h1_options(&shared.limits);
                    let answer = move |req| router::plain(shared.clone(), info.clone(), req);
                    let activity = Activity::default();
                    let served = serve_connection(
                        ActivityIo::new(tcp, activity.clone()),
                        false,
                        answer,
                        builder,
                        options,
                        activity,
                        idle,
                        shutdown,
                    );
                    if let Err(e) = served.await {
                        tracing::debug!(error = %e, "HTTP connection ended with an error");
                    }
                }
            }
        };
        connections.spawn(task);
    }
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn serve_tls(
    acceptor: Arc<TlsAcceptor>,
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    shutdown: CancellationToken,
    builder: Arc<http2::Builder<TokioExecutor>>,
    shared: Arc<Shared>,
) {
    let handshaking = conn::Handshaking::start();
    // On the heap for the handshake only.
    let accepted = Box::pin(acceptor.accept(tcp)).await;
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
    // The connection moves into the boxed future that serves it; nothing of it stays here.
    let served = start_https(accepted, peer, local, shutdown, builder, shared);
    if let Err(e) = served.await {
        tracing::debug!(client = %peer, error = %e, "HTTPS connection ended with an error");
    }
}

fn start_https(
    accepted: tls::Accepted,
    peer: SocketAddr,
    local: SocketAddr,
    shutdown: CancellationToken,
    builder: Arc<http2::Builder<TokioExecutor>>,
    shared: Arc<Shared>,
) -> Serving {
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
    let http2 = accepted.stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let options = h1_options(&shared.limits);
    let answer = move |req| router::route(shared.clone(), info.clone(), req);
    let activity = Activity::default();
    serve_connection(
        ActivityIo::new(accepted.stream, activity.clone()),
        http2,
        answer,
        builder,
        options,
        activity,
        idle,
        shutdown,
    )
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
