//! HTTP/1.1 connections to backends, kept per worker. hyper-util's pooled client spends a task
//! spawn per request (to put the connection back once it is ready), a lock shared by every
//! thread and a keyed lookup; here a request takes an idle connection of its worker (a lock
//! no other thread takes), sends on it, and its response body puts it back when it ends.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy_protocol::UpstreamError;
use crate::router::ProxyBody;

/// Idle connections kept per backend and worker.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than used (backends close theirs after
/// a while too; nginx's default is 60 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

struct Idle {
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

/// One worker's idle connections, by backend (`host:port` as configured).
pub(crate) struct Pool {
    idle: Mutex<HashMap<Arc<str>, Vec<Idle>>>,
    connect_timeout: Duration,
}

/// A connection lent to one request: back to the pool when its response body has ended.
pub(crate) struct Lease {
    pool: Arc<Pool>,
    backend: Arc<str>,
    sender: SendRequest<ProxyBody>,
}

impl Lease {
    pub(crate) fn give_back(self) {
        self.pool.put(self.backend, self.sender);
    }
}

impl Pool {
    pub(crate) fn new(connect_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            idle: Mutex::new(HashMap::new()),
            connect_timeout,
        })
    }

    /// Sends `request` to `backend` on an idle connection, or a new one. A pooled connection
    /// the backend closed meanwhile never took the request, which then goes on the next one.
    pub(crate) async fn send(
        self: &Arc<Self>,
        backend: &Arc<str>,
        mut request: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        while let Some(mut sender) = self.take(backend) {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, self.lease(backend, sender))),
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(UpstreamError::Http(failed.into_error())),
                },
            }
        }
        let mut sender = self.connect(backend).await?;
        let response = sender.send_request(request).await?;
        Ok((response, self.lease(backend, sender)))
    }

    fn lease(self: &Arc<Self>, backend: &Arc<str>, sender: SendRequest<ProxyBody>) -> Lease {
        Lease {
            pool: self.clone(),
            backend: backend.clone(),
            sender,
        }
    }

    async fn connect(&self, backend: &str) -> Result<SendRequest<ProxyBody>, UpstreamError> {
        // A name resolves here (getaddrinfo, off the runtime), each address tried in turn.
        let tcp =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(backend)).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
                Err(_) => return Err(UpstreamError::Connect(io::ErrorKind::TimedOut.into())),
            };
        let _ = tcp.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            // Its end (the backend closed, or an error) is seen by the next use of the sender.
            let _ = connection.with_upgrades().await;
        });
        Ok(sender)
    }

    /// The most recently used idle connection (the likeliest to be open still); connections
    /// idle past the timeout are dropped on the way.
    fn take(&self, backend: &Arc<str>) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(backend)?;
        let fresh_from = list
            .iter()
            .position(|c| c.since.elapsed() < IDLE_TIMEOUT)
            .unwrap_or(list.len());
        list.drain(..fresh_from);
        while let Some(conn) = list.pop() {
            if !conn.sender.is_closed() {
                return Some(conn.sender);
            }
        }
        None
    }

    fn put(&self, backend: Arc<str>, sender: SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(backend).or_default();
        if list.len() < MAX_IDLE {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}
