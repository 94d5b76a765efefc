//! PROXY protocol v2 (HAProxy's spec): read from trusted load balancers in front, written to
//! backends that asked for it. Parsing and building are ppp's; this is the I/O around them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper_util::client::legacy::Error as ClientError;
use hyper_util::rt::TokioIo;
use portcullis_config::model::{Backend, BackendHost};
use ppp::v2::{Addresses, Builder, Command, Header, PROTOCOL_PREFIX, Protocol, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::router::{ConnInfo, ProxyBody};

/// Signature, version/command, family/protocol, length.
const FIXED: usize = 16;

/// Reads one v2 header. `Some(client)` for PROXY, `None` for LOCAL (the balancer speaking
/// for itself). Reads exactly the header, so what follows (a ClientHello) is untouched.
pub async fn read_header(tcp: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    let mut fixed = [0u8; FIXED];
    tcp.read_exact(&mut fixed).await?;
    if &fixed[..PROTOCOL_PREFIX.len()] != PROTOCOL_PREFIX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no PROXY protocol v2 signature",
        ));
    }
    let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    let mut header = Vec::with_capacity(FIXED + len);
    header.extend_from_slice(&fixed);
    header.resize(FIXED + len, 0);
    tcp.read_exact(&mut header[FIXED..]).await?;
    let parsed = Header::try_from(header.as_slice())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    if parsed.command == Command::Local {
        return Ok(None);
    }
    match parsed.addresses {
        Addresses::IPv4(a) => Ok(Some(SocketAddr::from((a.source_address, a.source_port)))),
        Addresses::IPv6(a) => Ok(Some(SocketAddr::from((a.source_address, a.source_port)))),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "PROXY header without an IP source address",
        )),
    }
}

/// A failed upstream request, from the pooled client or from a direct connection.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Pooled(#[from] ClientError),
    #[error("connecting: {0}")]
    Connect(io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl UpstreamError {
    /// The request never reached the backend: safe to retry elsewhere.
    pub fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Pooled(e) => e.is_connect(),
            UpstreamError::Connect(_) => true,
            UpstreamError::Http(_) => false,
        }
    }
}

pub type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<hyper::Response<Incoming>, UpstreamError>> + Send>>;

/// Sends `request` on a new connection to `backend` that starts with a PROXY header for the
/// client of `conn`. Not pooled: the header speaks for one client.
pub fn send(
    backend: (&Backend, &str),
    conn: &ConnInfo,
    request: Request<ProxyBody>,
    connect_timeout: Duration,
) -> ResponseFuture {
    let target = match &backend.0.host {
        BackendHost::Ip(ip) => Ok(SocketAddr::from((*ip, backend.0.port))),
        BackendHost::Name(_) => Err(backend.1.to_string()),
    };
    let (client, local) = (conn.peer, conn.local);
    Box::pin(async move {
        let tcp = match target {
            Ok(addr) => tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await,
            Err(name) => tokio::time::timeout(connect_timeout, TcpStream::connect(name)).await,
        };
        let mut tcp = match tcp {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Err(_) => return Err(UpstreamError::Connect(io::ErrorKind::TimedOut.into())),
        };
        let _ = tcp.set_nodelay(true);
        // Both ends must be of one family; a v4 client seen on a v6 socket is mapped.
        let (src, dst) = match (client, local) {
            (SocketAddr::V4(c), SocketAddr::V6(l)) => (
                SocketAddr::from((c.ip().to_ipv6_mapped(), c.port())),
                SocketAddr::V6(l),
            ),
            (SocketAddr::V6(c), SocketAddr::V4(l)) => (
                SocketAddr::V6(c),
                SocketAddr::from((l.ip().to_ipv6_mapped(), l.port())),
            ),
            pair => pair,
        };
        let header =
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst))
                .build()
                .map_err(UpstreamError::Connect)?;
        tcp.write_all(&header)
            .await
            .map_err(UpstreamError::Connect)?;
        let (mut send, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        Ok(send.send_request(request).await?)
    })
}
