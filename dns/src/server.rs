//! Transports. UDP is an own loop on blocking threads with a cache of finished answers per
//! thread (hickory's UDP path copies, spawns a task and crosses a channel per query: see the
//! research note). TCP goes through hickory-server's `Server` with our `RequestHandler`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use foldhash::fast::FixedState;
use hickory_proto::op::{Header, Message, ResponseCode};
use hickory_proto::rr::RecordType;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use ipnet::IpNet;
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;

use crate::answer::{self, Transport};
use crate::forward::Forwarder;
use crate::ratelimit::{self, RateLimiter, Verdict};
use crate::view::{Invalidation, PublishedView, ViewHandle};
use crate::wire;

/// How often a blocked UDP thread looks up from its socket to see whether to stop.
const STOP_POLL: Duration = Duration::from_millis(200);

/// Datagrams taken per system call.
const BATCH: usize = 32;
/// Largest query read over UDP; a longer datagram is cut and answered FORMERR.
const MAX_QUERY: usize = 2048;
const UNSPECIFIED: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

fn socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    addr.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

/// Records per message in a zone transfer: well under 64 KiB even for HTTPS records.
const TRANSFER_CHUNK: usize = 200;

/// What the transports share besides the view: policy on who may do what.
pub struct Policies {
    pub forwarder: Option<Forwarder>,
    pub limiter: Option<RateLimiter>,
    pub transfer_from: Vec<IpNet>,
    /// Where forwarded questions are resolved (the UDP workers are plain threads).
    pub runtime: tokio::runtime::Handle,
}

impl Policies {
    fn forwarder_for(&self, client: IpAddr) -> Option<&Forwarder> {
        self.forwarder.as_ref().filter(|f| f.allows(client))
    }

    fn may_transfer(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        self.transfer_from.iter().any(|n| n.contains(&client))
    }
}

/// A finished answer, with what it was made from.
struct Cached {
    answer: Box<[u8]>,
    /// The view generation it was made at.
    generation: u64,
    /// The SOA serial it holds, if it holds the SOA.
    serial: Option<u32>,
    /// Names besides the question's whose records it carries, lowercase wire form.
    depends_on: Box<[Box<[u8]>]>,
}

/// One UDP worker: its own answer cache, checked against the changes since each answer was
/// made, so that an answer from the cache is always the one a lookup would make now.
struct UdpWorker {
    socket: Arc<UdpSocket>,
    views: ViewHandle,
    policies: Arc<Policies>,
    cache: HashMap<Box<[u8]>, Cached, FixedState>,
    /// Names whose records changed (lowercase wire form), with the generation that first
    /// showed it. Kept only while the cache holds answers older than that; emptied with it.
    changed: HashMap<Box<[u8]>, u64, FixedState>,
    /// Fewest labels of a name in `changed`: no shorter name needs a look.
    changed_min_labels: usize,
    capacity: usize,
    /// The view generation the cache has caught up with.
    generation: u64,
    udp_payload: u16,
}

impl UdpWorker {
    /// Receives up to [`BATCH`] datagrams per system call and sends their answers with one more,
    /// as Knot and NSD do: under load the two syscalls per query are most of the cost.
    fn run(mut self, stop: &AtomicBool) {
        let fd = self.socket.as_raw_fd();
        let mut buffers = vec![[0u8; MAX_QUERY]; BATCH];
        let mut received: Vec<(usize, SocketAddr)> = Vec::with_capacity(BATCH);
        let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(BATCH);
        let mut recv_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let mut send_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let mut key = Vec::with_capacity(300);
        while !stop.load(Ordering::Relaxed) {
            received.clear();
            {
                let mut slices: Vec<[IoSliceMut; 1]> = buffers
                    .iter_mut()
                    .map(|b| [IoSliceMut::new(b.as_mut_slice())])
                    .collect();
                match recvmmsg(
                    fd,
                    &mut recv_headers,
                    slices.iter_mut(),
                    MsgFlags::MSG_WAITFORONE,
                    None,
                ) {
                    Ok(results) => {
                        for r in results {
                            let peer = r.address.as_ref().and_then(socket_addr);
                            // Without a peer there is no one to answer; keep the slot aligned.
                            received.push((r.bytes, peer.unwrap_or(UNSPECIFIED)));
                        }
                    }
                    Err(Errno::EAGAIN | Errno::EINTR) => continue,
                    Err(e) => {
                        // ICMP errors from earlier sends surface here; they are not ours to fix.
                        tracing::debug!(error = %e, "UDP receive failed");
                        continue;
                    }
                }
            }
            replies.clear();
            for (buffer, &(len, peer)) in buffers.iter().zip(&received) {
                if peer == UNSPECIFIED {
                    continue;
                }
                let request = &buffer[..len.min(MAX_QUERY)];
                let reply = match self.policies.limiter.as_ref().map(|l| l.check(peer.ip())) {
                    Some(Verdict::Drop) => None,
                    Some(Verdict::Slip) => wire::question_end(request)
                        .and_then(|end| ratelimit::slip_answer(request, end)),
                    Some(Verdict::Answer) | None => self.answer(request, peer, &mut key),
                };
                if let Some(reply) = reply {
                    replies.push((reply, peer));
                }
            }
            self.send_all(fd, &replies, &mut send_headers);
        }
    }

    fn send_all(
        &self,
        fd: std::os::fd::RawFd,
        replies: &[(Vec<u8>, SocketAddr)],
        headers: &mut MultiHeaders<SockaddrStorage>,
    ) {
        let sent = match replies {
            [] => return,
            [(reply, peer)] => {
                if let Err(e) = self.socket.send_to(reply, peer) {
                    tracing::debug!(error = %e, %peer, "UDP send failed");
                }
                return;
            }
            _ => {
                let slices: Vec<[IoSlice; 1]> =
                    replies.iter().map(|(r, _)| [IoSlice::new(r)]).collect();
                let addrs: Vec<Option<SockaddrStorage>> = replies
                    .iter()
                    .map(|(_, p)| Some(SockaddrStorage::from(*p)))
                    .collect();
                match sendmmsg(fd, headers, &slices, &addrs, [], MsgFlags::empty()) {
                    Ok(results) => results.count(),
                    Err(_) => 0,
                }
            }
        };
        // What the batch did not take goes one by one, so one bad peer costs only its answer.
        for (reply, peer) in replies.iter().skip(sent) {
            if let Err(e) = self.socket.send_to(reply, peer) {
                tracing::debug!(error = %e, %peer, "UDP send failed");
            }
        }
    }

    /// Takes in the changes that made the views since the last one seen.
    fn catch_up(&mut self, view: &PublishedView) {
        let changes = view.changes_since(self.generation).filter(|changes| {
            !changes
                .iter()
                .any(|c| matches!(c.invalidation, Invalidation::All))
        });
        match changes {
            Some(changes) if !self.cache.is_empty() => {
                for change in changes {
                    let Invalidation::Names(names) = &change.invalidation else {
                        continue;
                    };
                    for name in names {
                        self.changed_min_labels = self.changed_min_labels.min(wire::labels(name));
                        self.changed
                            .insert(name.as_slice().into(), change.generation);
                    }
                }
                // Many changes since the cache was last empty: start over, which bounds both.
                if self.changed.len() > self.capacity.max(1024) {
                    self.forget_all();
                }
            }
            _ => self.forget_all(),
        }
        self.generation = view.generation;
    }

    fn forget_all(&mut self) {
        self.cache.clear();
        self.changed.clear();
        self.changed_min_labels = usize::MAX;
    }

    /// Whether a cached answer still holds: its serial is current, and no name it was made from
    /// (the question's, or one it carries records of) nor a name above one changed since.
    fn holds(&self, cached: &Cached, qname: &[u8], serial: u32) -> bool {
        if cached.serial.is_some_and(|s| s != serial) {
            return false;
        }
        if self.changed.is_empty() {
            return true;
        }
        std::iter::once(qname)
            .chain(cached.depends_on.iter().map(|n| &**n))
            .all(|name| !self.changed_under(name, cached.generation))
    }

    /// Whether `name` or a name above it changed after `generation`.
    fn changed_under(&self, name: &[u8], generation: u64) -> bool {
        let mut remaining = wire::labels(name);
        let mut at = 0;
        while remaining >= self.changed_min_labels && remaining > 0 {
            let Some(suffix) = name.get(at..) else {
                return true;
            };
            if self.changed.get(suffix).is_some_and(|g| *g > generation) {
                return true;
            }
            let Some(&len) = suffix.first() else {
                return false;
            };
            at += 1 + usize::from(len);
            remaining -= 1;
        }
        false
    }

    fn answer(&mut self, request: &[u8], peer: SocketAddr, key: &mut Vec<u8>) -> Option<Vec<u8>> {
        let view = self.views.load();
        if view.generation != self.generation {
            self.catch_up(&view);
        }
        let clients = view.zone.clients();
        let group = if clients.is_empty() {
            0
        } else {
            u16::try_from(clients.group_of(peer.ip())).unwrap_or(u16::MAX)
        };
        let fast = wire::parse_query(request, self.udp_payload, group, key);
        if let Some(fast) = &fast
            && let Some(cached) = self.cache.get(key.as_slice())
        {
            if self.holds(cached, wire::key_name(key), view.zone.serial()) {
                return Some(wire::patch(&cached.answer, request, fast));
            }
            self.cache.remove(key.as_slice());
        }
        if let Some(fast) = &fast
            && let Some(reply) =
                answer::fast_nxdomain(&view.zone, request, fast, key, self.udp_payload)
        {
            return Some(reply);
        }
        let Ok(message) = Message::from_vec(request) else {
            return answer::formerr(request);
        };
        if self.policies.forwarder_for(peer.ip()).is_some()
            && let Some(query) = answer::forwardable(&view.zone, &message)
        {
            self.forward(message, query, peer);
            return None;
        }
        let (reply, provenance) = answer::answer_message(
            &view.zone,
            message,
            Transport::Udp,
            self.udp_payload,
            peer.ip(),
        )?;
        if let Some(fast) = fast
            && self.capacity > 0
            && wire::cacheable(&reply, &fast)
        {
            if self.cache.len() >= self.capacity {
                // A flood of distinct names: start over rather than keep an LRU on the hot path.
                self.forget_all();
            }
            let cached = Cached {
                answer: reply.as_slice().into(),
                generation: self.generation,
                serial: provenance.has_soa.then(|| view.zone.serial()),
                depends_on: provenance
                    .depends_on
                    .iter()
                    .filter_map(wire::name_wire)
                    .map(Vec::into_boxed_slice)
                    .collect(),
            };
            self.cache.insert(key.as_slice().into(), cached);
        }
        Some(reply)
    }

    /// Resolves on the runtime and answers from there, so this thread goes on serving.
    fn forward(&self, message: Message, query: hickory_proto::op::Query, peer: SocketAddr) {
        let policies = self.policies.clone();
        let socket = self.socket.clone();
        let udp_payload = self.udp_payload;
        self.policies.runtime.spawn(async move {
            let Some(forwarder) = policies.forwarder.as_ref() else {
                return;
            };
            let response = forwarder.resolve(&message, query, udp_payload).await;
            let limit = answer::udp_limit(&message, udp_payload);
            if let Some(bytes) = answer::encode(&response, Some(limit))
                && let Err(e) = socket.send_to(&bytes, peer)
            {
                tracing::debug!(error = %e, %peer, "UDP send failed");
            }
        });
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
        policies: Arc<Policies>,
        capacity: usize,
        udp_payload: u16,
    ) -> std::io::Result<Self> {
        socket.set_read_timeout(Some(STOP_POLL))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..workers.max(1) {
            let worker = UdpWorker {
                socket: Arc::new(socket.try_clone()?),
                views: views.clone(),
                policies: policies.clone(),
                cache: HashMap::with_hasher(FixedState::default()),
                changed: HashMap::with_hasher(FixedState::default()),
                changed_min_labels: usize::MAX,
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
    pub policies: Arc<Policies>,
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
        let client = request.src().ip();
        let builder = MessageResponseBuilder::from_message_request(request);
        let Ok(message) = Message::from_vec(request.as_slice()) else {
            let built = builder.error_msg(&request.metadata, ResponseCode::FormErr);
            return sent(response_handle.send_response(built).await, request);
        };
        if let [query] = message.queries.as_slice()
            && matches!(query.query_type(), RecordType::AXFR | RecordType::IXFR)
            && self.policies.may_transfer(client)
            && let Some(records) = view.zone.transfer(query.name())
        {
            // RFC 5936: the zone in as many messages as it takes, SOA first and last. An IXFR
            // gets the whole zone too (RFC 1995 §4: we keep no history).
            let mut metadata = request.metadata;
            metadata.message_type = hickory_proto::op::MessageType::Response;
            metadata.authoritative = true;
            metadata.recursion_available = false;
            metadata.response_code = ResponseCode::NoError;
            let mut last = None;
            for chunk in records.chunks(TRANSFER_CHUNK) {
                let builder = MessageResponseBuilder::from_message_request(request);
                let built = builder.build(
                    metadata,
                    chunk.iter(),
                    std::iter::empty(),
                    std::iter::empty(),
                    std::iter::empty(),
                );
                match response_handle.send_response(built).await {
                    Ok(info) => last = Some(info),
                    Err(e) => return sent(Err(e), request),
                }
            }
            return last.unwrap_or_else(|| sent(Err("an empty transfer"), request));
        }
        let forward = self
            .policies
            .forwarder_for(client)
            .and_then(|f| Some((f, answer::forwardable(&view.zone, &message)?)));
        let response = match forward {
            Some((forwarder, query)) => {
                Some(forwarder.resolve(&message, query, self.udp_payload).await)
            }
            None => answer::respond(&view.zone, &message, self.udp_payload, client),
        };
        let Some(r) = response else {
            let built = builder.error_msg(&request.metadata, ResponseCode::FormErr);
            return sent(response_handle.send_response(built).await, request);
        };
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
        sent(response_handle.send_response(built).await, request)
    }
}

fn sent<E: std::fmt::Display>(result: Result<ResponseInfo, E>, request: &Request) -> ResponseInfo {
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

pub use hickory_server::Server as TcpServer;

/// Shorthand for the TCP server type.
pub type DnsTcpServer = TcpServer<TcpHandler>;

pub fn tcp_server(views: ViewHandle, policies: Arc<Policies>, udp_payload: u16) -> DnsTcpServer {
    TcpServer::new(TcpHandler {
        views,
        policies,
        udp_payload,
    })
}
