//! One request: pick the service by Host, check it against the TLS name, forward it to a
//! backend with the forwarding headers, stream both bodies, tunnel upgrades, and turn every
//! failure into a clear status and page.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use dashmap::DashMap;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_config::model::{
    LoadBalancing, MetricsDetail, Service, ServiceStatus, UpstreamProtocol,
};
use portcullis_config::names::{DomainName, MAX_NAME_LEN, host_name, normalize_host};
use portcullis_config::{ServiceId, SnapshotHandle};

use crate::Limits;
use crate::failure::{Failure, Fault};
use crate::h1::{RequestBody, lists_token};
use crate::health::{BackendState, Health, Target};
use crate::tls::SnapshotResolver;

/// Why a body could not be read to its end.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

pub type ProxyBody = BoxBody<Bytes, BodyError>;

/// What every connection of the node shares.
pub struct Shared {
    pub snapshot: SnapshotHandle,
    pub resolver: Arc<SnapshotResolver>,
    pub health: Arc<Health>,
    pub client: Client<HttpConnector, ProxyBody>,
    /// For backends that speak HTTP/2 in clear text (prior knowledge).
    pub h2c_client: Client<HttpConnector, ProxyBody>,
    /// Each service's backends as this worker balances them.
    upstreams: DashMap<ServiceId, Arc<Upstreams>>,
    /// This worker's HTTP/1.1 connections to backends.
    pool: Arc<crate::upstream::Pool>,
    pub limits: Limits,
    /// Log one event per request.
    access_log: bool,
    request_ids: RequestIds,
    /// Metric handles, made once: the macros would build and hash their labels per request.
    /// Requests for a service, by class, all services together.
    requests: [metrics::Counter; 5],
    connect_errors: metrics::Counter,
    /// Series of their own, for services with detailed metrics only: a series per service
    /// would make a million-service scrape megabytes.
    detailed_requests: DashMap<(ServiceId, usize), metrics::Counter>,
    detailed_connect_errors: DashMap<ServiceId, metrics::Counter>,
    durations: [metrics::Histogram; 5],
    /// Port clients reach HTTPS on, for redirects.
    pub https_port: u16,
    /// Cancelled when the node stops or hands over to a new process: HTTP/1 answers then close
    /// their connections.
    draining: tokio_util::sync::CancellationToken,
}

impl Shared {
    pub fn new(
        snapshot: SnapshotHandle,
        resolver: Arc<SnapshotResolver>,
        health: Arc<Health>,
        limits: Limits,
        access_log: bool,
        https_port: u16,
        draining: tokio_util::sync::CancellationToken,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(limits.connect_timeout.0));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector.clone());
        let h2c_client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_only(true)
            .build(connector);
        Shared {
            snapshot,
            resolver,
            health,
            client,
            h2c_client,
            upstreams: DashMap::new(),
            pool: crate::upstream::Pool::new(limits.connect_timeout.0),
            limits,
            access_log,
            request_ids: RequestIds::new(),
            requests: CLASSES
                .map(|class| metrics::counter!("portcullis_http_requests_total", "class" => class)),
            connect_errors: metrics::counter!("portcullis_upstream_connect_errors_total"),
            detailed_requests: DashMap::new(),
            detailed_connect_errors: DashMap::new(),
            durations: CLASSES.map(|class| {
                metrics::histogram!("portcullis_http_request_duration_seconds", "class" => class)
            }),
            https_port,
            draining,
        }
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// A service's backends as one worker balances them: their health states (shared by the
/// workers and the health checks), looked up once per version of the service rather than per
/// request, and the round-robin position.
struct Upstreams {
    /// The version of the service the states were looked up for: the Snapshot's own `Arc`,
    /// which a change replaces. (The weak reference keeps its address from being reused.)
    service: std::sync::Weak<Service>,
    states: Box<[Arc<BackendState>]>,
    cursor: AtomicUsize,
}

impl Shared {
    fn upstreams(&self, service: &Arc<Service>) -> Arc<Upstreams> {
        let cursor = match self.upstreams.get(&service.id) {
            Some(known) if std::ptr::eq(known.service.as_ptr(), Arc::as_ptr(service)) => {
                return known.clone();
            }
            Some(old) => old.cursor.load(Ordering::Relaxed),
            None => 0,
        };
        let fresh = Arc::new(Upstreams {
            service: Arc::downgrade(service),
            states: service
                .backends
                .iter()
                .map(|b| self.health.state(&Target::new(b, &service.options)))
                .collect(),
            cursor: AtomicUsize::new(cursor),
        });
        self.upstreams.insert(service.id, fresh.clone());
        fresh
    }
}

/// The service a request was for, as its metrics need it.
#[derive(Clone, Copy)]
struct Routed {
    id: ServiceId,
    detailed: bool,
}

impl Routed {
    fn of(service: &Service) -> Self {
        Routed {
            id: service.id,
            detailed: service.options.metrics == MetricsDetail::Detailed,
        }
    }
}

impl Shared {
    fn count_request(&self, service: Routed, class: usize) {
        self.requests[class].increment(1);
        if !service.detailed {
            return;
        }
        if let Some(counter) = self.detailed_requests.get(&(service.id, class)) {
            counter.increment(1);
            return;
        }
        let counter = metrics::counter!(
            "portcullis_service_http_requests_total",
            "service" => service.id.to_string(),
            "class" => CLASSES[class]
        );
        counter.increment(1);
        self.detailed_requests.insert((service.id, class), counter);
    }

    fn count_connect_error(&self, service: Routed) {
        self.connect_errors.increment(1);
        if !service.detailed {
            return;
        }
        if let Some(counter) = self.detailed_connect_errors.get(&service.id) {
            counter.increment(1);
            return;
        }
        let counter = metrics::counter!(
            "portcullis_service_upstream_connect_errors_total",
            "service" => service.id.to_string()
        );
        counter.increment(1);
        self.detailed_connect_errors.insert(service.id, counter);
    }
}

/// What the router knows of the connection a request came on.
#[derive(Clone)]
pub struct ConnInfo {
    /// The client: the TCP peer, or the address a trusted balancer's PROXY header named.
    pub peer: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// The TLS server name, lowercased; `None` on plain HTTP.
    pub sni: Option<Arc<str>>,
    /// The certificate the connection was opened with is publicly trusted (not the dev CA's),
    /// decided once per connection for HSTS.
    pub trusted_certificate: bool,
}

/// Request ids: a random per-process prefix and a counter, so they are unique without a
/// syscall per request.
struct RequestIds {
    prefix: u64,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let mut bytes = [0u8; 8];
        let _ = getrandom::fill(&mut bytes);
        RequestIds {
            prefix: u64::from_le_bytes(bytes),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> HeaderValue {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let count = self.next.fetch_add(1, Ordering::Relaxed) as u32;
        let mut text = [0u8; 24];
        for (i, byte) in text[..16].iter_mut().enumerate() {
            *byte = DIGITS[(self.prefix >> (60 - 4 * i) & 0xf) as usize];
        }
        for (i, byte) in text[16..].iter_mut().enumerate() {
            *byte = DIGITS[(count >> (28 - 4 * i) & 0xf) as usize];
        }
        // Hex digits only: always a valid header value.
        HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
}

/// A text page. Every page the HTTPS side makes carries the request id, so a visitor can quote
/// it and an operator can find the request's log lines.
fn page(
    status: StatusCode,
    mut text: String,
    request_id: Option<&HeaderValue>,
) -> Response<ProxyBody> {
    if let Some(id) = request_id.and_then(|id| id.to_str().ok()) {
        text.push_str("Request id: ");
        text.push_str(id);
        text.push('\n');
    }
    let mut response = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn empty(status: StatusCode) -> Response<ProxyBody> {
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response
}

/// The host a request is for. One Host header at most (RFC 9112 §3.2); a target with an
/// authority (HTTP/1.1's absolute form, HTTP/2's `:authority`) wins over Host (RFC 9112
/// §3.2.2), and in HTTP/2 the two must name the same site (RFC 9113 §8.3.1). `Ok(None)`: the
/// request names no host.
fn request_host(req: &Request<RequestBody>) -> Result<Option<&str>, Failure> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Failure::RepeatedHost);
    }
    let host = match host {
        Some(h) => Some(h.to_str().map_err(|_| Failure::MalformedHost)?),
        None => None,
    };
    let Some(authority) = req.uri().authority() else {
        return Ok(host);
    };
    if req.version() == Version::HTTP_2
        && let Some(host) = host
        && !same_site(authority, host, req.uri().scheme_str())
    {
        return Err(Failure::ConflictingHost);
    }
    Ok(Some(authority.as_str()))
}

/// True when the Host header `host` names the same site as `authority`: the same host,
/// compared case-insensitively and without a trailing dot, and the same port, an absent one
/// being the scheme's default (RFC 3986 §6.2.3).
fn same_site(authority: &hyper::http::uri::Authority, host: &str, scheme: Option<&str>) -> bool {
    let Ok(other) = host.parse::<hyper::http::uri::Authority>() else {
        return false;
    };
    let default = if scheme == Some("http") { 80 } else { 443 };
    let name = |a: &hyper::http::uri::Authority| {
        let h = a.host();
        h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase()
    };
    name(authority) == name(&other)
        && authority.port_u16().unwrap_or(default) == other.port_u16().unwrap_or(default)
}

/// The host as the ACME challenge path has always taken it: `:authority`, else Host. Kept
/// apart from [`request_host`] so a CA's validation requests are answered exactly as before.
fn challenge_host(req: &Request<RequestBody>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

/// Answers a request on the HTTP listener: 308 to HTTPS, the service itself where it asked
/// for plain HTTP, and ACME http-01 challenges (statelessly, from the account's thumbprint).
pub async fn plain(
    shared: Arc<Shared>,
    conn: ConnInfo,
    req: Request<RequestBody>,
) -> Result<Response<ProxyBody>, Infallible> {
    if let Some(token) = req
        .uri()
        .path()
        .strip_prefix("/.well-known/acme-challenge/")
    {
        let host = challenge_host(&req).and_then(host_name);
        let (status, body) = crate::challenge::respond(&shared.snapshot.load(), host, token);
        return Ok(page(status, body, None));
    }
    if let Some(response) = too_many_headers(&shared, &req, None) {
        return Ok(response);
    }
    let host = match request_host(&req) {
        Ok(Some(host)) => host,
        Ok(None) => {
            return Ok(page(
                StatusCode::BAD_REQUEST,
                "The request has no Host header; send one naming the site you want.\n".into(),
                None,
            ));
        }
        Err(failure) => return Ok(page(failure.status(), failure.page_text().into(), None)),
    };
    // Only a name this platform serves goes into Location: anything else taken from Host
    // (`a@evil.example`, `evil.example/phish?`) would send the visitor elsewhere.
    let mut buf = [0u8; MAX_NAME_LEN];
    let Some(name) = normalize_host(host, &mut buf).filter(|n| DomainName::parse(n).is_ok()) else {
        let (status, text) = if is_ip_literal(host) {
            (
                StatusCode::NOT_FOUND,
                format!("No site is served at {host}.\n"),
            )
        } else {
            (
                StatusCode::BAD_REQUEST,
                format!("`{host}` is not a host name.\n"),
            )
        };
        return Ok(page(status, text, None));
    };
    let snapshot = shared.snapshot.load();
    let Some(service) = snapshot.service_for_host(name) else {
        return Ok(page(
            StatusCode::NOT_FOUND,
            format!("No site is served at {name}.\n"),
            None,
        ));
    };
    if service.options.plain_http {
        drop(snapshot);
        return route(shared, conn, req).await;
    }
    drop(snapshot);
    let port = match shared.https_port {
        443 => String::new(),
        port => format!(":{port}"),
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{name}{port}{path}");
    let mut response = empty(StatusCode::PERMANENT_REDIRECT);
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            response.headers_mut().insert(header::LOCATION, v);
            Ok(response)
        }
        // The name is checked and the path came through hyper's parser: not reached.
        Err(_) => Ok(page(
            StatusCode::BAD_REQUEST,
            "The request's target cannot be redirected.\n".into(),
            None,
        )),
    }
}

/// A 431 for a request with more header fields than `proxy.max_headers`. hyper enforces the
/// limit itself for HTTP/1 (as it parses); HTTP/2 has only a byte limit, so fields are counted
/// here, for both, so the one setting means the same on each.
fn too_many_headers(
    shared: &Shared,
    req: &Request<RequestBody>,
    request_id: Option<&HeaderValue>,
) -> Option<Response<ProxyBody>> {
    let max = shared.limits.max_headers;
    (req.headers().len() > max).then(|| {
        let text = format!(
            "The request has {} header fields; this site takes at most {max}. Send fewer.\n",
            req.headers().len()
        );
        page(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            text,
            request_id,
        )
    })
}

/// An IP address as a Host (`192.0.2.1`, `[2001:db8::1]:80`): well formed, but never a site.
fn is_ip_literal(host: &str) -> bool {
    host.parse::<hyper::http::uri::Authority>().is_ok_and(|a| {
        !host.contains('@')
            && a.host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok()
    })
}

/// Answers a request on the HTTPS listener.
pub async fn route(
    shared: Arc<Shared>,
    conn: ConnInfo,
    req: Request<RequestBody>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let version = req.version();
    // What only the access log needs, taken only when it is on.
    let logged = shared
        .access_log
        .then(|| (req.method().clone(), req.uri().path().to_string()));
    let request_id = match req.headers().get(X_REQUEST_ID) {
        Some(v) if !v.is_empty() && v.len() <= 200 => v.clone(),
        _ => shared.request_ids.next(),
    };
    // Read a second time only for the access log, and only when it is on.
    let logged_host = match shared.access_log.then(|| request_host(&req)) {
        Some(Ok(host)) => host.unwrap_or("").to_string(),
        _ => String::new(),
    };
    // The name, lowercased into a buffer here, so the request can move on without a copy of
    // its Host.
    let mut buf = [0u8; MAX_NAME_LEN];
    let name = match request_host(&req) {
        Err(failure) => Err(page(
            failure.status(),
            failure.page_text().into(),
            Some(&request_id),
        )),
        Ok(host) => {
            let host = host.unwrap_or("");
            normalize_host(host, &mut buf).ok_or_else(|| {
                let text = if host.is_empty() {
                    "The request names no host; send a Host header.\n".to_string()
                } else {
                    format!("`{host}` is not a host name.\n")
                };
                page(StatusCode::BAD_REQUEST, text, Some(&request_id))
            })
        }
    };
    let (response, service, upstream) = route_inner(&shared, &conn, req, name, &request_id).await;
    let mut response = response;
    response
        .headers_mut()
        .insert(X_REQUEST_ID, request_id.clone());
    if version < Version::HTTP_2
        && shared.draining.is_cancelled()
        && response.status() != StatusCode::SWITCHING_PROTOCOLS
    {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let class = (response.status().as_u16() / 100).clamp(1, 5) as usize - 1;
    shared.durations[class].record(started.elapsed().as_secs_f64());
    if let Some(service) = service {
        shared.count_request(service, class);
    }
    let Some((method, path)) = logged else {
        return Ok(response);
    };
    // Logged when the body ends, so bytes and duration cover the whole response, as nginx's
    // $body_bytes_sent and $request_time do.
    let record = AccessRecord {
        service: service.map(|s| s.id.to_string()).unwrap_or_default(),
        host: logged_host,
        method,
        path,
        status: response.status().as_u16(),
        upstream,
        request_id,
        client: conn.peer.ip(),
        started,
    };
    let (parts, body) = response.into_parts();
    Ok(Response::from_parts(
        parts,
        Watched::new(body, record).boxed(),
    ))
}

/// What the access log says of one request, written when its response body is done.
struct AccessRecord {
    service: String,
    host: String,
    method: Method,
    path: String,
    status: u16,
    upstream: Option<Arc<str>>,
    request_id: HeaderValue,
    client: IpAddr,
    started: Instant,
}

impl BodyEnd for AccessRecord {
    fn finished(&mut self, bytes: u64, _complete: bool) {
        tracing::info!(
            target: "portcullis::access",
            service = self.service,
            host = self.host,
            method = %self.method,
            path = self.path,
            status = self.status,
            bytes,
            duration_us = self.started.elapsed().as_micros() as u64,
            upstream = self.upstream.as_deref().unwrap_or(""),
            request_id = self.request_id.to_str().unwrap_or(""),
            client = %self.client,
        );
    }
}

async fn route_inner(
    shared: &Shared,
    conn: &ConnInfo,
    req: Request<RequestBody>,
    name: Result<&str, Response<ProxyBody>>,
    request_id: &HeaderValue,
) -> (Response<ProxyBody>, Option<Routed>, Option<Arc<str>>) {
    if let Some(response) = too_many_headers(shared, &req, Some(request_id)) {
        return (response, None, None);
    }
    let name = match name {
        Ok(name) => name,
        Err(page) => return (page, None, None),
    };
    if let Some(sni) = &conn.sni
        && !covered_by_sni(shared, sni, name)
    {
        let text = format!(
            "This connection was opened for {sni}, not {name}: open a new connection for {name}.\n"
        );
        return (
            page(StatusCode::MISDIRECTED_REQUEST, text, Some(request_id)),
            None,
            None,
        );
    }
    let snapshot = shared.snapshot.load();
    let Some(service) = snapshot.service_for_host(name).cloned() else {
        let text = format!("No site is served at {name}.\n");
        return (
            page(StatusCode::NOT_FOUND, text, Some(request_id)),
            None,
            None,
        );
    };
    drop(snapshot);
    if req.method() == Method::CONNECT && !is_h2_websocket(&req) {
        let text = "CONNECT is only served for WebSocket over HTTP/2 (RFC 8441) here.\n";
        return (
            page(StatusCode::NOT_IMPLEMENTED, text.into(), Some(request_id)),
            Some(Routed::of(&service)),
            None,
        );
    }
    if service.status == ServiceStatus::Suspended {
        let text = format!("The site at {name} is suspended by its platform.\n");
        return (
            page(StatusCode::SERVICE_UNAVAILABLE, text, Some(request_id)),
            Some(Routed::of(&service)),
            None,
        );
    }
    let (mut response, upstream) =
        match forward(shared, conn, &service, req, name, request_id).await {
            Ok((response, backend)) => (response, Some(backend)),
            Err(failure) => {
                log_failure(&failure, name, request_id);
                let mut response = page(
                    failure.status(),
                    failure.page_text().into(),
                    Some(request_id),
                );
                if matches!(failure, Failure::NoneAvailable) {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                }
                (response, failure.backend().map(Arc::from))
            }
        };
    if conn.sni.is_some() && wants_hsts(&service, conn) {
        response.headers_mut().insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    (response, Some(Routed::of(&service)), upstream)
}

/// The whole story goes to the log, at the level of whoever is at fault: a client's broken
/// request is its own business, a backend's failure is the operator's.
fn log_failure(failure: &Failure, host: &str, request_id: &HeaderValue) {
    let request_id = request_id.to_str().unwrap_or("-");
    let error = portcullis_config::error::chain(failure);
    match failure.fault() {
        Fault::Client => tracing::debug!(host, request_id, error, "client request failed"),
        Fault::Upstream => tracing::warn!(host, request_id, error, "upstream request failed"),
        Fault::Internal => tracing::error!(host, request_id, error, "request failed"),
    }
}

/// HSTS as the service asks; by default only once a publicly trusted certificate serves it
/// (never the dev CA's, which would pin browsers to a certificate they do not trust).
fn wants_hsts(service: &Service, conn: &ConnInfo) -> bool {
    service.options.hsts.unwrap_or(conn.trusted_certificate)
}

/// A request for `host` on a connection for `sni` is fine when the certificate serving `sni`
/// also covers `host` (RFC 9110 §15.5.20: otherwise 421).
fn covered_by_sni(shared: &Shared, sni: &str, host: &str) -> bool {
    if sni.eq_ignore_ascii_case(host) {
        return true;
    }
    let Some(cert) = shared.resolver.certificate_for(sni) else {
        return false;
    };
    cert.domains.iter().any(|d| {
        let d = d.as_str();
        d == host
            || d.strip_prefix("*.")
                .is_some_and(|parent| host.split_once('.').is_some_and(|(_, p)| p == parent))
    })
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) are the connection's, never forwarded. `Trailer` is not
/// one of them (it was in RFC 2616): it tells the next hop which trailer fields to pass on.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // The fields `Connection` lists go too. Its values are copied out first (a reference
    // count each, no copy of the bytes), and each listed name is removed by its text, which
    // allocates nothing: backends list `keep-alive` on most responses.
    let mut listed = headers.get_all(header::CONNECTION).iter();
    match (listed.next().cloned(), listed.next().is_some()) {
        (None, _) => {}
        (Some(only), false) => remove_listed(headers, &only, keep_upgrade),
        (Some(_), true) => {
            let values: Vec<HeaderValue> = headers
                .get_all(header::CONNECTION)
                .iter()
                .cloned()
                .collect();
            for value in &values {
                remove_listed(headers, value, keep_upgrade);
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
}

fn remove_listed(headers: &mut HeaderMap, connection: &HeaderValue, keep_upgrade: bool) {
    let Ok(text) = connection.to_str() else {
        return;
    };
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if keep_upgrade && name.eq_ignore_ascii_case("upgrade") {
            continue;
        }
        // By its text: matched case-insensitively, and a token that is not a field name
        // removes nothing.
        headers.remove(name);
    }
}

fn is_upgrade(req: &Request<RequestBody>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && lists_token(req.headers(), header::CONNECTION, "upgrade")
}

fn is_h2_websocket(req: &Request<RequestBody>) -> bool {
    req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const VIA: HeaderName = HeaderName::from_static("via");

/// A header value made from formatted text: written on the stack, then one allocation.
fn formatted(args: std::fmt::Arguments<'_>) -> Option<HeaderValue> {
    use std::io::Write as _;
    // An IPv6 address in brackets, a 253-byte host and the rest fit.
    let mut buf = [0u8; 384];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    cursor.write_fmt(args).ok()?;
    let len = cursor.position() as usize;
    HeaderValue::from_bytes(&buf[..len]).ok()
}

/// Adds `value` to the comma-separated field `name`: as it is when the message has none (most
/// requests: no copy at all), else after what is there.
fn append(headers: &mut HeaderMap, name: HeaderName, value: HeaderValue) {
    match headers.entry(name) {
        header::Entry::Vacant(slot) => {
            slot.insert(value);
        }
        header::Entry::Occupied(mut slot) => {
            let prev = slot.get().as_bytes();
            if prev.is_empty() {
                slot.insert(value);
                return;
            }
            let mut combined = Vec::with_capacity(prev.len() + 2 + value.len());
            combined.extend_from_slice(prev);
            combined.extend_from_slice(b", ");
            combined.extend_from_slice(value.as_bytes());
            if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(combined)) {
                slot.insert(v);
            }
        }
    }
}

/// The request as it goes to the backends, made once for every attempt by [`request_filter`].
struct Outbound {
    method: Method,
    path_and_query: hyper::http::uri::PathAndQuery,
    headers: HeaderMap,
    /// An HTTP/1.1 Upgrade, or WebSocket over HTTP/2 sent on as one.
    upgrade: bool,
    /// WebSocket over HTTP/2 (RFC 8441): the backend sees an HTTP/1.1 GET with Upgrade.
    h2_websocket: bool,
    /// A failed attempt may be sent again: the body is known empty and the method idempotent
    /// (RFC 9110 §9.2.2).
    retryable: bool,
}

/// Forwards a request for `service` through its phases: the request filter, the choice of
/// backends, the send (with one retry where safe), the response filter. Every failure is a
/// [`Failure`], which the caller turns into a status and a page.
async fn forward(
    shared: &Shared,
    conn: &ConnInfo,
    service: &Arc<Service>,
    mut req: Request<RequestBody>,
    host: &str,
    request_id: &HeaderValue,
) -> Result<(Response<ProxyBody>, Arc<str>), Failure> {
    let client_upgrade =
        (is_upgrade(&req) || is_h2_websocket(&req)).then(|| ClientUpgrade::of(&mut req));
    let (parts, body) = req.into_parts();
    let retryable = body.is_end_stream()
        && matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        );
    let (upstreams, candidates) = choose_backends(shared, service)?;
    let outbound = request_filter(parts, conn, host, request_id, retryable);
    let h2_websocket = outbound.h2_websocket;
    let (response, inflight, backend) = send_with_retry(
        shared,
        conn,
        service,
        outbound,
        body,
        &upstreams.states,
        candidates,
    )
    .await?;
    Ok((
        response_filter(response, inflight, client_upgrade, h2_websocket),
        backend,
    ))
}

/// Phase 1: the backends this request may go to, in the order to try them.
fn choose_backends(
    shared: &Shared,
    service: &Arc<Service>,
) -> Result<(Arc<Upstreams>, [Option<usize>; 2]), Failure> {
    if service.backends.is_empty() {
        return Err(Failure::NoBackend);
    }
    let upstreams = shared.upstreams(service);
    let start = upstreams.cursor.fetch_add(1, Ordering::Relaxed);
    let states = &upstreams.states;
    let candidates = pick(service.options.load_balancing, states, start);
    if candidates[0].is_none() {
        return Err(Failure::NoneAvailable);
    }
    Ok((upstreams, candidates))
}

/// Phase 2: the request's headers as the backend gets them: hop-by-hop fields dropped, the
/// forwarding fields (`X-Forwarded-*`, `Forwarded`, `Via`) and the request id added.
fn request_filter(
    parts: hyper::http::request::Parts,
    conn: &ConnInfo,
    host: &str,
    request_id: &HeaderValue,
    retryable: bool,
) -> Outbound {
    let h2_websocket = parts.method == Method::CONNECT
        && parts
            .extensions
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    let upgrade = h2_websocket
        || (parts.version == Version::HTTP_11
            && parts.headers.contains_key(header::UPGRADE)
            && lists_token(&parts.headers, header::CONNECTION, "upgrade"));
    let mut headers = parts.headers;
    // `TE: trailers` is the one TE value that must reach the backend: without it an HTTP/1.1
    // backend sends no trailers, and gRPC's status lives there.
    let wants_trailers = lists_token(&headers, header::TE, "trailers");
    strip_hop_by_hop(&mut headers, upgrade);
    if wants_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if h2_websocket {
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        // RFC 8441 has no key; the backend's RFC 6455 handshake wants one, any will do.
        let mut key = [0u8; 16];
        let _ = getrandom::fill(&mut key);
        if let Ok(v) = HeaderValue::from_str(&base64::engine::general_purpose::STANDARD.encode(key))
        {
            headers.insert(header::SEC_WEBSOCKET_KEY, v);
        }
        if !headers.contains_key(header::SEC_WEBSOCKET_VERSION) {
            headers.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
    }
    let ip = conn.peer.ip();
    if let Some(v) = formatted(format_args!("{ip}")) {
        append(&mut headers, X_FORWARDED_FOR, v);
    }
    let proto = if conn.sni.is_some() { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    // The client's own Host value when it is already the name (most): shared, not copied.
    let host_value = match headers.get(header::HOST) {
        Some(v) if v.as_bytes() == host.as_bytes() => Some(v.clone()),
        _ => HeaderValue::from_str(host).ok(),
    };
    if let Some(v) = host_value {
        headers.insert(X_FORWARDED_HOST, v.clone());
        headers.insert(header::HOST, v);
    }
    // RFC 7239 §6: IPv6 in brackets and quotes.
    let forwarded = match ip {
        IpAddr::V4(ip) => formatted(format_args!("for={ip};host={host};proto={proto}")),
        IpAddr::V6(ip) => formatted(format_args!("for=\"[{ip}]\";host={host};proto={proto}")),
    };
    if let Some(v) = forwarded {
        append(&mut headers, FORWARDED, v);
    }
    let via = match parts.version {
        Version::HTTP_2 => "2 portcullis",
        Version::HTTP_10 => "1.0 portcullis",
        _ => "1.1 portcullis",
    };
    append(&mut headers, VIA, HeaderValue::from_static(via));
    headers.insert(X_REQUEST_ID, request_id.clone());
    Outbound {
        method: if h2_websocket {
            Method::GET
        } else {
            parts.method
        },
        path_and_query: parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
        headers,
        upgrade,
        h2_websocket,
        retryable,
    }
}

/// Phase 3: sends to the first candidate and, where that is safe, once more to the second when
/// the first could not be connected to. The response, the guard counting it in flight, and
/// the backend that answered.
async fn send_with_retry(
    shared: &Shared,
    conn: &ConnInfo,
    service: &Service,
    outbound: Outbound,
    body: RequestBody,
    states: &[Arc<BackendState>],
    candidates: [Option<usize>; 2],
) -> Result<(Response<Incoming>, Inflight, Arc<str>), Failure> {
    // A request with no body (most) has nothing to watch or to fail, and an empty boxed body
    // allocates nothing.
    let (mut body, client_failed) = if body.is_end_stream() {
        (
            Some(Empty::new().map_err(|never| match never {}).boxed()),
            None,
        )
    } else {
        let client_body = ClientBody::new(body);
        let failed = client_body.failed.clone();
        (Some(client_body.boxed()), Some(failed))
    };
    let attempts = if outbound.retryable { 2 } else { 1 };
    let mut headers = Some(outbound.headers);
    for (attempt, index) in candidates.into_iter().take(attempts).enumerate() {
        let Some(index) = index else { break };
        let backend = &service.backends[index];
        let state = &states[index];
        let mut uri_parts = hyper::http::uri::Parts::default();
        uri_parts.scheme = Some(hyper::http::uri::Scheme::HTTP);
        uri_parts.authority = state.authority.clone();
        uri_parts.path_and_query = Some(outbound.path_and_query.clone());
        let Ok(uri) = Uri::from_parts(uri_parts) else {
            return Err(Failure::BadBackendAddress {
                backend: state.label.to_string(),
            });
        };
        // The response timeout counts from the last byte of the request body sent, not from
        // the start: a large upload is not a backend that does not answer (nginx's
        // proxy_send_timeout and proxy_read_timeout measure between operations too).
        // A request without a body (most) needs no tracking: a plain timeout from the start.
        let body = body.take();
        let progress = body
            .as_ref()
            .filter(|b| !b.is_end_stream())
            .map(|_| Arc::new(Progress::new()));
        let mut up = Request::new(match (body, &progress) {
            (Some(body), Some(progress)) => Sending {
                inner: body,
                progress: progress.clone(),
            }
            .boxed(),
            (Some(body), None) => body,
            (None, _) => Empty::new().map_err(|never| match never {}).boxed(),
        });
        *up.method_mut() = outbound.method.clone();
        *up.uri_mut() = uri;
        let h2c = service.options.upstream_protocol == UpstreamProtocol::H2c && !outbound.upgrade;
        *up.version_mut() = if h2c {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        // The last attempt takes the headers; only one with a retry after it copies them.
        let may_retry = attempt + 1 < attempts && candidates[1].is_some();
        *up.headers_mut() = match (may_retry, &mut headers) {
            (true, Some(h)) => h.clone(),
            (_, h) => h.take().unwrap_or_default(),
        };

        let mut inflight = Inflight::start(state.clone());
        let request: LeasedFuture = if service.options.proxy_protocol {
            let addr = (backend, state.label.as_ref());
            let sent = crate::proxy_protocol::send(addr, conn, up, shared.limits.connect_timeout.0);
            Box::pin(async move { Ok((sent.await?, None)) })
        } else if h2c {
            let client = shared.h2c_client.clone();
            Box::pin(async move { Ok((client.request(up).await?, None)) })
        } else {
            // HTTP/1.1 to the backend in origin form, on this worker's own connections.
            *up.uri_mut() = Uri::from(outbound.path_and_query.clone());
            let pool = shared.pool.clone();
            let label = state.label.clone();
            Box::pin(async move {
                let (response, lease) = pool.send(&label, up).await?;
                Ok((response, Some(lease)))
            })
        };
        let timeout = shared.limits.response_timeout.0;
        let sent = match &progress {
            Some(progress) => progress.within(timeout, request).await,
            None => tokio::time::timeout(timeout, request).await,
        };
        let backend_text = || state.label.to_string();
        match sent {
            Ok(Ok((response, lease))) => {
                state.record_success();
                inflight.lease = lease;
                return Ok((response, inflight, state.label.clone()));
            }
            // The client broke its own request (bad chunked framing, a body cut short): hyper's
            // client reports that as a failed send, but the backend did nothing wrong.
            Ok(Err(_)) if client_failed.as_ref().is_some_and(|f| f.get().is_some()) => {
                let why = client_failed
                    .as_ref()
                    .and_then(|f| f.get().cloned())
                    .unwrap_or_default();
                return Err(Failure::ClientBody(why));
            }
            Ok(Err(e)) => {
                let connect = e.is_connect();
                if connect {
                    shared.count_connect_error(Routed::of(service));
                }
                if connect
                    && state
                        .record_connect_failure(service.options.health_check.unhealthy_threshold)
                {
                    tracing::warn!(backend = %state.label, "backend ejected after repeated connect failures");
                }
                if connect && may_retry {
                    tracing::warn!(
                        backend = %state.label,
                        error = portcullis_config::error::chain(&e),
                        "cannot connect to backend; trying another"
                    );
                    continue;
                }
                return Err(if connect {
                    Failure::Connect {
                        backend: backend_text(),
                        source: e,
                    }
                } else {
                    Failure::Upstream {
                        backend: backend_text(),
                        source: e,
                    }
                });
            }
            Err(_) => {
                return Err(Failure::Timeout {
                    backend: backend_text(),
                    after: timeout,
                });
            }
        }
    }
    // Every candidate was tried (the loop returns on all other paths), or none was left.
    Err(Failure::NoneAvailable)
}

/// Phase 4: the backend's response as the client gets it: hop-by-hop fields dropped, `Via`
/// added, the body counted in flight until it ends; a switch of protocols tunnels both
/// connections.
fn response_filter(
    response: Response<Incoming>,
    inflight: Inflight,
    client_upgrade: Option<ClientUpgrade>,
    h2_websocket: bool,
) -> Response<ProxyBody> {
    let mut response = response;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let backend_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(tunnel(client_upgrade, backend_upgrade));
        let (mut parts, _) = response.into_parts();
        if h2_websocket {
            // RFC 8441 §5: success is a 2xx, without the RFC 6455 handshake fields.
            parts.status = StatusCode::OK;
            strip_hop_by_hop(&mut parts.headers, false);
            parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
        }
        parts
            .headers
            .insert(VIA, HeaderValue::from_static("1.1 portcullis"));
        return Response::from_parts(parts, Empty::new().map_err(|n| match n {}).boxed());
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    append(
        &mut parts.headers,
        VIA,
        HeaderValue::from_static("1.1 portcullis"),
    );
    Response::from_parts(parts, Watched::new(body, inflight).boxed())
}

/// The client's side of an upgrade: its HTTP/1.1 connection after the `101`, or an HTTP/2
/// stream (WebSocket over extended CONNECT).
enum ClientUpgrade {
    H1(crate::h1::OnUpgrade),
    Hyper(hyper::upgrade::OnUpgrade),
}

impl ClientUpgrade {
    fn of(req: &mut Request<RequestBody>) -> Self {
        match req.extensions_mut().remove::<crate::h1::OnUpgrade>() {
            Some(on) => ClientUpgrade::H1(on),
            None => ClientUpgrade::Hyper(hyper::upgrade::on(req)),
        }
    }
}

async fn tunnel(client: ClientUpgrade, backend: hyper::upgrade::OnUpgrade) {
    let outcome = match client {
        ClientUpgrade::H1(client) => match tokio::try_join!(client.upgraded(), async {
            backend.await.map_err(BodyError::from)
        }) {
            Ok((mut client, backend)) => {
                tokio::io::copy_bidirectional(&mut client, &mut TokioIo::new(backend)).await
            }
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        },
        ClientUpgrade::Hyper(client) => match tokio::try_join!(client, backend) {
            Ok((client, backend)) => {
                tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(backend))
                    .await
            }
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        },
    };
    if let Err(e) = outcome {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
}

/// Up to two backends to try, in order: by round robin from `start`, or the fewest requests in
/// flight (ties broken by the round-robin order). Only available backends are picked.
fn pick(policy: LoadBalancing, states: &[Arc<BackendState>], start: usize) -> [Option<usize>; 2] {
    let n = states.len();
    let order = (0..n)
        .map(|i| (start + i) % n)
        .filter(|&i| states[i].available());
    match policy {
        LoadBalancing::RoundRobin => {
            let mut it = order;
            [it.next(), it.next()]
        }
        LoadBalancing::LeastRequests => {
            let mut best: Option<(usize, usize)> = None;
            let mut second: Option<(usize, usize)> = None;
            for i in order {
                let load = states[i].inflight.load(Ordering::Relaxed);
                if best.is_none_or(|(b, _)| load < b) {
                    second = best;
                    best = Some((load, i));
                } else if second.is_none_or(|(b, _)| load < b) {
                    second = Some((load, i));
                }
            }
            [best.map(|(_, i)| i), second.map(|(_, i)| i)]
        }
    }
}

/// Counts a request as in flight to its backend until its response body ends or is dropped.
/// And holds the pooled connection the response came on, which goes back to the pool when the
/// body ended whole (one cut short leaves the connection unusable: it is closed).
struct Inflight {
    state: Arc<BackendState>,
    lease: Option<crate::upstream::Lease>,
}

impl Inflight {
    fn start(state: Arc<BackendState>) -> Self {
        state.inflight.fetch_add(1, Ordering::Relaxed);
        Inflight { state, lease: None }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.state.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl BodyEnd for Inflight {
    fn finished(&mut self, _bytes: u64, complete: bool) {
        if let Some(lease) = self.lease.take()
            && complete
        {
            lease.give_back();
        }
    }
}

/// A response on its way from a backend, with the pooled connection it came on (if any).
type LeasedFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    (Response<Incoming>, Option<crate::upstream::Lease>),
                    crate::proxy_protocol::UpstreamError,
                >,
            > + Send,
    >,
>;

/// The client's request body on its way to the backend, noting why it failed if it does.
struct ClientBody {
    inner: RequestBody,
    failed: Arc<OnceLock<String>>,
}

impl ClientBody {
    fn new(inner: RequestBody) -> Self {
        ClientBody {
            inner,
            failed: Arc::default(),
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BodyError>>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(e))) = &poll {
            let _ = self.failed.set(portcullis_config::error::chain(&**e));
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Something to do once a response body has ended, or was dropped unfinished.
trait BodyEnd: Send + 'static {
    /// `complete`: the body reached its end (rather than being dropped part way).
    fn finished(&mut self, bytes: u64, complete: bool);
}

/// A response body that counts the bytes it passes on and tells `end` when it is done.
/// When a request body last moved toward the backend.
struct Progress {
    started: tokio::time::Instant,
    /// Nanoseconds after `started` of the last frame sent.
    last_ns: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Progress {
            started: tokio::time::Instant::now(),
            last_ns: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ns = self.started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.last_ns.fetch_max(ns, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.started + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed))
    }

    /// `future`'s outcome, or `Err` once `timeout` passed with no request body sent: the
    /// deadline moves with each frame, so only silence counts.
    async fn within<F: std::future::Future>(
        &self,
        timeout: Duration,
        future: F,
    ) -> Result<F::Output, tokio::time::error::Elapsed> {
        tokio::pin!(future);
        loop {
            match tokio::time::timeout_at(self.last() + timeout, &mut future).await {
                Ok(output) => return Ok(output),
                Err(elapsed) if self.last() + timeout <= tokio::time::Instant::now() => {
                    return Err(elapsed);
                }
                Err(_) => {}
            }
        }
    }
}

/// A request body on its way to the backend, noting each frame in its [`Progress`].
struct Sending {
    inner: ProxyBody,
    progress: Arc<Progress>,
}

impl Body for Sending {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BodyError>>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(_))) = &poll {
            self.progress.touch();
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

struct Watched<B: Body, E: BodyEnd> {
    inner: B,
    bytes: u64,
    /// The body said it had no more.
    ended: bool,
    end: E,
}

impl<B: Body, E: BodyEnd> Watched<B, E> {
    fn new(inner: B, end: E) -> Self {
        Watched {
            inner,
            bytes: 0,
            ended: false,
            end,
        }
    }
}

impl<B, E> Body for Watched<B, E>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
    E: BodyEnd + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BodyError>>> {
        let poll = std::pin::Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(Into::into);
        match &poll {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            std::task::Poll::Ready(None) => self.ended = true,
            _ => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body, E: BodyEnd> Drop for Watched<B, E> {
    fn drop(&mut self) {
        let complete = self.ended || self.inner.is_end_stream();
        self.end.finished(self.bytes, complete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_site_ignores_case_trailing_dot_and_default_port() {
        let authority: hyper::http::uri::Authority = "a.example".parse().unwrap();
        assert!(same_site(&authority, "A.Example.:443", Some("https")));
        assert!(!same_site(&authority, "a.example:8443", Some("https")));
        assert!(!same_site(&authority, "b.example", Some("https")));
        assert!(!same_site(&authority, "a.example/x", Some("https")));
        assert!(same_site(&authority, "a.example:80", Some("http")));
    }

    #[test]
    fn ip_literals_are_told_apart_from_bad_names() {
        assert!(is_ip_literal("192.0.2.1"));
        assert!(is_ip_literal("[2001:db8::1]:80"));
        assert!(!is_ip_literal("a@192.0.2.1"));
        assert!(!is_ip_literal("evil.example"));
    }

    #[test]
    fn picks_only_available_backends_in_order() {
        let states: Vec<Arc<BackendState>> = (0..3).map(|_| Arc::default()).collect();
        assert_eq!(
            pick(LoadBalancing::RoundRobin, &states, 1),
            [Some(1), Some(2)]
        );
        assert!(states[2].record_connect_failure(1));
        assert_eq!(
            pick(LoadBalancing::RoundRobin, &states, 1),
            [Some(1), Some(0)]
        );
        states[0].inflight.store(5, Ordering::Relaxed);
        assert_eq!(
            pick(LoadBalancing::LeastRequests, &states, 0),
            [Some(1), Some(0)]
        );
        assert!(states[1].record_connect_failure(1));
        assert!(states[0].record_connect_failure(1));
        assert_eq!(pick(LoadBalancing::RoundRobin, &states, 0), [None, None]);
    }
}
