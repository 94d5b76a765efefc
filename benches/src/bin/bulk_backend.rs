//! A backend for bulk transfers through a proxy, which costs little itself:
//!
//!   bulk_backend --listen 127.0.0.1:18082
//!
//! `GET /big?bytes=N` answers N zero bytes (Content-Length, 1 MiB frames); `PUT` or `POST`
//! `/upload` reads the whole request body, drops it and answers how many bytes came.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench tool: a failed step ends it

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn serve(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/upload" {
        let mut body = req.into_body();
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => bytes += frame.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => break,
            }
        }
        return Ok(Response::new(
            Full::new(Bytes::from(format!("got {bytes}\n"))).boxed(),
        ));
    }
    let total: u64 = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("bytes="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1 << 20);
    let mut response = Response::new(Zeros { left: total }.boxed());
    response
        .headers_mut()
        .insert("content-length", total.to_string().parse().unwrap());
    Ok(response)
}

/// `left` zero bytes, a megabyte a frame, from one static buffer (no copy, no allocation).
struct Zeros {
    left: u64,
}

impl hyper::body::Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(ZEROS.len() as u64) as usize;
        self.left -= n as u64;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&ZEROS[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen: SocketAddr = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1))
        .expect("--listen ADDR")
        .parse()
        .unwrap();
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(serve))
                .await;
        });
    }
}
