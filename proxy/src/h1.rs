//! The HTTP/1.1 server side of client connections: heads parsed with `httparse`, bodies framed
//! here, requests answered by the router.
//!
//! Why not hyper's HTTP/1 server: it gives every connection a read buffer (grown to 16 KiB by
//! the first request) and an 8 KiB write buffer, and keeps both for as long as the connection
//! lives. 10,000 idle keep-alive visitors then cost 300 MB more than nginx's. Here a connection
//! that waits between requests holds no buffer at all: it waits for its socket to become
//! readable, and only then takes one (nginx frees its buffers on idle keep-alive the same way).
//!
//! What hyper did and this keeps: 400 for a malformed head, 431 for one too large or with too
//! many fields, request smuggling refused (Transfer-Encoding with Content-Length, or in
//! HTTP/1.0, conflicting lengths), `Expect: 100-continue` answered when the body is first
//! read, chunked bodies with trailers both ways, a `Date` on every answer, keep-alive by
//! version and `Connection`, upgrades (101) handing the connection to the router's tunnel,
//! pipelined requests answered in order, and a graceful close between requests.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::router::{BodyError, ProxyBody};

/// Bytes read at a time: a TLS record's worth.
const READ_SIZE: usize = 16 * 1024;
/// Request body data passed on in frames of up to this much, when it has arrived.
const FRAME_TARGET: usize = 64 * 1024;
/// Body data at most this long is copied next to its framing, to go out in one write.
const COPY_BELOW: usize = 8 * 1024;
/// A chunk-size line (with extensions) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection's transport: TCP, or TLS over it.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ready once a read would not wait (bytes or the end have arrived), so a connection can
    /// wait between requests without a buffer to read into.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// What the connection's limits are.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
}

/// How one connection ended.
pub(crate) enum Ended {
    /// Closed, by either side.
    Closed,
    /// The client opened with HTTP/2's preface (prior knowledge): the connection, with the
    /// bytes already read, goes to the HTTP/2 server.
    Http2(Upgraded),
}

/// Tells a connection to finish: at once if it waits between requests, after the answer in
/// progress (which then says `Connection: close`) otherwise. The connection checks it each time
/// it is polled, so whoever sets it polls the connection again.
#[derive(Clone, Default)]
pub(crate) struct Closing(Arc<AtomicBool>);

impl Closing {
    pub(crate) fn close(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A connection after a `101 Switching Protocols`, or a connection handed to HTTP/2: the bytes
/// already read from it come first.
pub struct Upgraded {
    io: Box<dyn Transport>,
    read: Bytes,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A request's claim on its connection once the answer is `101`: a request extension, taken
/// by the router's tunnel.
#[derive(Clone)]
pub struct OnUpgrade(Arc<Mutex<Option<tokio::sync::oneshot::Receiver<Upgraded>>>>);

impl OnUpgrade {
    /// The connection, once the `101` has been written to it.
    pub async fn upgraded(self) -> Result<Upgraded, BodyError> {
        let rx = self.0.lock().ok().and_then(|mut rx| rx.take());
        match rx {
            Some(rx) => rx
                .await
                .map_err(|_| "the connection closed before the upgrade".into()),
            None => Err("the upgrade was already taken".into()),
        }
    }
}

/// Serves HTTP/1.x requests on `io` until either side closes, answering each with `service`.
pub(crate) async fn serve<T, S, F>(
    mut io: T,
    mut service: S,
    options: Options,
    closing: Closing,
) -> Result<Ended, io::Error>
where
    T: Transport,
    S: FnMut(Request<RequestBody>) -> F,
    F: Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>>,
{
    let mut buf = BytesMut::new();
    let mut first = true;
    loop {
        if buf.is_empty() {
            // Between requests no buffer is held: one is taken once the socket is readable,
            // and given back if the read finds no request bytes (a TLS record of its own).
            loop {
                buf = BytesMut::new();
                let ready = poll_fn(|cx| {
                    if closing.is_set() {
                        return Poll::Ready(Ok(false));
                    }
                    io.poll_read_ready(cx).map_ok(|()| true)
                })
                .await?;
                if !ready {
                    let _ = io.shutdown().await;
                    return Ok(Ended::Closed);
                }
                let read = poll_fn(|cx| Poll::Ready(poll_read_into(&mut io, cx, &mut buf))).await;
                match read {
                    Poll::Ready(Ok(0)) => return Ok(Ended::Closed),
                    Poll::Ready(Ok(_)) => break,
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => {}
                }
            }
        }
        let head = tokio::time::timeout(
            options.header_read_timeout,
            read_head(&mut io, &mut buf, &options, first),
        )
        .await;
        let parsed = match head {
            Ok(Ok(Some(parsed))) => parsed,
            Ok(Ok(None)) => return Ok(Ended::Closed),
            Ok(Err(HeadError::Io(e))) => return Err(e),
            Ok(Err(HeadError::Http2)) => {
                return Ok(Ended::Http2(Upgraded {
                    io: Box::new(io),
                    read: buf.freeze(),
                }));
            }
            Ok(Err(HeadError::Refused(status, text))) => {
                refuse(&mut io, status, text).await;
                return Ok(Ended::Closed);
            }
            Err(_) => {
                let text = "The request's headers did not arrive in time; send them at once.\n";
                refuse(&mut io, StatusCode::REQUEST_TIMEOUT, text).await;
                return Ok(Ended::Closed);
            }
        };
        first = false;
        let Parsed {
            mut request,
            framing,
            expects_continue,
            mut keep_alive,
            upgrade,
        } = parsed;
        let is_head = request.method() == Method::HEAD;
        let version = request.version();
        let mut feeder = match framing {
            BodyFraming::None => None,
            framing => {
                let channel = Arc::new(Channel::default());
                let hint = match framing {
                    BodyFraming::Length(n) => SizeHint::with_exact(n),
                    _ => SizeHint::default(),
                };
                *request.body_mut() = RequestBody::H1(RecvBody {
                    channel: channel.clone(),
                    hint,
                    ended: false,
                });
                Some(Feeder {
                    channel,
                    decoder: Decoder::new(framing, options.max_head_bytes),
                    continue_line: if expects_continue {
                        &b"HTTP/1.1 100 Continue\r\n\r\n"[..]
                    } else {
                        &[]
                    },
                    state: FeedState::Running,
                })
            }
        };
        let upgrade_tx = upgrade.then(|| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            request
                .extensions_mut()
                .insert(OnUpgrade(Arc::new(Mutex::new(Some(rx)))));
            tx
        });

        // On the heap for the request's life only: a connection waiting between requests
        // should not carry the router's largest state with it.
        let mut answer = Box::pin(service(request));
        let response = poll_fn(|cx| {
            if let Some(feeder) = feeder.as_mut() {
                feeder.poll_feed(cx, &mut io, &mut buf)?;
            }
            answer
                .as_mut()
                .poll(cx)
                .map(|answered| Ok::<_, io::Error>(answered.unwrap_or_else(|never| match never {})))
        })
        .await?;

        let (parts, body) = response.into_parts();
        if parts.status == StatusCode::SWITCHING_PROTOCOLS
            && let Some(tx) = upgrade_tx
        {
            let mut head = Vec::with_capacity(256);
            encode_head(
                &mut head,
                &parts.status,
                &parts.headers,
                Framing::None,
                None,
            );
            io.write_all(&head).await?;
            io.flush().await?;
            let _ = tx.send(Upgraded {
                io: Box::new(io),
                read: buf.freeze(),
            });
            return Ok(Ended::Closed);
        }

        let status = parts.status;
        let no_body = is_head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let framing = if status.is_informational() || status == StatusCode::NO_CONTENT {
            Framing::None
        } else if let Some(n) = declared {
            Framing::Declared(n)
        } else if no_body {
            Framing::None
        } else if let Some(n) = body.size_hint().exact() {
            Framing::Length(n)
        } else if version == Version::HTTP_11 {
            Framing::Chunked
        } else {
            keep_alive = false;
            Framing::Close
        };
        if lists_token(&parts.headers, header::CONNECTION, "close") || closing.is_set() {
            keep_alive = false;
        }
        let connection = if !keep_alive {
            Some("close")
        } else if version == Version::HTTP_10 {
            Some("keep-alive")
        } else {
            None
        };
        let mut out = Vec::with_capacity(512);
        encode_head(&mut out, &status, &parts.headers, framing, connection);
        let mut writer = BodyWriter::new(out, framing, no_body);
        let mut body = body;
        poll_fn(|cx| {
            if let Some(feeder) = feeder.as_mut() {
                feeder.poll_feed(cx, &mut io, &mut buf)?;
            }
            writer.poll_write(cx, &mut io, &mut body)
        })
        .await?;
        drop(body);
        // A request body the router did not read to its end (a backend that answered without
        // reading it) is read past here when that is quick; otherwise the connection's framing
        // is lost and it ends with this answer.
        if let Some(mut feeder) = feeder
            && feeder.state != FeedState::Complete
            && !(keep_alive
                && matches!(feeder.state, FeedState::Running | FeedState::Abandoned)
                && feeder.drain(&mut io, &mut buf).await)
        {
            keep_alive = false;
        }
        if !keep_alive {
            let _ = io.shutdown().await;
            return Ok(Ended::Closed);
        }
    }
}

/// Writes a page for a request that is not answered, then closes.
async fn refuse<T: Transport>(io: &mut T, status: StatusCode, text: &str) {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let mut out = Vec::with_capacity(256 + text.len());
    encode_head(
        &mut out,
        &status,
        &headers,
        Framing::Length(text.len() as u64),
        Some("close"),
    );
    out.extend_from_slice(text.as_bytes());
    if io.write_all(&out).await.is_ok() {
        let _ = io.flush().await;
    }
    let _ = io.shutdown().await;
}

thread_local! {
    /// Where each read lands first: initialized once, so a read costs no zeroing (tokio-rustls
    /// zeroes any uninitialized space it is given, every time), and only the bytes read are
    /// copied to the connection's buffer, which is sized to them.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ_SIZE].into_boxed_slice());
}

/// Reads what is there (up to [`READ_SIZE`]) onto the end of `buf`.
fn poll_read_into<T: AsyncRead + Unpin>(
    io: &mut T,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    SCRATCH.with(|scratch| {
        // A read does not read again, so the scratch buffer is free; were it not, a buffer of
        // its own rather than a panic.
        let mut own;
        let mut borrowed = scratch.try_borrow_mut();
        let space: &mut [u8] = match borrowed.as_mut() {
            Ok(scratch) => &mut scratch[..],
            Err(_) => {
                own = vec![0; READ_SIZE];
                &mut own
            }
        };
        let mut read = ReadBuf::new(space);
        std::task::ready!(Pin::new(&mut *io).poll_read(cx, &mut read))?;
        buf.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    })
}

enum HeadError {
    Io(io::Error),
    Http2,
    Refused(StatusCode, &'static str),
}

impl From<io::Error> for HeadError {
    fn from(e: io::Error) -> Self {
        HeadError::Io(e)
    }
}

/// How a request's body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq)]
enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

struct Parsed {
    request: Request<RequestBody>,
    framing: BodyFraming,
    expects_continue: bool,
    keep_alive: bool,
    upgrade: bool,
}

/// Reads until a whole head is in `buf` and parses it. `Ok(None)`: the client closed between
/// requests.
async fn read_head<T: Transport>(
    io: &mut T,
    buf: &mut BytesMut,
    options: &Options,
    first: bool,
) -> Result<Option<Parsed>, HeadError> {
    loop {
        if !buf.is_empty() {
            if first && buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
                // Maybe HTTP/2's preface: wait for the rest.
            } else if first && buf.starts_with(H2_PREFACE) {
                return Err(HeadError::Http2);
            } else if let Some(parsed) = parse(buf, options)? {
                return Ok(Some(parsed));
            }
            if buf.len() >= options.max_head_bytes {
                return Err(HeadError::Refused(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "The request's head is too large; send smaller headers.\n",
                ));
            }
        }
        let n = poll_fn(|cx| poll_read_into(&mut *io, cx, buf)).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(HeadError::Refused(
                    StatusCode::BAD_REQUEST,
                    "The request's head ended early.\n",
                ))
            };
        }
    }
}

/// Where a parsed name or value lies in the head.
#[derive(Clone, Copy, Default)]
struct Span {
    name: (usize, usize),
    value: (usize, usize),
}

/// The fields parsed on the stack, up to this many; more take a vector.
const STACK_HEADERS: usize = 128;

fn parse(buf: &mut BytesMut, options: &Options) -> Result<Option<Parsed>, HeadError> {
    // One more than allowed, so one too many is told apart (the router's page says how many)
    // from far too many (refused here).
    let slots = options.max_headers + 1;
    let mut stack_headers = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut heap_headers;
    let headers: &mut [httparse::Header<'_>] = if slots <= STACK_HEADERS {
        &mut stack_headers[..slots]
    } else {
        heap_headers = vec![httparse::EMPTY_HEADER; slots];
        &mut heap_headers
    };
    let mut stack_spans = [Span::default(); STACK_HEADERS];
    let mut heap_spans;
    let spans: &mut [Span] = if slots <= STACK_HEADERS {
        &mut stack_spans[..slots]
    } else {
        heap_spans = vec![Span::default(); slots];
        &mut heap_spans
    };
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start, start + s.len())
    };
    let mut req = httparse::Request::new(headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::Refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "The request has too many header fields; send fewer.\n",
            ));
        }
        Err(httparse::Error::Version) => {
            return Err(HeadError::Refused(
                StatusCode::BAD_REQUEST,
                "This listener speaks HTTP/1.0, HTTP/1.1 and HTTP/2.\n",
            ));
        }
        Err(_) => {
            return Err(HeadError::Refused(
                StatusCode::BAD_REQUEST,
                "The request is not well-formed HTTP/1.1.\n",
            ));
        }
    };
    let bad = |text| Err(HeadError::Refused(StatusCode::BAD_REQUEST, text));
    let Ok(method) = Method::from_bytes(req.method.unwrap_or("").as_bytes()) else {
        return bad("The request's method is not well-formed.\n");
    };
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let path = span(req.path.unwrap_or("").as_bytes());
    let count = req.headers.len();
    for (header, slot) in req.headers.iter().zip(spans.iter_mut()) {
        slot.name = span(header.name.as_bytes());
        slot.value = span(header.value);
    }
    let head = buf.split_to(len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path.0..path.1)) else {
        return bad("The request's target is not a well-formed URI.\n");
    };
    let mut headers = HeaderMap::with_capacity(count);
    let mut framing = BodyFraming::None;
    let mut chunked = false;
    let mut length: Option<u64> = None;
    let mut expects_continue = false;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut connection_upgrade = false;
    for slot in &spans[..count] {
        let Ok(name) = HeaderName::from_bytes(&head[slot.name.0..slot.name.1]) else {
            return bad("A header field's name is not well-formed.\n");
        };
        let Ok(value) = HeaderValue::from_maybe_shared(head.slice(slot.value.0..slot.value.1))
        else {
            return bad("A header field's value is not well-formed.\n");
        };
        if name == header::TRANSFER_ENCODING {
            if version == Version::HTTP_10 {
                return bad("Transfer-Encoding is not allowed in HTTP/1.0.\n");
            }
            // Only chunked is understood, and it must come last (RFC 9112 §6.1).
            let last = value.to_str().ok().and_then(|v| v.rsplit(',').next());
            chunked = last.is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"));
            if !chunked {
                return bad("The request's Transfer-Encoding does not end with chunked.\n");
            }
            framing = BodyFraming::Chunked;
        } else if name == header::CONTENT_LENGTH {
            // Repeated or listed lengths must agree (RFC 9110 §8.6).
            let Some(text) = value.to_str().ok() else {
                return bad("The request's Content-Length is not a number.\n");
            };
            for part in text.split(',') {
                let part = part.trim();
                let Some(n) = (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| part.parse::<u64>().ok())
                    .flatten()
                else {
                    return bad("The request's Content-Length is not a number.\n");
                };
                if length.is_some_and(|l| l != n) {
                    return bad("The request has Content-Length values that disagree.\n");
                }
                length = Some(n);
            }
        } else if name == header::CONNECTION {
            for token in value.to_str().unwrap_or("").split(',') {
                let token = token.trim();
                connection_close |= token.eq_ignore_ascii_case("close");
                connection_keep_alive |= token.eq_ignore_ascii_case("keep-alive");
                connection_upgrade |= token.eq_ignore_ascii_case("upgrade");
            }
        } else if name == header::EXPECT {
            expects_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        }
        headers.append(name, value);
    }
    if chunked && length.is_some() {
        // Both: a smuggling attempt, or a broken client; either way not passed on.
        return bad("The request has both Transfer-Encoding and Content-Length; send one.\n");
    }
    if let Some(n) = length {
        framing = if n == 0 {
            BodyFraming::None
        } else {
            BodyFraming::Length(n)
        };
    }
    let keep_alive = match version {
        Version::HTTP_10 => connection_keep_alive && !connection_close,
        _ => !connection_close,
    };
    let upgrade =
        version == Version::HTTP_11 && connection_upgrade && headers.contains_key(header::UPGRADE);
    let mut request = Request::new(RequestBody::Empty);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Parsed {
        request,
        framing,
        expects_continue: expects_continue && version == Version::HTTP_11,
        keep_alive,
        upgrade,
    }))
}

/// True when the comma-separated header `name` lists `token` (case-insensitively).
pub(crate) fn lists_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// How an answer's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    None,
    /// The answer's own Content-Length.
    Declared(u64),
    /// A length known from the body, written as Content-Length.
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, a length unknown).
    Close,
}

fn encode_head(
    out: &mut Vec<u8>,
    status: &StatusCode,
    headers: &HeaderMap,
    framing: Framing,
    connection: Option<&str>,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    for (name, value) in headers {
        if name == header::TRANSFER_ENCODING
            || (name == header::CONNECTION && connection.is_some())
            || (name == header::CONTENT_LENGTH && framing == Framing::Chunked)
        {
            continue;
        }
        has_date |= name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        date::write(out);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None | Framing::Declared(_) | Framing::Close => {}
    }
    if let Some(connection) = connection {
        out.extend_from_slice(b"connection: ");
        out.extend_from_slice(connection.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// An answer's body on its way out: framing and small data gathered in `out`, large data
/// written from where it lies, then `tail` (the end of a chunk).
struct BodyWriter {
    out: Vec<u8>,
    /// Bytes of `out` already written.
    sent: usize,
    /// Data written after `out`.
    data: Bytes,
    /// Written after `data`.
    tail: &'static [u8],
    framing: Framing,
    /// HEAD, 204, 304: the body is read to its end but not sent.
    discard: bool,
    /// Body bytes passed on, checked against a declared length.
    written: u64,
    done: bool,
}

impl BodyWriter {
    fn new(out: Vec<u8>, framing: Framing, discard: bool) -> Self {
        BodyWriter {
            out,
            sent: 0,
            data: Bytes::new(),
            tail: &[],
            framing: if discard { Framing::None } else { framing },
            discard,
            written: 0,
            done: false,
        }
    }

    /// Writes `out`, `data` and `tail`, in that order, until all are written.
    fn poll_drain<T: Transport>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut T,
    ) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() || !self.data.is_empty() || !self.tail.is_empty() {
            let slices = [
                io::IoSlice::new(&self.out[self.sent..]),
                io::IoSlice::new(&self.data),
                io::IoSlice::new(self.tail),
            ];
            let first = slices.iter().position(|s| !s.is_empty()).unwrap_or(0);
            let n = if slices[first + 1..].iter().all(|s| s.is_empty()) {
                std::task::ready!(Pin::new(&mut *io).poll_write(cx, &slices[first]))?
            } else {
                std::task::ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[first..]))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let mut n = n;
            let from_out = n.min(self.out.len() - self.sent);
            self.sent += from_out;
            n -= from_out;
            let from_data = n.min(self.data.len());
            self.data.advance(from_data);
            n -= from_data;
            self.tail = &self.tail[n.min(self.tail.len())..];
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_write<T: Transport>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut T,
        body: &mut ProxyBody,
    ) -> Poll<io::Result<()>> {
        loop {
            // The head and a small body go out in one write (one TLS record, one syscall):
            // written only once the body ends, waits, or holds large data.
            if self.done || !self.data.is_empty() || self.out.len() - self.sent >= COPY_BELOW {
                std::task::ready!(self.poll_drain(cx, io))?;
            }
            if self.done {
                return Pin::new(&mut *io).poll_flush(cx);
            }
            let frame = match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending => {
                    // Nothing more yet: what there is goes out now.
                    std::task::ready!(self.poll_drain(cx, io))?;
                    std::task::ready!(Pin::new(&mut *io).poll_flush(cx))?;
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    self.done = true;
                    match self.framing {
                        Framing::Chunked => self.out.extend_from_slice(b"0\r\n\r\n"),
                        Framing::Declared(n) | Framing::Length(n) if n != self.written => {
                            // The client would wait for bytes that never come.
                            return Poll::Ready(Err(io::Error::other(
                                "the answer's body ended before its length",
                            )));
                        }
                        _ => {}
                    }
                    continue;
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(io::Error::other(e)));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let frame = match frame.into_data() {
                Ok(data) => {
                    if self.discard || data.is_empty() {
                        continue;
                    }
                    self.written += data.len() as u64;
                    match self.framing {
                        Framing::Declared(n) | Framing::Length(n) if self.written > n => {
                            return Poll::Ready(Err(io::Error::other(
                                "the answer's body is longer than its length",
                            )));
                        }
                        Framing::Chunked => {
                            push_hex(&mut self.out, data.len() as u64);
                            self.out.extend_from_slice(b"\r\n");
                            self.push_data(data, b"\r\n");
                        }
                        Framing::None => {}
                        _ => self.push_data(data, b""),
                    }
                    continue;
                }
                Err(frame) => frame,
            };
            if let Ok(trailers) = frame.into_trailers()
                && self.framing == Framing::Chunked
            {
                self.out.extend_from_slice(b"0\r\n");
                for (name, value) in &trailers {
                    self.out.extend_from_slice(name.as_str().as_bytes());
                    self.out.extend_from_slice(b": ");
                    self.out.extend_from_slice(value.as_bytes());
                    self.out.extend_from_slice(b"\r\n");
                }
                self.out.extend_from_slice(b"\r\n");
                // Trailers end a chunked body: nothing after them is sent.
                self.done = true;
                self.framing = Framing::None;
            }
        }
    }

    /// Called with no large data waiting: small data is copied behind the framing, to go out
    /// in one write; large data is written from where it lies, after what is gathered.
    fn push_data(&mut self, data: Bytes, tail: &'static [u8]) {
        if data.len() < COPY_BELOW {
            self.out.extend_from_slice(&data);
            self.out.extend_from_slice(tail);
        } else {
            self.data = data;
            self.tail = tail;
        }
    }
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

fn push_hex(out: &mut Vec<u8>, mut n: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = DIGITS[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// A request body read from an HTTP/1 connection: the connection reads it, a frame at a time,
/// as the body is polled (the backend's connection task polls it).
pub struct RecvBody {
    channel: Arc<Channel>,
    hint: SizeHint,
    ended: bool,
}

#[derive(Default)]
struct Channel {
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    frame: Option<Result<Frame<Bytes>, BodyError>>,
    finished: bool,
    /// The body has been polled at least once (time for `100 Continue`).
    wanted: bool,
    receiver_gone: bool,
    receiver: Option<Waker>,
    sender: Option<Waker>,
}

fn wake(waker: &mut Option<Waker>) {
    if let Some(w) = waker.take() {
        w.wake();
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let Ok(mut slot) = self.channel.slot.lock() else {
            return Poll::Ready(Some(Err("the request body's connection failed".into())));
        };
        if let Some(frame) = slot.frame.take() {
            wake(&mut slot.sender);
            drop(slot);
            if let Ok(frame) = &frame
                && let Some(data) = frame.data_ref()
            {
                let left = self
                    .hint
                    .upper()
                    .map(|u| u.saturating_sub(data.len() as u64));
                if let Some(left) = left {
                    self.hint = SizeHint::with_exact(left);
                }
            }
            return Poll::Ready(Some(frame));
        }
        if slot.finished {
            drop(slot);
            self.ended = true;
            return Poll::Ready(None);
        }
        slot.wanted = true;
        slot.receiver = Some(cx.waker().clone());
        wake(&mut slot.sender);
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.channel.slot.lock() {
            slot.receiver_gone = true;
            wake(&mut slot.sender);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum FeedState {
    Running,
    Complete,
    /// Dropped by the router before its end: what is left may be read past.
    Abandoned,
    /// Malformed or cut short: the connection cannot carry another request.
    Stopped,
}

/// The connection's side of a request body: reads and decodes it as the body is polled.
struct Feeder {
    channel: Arc<Channel>,
    decoder: Decoder,
    /// What is left to write of `100 Continue`.
    continue_line: &'static [u8],
    state: FeedState,
}

impl Feeder {
    /// Moves the body on as far as it can without waiting. An I/O error writing `100
    /// Continue` is the connection's; every other failure is the body's.
    fn poll_feed<T: Transport>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut T,
        buf: &mut BytesMut,
    ) -> io::Result<()> {
        while self.state == FeedState::Running {
            {
                let Ok(mut slot) = self.channel.slot.lock() else {
                    self.state = FeedState::Stopped;
                    return Ok(());
                };
                if slot.receiver_gone {
                    self.state = FeedState::Abandoned;
                    return Ok(());
                }
                if slot.frame.is_some() || (!slot.wanted && !self.continue_line.is_empty()) {
                    slot.sender = Some(cx.waker().clone());
                    return Ok(());
                }
            }
            if !self.continue_line.is_empty() {
                match Pin::new(&mut *io).poll_write(cx, self.continue_line) {
                    Poll::Ready(Ok(n)) => {
                        self.continue_line = &self.continue_line[n..];
                        if self.continue_line.is_empty() {
                            let _ = Pin::new(&mut *io).poll_flush(cx)?;
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => return Ok(()),
                }
            }
            // What has already arrived is gathered into one frame of up to FRAME_TARGET bytes:
            // fewer, larger frames mean fewer wakeups and writes toward the backend.
            while buf.len() < FRAME_TARGET && (buf.len() as u64) < self.decoder.body_left() {
                match poll_read_into(&mut *io, cx, buf) {
                    Poll::Ready(Ok(n)) if n > 0 => {}
                    // The end, an error or nothing yet: the decoder below says what it means.
                    _ => break,
                }
            }
            let decoded = match self.decoder.decode(buf) {
                Ok(decoded) => decoded,
                Err(why) => {
                    self.fail(why.into());
                    return Ok(());
                }
            };
            let frame = match decoded {
                Decoded::Data(data) => Frame::data(data),
                Decoded::Trailers(trailers) => Frame::trailers(trailers),
                Decoded::End => {
                    self.state = FeedState::Complete;
                    if let Ok(mut slot) = self.channel.slot.lock() {
                        slot.finished = true;
                        wake(&mut slot.receiver);
                    }
                    return Ok(());
                }
                Decoded::More => {
                    match poll_read_into(&mut *io, cx, buf) {
                        Poll::Ready(Ok(0)) => self
                            .fail("the client closed the connection before the body's end".into()),
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(e)) => self.fail(Box::new(e)),
                        Poll::Pending => return Ok(()),
                    }
                    continue;
                }
            };
            if let Ok(mut slot) = self.channel.slot.lock() {
                slot.frame = Some(Ok(frame));
                wake(&mut slot.receiver);
            }
        }
        Ok(())
    }

    /// Reads what is left of the body and drops it, if that takes no waiting and not more
    /// than 64 KiB. True when the body's end was reached.
    async fn drain<T: Transport>(&mut self, io: &mut T, buf: &mut BytesMut) -> bool {
        if let Ok(mut slot) = self.channel.slot.lock() {
            slot.frame = None;
            slot.finished = true;
            wake(&mut slot.receiver);
        }
        let mut budget = 64 * 1024;
        loop {
            match self.decoder.decode(buf) {
                Ok(Decoded::Data(data)) if data.len() <= budget => budget -= data.len(),
                Ok(Decoded::Trailers(_)) => {}
                Ok(Decoded::End) => {
                    self.state = FeedState::Complete;
                    return true;
                }
                Ok(Decoded::More) => {
                    let read = poll_fn(|cx| Poll::Ready(poll_read_into(&mut *io, cx, buf))).await;
                    if !matches!(read, Poll::Ready(Ok(n)) if n > 0) {
                        return false;
                    }
                }
                Ok(Decoded::Data(_)) | Err(_) => return false,
            }
        }
    }

    fn fail(&mut self, why: BodyError) {
        self.state = FeedState::Stopped;
        if let Ok(mut slot) = self.channel.slot.lock() {
            slot.frame = Some(Err(why));
            slot.finished = true;
            wake(&mut slot.receiver);
        }
    }
}

enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    /// More bytes are needed.
    More,
}

/// Takes a request body's framing off the bytes read: no I/O here.
struct Decoder {
    framing: BodyFraming,
    /// Bytes left: of the body (`Length`) or of the current chunk.
    left: u64,
    chunk: ChunkState,
    max_trailer_bytes: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum ChunkState {
    Size,
    Data,
    DataEnd,
    Trailers,
    Done,
}

impl Decoder {
    fn new(framing: BodyFraming, max_trailer_bytes: usize) -> Self {
        Decoder {
            framing,
            left: match framing {
                BodyFraming::Length(n) => n,
                _ => 0,
            },
            chunk: ChunkState::Size,
            max_trailer_bytes,
        }
    }

    /// Body bytes still to come, as far as the framing says (chunked: unknown).
    fn body_left(&self) -> u64 {
        match self.framing {
            BodyFraming::None => 0,
            BodyFraming::Length(_) => self.left,
            BodyFraming::Chunked => u64::MAX,
        }
    }

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, &'static str> {
        match self.framing {
            BodyFraming::None => Ok(Decoded::End),
            BodyFraming::Length(_) => {
                if self.left == 0 {
                    return Ok(Decoded::End);
                }
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = (buf.len() as u64).min(self.left) as usize;
                self.left -= n as u64;
                Ok(Decoded::Data(buf.split_to(n).freeze()))
            }
            BodyFraming::Chunked => self.decode_chunked(buf),
        }
    }

    fn decode_chunked(&mut self, buf: &mut BytesMut) -> Result<Decoded, &'static str> {
        loop {
            match self.chunk {
                ChunkState::Size => {
                    let Some(end) = find_crlf(buf) else {
                        return if buf.len() > MAX_CHUNK_LINE {
                            Err("a chunk-size line is too long")
                        } else {
                            Ok(Decoded::More)
                        };
                    };
                    let line = &buf[..end];
                    let digits = line
                        .iter()
                        .position(|&b| b == b';' || b == b' ' || b == b'\t')
                        .map_or(line, |i| &line[..i]);
                    if digits.is_empty() || digits.len() > 16 {
                        return Err("invalid chunk size line");
                    }
                    let mut size: u64 = 0;
                    for &b in digits {
                        let d = (b as char).to_digit(16).ok_or("invalid chunk size line")?;
                        size = size << 4 | u64::from(d);
                    }
                    buf.advance(end + 2);
                    self.left = size;
                    self.chunk = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data
                    };
                }
                ChunkState::Data => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = (buf.len() as u64).min(self.left) as usize;
                    self.left -= n as u64;
                    if self.left == 0 {
                        self.chunk = ChunkState::DataEnd;
                    }
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("a chunk is longer than its size");
                    }
                    buf.advance(2);
                    self.chunk = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.chunk = ChunkState::Done;
                        return Ok(Decoded::End);
                    }
                    let mut fields = [httparse::EMPTY_HEADER; 64];
                    match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for field in fields {
                                let (Ok(name), Ok(value)) = (
                                    HeaderName::from_bytes(field.name.as_bytes()),
                                    HeaderValue::from_bytes(field.value),
                                ) else {
                                    return Err("a trailer field is not well-formed");
                                };
                                trailers.append(name, value);
                            }
                            buf.advance(len);
                            self.chunk = ChunkState::Done;
                            return Ok(Decoded::Trailers(trailers));
                        }
                        Ok(httparse::Status::Partial) if buf.len() <= self.max_trailer_bytes => {
                            return Ok(Decoded::More);
                        }
                        Ok(httparse::Status::Partial) => return Err("the trailers are too large"),
                        Err(_) => return Err("the trailers are not well-formed"),
                    }
                }
                ChunkState::Done => return Ok(Decoded::End),
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// A request's body, from whichever server read the request.
pub enum RequestBody {
    Empty,
    /// HTTP/2, from hyper.
    Hyper(hyper::body::Incoming),
    H1(RecvBody),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            RequestBody::H1(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Hyper(body) => body.is_end_stream(),
            RequestBody::H1(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Hyper(body) => body.size_hint(),
            RequestBody::H1(body) => body.size_hint(),
        }
    }
}

/// For the fuzzer: `data`, arriving `step` bytes at a time, read as a connection reads it:
/// heads parsed, bodies decoded, pipelined requests one after another. Panics where something
/// that must hold does not: a body of declared length decodes to exactly that length, no
/// request has more fields than allowed, nothing decodes to more bytes than arrived.
#[doc(hidden)]
pub fn check_request_bytes(data: &[u8], step: usize) {
    let options = Options {
        max_head_bytes: 4096,
        max_headers: 16,
        header_read_timeout: Duration::from_secs(1),
    };
    let step = step.max(1);
    let mut input = data.chunks(step);
    let mut buf = BytesMut::new();
    let mut decoded_total = 0usize;
    loop {
        let parsed = loop {
            match parse(&mut buf, &options) {
                Ok(Some(parsed)) => break parsed,
                Ok(None) if buf.len() < options.max_head_bytes => match input.next() {
                    Some(more) => buf.extend_from_slice(more),
                    None => return,
                },
                Ok(None) | Err(_) => return,
            }
        };
        assert!(parsed.request.headers().len() <= options.max_headers + 1);
        let mut decoder = Decoder::new(parsed.framing, options.max_head_bytes);
        let mut body = 0u64;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(frame)) => {
                    assert!(!frame.is_empty(), "an empty data frame");
                    body += frame.len() as u64;
                    decoded_total += frame.len();
                }
                Ok(Decoded::Trailers(_)) => {}
                Ok(Decoded::End) => break,
                Ok(Decoded::More) => match input.next() {
                    Some(more) => buf.extend_from_slice(more),
                    None => return,
                },
                Err(_) => return,
            }
        }
        assert!(decoded_total <= data.len(), "more body than input");
        if let BodyFraming::Length(n) = parsed.framing {
            assert_eq!(body, n, "a body of declared length decoded to another");
        }
    }
}

/// The `Date` of answers, formatted once a second.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }

    pub(super) fn write(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != second {
                let text = httpdate::fmt_http_date(now);
                if text.len() == 29 {
                    cached.1.copy_from_slice(text.as_bytes());
                    cached.0 = second;
                } else {
                    out.extend_from_slice(text.as_bytes());
                    return;
                }
            }
            out.extend_from_slice(&cached.1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options {
            max_head_bytes: 8192,
            max_headers: 10,
            header_read_timeout: Duration::from_secs(5),
        }
    }

    fn parsed(text: &str) -> Result<Option<Parsed>, HeadError> {
        parse(&mut BytesMut::from(text), &options())
    }

    fn refused(text: &str) -> StatusCode {
        match parsed(text) {
            Err(HeadError::Refused(status, _)) => status,
            Ok(_) => panic!("accepted: {text:?}"),
            Err(_) => panic!("not refused: {text:?}"),
        }
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let both =
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(refused(both), StatusCode::BAD_REQUEST);
        let disagree =
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        assert_eq!(refused(disagree), StatusCode::BAD_REQUEST);
        let listed = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n";
        assert_eq!(refused(listed), StatusCode::BAD_REQUEST);
        let signed = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n";
        assert_eq!(refused(signed), StatusCode::BAD_REQUEST);
        let not_last = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n";
        assert_eq!(refused(not_last), StatusCode::BAD_REQUEST);
        let te_10 = "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(refused(te_10), StatusCode::BAD_REQUEST);
        let agree = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n";
        assert!(matches!(parsed(agree), Ok(Some(p)) if p.framing == BodyFraming::Length(5)));
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        let keep = |text: &str| match parsed(text) {
            Ok(Some(p)) => p.keep_alive,
            _ => panic!("{text:?}"),
        };
        assert!(keep("GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!keep(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        ));
        assert!(!keep("GET / HTTP/1.0\r\nHost: a\r\n\r\n"));
        assert!(keep("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    }

    #[test]
    fn too_many_fields_and_partial_heads() {
        let mut head = String::from("GET / HTTP/1.1\r\n");
        for i in 0..12 {
            head.push_str(&format!("x-{i}: v\r\n"));
        }
        head.push_str("\r\n");
        assert_eq!(refused(&head), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert!(matches!(parsed("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None)));
        assert_eq!(refused("GET / HTTP/3.0\r\n\r\n"), StatusCode::BAD_REQUEST);
    }

    fn decode_all(
        framing: BodyFraming,
        input: &[u8],
    ) -> Result<(Vec<u8>, Option<HeaderMap>), &'static str> {
        let mut decoder = Decoder::new(framing, 1024);
        let mut data = Vec::new();
        let mut trailers = None;
        // Byte by byte: every split point of the framing is crossed.
        let mut buf = BytesMut::new();
        let mut input = input.iter();
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(d) => data.extend_from_slice(&d),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::End => return Ok((data, trailers)),
                Decoded::More => match input.next() {
                    Some(b) => buf.extend_from_slice(&[*b]),
                    None => return Err("ended early"),
                },
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (data, trailers) = decode_all(
            BodyFraming::Chunked,
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\ngrpc-status: 0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(data, b"hello world");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
        let (data, trailers) =
            decode_all(BodyFraming::Chunked, b"A\r\n0123456789\r\n0\r\n\r\n").unwrap();
        assert_eq!(data, b"0123456789");
        assert!(trailers.is_none());
        assert!(decode_all(BodyFraming::Chunked, b"5\r\nhello\r\nzz\r\n").is_err());
        assert!(decode_all(BodyFraming::Chunked, b"5\r\nhelloXX0\r\n\r\n").is_err());
        assert!(decode_all(BodyFraming::Chunked, b"11111111111111111\r\n").is_err());
        assert!(decode_all(BodyFraming::Chunked, b"5\r\nhel").is_err());
        let (data, _) = decode_all(BodyFraming::Length(4), b"abcdEXTRA").unwrap();
        assert_eq!(data, b"abcd");
    }

    #[test]
    fn heads_are_written_with_date_and_framing() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let mut out = Vec::new();
        encode_head(
            &mut out,
            &StatusCode::OK,
            &headers,
            Framing::Length(12),
            Some("close"),
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ndate: "));
        assert!(
            text.ends_with(" GMT\r\ncontent-length: 12\r\nconnection: close\r\n\r\n"),
            "{text}"
        );
        assert_eq!(text.matches("connection").count(), 1);
    }
}
