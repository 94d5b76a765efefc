//! portcullis-dns: the authoritative DNS responder for the platform zone, answering from the
//! Snapshot only. It knows nothing of ACME or the proxy; it meets them through the Snapshot.
//!
//! - [`zone`]: the lookup (RFC 1034 §4.3.2, RFC 4592 wildcards, CNAME chasing) over one view.
//! - [`answer`]: request to response, EDNS and truncation; bytes to bytes, no I/O.
//! - [`view`]: a view per Snapshot, swapped atomically, with what caches must forget.
//! - [`wire`]: the UDP fast path's cache keys.
//! - [`server`]: the UDP loop with its answer cache, and TCP on hickory-server.
//! - [`records`]: custom records from their stored form, and the API's checks.

pub mod answer;
pub mod clients;
pub mod forward;
pub mod ratelimit;
pub mod records;
pub mod server;
pub mod text;
pub mod view;
pub mod wire;
pub mod zone;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use portcullis_config::{NodeConfig, SnapshotHandle, sockets};
use tokio::task::JoinHandle;

pub use records::{RecordError, check_record};
pub use view::ViewHandle;
pub use zone::ZoneSettings;

/// Idle TCP connections are closed after this (Knot's default is 10 s as well).
const TCP_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("the DNS settings cannot be used: {0}")]
    Settings(String),
    #[error("cannot listen for DNS on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The running responder on every configured address.
pub struct Dns {
    pub views: ViewHandle,
    pub settings: Arc<ZoneSettings>,
    udp: Vec<server::UdpServer>,
    tcp: server::DnsTcpServer,
    follower: JoinHandle<()>,
    /// The addresses bound (port 0 resolved).
    pub local_addrs: Vec<SocketAddr>,
}

/// Times to try for a port free on both UDP and TCP when the config asks for port 0.
const PORT_ATTEMPTS: usize = 32;

/// UDP and TCP on one port, the ones a reload passed on if any. For port 0 the kernel picks the UDP port, which TCP may already
/// use elsewhere: then try another.
async fn bind_pair(
    addr: SocketAddr,
) -> std::io::Result<(std::net::UdpSocket, tokio::net::TcpListener, SocketAddr)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let socket = sockets::udp_socket("dns", addr)?;
        let local = socket.local_addr()?;
        match sockets::tcp_listener("dns", local, false) {
            Ok(listener) => {
                return Ok((socket, tokio::net::TcpListener::from_std(listener)?, local));
            }
            Err(e)
                if addr.port() == 0
                    && e.kind() == std::io::ErrorKind::AddrInUse
                    && attempt < PORT_ATTEMPTS =>
            {
                sockets::forget_udp(local);
            }
            Err(e) => return Err(e),
        }
    }
}

impl Dns {
    /// Binds UDP and TCP on each `listen.dns` address and starts answering.
    pub async fn start(config: &NodeConfig, snapshots: SnapshotHandle) -> Result<Dns, DnsError> {
        let settings = Arc::new(ZoneSettings::from_config(config).map_err(DnsError::Settings)?);
        let (views, follower) = view::follow(snapshots, settings.clone());
        let udp_payload = config.dns.udp_payload;
        let workers = match config.dns.udp_workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let policies = Arc::new(server::Policies {
            forwarder: forward::Forwarder::new(&config.dns.forward).map_err(DnsError::Settings)?,
            limiter: ratelimit::RateLimiter::new(&config.dns.rate_limit),
            transfer_from: config.dns.transfer_from.clone(),
            runtime: tokio::runtime::Handle::current(),
        });
        let mut udp = Vec::new();
        let mut tcp = server::tcp_server(views.clone(), policies.clone(), udp_payload);
        let mut local_addrs = Vec::new();
        for addr in &config.listen.dns {
            let bind = |source| DnsError::Bind {
                addr: *addr,
                source,
            };
            let (socket, listener, local) = bind_pair(*addr).await.map_err(bind)?;
            udp.push(
                server::UdpServer::start(
                    socket,
                    workers,
                    views.clone(),
                    policies.clone(),
                    config.dns.answer_cache,
                    udp_payload,
                )
                .map_err(bind)?,
            );
            tcp.register_listener(listener, TCP_IDLE, 64);
            local_addrs.push(local);
        }
        Ok(Dns {
            views,
            settings,
            udp,
            tcp,
            follower,
            local_addrs,
        })
    }

    pub async fn shutdown(mut self) {
        for u in &mut self.udp {
            u.stop();
        }
        if let Err(e) = self.tcp.shutdown_gracefully().await {
            tracing::debug!(error = %e, "DNS TCP shutdown");
        }
        self.follower.abort();
    }
}
