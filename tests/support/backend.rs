//! A backend for proxy tests, on a loopback port: answers what it saw, streams bodies both
//! ways, answers slowly on request, sends trailers, and echoes WebSocket messages.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub struct Backend {
    pub addr: SocketAddr,
    pub name: &'static str,
    /// Requests that reached this backend, the node's health checks left out.
    pub hits: Arc<AtomicUsize>,
    /// The node's health checks that reached this backend.
    pub checks: Arc<AtomicUsize>,
    /// The Host header of the last health check.
    pub check_host: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &'static str) -> Backend {
        Self::start_at(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// A backend on `addr`: the port of one that was stopped, to bring it back.
    pub async fn start_at(name: &'static str, addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let checks = Arc::new(AtomicUsize::new(0));
        let check_counter = checks.clone();
        let check_host = Arc::new(Mutex::new(None));
        let last_host = check_host.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set, so aborting this task (stop) ends them too.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                while connections.try_join_next().is_some() {}
                let counter = counter.clone();
                let check_counter = check_counter.clone();
                let last_host = last_host.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        // The node's health checks come at random points of their interval:
                        // counting them with the visitors' requests would make every count a
                        // race.
                        let health_check = req
                            .headers()
                            .get(hyper::header::USER_AGENT)
                            .is_some_and(|ua| ua == "portcullis-health-check");
                        if health_check {
                            let host = req.headers().get(hyper::header::HOST);
                            *last_host.lock().unwrap() =
                                host.and_then(|h| h.to_str().ok()).map(str::to_string);
                            check_counter.fetch_add(1, Ordering::SeqCst);
                        } else {
                            counter.fetch_add(1, Ordering::SeqCst);
                        }
                        handle(name, req)
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Backend {
            addr,
            name,
            hits,
            checks,
            check_host,
            task,
        }
    }

    /// Stops listening; connections it has already accepted end too.
    pub fn stop(&self) {
        self.task.abort();
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn checks(&self) -> usize {
        self.checks.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn headers_json(headers: &HeaderMap) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (name, value) in headers {
        let v = value.to_str().unwrap_or("").to_string();
        map.entry(name.as_str())
            .and_modify(|e| {
                if let serde_json::Value::String(s) = e {
                    s.push_str(", ");
                    s.push_str(&v);
                }
            })
            .or_insert(serde_json::Value::String(v));
    }
    serde_json::Value::Object(map)
}

async fn handle(
    name: &'static str,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let param = |key: &str| -> u64 {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    };
    let response = match path.as_str() {
        "/upload" => {
            // Count the body as it streams in, holding one frame at a time.
            let mut body = req.into_body();
            let (mut bytes, mut sum) = (0u64, 0u64);
            // A body the proxy gave up on (the client broke it) ends the count.
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    bytes += data.len() as u64;
                    sum = data.iter().fold(sum, |s, b| s.wrapping_add(u64::from(*b)));
                }
            }
            Response::new(full(format!("{{\"bytes\":{bytes},\"sum\":{sum}}}")))
        }
        "/download" => {
            let total = param("bytes");
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_util::stream::unfold(total, move |left| {
                let chunk = chunk.clone();
                async move {
                    (left > 0).then(|| {
                        let n = left.min(chunk.len() as u64);
                        (
                            Ok::<_, Infallible>(Frame::data(chunk.slice(..n as usize))),
                            left - n,
                        )
                    })
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(param("ms"))).await;
            Response::new(full("slow answer\n"))
        }
        "/trailers" => {
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"grpc-style body"))),
                Ok(Frame::trailers({
                    let mut t = HeaderMap::new();
                    t.insert("grpc-status", "0".parse().unwrap());
                    t.insert("grpc-message", "ok".parse().unwrap());
                    t
                })),
            ];
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(
                futures_util::stream::iter(frames),
            )));
            response
                .headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            // HTTP/1.1 sends only the trailer fields announced up front.
            response
                .headers_mut()
                .insert("trailer", "grpc-status, grpc-message".parse().unwrap());
            response
        }
        "/ws" => {
            let key = req
                .headers()
                .get("sec-websocket-key")
                .cloned()
                .unwrap_or_else(|| "".parse().unwrap());
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        if ws.send(msg).await.is_err() {
                            return;
                        }
                    } else if msg.is_close() {
                        return;
                    }
                }
            });
            let mut response = Response::new(full(""));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = response.headers_mut();
            h.insert("upgrade", "websocket".parse().unwrap());
            h.insert("connection", "upgrade".parse().unwrap());
            h.insert("sec-websocket-accept", accept.parse().unwrap());
            response
        }
        _ => {
            let body = serde_json::json!({
                "backend": name,
                "method": req.method().as_str(),
                "path": req.uri().path_and_query().map_or("/", |p| p.as_str()),
                "version": format!("{:?}", req.version()),
                "headers": headers_json(req.headers()),
            });
            let mut response = Response::new(full(body.to_string()));
            response
                .headers_mut()
                .insert("x-backend", name.parse().unwrap());
            // A hop-by-hop header the proxy must not pass on.
            response
                .headers_mut()
                .insert("keep-alive", "timeout=5".parse().unwrap());
            response
        }
    };
    Ok(response)
}
