//! Reloads and upgrades under load: a new process takes the listeners and the store over while
//! clients keep asking over HTTP/1.1 keep-alive, HTTP/2 and a new connection per request, and
//! not one request fails nor one connection is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use support::backend::Backend;
use support::tls::{HttpConn, TlsClient, body_text};
use support::{DEADLINE, Node, POLL};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }
}

fn get(host: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(format!("https://{host}/echo"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Asks in a loop until `stop`: on one connection kept open (`keep`), or a new one per
/// request. A connection the server closes politely (`Connection: close` on an answer, or an
/// HTTP/2 GOAWAY before the request was sent) is opened again, as any client does; every
/// other error is a failure.
async fn client_loop(
    client: Arc<TlsClient>,
    https: SocketAddr,
    host: String,
    keep: bool,
    stop: CancellationToken,
    tally: Arc<Tally>,
) {
    let mut conn: Option<HttpConn> = None;
    while !stop.is_cancelled() {
        let mut open = match conn.take() {
            Some(open) => open,
            None => match client.connect(https, &host).await {
                Ok(stream) => HttpConn::open(stream).await.0,
                Err(e) => {
                    tally.fail(format!("connect: {e}"));
                    continue;
                }
            },
        };
        let ready = match &mut open {
            HttpConn::H1(s) => s.ready().await.is_ok(),
            HttpConn::H2(s) => s.ready().await.is_ok(),
        };
        if !ready {
            // Closed before this request was sent (a GOAWAY, or the close after an answer that
            // said so): nothing was lost.
            continue;
        }
        match open.send(get(&host)).await {
            Ok(response) => {
                let closing = response
                    .headers()
                    .get("connection")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                let status = response.status();
                let body = body_text(response).await;
                if status == StatusCode::OK && body.contains("\"path\":\"/echo\"") {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    tally.fail(format!("answer {status}: {body}"));
                }
                if keep && !closing {
                    conn = Some(open);
                }
            }
            Err(e) if e.is_canceled() => {} // never sent: HTTP/2 refused it before it began
            Err(e) => tally.fail(format!("request: {e:?}")),
        }
    }
}

async fn wait_for_more(tally: &Tally, more: usize) {
    let target = tally.ok() + more;
    let start = Instant::now();
    while tally.ok() < target {
        assert!(
            start.elapsed() < DEADLINE,
            "clients stalled at {} answers; failures: {:?}",
            tally.ok(),
            tally.failures.lock().unwrap()
        );
        tokio::time::sleep(POLL).await;
    }
}

fn exe_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn reloads_and_an_upgrade_under_load_fail_no_request() {
    // The node runs from a copy of the binary, which the upgrade replaces.
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("portcullis");
    std::fs::copy(support::bin(), &program).unwrap();
    let config = dir.path().join("portcullis.toml");
    let text = support::config_text(&dir.path().join("state"));
    std::fs::write(&config, &text).unwrap();
    let mut node = Node::start_program(dir, &config, program.clone());
    let backend = Backend::start("a").await;
    let (_id, host) = node.service(&[backend.addr]).await;
    let https = node.listener("https").await;
    let dns = node.dns_addr().await;
    let root = node.root_pem();

    let stop = CancellationToken::new();
    let tally = Arc::new(Tally::default());
    let mut clients = Vec::new();
    for (alpn, keep) in [
        (&b"http/1.1"[..], true),
        (&b"http/1.1"[..], true),
        (&b"h2"[..], true),
        (&b"h2"[..], true),
        (&b"http/1.1"[..], false),
        (&b"http/1.1"[..], false),
    ] {
        clients.push(tokio::spawn(client_loop(
            Arc::new(TlsClient::new(&root, &[alpn])),
            https,
            host.clone(),
            keep,
            stop.clone(),
            tally.clone(),
        )));
    }
    wait_for_more(&tally, 200).await;

    // A reload with the configuration as it is, through the CLI.
    let second = node.reload().await;
    wait_for_more(&tally, 200).await;
    assert_eq!(node.listener("https").await, https, "the same listener");

    // An upgrade: a new binary installed where the node was started from, a changed
    // configuration (the addresses DNS gives), and SIGHUP.
    let fresh = program.with_extension("new");
    std::fs::copy(support::bin(), &fresh).unwrap();
    std::fs::rename(&fresh, &program).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "public_ipv4 = [\"127.0.0.1\"]",
            "public_ipv4 = [\"127.0.0.9\"]",
        ),
    )
    .unwrap();
    let pid_file = node.state_dir().join("portcullis.pid");
    support::signal(second, "-HUP");
    let third = support::poll("the new process to write its pid", || {
        support::read_trimmed(&pid_file)
            .and_then(|p| p.parse::<u32>().ok())
            .filter(|&p| p != second)
    });
    tokio::task::block_in_place(|| node.follow_reload(third));
    assert!(
        !exe_of(third).ends_with("(deleted)") && exe_of(third).ends_with("portcullis"),
        "the new process runs the binary now installed: {}",
        exe_of(third)
    );
    wait_for_more(&tally, 200).await;
    let answers = tokio::task::block_in_place(|| {
        support::poll("DNS to follow the new configuration", || {
            let a = support::dns::dig_short(dns, &host, "A");
            (a == ["127.0.0.9"]).then_some(a)
        })
    });
    assert_eq!(answers, ["127.0.0.9"]);

    // A configuration that cannot be used is refused; the node goes on as it was.
    std::fs::write(&config, "[node]\nid = \"test-1\"\nworkers = \"many\"\n").unwrap();
    let out = node.cli_blocking(&["reload"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid_config"), "{err}");
    assert!(err.contains("goes on serving"), "{err}");
    assert_eq!(node.pid(), third);
    wait_for_more(&tally, 100).await;

    stop.cancel();
    for client in clients {
        client.await.unwrap();
    }
    let failures = tally.failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        tally.ok() + failures.len(),
        &failures[..failures.len().min(10)]
    );
    drop(failures);
    tokio::task::block_in_place(|| node.stop());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_process_that_fails_leaves_the_old_one_serving() {
    let node = Node::start();
    let backend = Backend::start("a").await;
    let (_id, host) = node.service(&[backend.addr]).await;
    let https = node.listener("https").await;
    let client = TlsClient::new(&node.root_pem(), &[b"http/1.1"]);
    let before = node.pid();
    // Valid, but the new process cannot start with it: its DNS port is taken by another socket.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let _tcp = std::net::TcpListener::bind(("127.0.0.1", port));
    let text = std::fs::read_to_string(node.config_path()).unwrap();
    std::fs::write(
        node.config_path(),
        text.replace(
            "dns = [\"127.0.0.1:0\"]",
            &format!("dns = [\"127.0.0.1:{port}\"]"),
        ),
    )
    .unwrap();
    let out = node.cli_blocking(&["reload"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reload_failed"), "{err}");
    assert_eq!(node.pid(), before);
    // The old process took the store back and accepts again.
    let stream = client.connect(https, &host).await.expect("TLS handshake");
    let (mut conn, _) = HttpConn::open(stream).await;
    let response = conn.send(get(&host)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let created = node
        .api(
            hyper::Method::POST,
            "/v1/services",
            Some(serde_json::json!({"backends": [backend.addr.to_string()]})),
        )
        .await;
    assert_eq!(
        created.status,
        StatusCode::CREATED,
        "the store is writable again"
    );
}
