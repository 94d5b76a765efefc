//! Transports. UDP is an own loop on blocking threads with a cache of finished answers per
//! thread (hickory's UDP path copies, spawns a task and crosses a channel per query: see the
//! research note). TCP goes through hickory-server's `Server` with our `RequestHandler`.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use foldhash::fast::FixedState;
use hickory_proto::op::{Header, Message, ResponseCode};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use crate::answer::{self, Transport};
use crate::view::{Invalidation, ViewHandle};
use crate::wire;

/// How often a blocked UDP thread looks up from its socket to see whether to stop.
const STOP_POLL: Duration = Duration::from_millis(200);

/// One UDP worker: its own answer cache, valid for the view generation it last saw.
struct UdpWorker {
    socket: UdpSocket,
    views: ViewHandle,
    cache: HashMap<Box<[u8]>, Box<[u8]>, FixedState>,
    capacity: usize,
    generation: u64,
    udp_payload: u16,
}

impl UdpWorker {
    fn run(mut self, stop: &AtomicBool) {
        let mut buf = [0u8; 4096];
        let mut key = Vec::with_capacity(300);
        while !stop.load(Ordering::Relaxed) {
            let (len, peer) = match self.socket.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    // ICMP errors from earlier sends surface here; they are not ours to fix.
                    tracing::debug!(error = %e, "UDP receive failed");
                    continue;
                }
            };
            let request = &buf[..len];
            if let Some(reply) = self.answer(request, &mut key)
                && let Err(e) = self.socket.send_to(&reply, peer)
            {
                tracing::debug!(error = %e, %peer, "UDP send failed");
            }
        }
    }

    fn answer(&mut self, request: &[u8], key: &mut Vec<u8>) -> Option<Vec<u8>> {
        let view = self.views.load();
        if view.generation != self.generation {
            match &view.invalidation {
                Invalidation::Names(names)
                    if view.generation == self.generation.wrapping_add(1) =>
                {
                    if !names.is_empty() {
                        self.cache.retain(|k, _| !names.contains(wire::key_name(k)));
                    }
                }
                Invalidation::Names(_) if self.cache.is_empty() => {}
                _ => self.cache.clear(),
            }
            self.generation = view.generation;
        }
        let fast = wire::parse_query(request, self.udp_payload, key);
        if let Some(fast) = &fast
            && let Some(cached) = self.cache.get(key.as_slice())
        {
            return Some(wire::patch(cached, request, fast));
        }
        let reply = answer::answer_bytes(&view.zone, request, Transport::Udp, self.udp_payload)?;
        if let Some(fast) = fast
            && self.capacity > 0
            && wire::cacheable(&reply, &fast)
        {
            if self.cache.len() >= self.capacity {
                // A flood of distinct names: start over rather than keep an LRU on the hot path.
                self.cache.clear();
            }
            self.cache
                .insert(key.as_slice().into(), reply.as_slice().into());
        }
        Some(reply)
    }
}

/// Running UDP workers; stopped on drop.
pub struct UdpServer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl UdpServer {
    pub fn start(
        socket: UdpSocket,
        workers: usize,
        views: ViewHandle,
        capacity: usize,
        udp_payload: u16,
    ) -> std::io::Result<Self> {
        socket.set_read_timeout(Some(STOP_POLL))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..workers.max(1) {
            let worker = UdpWorker {
                socket: socket.try_clone()?,
                views: views.clone(),
                cache: HashMap::with_hasher(FixedState::default()),
                capacity,
                generation: u64::MAX,
                udp_payload,
            };
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("dns-udp-{i}"))
                    .spawn(move || worker.run(&stop))?,
            );
        }
        Ok(UdpServer { stop, threads })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The TCP side: hickory-server parses and frames; we answer from the same view.
pub struct TcpHandler {
    pub views: ViewHandle,
    pub udp_payload: u16,
}

#[async_trait::async_trait]
impl RequestHandler for TcpHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let view = self.views.load_full();
        let message = Message::from_vec(request.as_slice());
        let response = match &message {
            Ok(m) => answer::respond(&view.zone, m, self.udp_payload),
            Err(_) => None,
        };
        let builder = MessageResponseBuilder::from_message_request(request);
        let result = match &response {
            Some(r) => {
                let mut metadata = r.metadata;
                metadata.truncation = false;
                let mut built = builder.build(
                    metadata,
                    r.answers.iter(),
                    r.authorities.iter(),
                    std::iter::empty(),
                    r.additionals.iter(),
                );
                if let Some(edns) = &r.edns {
                    built.set_edns(edns);
                }
                response_handle.send_response(built).await
            }
            None => {
                let built = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                response_handle.send_response(built).await
            }
        };
        match result {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "TCP DNS response not sent");
                let mut metadata = request.metadata;
                metadata.response_code = ResponseCode::ServFail;
                Header {
                    metadata,
                    counts: Default::default(),
                }
                .into()
            }
        }
    }
}

pub use hickory_server::Server as TcpServer;

/// Shorthand for the TCP server type.
pub type DnsTcpServer = TcpServer<TcpHandler>;

pub fn tcp_server(views: ViewHandle, udp_payload: u16) -> DnsTcpServer {
    TcpServer::new(TcpHandler { views, udp_payload })
}
