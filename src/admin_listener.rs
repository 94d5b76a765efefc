//! The admin API's listener. Its connections are driven as the edge's own are (a deadline for
//! the request head, idle connections closed, a graceful finish on shutdown), and a request body
//! is capped before it is read and cut when it stalls, so a client that opens a connection and
//! sends nothing, half a head, or two bytes of a huge body cannot hold it open.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use hyper::body::{Bytes, Frame};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use portcullis_config::file::ProxySection;
use portcullis_proxy::conn::{Activity, ActivityIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{ApiError, MAX_BODY};

/// The limits of the admin listener: the edge's own (`[proxy]`), since a slow or idle client
/// is the same threat on either.
#[derive(Clone, Copy, Debug)]
pub struct AdminLimits {
    /// For a request's head, and for each pause in its body.
    pub read_timeout: Duration,
    /// A connection with no traffic this long is closed.
    pub idle_timeout: Duration,
    /// How long open requests may finish after shutdown.
    pub shutdown_grace: Duration,
}

impl AdminLimits {
    pub fn from_proxy(proxy: &ProxySection) -> Self {
        AdminLimits {
            read_timeout: proxy.header_read_timeout.0,
            idle_timeout: proxy.idle_timeout.0,
            shutdown_grace: proxy.shutdown_grace.0,
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets open requests finish within the
/// grace period.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: AdminLimits,
    shutdown: CancellationToken,
) {
    let read_timeout = limits.read_timeout;
    let router = router.layer(middleware::from_fn(move |request, next| {
        guard_body(read_timeout, request, next)
    }));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .keep_alive(true);
    let connections = TaskTracker::new();
    while let Some((tcp, peer)) =
        portcullis_proxy::conn::accept(&listener, &shutdown, "admin").await
    {
        let activity = Activity::default();
        let io = TokioIo::new(ActivityIo::new(tcp, activity.clone()));
        let service = TowerToHyperService::new(router.clone());
        let conn = builder.serve_connection(io, service);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let driven = portcullis_proxy::conn::drive(
                conn,
                activity,
                limits.idle_timeout,
                Duration::ZERO,
                shutdown,
            );
            if let Err(e) = driven.await {
                tracing::debug!(client = %peer, error = %e, "admin connection ended with an error");
            }
        });
    }
    connections.close();
    if tokio::time::timeout(limits.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("admin requests still running after the grace period; closing them");
    }
}

/// Refuses a body declared larger than the API takes before reading any of it, and times out
/// a body that stalls. Either answer closes the connection: the rest of the body is unread.
async fn guard_body(read_timeout: Duration, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        let error = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {MAX_BODY} bytes"),
        );
        return closing(error.into_response());
    }
    let request = request.map(|body| Body::new(StallTimeout::new(body, read_timeout)));
    let response = next.run(request).await;
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        return closing(response);
    }
    response
}

fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The body of an admin request did not move for this long.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled for {0:?}")]
pub struct BodyStalled(pub Duration);

/// A request body that fails with [`BodyStalled`] when no frame arrives for `after`, as nginx's
/// `client_body_timeout` counts between two reads, not over the whole body.
struct StallTimeout {
    inner: Body,
    after: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl StallTimeout {
    fn new(inner: Body, after: Duration) -> Self {
        StallTimeout {
            inner,
            after,
            sleep: Box::pin(tokio::time::sleep(after)),
        }
    }
}

impl hyper::body::Body for StallTimeout {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + this.after;
                this.sleep.as_mut().reset(next);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(this.after))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// True when `error` or one of its causes is a stalled body.
pub fn is_stalled_body(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<BodyStalled>() {
            return true;
        }
        cause = e.source();
    }
    false
}
