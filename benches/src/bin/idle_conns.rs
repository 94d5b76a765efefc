//! Holds many idle TLS client connections open, for measuring what a proxy keeps per idle
//! connection:
//!
//!   idle_conns --addr 127.0.0.1:18443 --host NAME [--count 5000] [--request]
//!
//! opens `count` connections (64 at a time), completes the handshake on each and, with
//! `--request`, one HTTP/1.1 keep-alive request whose whole answer it reads; prints `ready N`
//! and holds them until its standard input ends. The certificate is not checked: only the
//! server's memory is of interest here.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench tool: a failed step ends it

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Reads one whole HTTP/1.1 response with a Content-Length (what the bench backend sends).
async fn read_response(stream: &mut TlsStream<TcpStream>) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.expect("read the answer");
        assert!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap_or(0));
        if buf.len() >= end + 4 + length {
            assert!(head.starts_with("http/1.1 200"), "{head}");
            return;
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr: SocketAddr = arg(&args, "--addr").expect("--addr").parse().unwrap();
    let host = arg(&args, "--host").expect("--host");
    let count: usize = arg(&args, "--count").map_or(5000, |c| c.parse().unwrap());
    let request = args.iter().any(|a| a == "--request");

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No resumption: every connection costs the server a full handshake's state, as new
    // visitors do.
    config.resumption = rustls::client::Resumption::disabled();
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(host.clone()).unwrap();
    let get = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");

    let mut held = Vec::with_capacity(count);
    while held.len() < count {
        let batch = (count - held.len()).min(64);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let connector = connector.clone();
            let name = name.clone();
            let get = get.clone();
            tasks.spawn(async move {
                let tcp = TcpStream::connect(addr).await.expect("connect");
                let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
                if request {
                    tls.write_all(get.as_bytes())
                        .await
                        .expect("send the request");
                    read_response(&mut tls).await;
                }
                tls
            });
        }
        while let Some(done) = tasks.join_next().await {
            held.push(done.expect("a connection task"));
        }
    }
    println!("ready {}", held.len());
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(_)) = lines.next_line().await {}
    drop(held);
}
