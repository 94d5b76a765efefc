//! Driving one client connection: idle connections are closed after the idle timeout, and on
//! shutdown every connection is asked to finish gracefully (in-flight requests complete).
//! Public, so the binary's admin listener drives its connections the same way.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn elapsed_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// When a connection last moved a byte.
#[derive(Clone, Default)]
pub struct Activity(Arc<AtomicU64>);

impl Activity {
    fn touch(&self) {
        self.0.store(elapsed_ms(), Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        Duration::from_millis(elapsed_ms().saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}

/// Wraps a connection's I/O to record its activity.
pub struct ActivityIo<T> {
    inner: T,
    activity: Activity,
}

impl<T> ActivityIo<T> {
    pub fn new(inner: T, activity: Activity) -> Self {
        activity.touch();
        ActivityIo { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() != before {
            self.activity.touch();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Runs `conn` to its end; asks it to finish gracefully once it has been idle for `idle`, or
/// when `shutdown` fires. A request in flight is not idle time only while bytes move: a
/// response that stalls longer than `idle` is cut, as nginx's `keepalive_timeout` would not,
/// but `response_timeout` (shorter by default) ends such waits first.
///
/// `linger`: after `shutdown`, how long an HTTP/1 connection may wait idle before it is closed.
/// Closing an idle keep-alive connection races with the client's next request (it may be on
/// its way), which then fails; meanwhile every response says `Connection: close` (the router's
/// part), so a client that keeps asking moves on after its next answer. Zero closes at once,
/// right for HTTP/2, whose GOAWAY tells the client which requests were not taken.
pub async fn drive<C>(
    conn: C,
    activity: Activity,
    idle: Duration,
    linger: Duration,
    shutdown: CancellationToken,
) -> Result<(), C::Error>
where
    C: Graceful,
{
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    let mut draining = false;
    let mut limit = idle;
    loop {
        let wait = limit.saturating_sub(activity.idle_for());
        tokio::select! {
            result = conn.as_mut() => return result,
            () = shutdown.cancelled(), if !closing && !draining => {
                draining = true;
                limit = linger.min(idle);
                if limit.is_zero() {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            () = tokio::time::sleep(wait), if !closing => {
                if activity.idle_for() >= limit {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// A connection that can be asked to finish its in-flight requests and close.
pub trait Graceful: std::future::Future<Output = Result<(), Self::Error>> {
    type Error;
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<C: GracefulConnection> Graceful for C {
    type Error = C::Error;

    fn graceful_shutdown(self: Pin<&mut Self>) {
        GracefulConnection::graceful_shutdown(self)
    }
}

impl crate::h1::Transport for ActivityIo<TcpStream> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_read_ready(cx)
    }
}

impl crate::h1::Transport for ActivityIo<tokio_rustls::server::TlsStream<TcpStream>> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, tls) = self.inner.get_ref();
        // Plaintext rustls already holds (or the client's close_notify) is ready now.
        if !tls.wants_read() {
            return Poll::Ready(Ok(()));
        }
        tcp.poll_read_ready(cx)
    }
}

/// While a reload hands the listeners to the new process, this one stops taking connections
/// (they wait in the sockets' queues for the new one) without closing anything.
fn paused() -> &'static tokio::sync::watch::Sender<bool> {
    static PAUSED: OnceLock<tokio::sync::watch::Sender<bool>> = OnceLock::new();
    PAUSED.get_or_init(|| tokio::sync::watch::channel(false).0)
}

/// TLS handshakes under way: they may read a certificate's key from the store, so a reload
/// lets them finish before it hands the store over.
static HANDSHAKES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn handshakes_done() -> &'static tokio::sync::Notify {
    static DONE: OnceLock<tokio::sync::Notify> = OnceLock::new();
    DONE.get_or_init(tokio::sync::Notify::new)
}

/// Counts one handshake as under way for as long as it lives.
pub(crate) struct Handshaking(());

impl Handshaking {
    pub(crate) fn start() -> Self {
        HANDSHAKES.fetch_add(1, Ordering::Relaxed);
        Handshaking(())
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        if HANDSHAKES.fetch_sub(1, Ordering::AcqRel) == 1 {
            handshakes_done().notify_waiters();
        }
    }
}

/// Waits, at most `limit`, until no TLS handshake is under way.
pub async fn handshakes_settled(limit: Duration) {
    let _ = tokio::time::timeout(limit, async {
        loop {
            let done = handshakes_done().notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if HANDSHAKES.load(Ordering::Acquire) == 0 {
                return;
            }
            done.await;
        }
    })
    .await;
}

/// Whether accepting is paused: a reload is handing the process over.
pub fn accepting_paused() -> tokio::sync::watch::Receiver<bool> {
    paused().subscribe()
}

/// Stops (`true`) or resumes (`false`) accepting on every listener of the process.
pub fn pause_accepting(pause: bool) {
    paused().send_replace(pause);
}

/// The next connection on `listener`, or `None` once `shutdown` is cancelled. A failed accept
/// (out of file descriptors and the like) is logged and retried shortly: what is being served
/// goes on. `what` names the listener in the log.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, std::net::SocketAddr)> {
    let mut pause = paused().subscribe();
    loop {
        if *pause.borrow_and_update() {
            tokio::select! {
                () = shutdown.cancelled() => return None,
                _ = pause.changed() => continue,
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            _ = pause.changed() => {}
            accepted = listener.accept() => match accepted {
                Ok(pair) => return Some(pair),
                Err(e) => {
                    tracing::warn!(error = %e, listener = what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}
