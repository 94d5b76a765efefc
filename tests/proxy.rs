//! The HTTPS edge end to end: a real node, real backends on loopback, and clients that verify
//! the chain to the dev CA root (a rustls client, and curl).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use serde_json::{Value, json};
use support::backend::Backend;
use support::tls::{HttpConn, TlsClient, body_text};
use support::{DEADLINE, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A node, one test backend, one service in front of it, and a TLS client that trusts the
/// node's dev CA and offers `alpn`.
struct Edge {
    node: Node,
    backend: Backend,
    id: String,
    host: String,
    https: SocketAddr,
    client: TlsClient,
}

impl Edge {
    async fn start(backend: &'static str, alpn: &[u8]) -> Edge {
        let node = Node::start();
        let backend = Backend::start(backend).await;
        let (id, host) = node.service(&[backend.addr]).await;
        let https = node.listener("https").await;
        let client = TlsClient::new(&node.root_pem(), &[alpn]);
        Edge {
            node,
            backend,
            id,
            host,
            https,
            client,
        }
    }
}

fn get(host: &str, path: &str) -> hyper::http::request::Builder {
    // HTTP/2 takes the authority from the URI, HTTP/1.1 from Host: give both.
    Request::builder()
        .uri(format!("https://{host}{path}"))
        .header("host", host)
}

fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

async fn open(client: &TlsClient, addr: SocketAddr, sni: &str) -> (HttpConn, Option<Vec<u8>>) {
    HttpConn::open(client.connect(addr, sni).await.expect("TLS handshake")).await
}

async fn echo(conn: &mut HttpConn, host: &str) -> Value {
    let response = conn
        .send(get(host, "/echo").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    serde_json::from_str(&body_text(response).await).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn h1_and_h2_reach_the_backend_with_forwarding_headers() {
    let node = Node::start();
    let backend = Backend::start("a").await;
    let (_, host) = node.service(&[backend.addr]).await;
    let https = node.listener("https").await;
    let root = node.root_pem();

    for (alpn, expected) in [(&b"h2"[..], "HTTP/2.0"), (&b"http/1.1"[..], "HTTP/1.1")] {
        let client = TlsClient::new(&root, &[alpn]);
        let (mut conn, negotiated) = open(&client, https, &host).await;
        assert_eq!(negotiated.as_deref(), Some(alpn), "ALPN");
        let request = get(&host, "/echo?x=1")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-request-id", "req-123")
            .header("x-custom", "kept")
            .body(empty())
            .unwrap();
        let response = conn.send(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(format!("{:?}", response.version()), expected);
        let headers = response.headers().clone();
        assert_eq!(
            headers["x-request-id"], "req-123",
            "a given request id is kept"
        );
        assert!(headers["via"].to_str().unwrap().contains("portcullis"));
        assert!(
            !headers.contains_key("keep-alive"),
            "hop-by-hop headers from the backend are dropped"
        );
        let seen: Value = serde_json::from_str(&body_text(response).await).unwrap();
        let h = &seen["headers"];
        assert_eq!(seen["path"], "/echo?x=1");
        assert_eq!(h["host"], host.as_str());
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], host.as_str());
        assert_eq!(
            h["forwarded"],
            format!("for=127.0.0.1;host={host};proto=https").as_str()
        );
        assert_eq!(h["x-request-id"], "req-123");
        assert_eq!(h["x-custom"], "kept");
        assert!(h["via"].as_str().unwrap().ends_with("portcullis"));

        // Without one, the edge makes a request id and passes it both ways.
        let seen = echo(&mut conn, &host).await;
        let id = seen["headers"]["x-request-id"].as_str().unwrap();
        assert!(id.len() >= 16, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_speaks_http2_and_sees_the_right_statuses() {
    let node = Node::start();
    let backend = Backend::start("a").await;
    let (_, host) = node.service(&[backend.addr]).await;
    let https = node.listener("https").await;
    let http = node.listener("http").await;
    let root = node.state_dir().join("dev-ca/root.pem");
    let resolve = |port: u16| format!("{host}:{port}:127.0.0.1");
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20"])
            .args(args)
            .output()
            .expect("curl is installed (make test installs it)");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let url = format!("https://{host}:{}/echo", https.port());

    let (code, out, err) = curl(&[
        "--cacert",
        root.to_str().unwrap(),
        "--resolve",
        &resolve(https.port()),
        "--http2",
        "-w",
        "\n%{http_version} %{http_code}",
        &url,
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.ends_with("\n2 200"), "{out}");
    assert!(out.contains("\"backend\":\"a\""), "{out}");

    // Plain HTTP redirects to the same URL on HTTPS, with the HTTPS port.
    let (_, out, err) = curl(&[
        "--resolve",
        &resolve(http.port()),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        &format!("http://{host}:{}/a/b?c=d", http.port()),
    ]);
    assert_eq!(
        out,
        format!("308 https://{host}:{}/a/b?c=d", https.port()),
        "{err}"
    );
    let (_, out, _) = curl(&[
        "--resolve",
        &resolve(http.port()),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!(
            "http://{host}:{}/.well-known/acme-challenge/abc",
            http.port()
        ),
    ]);
    assert_eq!(out, "404");

    // A name with no certificate here: the handshake is refused with unrecognized_name.
    let stranger = "nobody.app.example.test";
    let (code, _, err) = curl(&[
        "--cacert",
        root.to_str().unwrap(),
        "--resolve",
        &format!("{stranger}:{}:127.0.0.1", https.port()),
        &format!("https://{stranger}:{}/", https.port()),
    ]);
    assert_eq!(code, Some(35), "TLS failure expected: {err}");
    assert!(err.contains("unrecognized name"), "{err}");

    // A Host that the connection's certificate does not cover: 421.
    let (_, out, _) = curl(&[
        "--cacert",
        root.to_str().unwrap(),
        "--resolve",
        &resolve(https.port()),
        "-H",
        &format!("Host: {stranger}"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ]);
    assert_eq!(out, "421");
}

#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_stream_both_ways() {
    let Edge {
        node,
        backend: _backend,
        host,
        https,
        client,
        ..
    } = Edge::start("a", b"h2").await;
    let (mut conn, _) = open(&client, https, &host).await;
    let peak = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    let before = peak(node.pid());

    const SIZE: usize = 100 * 1024 * 1024;
    let body = Bytes::from(vec![7u8; SIZE]);
    let response = conn
        .send(
            Request::post(format!("https://{host}/upload"))
                .body(Full::new(body))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let got: Value = serde_json::from_str(&body_text(response).await).unwrap();
    assert_eq!(got["bytes"], SIZE as u64);
    assert_eq!(got["sum"], 7 * SIZE as u64);

    let response = conn
        .send(
            get(&host, &format!("/download?bytes={SIZE}"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let mut received = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len();
        }
    }
    assert_eq!(received, SIZE);

    let growth = peak(node.pid()).saturating_sub(before);
    assert!(
        growth < 40 * 1024 * 1024,
        "the proxy's peak memory grew by {} MiB for 100 MiB each way: bodies are buffered",
        growth >> 20
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_echo_through_the_edge() {
    let Edge {
        node: _node,
        backend: _backend,
        host,
        https,
        client,
        ..
    } = Edge::start("ws", b"http/1.1").await;
    let stream = client.connect(https, &host).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(format!("wss://{host}/ws"), stream)
        .await
        .expect("WebSocket handshake through the proxy");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for text in ["hello", "through", "the edge"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .unwrap();
        let back = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), text);
    }
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_style_trailers_pass_over_h2() {
    let Edge {
        node: _node,
        backend: _backend,
        host,
        https,
        client,
        ..
    } = Edge::start("a", b"h2").await;
    let (mut conn, _) = open(&client, https, &host).await;
    let response = conn
        .send(
            get(&host, "/trailers")
                .header("te", "trailers")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "application/grpc");
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"grpc-style body"));
}

#[tokio::test(flavor = "multi_thread")]
async fn renewed_certificate_serves_new_handshakes_and_open_connections_live_on() {
    let Edge {
        node,
        backend: _backend,
        id,
        host,
        https,
        client,
    } = Edge::start("a", b"http/1.1").await;

    let stream = client.connect(https, &host).await.unwrap();
    let old_leaf = TlsClient::peer_leaf(&stream);
    let (mut open_conn, _) = HttpConn::open(stream).await;
    echo(&mut open_conn, &host).await;

    let renew = node
        .api(
            Method::POST,
            &format!("/v1/certificates/{host}/renew"),
            None,
        )
        .await;
    assert_eq!(renew.status, StatusCode::ACCEPTED);
    assert_eq!(renew.json()["status"], "pending");

    // New handshakes get the new certificate, with no restart.
    let start = Instant::now();
    loop {
        let stream = client.connect(https, &host).await.expect("handshake");
        if TlsClient::peer_leaf(&stream) != old_leaf {
            let (mut conn, _) = HttpConn::open(stream).await;
            echo(&mut conn, &host).await;
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "new handshakes still get the old certificate"
        );
        tokio::time::sleep(support::POLL).await;
    }
    node.wait_certificate(&id, |c| c["status"] == "active")
        .await;
    // The connection opened before the swap still works.
    echo(&mut open_conn, &host).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn routing_follows_changes_without_restart() {
    let node = Node::start();
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (id, host) = node.service(&[a.addr]).await;
    let https = node.listener("https").await;
    let client = TlsClient::new(&node.root_pem(), &[b"h2"]);
    let (mut conn, _) = open(&client, https, &host).await;
    async fn backends_hit(conn: &mut HttpConn, host: &str, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(
                echo(conn, host).await["backend"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        out.sort();
        out
    }
    assert_eq!(backends_hit(&mut conn, &host, 2).await, ["a", "a"]);

    let path = format!("/v1/services/{id}");
    let both = json!({"backends": [a.addr.to_string(), b.addr.to_string()]});
    assert_eq!(
        node.api(Method::PATCH, &path, Some(both)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        backends_hit(&mut conn, &host, 4).await,
        ["a", "a", "b", "b"],
        "round robin over both"
    );

    let only_b = json!({"backends": [b.addr.to_string()]});
    node.api(Method::PATCH, &path, Some(only_b)).await;
    assert_eq!(backends_hit(&mut conn, &host, 3).await, ["b", "b", "b"]);

    let suspended = json!({"status": "suspended"});
    node.api(Method::PATCH, &path, Some(suspended)).await;
    let response = conn
        .send(get(&host, "/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);

    assert_eq!(
        node.api(Method::DELETE, &path, None).await.status,
        StatusCode::NO_CONTENT
    );
    let response = conn
        .send(get(&host, "/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let page = body_text(response).await;
    assert!(page.contains(&host), "the page names the host: {page}");
    assert!(
        client.connect(https, &host).await.is_err(),
        "no certificate for a deleted service"
    );
}

/// Sends `request` as it is on a new HTTP/1.1 TLS connection, and reads the answer until the
/// node closes the connection.
async fn raw_https(client: &TlsClient, https: SocketAddr, sni: &str, request: &[u8]) -> String {
    let mut stream = client.connect(https, sni).await.expect("TLS handshake");
    stream.write_all(request).await.unwrap();
    stream.flush().await.unwrap();
    let mut answer = Vec::new();
    // The node may close without close_notify once it has answered; what was read is kept.
    let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the node never closed the connection");
    String::from_utf8_lossy(&answer).into_owned()
}

/// A page for the public names nothing inside the platform.
fn assert_no_internals(page: &str, backend: SocketAddr) {
    for leak in [
        backend.to_string().as_str(),
        "127.0.0.1",
        "os error",
        "hyper",
        "client error",
        "Connection refused",
    ] {
        assert!(!page.contains(leak), "the page tells `{leak}`: {page}");
    }
}

async fn metrics_text(node: &Node) -> String {
    let reply = support::http(Method::GET, &format!("{}/metrics", node.admin), None, None).await;
    String::from_utf8(reply.body).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_failure_pages_tell_visitors_what_happened_and_nothing_inside() {
    let Edge {
        node: _node,
        backend: a,
        host,
        https,
        client,
        ..
    } = Edge::start("a", b"h2").await;
    let (mut conn, _) = open(&client, https, &host).await;

    // The node's response_timeout is 2s.
    let response = conn
        .send(get(&host, "/slow?ms=4000").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let page = body_text(response).await;
    assert!(page.contains("took too long to answer"), "{page}");
    assert!(page.contains(&format!("Request id: {id}")), "{page}");
    assert_no_internals(&page, a.addr);

    a.stop();
    let response = conn
        .send(
            get(&host, "/")
                .header("x-request-id", "visitor-quotes-this")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let page = body_text(response).await;
    // Refused on a new connection, or closed under a pooled one the stop raced with.
    assert!(
        page.contains("could not be reached") || page.contains("failed while answering"),
        "the page says what happened: {page}"
    );
    assert!(page.contains("Request id: visitor-quotes-this"), "{page}");
    assert_no_internals(&page, a.addr);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_chunked_body_is_a_400_not_held_against_the_backend() {
    let Edge {
        node,
        backend: a,
        host,
        https,
        client,
        ..
    } = Edge::start("a", b"http/1.1").await;
    let bad = format!(
        "POST /upload HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
    );
    // More times than the passive ejection threshold (3), so an ejection would show.
    for _ in 0..4 {
        let answer = raw_https(&client, https, &host, bad.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("malformed or ended early"), "{answer}");
        assert_no_internals(&answer, a.addr);
    }

    // Counted as the client's: 4xx, no 5xx, no upstream error.
    let text = metrics_text(&node).await;
    for wanted in [
        "portcullis_http_requests_total{class=\"4xx\"} 4\n",
        "portcullis_http_requests_total{class=\"5xx\"} 0\n",
        "portcullis_upstream_connect_errors_total 0\n",
    ] {
        assert!(text.contains(wanted), "{wanted} missing:\n{text}");
    }
    assert!(
        !node.log().contains("upstream request failed"),
        "{}",
        node.log()
    );
    // The backend was not ejected: a good request still reaches it.
    let (mut conn, _) = open(&client, https, &host).await;
    assert_eq!(echo(&mut conn, &host).await["backend"], "a");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_host_headers_or_a_disagreeing_authority_are_400_and_the_target_wins() {
    let Edge {
        node,
        backend: a,
        host,
        https,
        client,
        ..
    } = Edge::start("a", b"http/1.1").await;

    // RFC 9112 §3.2: more than one Host is a 400, whichever comes first.
    for (first, second) in [
        (host.as_str(), "other.example"),
        ("other.example", host.as_str()),
    ] {
        let request = format!(
            "GET /echo HTTP/1.1\r\nHost: {first}\r\nHost: {second}\r\nConnection: close\r\n\r\n"
        );
        let answer = raw_https(&client, https, &host, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("more than one Host"), "{answer}");
    }
    assert_eq!(a.hits(), 0, "nothing reached the backend");

    // RFC 9112 §3.2.2: an absolute-form target's authority wins over Host.
    let request = format!(
        "GET https://{host}/echo HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n"
    );
    let answer = raw_https(&client, https, &host, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(seen["headers"]["host"], host.as_str(), "{seen}");

    // RFC 9113 §8.3.1: in HTTP/2, `:authority` and a Host naming another site are refused.
    let h2 = TlsClient::new(&node.root_pem(), &[b"h2"]);
    let (mut conn, _) = open(&h2, https, &host).await;
    let response = conn
        .send(
            Request::builder()
                .uri(format!("https://{host}/echo"))
                .header("host", "other.example")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(body_text(response).await.contains("name different sites"));
    // The same site written differently (case, the default port) is the same site.
    let response = conn
        .send(
            Request::builder()
                .uri(format!("https://{host}/echo"))
                .header("host", format!("{}:443", host.to_uppercase()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(a.hits(), 2);
}

/// Sends `request` as it is to the plain HTTP listener, and reads the answer to the close.
async fn raw_http(addr: SocketAddr, request: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the node never closed the connection");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_redirects_only_to_hosts_the_platform_serves() {
    let Edge {
        node, host, https, ..
    } = Edge::start("a", b"http/1.1").await;
    let http = node.listener("http").await;
    let get = |host: &str, path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };

    for bad in [
        "D@evil.example",
        "evil.example/phish?",
        "evil..example",
        "-x.example",
    ] {
        let answer = raw_http(http, &get(bad, "/x")).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{bad}: {answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("location:"),
            "{answer}"
        );
    }
    for stranger in [
        "evil.example",
        "evil.example:8080",
        "192.0.2.1",
        "[2001:db8::1]:80",
    ] {
        let answer = raw_http(http, &get(stranger, "/x")).await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{stranger}: {answer}");
        assert!(answer.contains("No site is served at"), "{answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("location:"),
            "{answer}"
        );
    }

    // A served name, in any case and with a port, goes to its HTTPS URL.
    let answer = raw_http(http, &get(&format!("{}:80", host.to_uppercase()), "/x?y=1")).await;
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
    let location = format!("location: https://{host}:{}/x?y=1\r\n", https.port());
    assert!(answer.to_ascii_lowercase().contains(&location), "{answer}");

    // The ACME challenge path answers as it always has (no ACME account with the dev CA).
    let answer = raw_http(
        http,
        &get("D@evil.example", "/.well-known/acme-challenge/abc"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("no ACME account"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn max_headers_is_one_limit_for_http1_and_http2() {
    let node = Node::start_edited(|text| text.replace("[proxy]\n", "[proxy]\nmax_headers = 30\n"));
    let a = Backend::start("a").await;
    let (_, host) = node.service(&[a.addr]).await;
    let https = node.listener("https").await;

    // HTTP/1.1: Host and n - 1 more lines.
    let h1 = TlsClient::new(&node.root_pem(), &[b"http/1.1"]);
    let head = |n: usize| {
        let mut head = format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
        for i in 2..n {
            head.push_str(&format!("x-h{i}: v\r\n"));
        }
        head + "\r\n"
    };
    let answer = raw_https(&h1, https, &host, head(30).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = raw_https(&h1, https, &host, head(31).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // HTTP/2: n fields besides the pseudo-headers.
    let h2 = TlsClient::new(&node.root_pem(), &[b"h2"]);
    let (mut conn, _) = open(&h2, https, &host).await;
    let request = |n: usize| {
        let mut request = Request::builder().uri(format!("https://{host}/echo"));
        for i in 0..n {
            request = request.header(format!("x-h{i}"), "v");
        }
        request.body(empty()).unwrap()
    };
    let response = conn.send(request(30)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = conn.send(request(31)).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    let page = body_text(response).await;
    assert!(page.contains("at most 30"), "{page}");
    assert_eq!(
        a.hits(),
        2,
        "only the requests within the limit reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_request_is_retried_on_another_backend() {
    let node = Node::start();
    let live = Backend::start("live").await;
    let dead = Backend::start("dead").await;
    dead.stop();
    let (_, host) = node.service(&[dead.addr, live.addr]).await;
    let https = node.listener("https").await;
    let client = TlsClient::new(&node.root_pem(), &[b"h2"]);
    let (mut conn, _) = open(&client, https, &host).await;
    for _ in 0..4 {
        assert_eq!(echo(&mut conn, &host).await["backend"], "live");
    }
    // A POST with a body is not retried: whichever backend it is sent to answers.
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let response = conn
            .send(
                Request::post(format!("https://{host}/echo"))
                    .body(Full::new(Bytes::from_static(b"data")))
                    .unwrap(),
            )
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 502]);
}

/// The response timeout is the backend's silence after the request was sent: an upload that
/// keeps moving for longer than it (here 3.6 s against 2 s) is not cut.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_longer_than_the_response_timeout_goes_through_while_it_moves() {
    let Edge {
        node: _node,
        backend: _a,
        host,
        https,
        client,
        ..
    } = Edge::start("a", b"http/1.1").await;
    let mut stream = client.connect(https, &host).await.unwrap();
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 12;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        CHUNK * CHUNKS
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let start = Instant::now();
    for _ in 0..CHUNKS {
        stream.write_all(&[7u8; CHUNK]).await.unwrap();
        stream.flush().await.unwrap();
        // Pacing the test's own upload, well under the body stall limit (2 s).
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        start.elapsed() > Duration::from_secs(2),
        "the upload outlasted the timeout"
    );
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .ok();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(&format!("\"bytes\":{}", CHUNK * CHUNKS)),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_is_cut_at_the_header_timeout() {
    let Edge {
        node: _node,
        backend: _a,
        host,
        https,
        client,
        ..
    } = Edge::start("a", b"http/1.1").await;
    let mut stream = client.connect(https, &host).await.unwrap();
    let start = Instant::now();
    let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-Slow: ");
    let mut closed = false;
    // One byte at a time, a few a second, never finishing the head. The node's
    // header_read_timeout is 2s.
    for byte in head.bytes().chain(std::iter::repeat(b'a')) {
        if stream.write_all(&[byte]).await.is_err() || stream.flush().await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(250), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {
                // A 408 before closing is fine; keep reading until the close.
            }
            Err(_) => {}
        }
        assert!(start.elapsed() < DEADLINE, "slow client never cut off");
    }
    assert!(closed);
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900),
        "cut before the timeout: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "cut too late: {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_checks_move_traffic_and_all_down_is_503() {
    let node = Node::start();
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (id, host) = node.service(&[a.addr, b.addr]).await;
    let fast_checks = json!({"options": {"health_check": {
        "interval_ms": 100, "timeout_ms": 100, "healthy_threshold": 1, "unhealthy_threshold": 2
    }}});
    let path = format!("/v1/services/{id}");
    let patched = node.api(Method::PATCH, &path, Some(fast_checks)).await;
    assert_eq!(patched.status, StatusCode::OK);
    assert_eq!(
        patched.json()["options"]["health_check"]["interval_ms"],
        100
    );
    let https = node.listener("https").await;
    let client = TlsClient::new(&node.root_pem(), &[b"h2"]);
    let (mut conn, _) = open(&client, https, &host).await;

    // The checker runs: both backends see its checks.
    let start = Instant::now();
    while a.checks() == 0 || b.checks() == 0 {
        assert!(
            start.elapsed() < DEADLINE,
            "no health checks reached a and b"
        );
        tokio::time::sleep(support::POLL).await;
    }
    // Only backends in trouble have a series.
    let metrics = || async {
        let reply =
            support::http(Method::GET, &format!("{}/metrics", node.admin), None, None).await;
        String::from_utf8(reply.body).unwrap()
    };
    let unhealthy =
        |backend: SocketAddr| format!("portcullis_backend_healthy{{backend=\"{backend}\"}} 0");
    let text = metrics().await;
    assert!(text.contains("portcullis_backends_unhealthy 0"), "{text}");
    assert!(!text.contains("portcullis_backend_healthy{"), "{text}");

    // b goes away: the checks take it out, and then even requests that cannot be retried
    // (POST with a body) all land on a.
    b.stop();
    let b_addr = b.addr;
    let start = Instant::now();
    loop {
        let text = metrics().await;
        if text.contains(&unhealthy(b_addr)) {
            assert!(text.contains("portcullis_backends_unhealthy 1"), "{text}");
            break;
        }
        assert!(start.elapsed() < DEADLINE, "b never marked unhealthy");
        tokio::time::sleep(support::POLL).await;
    }
    for _ in 0..6 {
        let response = conn
            .send(
                Request::post(format!("https://{host}/echo"))
                    .body(Full::new(Bytes::from_static(b"x")))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let seen: Value = serde_json::from_str(&body_text(response).await).unwrap();
        assert_eq!(seen["backend"], "a");
    }

    // b comes back on its port: the checks bring it in again, and it gets requests.
    let b = Backend::start_at("b", b_addr).await;
    let start = Instant::now();
    loop {
        let text = metrics().await;
        if !text.contains(&unhealthy(b_addr)) {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "b never came back");
        tokio::time::sleep(support::POLL).await;
    }
    let start = Instant::now();
    while echo(&mut conn, &host).await["backend"] != "b" {
        assert!(
            start.elapsed() < DEADLINE,
            "b back but no requests reach it"
        );
    }

    // Every backend down: 503 with Retry-After.
    a.stop();
    b.stop();
    let start = Instant::now();
    let response = loop {
        let response = conn
            .send(get(&host, "/").body(empty()).unwrap())
            .await
            .unwrap();
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            break response;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "never 503 with every backend down"
        );
    };
    assert_eq!(response.headers()["retry-after"], "5");

    // The other metrics the edge keeps are there too.
    let text = metrics().await;
    for name in [
        "portcullis_http_requests_total",
        "portcullis_http_request_duration_seconds",
        "portcullis_tls_handshakes_total",
        "portcullis_active_connections",
        "portcullis_upstream_connect_errors_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    // A service with basic metrics counts in the totals only.
    assert!(
        text.contains("portcullis_http_requests_total{class=\"5xx\"}"),
        "{text}"
    );
    assert!(!text.contains(&id), "a series names the service:\n{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scrape_stays_small_with_many_services_and_names_only_detailed_ones() {
    let Edge {
        node,
        backend,
        id: first,
        host: first_host,
        https,
        client,
    } = Edge::start("a", b"h2").await;
    // 300 services with basic metrics, all served (certificates issued), 20 of them visited.
    let node = std::sync::Arc::new(node);
    let mut hosts = vec![first_host.clone()];
    // Ten at a time: each creation polls for its certificate.
    for batch in 0..30 {
        let mut creations = tokio::task::JoinSet::new();
        for _ in 0..if batch == 0 { 9 } else { 10 } {
            let node = node.clone();
            let addr = backend.addr;
            creations.spawn(async move { node.service(&[addr]).await });
        }
        while let Some(created) = creations.join_next().await {
            hosts.push(created.unwrap().1);
        }
    }
    assert_eq!(hosts.len(), 300);
    for host in &hosts[..20] {
        let (mut conn, _) = open(&client, https, host).await;
        echo(&mut conn, host).await;
    }
    let text = metrics_text(&node).await;
    assert!(
        text.contains("portcullis_certificates{status=\"active\"} 300\n"),
        "{text}"
    );
    assert!(
        text.contains("portcullis_http_requests_total{class=\"2xx\"} 20\n"),
        "{text}"
    );
    for per_name in ["service=", "domain=", "backend="] {
        assert!(!text.contains(per_name), "{per_name} in:\n{text}");
    }
    // The per-domain expiry alone used to be about 120 bytes a service.
    assert!(text.len() < 16 * 1024, "{} bytes:\n{text}", text.len());

    // A service that asks for detailed metrics gets series of its own.
    let path = format!("/v1/services/{first}");
    let detailed = json!({"options": {"metrics": "detailed"}});
    let r = node.api(Method::PATCH, &path, Some(detailed)).await;
    assert_eq!(r.status, StatusCode::OK);
    let (mut conn, _) = open(&client, https, &first_host).await;
    echo(&mut conn, &first_host).await;
    let text = metrics_text(&node).await;
    for wanted in [
        format!("portcullis_service_http_requests_total{{service=\"{first}\",class=\"2xx\"}} 1\n"),
        format!("portcullis_certificate_expiry_seconds{{domain=\"{first_host}\"}}"),
    ] {
        assert!(text.contains(&wanted), "{wanted} missing:\n{text}");
    }
    // Its backend gone, connect errors are counted for it too (a request may first find a
    // pooled connection closed under it, which is not a connect error).
    backend.stop();
    let connect_errors =
        format!("portcullis_service_upstream_connect_errors_total{{service=\"{first}\"}}");
    let start = Instant::now();
    let text = loop {
        let response = conn
            .send(get(&first_host, "/").body(empty()).unwrap())
            .await
            .unwrap();
        assert!(response.status().is_server_error());
        let text = metrics_text(&node).await;
        if text.contains(&connect_errors) {
            break text;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{connect_errors} missing:\n{text}"
        );
    };
    assert!(
        text.lines()
            .filter(|l| l.contains("service="))
            .all(|l| l.contains(&first)),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn service_options_plain_http_and_hsts() {
    let node = Node::start();
    let a = Backend::start("a").await;
    let (id, host) = node.service(&[a.addr]).await;
    let https = node.listener("https").await;
    let http = node.listener("http").await;
    let client = TlsClient::new(&node.root_pem(), &[b"h2"]);

    // The dev CA is not publicly trusted: no HSTS by default.
    let (mut conn, _) = open(&client, https, &host).await;
    let response = conn
        .send(get(&host, "/").body(empty()).unwrap())
        .await
        .unwrap();
    assert!(!response.headers().contains_key("strict-transport-security"));

    let path = format!("/v1/services/{id}");
    let options = json!({"options": {"hsts": true, "plain_http": true}});
    assert_eq!(
        node.api(Method::PATCH, &path, Some(options)).await.status,
        StatusCode::OK
    );
    let response = conn
        .send(get(&host, "/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(
        response.headers()["strict-transport-security"],
        "max-age=31536000"
    );

    // Plain HTTP now serves the site instead of redirecting.
    // By hand, so the Host is the service's while the connection goes to the loopback port.
    let mut tcp = tokio::net::TcpStream::connect(http).await.unwrap();
    tcp.write_all(
        format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("\"x-forwarded-proto\":\"http\""),
        "{answer}"
    );

    let bad = json!({"options": {"health_check": {"interval_ms": 10}}});
    let r = node.api(Method::PATCH, &path, Some(bad)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json()["error"]["field"],
        "options.health_check.interval_ms"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_in_flight_requests_finish() {
    let Edge {
        mut node,
        backend: a,
        host,
        https,
        client,
        ..
    } = Edge::start("a", b"h2").await;
    let (mut conn, _) = open(&client, https, &host).await;
    let slow = tokio::spawn(async move {
        let response = conn
            .send(get(&host, "/slow?ms=1000").body(empty()).unwrap())
            .await
            .unwrap();
        (response.status(), body_text(response).await)
    });
    // Wait until the backend has the request, then stop the node.
    let start = Instant::now();
    while a.hits() == 0 {
        assert!(start.elapsed() < DEADLINE);
        tokio::time::sleep(support::POLL).await;
    }
    let status = tokio::task::spawn_blocking(move || {
        let status = node.stop();
        (status, node)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "{status}");
    let (code, body) = slow.await.unwrap();
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body, "slow answer\n");
    assert!(
        tokio::net::TcpStream::connect(https).await.is_err(),
        "the listener is closed after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_is_refused_with_a_reason() {
    let Edge {
        node: _node,
        backend: a,
        host,
        https,
        client,
        ..
    } = Edge::start("a", b"http/1.1").await;
    let (mut conn, _) = open(&client, https, &host).await;
    let response = conn
        .send(
            Request::builder()
                .method(Method::CONNECT)
                .uri(format!("{host}:443"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_IMPLEMENTED);
    assert!(body_text(response).await.contains("WebSocket"));
    assert_eq!(a.hits(), 0, "nothing reached the backend");
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_backends_get_http2_with_trailers_and_the_site_host() {
    let node = Node::start();
    let a = Backend::start("grpc").await;
    let (id, host) = node.service(&[a.addr]).await;
    let options = json!({"options": {"upstream_protocol": "h2c"}});
    let patched = node
        .api(Method::PATCH, &format!("/v1/services/{id}"), Some(options))
        .await;
    assert_eq!(patched.status, StatusCode::OK);
    let https = node.listener("https").await;
    let client = TlsClient::new(&node.root_pem(), &[b"h2"]);
    let (mut conn, _) = open(&client, https, &host).await;

    let seen = echo(&mut conn, &host).await;
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    assert_eq!(seen["headers"]["host"], host.as_str(), "{seen}");
    assert_eq!(seen["headers"]["via"], "2 portcullis");

    let response = conn
        .send(
            get(&host, "/trailers")
                .header("te", "trailers")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_protocol_from_a_trusted_balancer_names_the_client() {
    let node = Node::start_edited(|text| {
        text.replace(
            "[proxy]\n",
            "[proxy]\nproxy_protocol_from = [\"127.0.0.0/8\"]\n",
        )
    });
    let a = Backend::start("a").await;
    // The admin API is not behind the balancer; only the edge's listeners are.
    let (_, host) = node.service(&[a.addr]).await;
    let https = node.listener("https").await;
    let client = TlsClient::new(&node.root_pem(), &[b"http/1.1"]);

    let mut tcp = tokio::net::TcpStream::connect(https).await.unwrap();
    let client_addr: SocketAddr = "203.0.113.7:40000".parse().unwrap();
    let header = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (client_addr, https),
    )
    .build()
    .unwrap();
    tcp.write_all(&header).await.unwrap();
    let stream = client.connect_over(tcp, &host).await.unwrap();
    let (mut conn, _) = HttpConn::open(stream).await;
    let seen = echo(&mut conn, &host).await;
    assert_eq!(seen["headers"]["x-forwarded-for"], "203.0.113.7");

    // From a trusted source, a connection without the header is not served.
    assert!(
        client.connect(https, &host).await.is_err(),
        "a trusted source must send the header"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_protocol_to_backends_names_the_client() {
    let node = Node::start();
    // A backend that reads the PROXY header and answers with the client it names.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut fixed = [0u8; 16];
                if tcp.read_exact(&mut fixed).await.is_err() {
                    return;
                }
                let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
                let mut rest = vec![0u8; len];
                tcp.read_exact(&mut rest).await.unwrap();
                let whole = [&fixed[..], &rest[..]].concat();
                let header = ppp::v2::Header::try_from(whole.as_slice()).unwrap();
                let source = match header.addresses {
                    ppp::v2::Addresses::IPv4(a) => a.source_address.to_string(),
                    ppp::v2::Addresses::IPv6(a) => a.source_address.to_string(),
                    _ => "none".into(),
                };
                // Then one HTTP request, answered with the source.
                let mut buf = vec![0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{source}",
                    source.len()
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
            });
        }
    });
    let (id, host) = node.service(&[backend]).await;
    let options = json!({"options": {"proxy_protocol": true, "health_check": {"enabled": false}}});
    node.api(Method::PATCH, &format!("/v1/services/{id}"), Some(options))
        .await;
    let https = node.listener("https").await;
    let client = TlsClient::new(&node.root_pem(), &[b"h2"]);
    let (mut conn, _) = open(&client, https, &host).await;
    for _ in 0..2 {
        let response = conn
            .send(get(&host, "/").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_text(response).await, "127.0.0.1");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let Edge {
        node: _node,
        backend: _a,
        host,
        https,
        client,
        ..
    } = Edge::start("a", b"h2").await;
    let (mut conn, _) = open(&client, https, &host).await;
    echo(&mut conn, &host).await;
    let last_use = Instant::now();
    let HttpConn::H2(sender) = conn else {
        panic!("h2 expected")
    };
    // The node's idle_timeout is 3s: the connection closes then, not before.
    while !sender.is_closed() {
        assert!(
            last_use.elapsed() < DEADLINE,
            "idle connection never closed"
        );
        // A short pause between polls, so the test does not spin a core the node needs.
        tokio::time::sleep(support::POLL).await;
    }
    let idle = last_use.elapsed();
    assert!(
        idle >= Duration::from_millis(2900),
        "closed early: {idle:?}"
    );
    assert!(idle < Duration::from_secs(10), "closed late: {idle:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_over_http2_extended_connect() {
    let Edge {
        node: _node,
        backend: _backend,
        host,
        https,
        client,
        ..
    } = Edge::start("ws", b"h2").await;
    let (mut conn, _) = open(&client, https, &host).await;
    // One request first, so the server's SETTINGS (with ENABLE_CONNECT_PROTOCOL) are in.
    echo(&mut conn, &host).await;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("https://{host}/ws"))
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .header("sec-websocket-version", "13")
        .body(empty())
        .unwrap();
    let response = conn.send(request).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "RFC 8441: 2xx opens the tunnel"
    );
    let upgraded = hyper::upgrade::on(response)
        .await
        .expect("h2 stream becomes the tunnel");
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    for text in ["over", "http/2"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .unwrap();
        let back = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), text);
    }
    // The connection carries other streams meanwhile.
    echo(&mut conn, &host).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_counts_the_bytes_of_streamed_responses() {
    let Edge {
        node,
        backend: _backend,
        host,
        https,
        client,
        ..
    } = Edge::start("a", b"h2").await;
    let (mut conn, _) = open(&client, https, &host).await;
    let response = conn
        .send(get(&host, "/download?bytes=123457").body(empty()).unwrap())
        .await
        .unwrap();
    assert!(
        response.headers().get("content-length").is_none(),
        "streamed"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 123457);
    // The event is written when the body ends: poll the node's log for it.
    let line = support::poll("the access-log event", || {
        node.log()
            .lines()
            .find(|l| l.contains("portcullis::access") && l.contains("/download"))
            .map(str::to_string)
    });
    assert!(line.contains("bytes=123457"), "{line}");
    assert!(line.contains("status=200"), "{line}");
    assert!(line.contains(&host), "{line}");
}

/// A backend that answers one request per connection as if it kept the connection (no
/// `Connection: close`), then closes it, as a backend's keep-alive timeout does between
/// requests. Returns its address and how many connections it took.
async fn closing_backend() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nfresh\n")
                    .await;
                // Closed at once: the proxy's idle connection is dead before its next use.
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_closing_idle_connections_costs_no_request() {
    let node = Node::start();
    let (backend, accepted) = closing_backend().await;
    let (_id, host) = node.service(&[backend]).await;
    let https = node.listener("https").await;
    let client = TlsClient::new(&node.root_pem(), &[b"http/1.1"]);
    let (mut conn, _) = open(&client, https, &host).await;
    for round in 0..20 {
        // POST too: not idempotent, so only a request that never left may go on another
        // connection, which is exactly the case of a connection closed while idle.
        let method = if round % 2 == 0 {
            Method::GET
        } else {
            Method::POST
        };
        let response = conn
            .send(
                get(&host, "/")
                    .method(method)
                    .body(Full::new(Bytes::from_static(b"x")))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "round {round}");
        assert_eq!(body_text(response).await, "fresh\n");
    }
    assert!(accepted.load(std::sync::atomic::Ordering::Relaxed) >= 20);
}

/// Reads from `stream` until `needle` has been seen; what was read.
async fn read_until<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let reading = async {
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before {needle:?}: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(DEADLINE, reading)
        .await
        .expect("the answer never came");
    String::from_utf8_lossy(&seen).into_owned()
}

/// The HTTP/1 server's framing, as raw clients see it: pipelined requests answered in order,
/// `Expect: 100-continue`, chunked uploads with trailers, HTTP/1.0 without a length, HEAD,
/// trailers on a chunked answer, and the request shapes that smuggle refused before a
/// backend sees them.
#[tokio::test(flavor = "multi_thread")]
async fn http1_framing_as_raw_clients_see_it() {
    let Edge {
        node,
        backend: a,
        host,
        https,
        client,
        ..
    } = Edge::start("a", b"http/1.1").await;

    // Two requests in one write: two answers, in order, then the close the second asked for.
    let pipelined = format!(
        "GET /echo?n=1 HTTP/1.1\r\nHost: {host}\r\n\r\nGET /echo?n=2 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    let answer = raw_https(&client, https, &host, pipelined.as_bytes()).await;
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    let (first, second) = (answer.find("/echo?n=1"), answer.find("/echo?n=2"));
    assert!(first.is_some() && first < second, "{answer}");

    // Expect: 100-continue: the interim answer comes before the body is sent.
    let mut stream = client.connect(https, &host).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    let interim = read_until(&mut stream, "\r\n\r\n").await;
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "{interim}"
    );
    stream.write_all(b"hello").await.unwrap();
    stream.flush().await.unwrap();
    let answer = read_until(&mut stream, "}").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains(r#""bytes":5,"sum":532"#), "{answer}");

    // A chunked upload with an extension and a trailer.
    let chunked = format!(
        "POST /upload HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3;x=y\r\nhel\r\n2\r\nlo\r\n0\r\nx-check: 1\r\n\r\n"
    );
    let answer = raw_https(&client, https, &host, chunked.as_bytes()).await;
    assert!(answer.contains(r#""bytes":5,"sum":532"#), "{answer}");

    // HTTP/1.0 and a streamed answer of no known length: the close delimits it.
    let old = format!("GET /download?bytes=100000 HTTP/1.0\r\nHost: {host}\r\n\r\n");
    let answer = raw_https(&client, https, &host, old.as_bytes()).await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(body.len(), 100_000);

    // HEAD: the answer's head only, and the connection goes on.
    let head_then_get = format!(
        "HEAD /echo HTTP/1.1\r\nHost: {host}\r\n\r\nGET /echo?after-head HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    let answer = raw_https(&client, https, &host, head_then_get.as_bytes()).await;
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    let second = answer.rfind("HTTP/1.1 200 OK").unwrap();
    assert!(
        !answer[..second].contains("\"backend\""),
        "HEAD got a body: {answer}"
    );
    assert!(answer[second..].contains("after-head"), "{answer}");

    // Trailers on a chunked answer, for a client that takes them.
    let trailers = format!(
        "GET /trailers HTTP/1.1\r\nHost: {host}\r\nTE: trailers\r\nConnection: close\r\n\r\n"
    );
    let answer = raw_https(&client, https, &host, trailers.as_bytes()).await;
    assert!(answer.contains("transfer-encoding: chunked"), "{answer}");
    let body = answer.split_once("\r\n\r\n").unwrap().1;
    assert!(body.contains("grpc-style body"), "{answer}");
    assert!(body.contains("grpc-status: 0\r\n"), "{answer}");
    assert!(body.ends_with("\r\n\r\n"), "{answer}");

    // Smuggling shapes: refused with a 400 and a reason, and no backend sees them.
    let hits = a.hits();
    for bad in [
        "POST /upload HTTP/1.1\r\nHost: HOST\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /upload HTTP/1.1\r\nHost: HOST\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        "POST /upload HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: gzip\r\n\r\n",
        "POST /upload HTTP/1.0\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "GET /echo HTTP/1.1\r\nHost: HOST\r\nBad Name: x\r\n\r\n",
    ] {
        let answer = raw_https(&client, https, &host, bad.replace("HOST", &host).as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{bad:?}: {answer}"
        );
        assert!(answer.contains("connection: close"), "{answer}");
        assert!(
            answer.split_once("\r\n\r\n").unwrap().1.len() > 10,
            "no reason given: {answer}"
        );
    }
    assert_eq!(a.hits(), hits, "a refused request reached the backend");

    // HTTP/2 with prior knowledge on the plain listener (h2c), as curl sends it.
    let http = node.listener("http").await;
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ])
        .arg("--http2-prior-knowledge")
        .args(["-H", &format!("Host: {host}")])
        .arg(format!("http://{http}/echo"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 308");
}

/// A backend that answers every request with a head promising `promised` bytes, sends
/// `sent`, and closes.
async fn cut_short_backend(promised: usize, sent: &'static [u8]) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {promised}\r\n\r\n");
                let _ = tcp.write_all(answer.as_bytes()).await;
                let _ = tcp.write_all(sent).await;
            });
        }
    });
    addr
}

/// Faults on either side of an HTTP/1 connection: a backend that dies part way through its
/// answer is cut short for the client too (never passed on as whole, never left hanging), and
/// a client that goes away part way through its upload costs the edge nothing.
#[tokio::test(flavor = "multi_thread")]
async fn http1_answers_and_uploads_cut_short_end_their_connections() {
    let node = Node::start();
    let cut = cut_short_backend(1000, b"only a part").await;
    let (_, cut_host) = node.service(&[cut]).await;
    let a = Backend::start("a").await;
    let (_, host) = node.service(&[a.addr]).await;
    let https = node.listener("https").await;
    let client = TlsClient::new(&node.root_pem(), &[b"http/1.1"]);

    // Content-Length says 1000, 11 bytes come: the client gets the head and those bytes, then
    // the connection ends (raw_https reads to the close, within the deadline).
    let request = format!("GET / HTTP/1.1\r\nHost: {cut_host}\r\n\r\n");
    let answer = raw_https(&client, https, &cut_host, request.as_bytes()).await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(head.contains("content-length: 1000"), "{answer}");
    assert_eq!(body, "only a part");

    // The client declares 1 MiB, sends 10 KiB and closes.
    for _ in 0..3 {
        let mut stream = client.connect(https, &host).await.unwrap();
        let head =
            format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1048576\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&[b'x'; 10 * 1024]).await.unwrap();
        stream.flush().await.unwrap();
        drop(stream);
    }
    // The edge and the backend are fine: the next upload goes through whole.
    let (mut conn, _) = open(&client, https, &host).await;
    let response = conn
        .send(
            get(&host, "/upload")
                .method(Method::POST)
                .body(Full::new(Bytes::from(vec![b'y'; 200_000])))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let counted: Value = serde_json::from_str(&body_text(response).await).unwrap();
    assert_eq!(counted["bytes"], 200_000);
    let text = metrics_text(&node).await;
    assert!(
        text.contains("portcullis_upstream_connect_errors_total 0\n"),
        "{text}"
    );
}
