//! A TLS client that trusts only a given root, speaking HTTP/1.1 or HTTP/2 as ALPN settles.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub struct TlsClient {
    connector: TlsConnector,
}

impl TlsClient {
    pub fn new(root_pem: &str, alpn: &[&[u8]]) -> TlsClient {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
        }
    }

    pub async fn connect(
        &self,
        addr: SocketAddr,
        sni: &str,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        self.connect_over(TcpStream::connect(addr).await?, sni)
            .await
    }

    /// TLS over a connection the caller opened (and may have written to first).
    pub async fn connect_over(
        &self,
        tcp: TcpStream,
        sni: &str,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(sni.to_string()).unwrap();
        self.connector.connect(name, tcp).await
    }

    /// The leaf certificate the server presented on `stream`.
    pub fn peer_leaf(stream: &TlsStream<TcpStream>) -> Vec<u8> {
        stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }
}

/// One open HTTP connection over TLS, h1 or h2 by ALPN.
pub enum HttpConn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl HttpConn {
    pub async fn open(stream: TlsStream<TcpStream>) -> (HttpConn, Option<Vec<u8>>) {
        let alpn = stream.get_ref().1.alpn_protocol().map(|p| p.to_vec());
        let io = TokioIo::new(stream);
        if alpn.as_deref() == Some(b"h2") {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            (HttpConn::H2(send), alpn)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn.with_upgrades());
            (HttpConn::H1(send), alpn)
        }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        match self {
            HttpConn::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            HttpConn::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }
}

pub async fn body_text(response: Response<Incoming>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}
