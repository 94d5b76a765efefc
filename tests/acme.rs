//! ACME issuance end to end against Pebble (Debian `pebble`): Pebble resolves through the
//! node's own DNS responder and validates http-01 on the node's HTTP listener; the certificate
//! it issues is then served to a client that trusts only Pebble's root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use support::Node;
use support::backend::Backend;
use support::pebble::PebblePlan;

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl is installed (make test installs it)");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `GET https://<host><path>` on the node's HTTPS listener by a client that trusts only
/// Pebble's root: the status code, and curl's complaint.
async fn https_status(
    node: &Node,
    pebble: &support::pebble::Pebble,
    host: &str,
    path: &str,
) -> (String, String) {
    let root = pebble.dir.path().join("issuing-root.pem");
    std::fs::write(&root, pebble.issuing_root()).unwrap();
    let https = node.listener("https").await;
    curl(&[
        "--cacert",
        root.to_str().unwrap(),
        "--resolve",
        &format!("{host}:{}:127.0.0.1", https.port()),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("https://{host}:{}{path}", https.port()),
    ])
}

/// A node whose `[issuer]` section is `section` (an ACME one).
fn acme_node(section: &str) -> Node {
    Node::start_edited(|t| t.replace("[issuer]\nkind = \"dev\"\n", section))
}

/// Creates a service with a backend nothing listens on, without waiting for its certificate;
/// its id.
async fn service_pending(node: &Node) -> String {
    let created = node
        .api(
            hyper::Method::POST,
            "/v1/services",
            Some(serde_json::json!({ "backends": ["127.0.0.1:9"] })),
        )
        .await;
    assert_eq!(created.status, hyper::StatusCode::CREATED);
    created.json()["id"].as_str().unwrap().to_string()
}

/// A node whose issuer is the Pebble of `plan`, and that Pebble, started on the node's ports.
async fn node_with_pebble(extra_pebble: &str) -> (Node, support::pebble::Pebble) {
    let plan = PebblePlan::new();
    let section = plan.issuer_section();
    let node = acme_node(&section);
    let dns = node.dns_addr().await;
    let http = node.listener("http").await;
    let pebble = plan.start(dns, http.port(), extra_pebble);
    (node, pebble)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_service_gets_a_certificate_from_pebble_and_serves_it() {
    let (node, pebble) = node_with_pebble("").await;
    let backend = Backend::start("a").await;
    // `service` waits for the certificate to be active.
    let (id, host) = node.service(&[backend.addr]).await;
    let cert = node
        .wait_certificate(&id, |c| c["status"] == "active")
        .await;
    assert_eq!(cert["status"], "active", "{cert}");
    // The account key and the certificate key are in the store, which only the owner reads.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(node.state_dir().join("state.redb"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "state.redb mode {mode:o}");
    }

    let (code, err) = https_status(&node, &pebble, &host, "/echo").await;
    assert_eq!(code, "200", "{err}\nPebble log:\n{}", pebble.log());
    assert!(backend.hits() >= 1);

    // Metrics: the order, the certificates by status and by time left. A healthy certificate
    // of a service with basic metrics has no series of its own.
    let metrics = node.metrics().await;
    for wanted in [
        "portcullis_certificate_orders_total{outcome=\"issued\"} 1".to_string(),
        "portcullis_certificates{status=\"active\"} 1".to_string(),
        "portcullis_certificates_expiring{within=\"30d\"} 0".to_string(),
        "portcullis_certificate_soonest_expiry_timestamp_seconds ".to_string(),
        "portcullis_certificates_in_trouble 0".to_string(),
        "portcullis_certificate_issuance_seconds_count 1".to_string(),
    ] {
        assert!(metrics.contains(&wanted), "{wanted} missing:\n{metrics}");
    }
    assert!(
        !metrics.contains(&format!(
            "portcullis_certificate_expiry_seconds{{domain=\"{host}\"}}"
        )),
        "a healthy certificate has a series:\n{metrics}"
    );
    assert_eq!(
        metrics
            .matches("# TYPE portcullis_certificates gauge")
            .count(),
        1,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_challenge_responder_answers_managed_hosts_with_the_key_authorization() {
    let (node, _pebble) = node_with_pebble("").await;
    let backend = Backend::start("a").await;
    let (_, host) = node.service(&[backend.addr]).await;
    let http = node.listener("http").await;
    let get = |host: &str, token: &str| {
        let (out, err) = curl(&[
            "--resolve",
            &format!("{host}:{}:127.0.0.1", http.port()),
            "-w",
            "\n%{http_code} %{content_type}",
            &format!(
                "http://{host}:{}/.well-known/acme-challenge/{token}",
                http.port()
            ),
        ]);
        let (body, status) = out.rsplit_once('\n').unwrap_or_else(|| panic!("{err}"));
        (body.to_string(), status.to_string())
    };
    let token = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
    let (body, status) = get(&host, token);
    assert_eq!(status, "200 text/plain; charset=utf-8");
    let (echoed, thumbprint) = body.split_once('.').unwrap();
    assert_eq!(echoed, token);
    // An RFC 7638 SHA-256 thumbprint: 43 base64url characters.
    assert_eq!(thumbprint.len(), 43, "{body}");
    assert!(
        thumbprint
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    // The same thumbprint for every token and every managed host: no per-challenge state.
    let (other, _) = get(&host.to_uppercase(), "abc_DEF-123");
    assert_eq!(other, format!("abc_DEF-123.{thumbprint}"));
    // Tokens outside base64url, or absurdly long: 400.
    assert!(get(&host, "abc%21def").1.starts_with("400"));
    assert!(get(&host, "a.b").1.starts_with("400"));
    assert!(get(&host, &"a".repeat(129)).1.starts_with("400"));
    // Hosts the platform does not manage: 404.
    assert!(get("stranger.example.org", token).1.starts_with("404"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_the_ca_refuses_is_failed_with_the_problem_and_retried_later() {
    let (node, _pebble) = node_with_pebble(r#", "domainBlocklist": ["app.example.test"]"#).await;
    let id = service_pending(&node).await;
    let cert = node
        .wait_certificate(&id, |c| c["status"] == "failed")
        .await;
    let problem = &cert["last_error"];
    assert_eq!(
        problem["type"], "urn:ietf:params:acme:error:rejectedIdentifier",
        "{cert}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("app.example.test"),
        "{cert}"
    );
    assert!(cert["attempts"].as_u64().unwrap() >= 1, "{cert}");
    assert!(cert["next_attempt_at"].is_string(), "{cert}");
    // Retried at next_attempt_at (the first backoff step is a few seconds), and failed again.
    let again = node
        .wait_certificate(&id, |c| c["attempts"].as_u64() >= Some(2))
        .await;
    assert_eq!(again["status"], "failed", "{again}");
    // A failed name is in trouble: it has a series of its own (0 s left: it has none).
    let metrics = node.metrics().await;
    for wanted in [
        format!("portcullis_certificate_expiry_seconds{{domain=\"{id}.app.example.test\"}} 0\n"),
        "portcullis_certificates{status=\"failed\"} 1\n".to_string(),
        "portcullis_certificates_in_trouble 1\n".to_string(),
    ] {
        assert!(metrics.contains(&wanted), "{wanted} missing:\n{metrics}");
    }
    // The node goes on serving: DNS still answers for the service.
    let dns = node.dns_addr().await;
    let a = support::dns::q(
        dns,
        &format!("{id}.app.example.test"),
        hickory_proto::rr::RecordType::A,
    );
    assert_eq!(support::dns::rdata(&a), ["127.0.0.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_services_created_at_once_all_get_certificates() {
    let (node, pebble) = node_with_pebble("").await;
    let node = std::sync::Arc::new(node);
    let mut creations = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let node = node.clone();
        creations.spawn(async move {
            let r = node
                .api(
                    hyper::Method::POST,
                    "/v1/services",
                    Some(serde_json::json!({ "backends": ["127.0.0.1:9"],
                        "options": { "health_check": { "enabled": false } } })),
                )
                .await;
            assert_eq!(r.status, hyper::StatusCode::CREATED);
        });
    }
    while let Some(done) = creations.join_next().await {
        done.unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let list = node
            .api(hyper::Method::GET, "/v1/certificates", None)
            .await
            .json();
        let certs = list["certificates"].as_array().unwrap().clone();
        let active = certs.iter().filter(|c| c["status"] == "active").count();
        if active == 100 {
            break;
        }
        let failed: Vec<_> = certs.iter().filter(|c| c["status"] == "failed").collect();
        assert!(failed.is_empty(), "failed: {failed:?}\n{}", pebble.log());
        assert!(
            std::time::Instant::now() < deadline,
            "{active} of 100 active after 120 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificates_are_replaced_before_they_expire() {
    // Pebble issues certificates valid for 12 s: renewal is due with 4 s left.
    let (node, pebble) = node_with_pebble(r#", "certificateValidityPeriod": 12"#).await;
    let backend = Backend::start("a").await;
    let (_, host) = node.service(&[backend.addr]).await;
    let https = node.listener("https").await;
    let client = support::tls::TlsClient::new(&pebble.issuing_root(), &[b"http/1.1"]);
    let first = support::tls::TlsClient::peer_leaf(&client.connect(https, &host).await.unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut handshakes = 0;
    let mut leaves = vec![first];
    // Handshake continuously through two renewals: every one must verify (an expired
    // certificate fails verification), and the certificate must change twice.
    while leaves.len() < 3 {
        let stream = client.connect(https, &host).await.unwrap_or_else(|e| {
            panic!(
                "handshake {handshakes} failed: {e}\nnode log:\n{}",
                node.log()
            )
        });
        handshakes += 1;
        let leaf = support::tls::TlsClient::peer_leaf(&stream);
        if leaves.last() != Some(&leaf) {
            leaves.push(leaf);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} renewals in 30 s",
            leaves.len() - 1
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(handshakes > 100, "{handshakes} handshakes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_create_wait_follows_the_first_issuance() {
    let (node, _pebble) = node_with_pebble("").await;
    let out = node.cli(&["service", "create", "--backend", "127.0.0.1:9", "--wait"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("certificate "))
        .collect();
    let last = steps.last().unwrap();
    assert!(last.starts_with("certificate active until "), "{stdout}");
    // Each line is a step in order; polling may skip fast ones, never reorder them.
    let order = ["pending", "ordering", "validating", "issuing", "active"];
    let ranks: Vec<usize> = steps
        .iter()
        .map(|l| {
            let word = l["certificate ".len()..].split(' ').next().unwrap();
            order.iter().position(|o| *o == word).unwrap()
        })
        .collect();
    assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_create_wait_reports_the_cas_refusal() {
    let (node, _pebble) = node_with_pebble(r#", "domainBlocklist": ["app.example.test"]"#).await;
    let out = node.cli(&["service", "create", "--backend", "127.0.0.1:9", "--wait"]);
    assert_eq!(out.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rejectedIdentifier"), "{stderr}");
    assert!(stderr.contains("retries at"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_revoke_revokes_at_the_ca_and_replaces_the_certificate() {
    let (node, pebble) = node_with_pebble("").await;
    let backend = Backend::start("a").await;
    let (_, host) = node.service(&[backend.addr]).await;
    let https = node.listener("https").await;
    let client = support::tls::TlsClient::new(&pebble.issuing_root(), &[b"http/1.1"]);
    let first = support::tls::TlsClient::peer_leaf(&client.connect(https, &host).await.unwrap());
    let serial = {
        let (_, cert) = x509_parser::parse_x509_certificate(&first).unwrap();
        cert.tbs_certificate.serial.to_str_radix(16)
    };

    let out = node.cli(&["cert", "revoke", &host]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The CA knows it revoked.
    let status = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&pebble.tls_ca)
        .arg(format!(
            "https://127.0.0.1:{}/cert-status-by-serial/{serial}",
            pebble.management.port()
        ))
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("Revoked"), "{status}");
    // And a new certificate takes its place.
    support::poll("a new certificate", || {
        let leaf = futures_block(client.connect(https, &host));
        (leaf != first).then_some(())
    });
}

/// The served leaf, from a blocking context (poll's closure).
fn futures_block(
    connect: impl std::future::Future<
        Output = std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    >,
) -> Vec<u8> {
    let stream =
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(connect))
            .unwrap();
    support::tls::TlsClient::peer_leaf(&stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_ca_says_it_does_not_revoke() {
    let node = Node::start();
    let backend = Backend::start("a").await;
    let (_, host) = node.service(&[backend.addr]).await;
    let out = node.cli(&["cert", "revoke", &host]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not revoke"), "{stderr}");
    // Renewal goes through the same path, and works with any issuer.
    let out = node.cli(&["cert", "renew", &host]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&format!("renewal of {host} requested"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_failures_at_the_primary_ca_the_fallback_ca_issues() {
    // The primary refuses every name of the zone; the fallback issues.
    let primary = PebblePlan::new();
    let fallback = PebblePlan::new();
    let section = format!(
        "[issuer]\nkind = \"acme\"\ndirectory_url = \"{}\"\nfallback_directories = [\"{}\"]\n\
         fallback_after_failures = 1\ntrust_roots = [\"{}\", \"{}\"]\n",
        primary.directory,
        fallback.directory,
        primary.tls_ca.display(),
        fallback.tls_ca.display()
    );
    let node = acme_node(&section);
    let dns = node.dns_addr().await;
    let http = node.listener("http").await;
    let _primary = primary.start(
        dns,
        http.port(),
        r#", "domainBlocklist": ["app.example.test"]"#,
    );
    let fallback = fallback.start(dns, http.port(), "");
    let backend = Backend::start("a").await;
    let created = node
        .api(
            hyper::Method::POST,
            "/v1/services",
            Some(serde_json::json!({ "backends": [backend.addr.to_string()] })),
        )
        .await;
    let id = created.json()["id"].as_str().unwrap().to_string();
    let host = format!("{id}.app.example.test");
    let cert = node
        .wait_certificate(&id, |c| c["status"] == "active")
        .await;
    assert_eq!(cert["status"], "active");
    // The certificate served chains to the fallback's root.
    let https = node.listener("https").await;
    let client = support::tls::TlsClient::new(&fallback.issuing_root(), &[b"http/1.1"]);
    client
        .connect(https, &host)
        .await
        .expect("a certificate from the fallback CA");
    assert!(
        node.log().contains("trying a fallback CA"),
        "{}",
        node.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_name_leaves_other_services_unaffected() {
    let plan = PebblePlan::new();
    let section = plan.issuer_section();
    let node = acme_node(&section);
    // Created before the CA is up: its first attempt fails and is retried later.
    let refused = service_pending(&node).await;
    node.wait_certificate(&refused, |c| c["status"] == "failed")
        .await;
    // The CA comes up refusing exactly that name.
    let dns = node.dns_addr().await;
    let http = node.listener("http").await;
    let _pebble = plan.start(
        dns,
        http.port(),
        &format!(r#", "domainBlocklist": ["{refused}.app.example.test"]"#),
    );
    let fine = service_pending(&node).await;
    let cert = node
        .wait_certificate(&fine, |c| c["status"] == "active")
        .await;
    assert_eq!(cert["status"], "active");
    let cert = node
        .wait_certificate(&refused, |c| {
            c["last_error"]["type"] == "urn:ietf:params:acme:error:rejectedIdentifier"
        })
        .await;
    assert_eq!(cert["status"], "failed", "{cert}");
    let again = node
        .wait_certificate(&fine, |c| c["status"] == "active")
        .await;
    assert_eq!(again["status"], "active");
}

/// `GET /.well-known/acme-challenge/<token>` on a node's HTTP listener for `host`: the body.
async fn challenge_answer(node: &Node, host: &str, token: &str) -> String {
    let http = node.listener("http").await;
    let (out, err) = curl(&[
        "--fail",
        "--resolve",
        &format!("{host}:{}:127.0.0.1", http.port()),
        &format!(
            "http://{host}:{}/.well-known/acme-challenge/{token}",
            http.port()
        ),
    ]);
    assert!(err.is_empty(), "{host} on {}: {err}", http);
    out
}

/// Creates the service `id` on `node` (each node has its own store here).
async fn service_with_id(node: &Node, id: &str, backend: std::net::SocketAddr) {
    let body = serde_json::json!({ "id": id, "backends": [backend.to_string()] });
    let created = support::http(
        hyper::Method::POST,
        &format!("{}/v1/services", node.admin),
        Some(&node.token),
        Some(("application/json", body.to_string().into_bytes())),
    )
    .await;
    assert_eq!(
        created.status,
        hyper::StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    assert_eq!(created.json()["id"], id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_that_share_only_the_account_answer_each_others_challenges() {
    // The operator's account key, given to both nodes; nothing else is shared.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("account.pem");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let plan = PebblePlan::new();
    let section = format!(
        "{}account_key_file = \"{}\"\n",
        plan.issuer_section(),
        key_file.display()
    );
    let (a, b) = (acme_node(&section), acme_node(&section));
    // Pebble asks node B's DNS and validates every challenge on node B's HTTP listener, so the
    // orders node A places are answered by B.
    let pebble = plan.start(b.dns_addr().await, b.listener("http").await.port(), "");

    let backend = Backend::start("shared").await;
    let id = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
    let host = format!("{id}.app.example.test");
    service_with_id(&b, id, backend.addr).await;
    service_with_id(&a, id, backend.addr).await;
    for node in [&a, &b] {
        node.wait_certificate(id, |c| c["status"] == "active").await;
    }

    // Both hold the one account: the same key authorization for any token, from either node.
    for token in ["LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0", "x_Y-z"] {
        let from_a = challenge_answer(&a, &host, token).await;
        let from_b = challenge_answer(&b, &host, token).await;
        assert_eq!(from_a, from_b);
        let (echoed, thumbprint) = from_a.split_once('.').unwrap();
        assert_eq!((echoed, thumbprint.len()), (token, 43), "{from_a}");
    }

    // And each serves its certificate, which Pebble issued after asking node B only.
    for node in [&a, &b] {
        let (code, err) = https_status(node, &pebble, &host, "/").await;
        assert_eq!(code, "200", "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_ordered_while_the_ca_is_down_are_issued_once_it_is_up() {
    let plan = PebblePlan::new();
    let section = plan.issuer_section();
    let node = acme_node(&section);
    // Nothing listens at the directory yet.
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(service_pending(&node).await);
    }
    let failed = node
        .wait_certificate(&ids[0], |c| c["status"] == "failed")
        .await;
    assert_eq!(
        failed["last_error"]["type"], "portcullis:ca-unreachable",
        "{failed}"
    );
    // The node serves on, and its account backs off rather than retry each name at once.
    let dns = node.dns_addr().await;
    let a = support::dns::q(
        dns,
        &format!("{}.app.example.test", ids[0]),
        hickory_proto::rr::RecordType::A,
    );
    assert_eq!(support::dns::rdata(&a), ["127.0.0.1"]);

    let pebble = plan.start(dns, node.listener("http").await.port(), "");
    for id in &ids {
        node.wait_certificate(id, |c| c["status"] == "active").await;
    }
    let host = format!("{}.app.example.test", ids[3]);
    let (code, err) = https_status(&node, &pebble, &host, "/").await;
    // The backend (port 9) is down: the proxy says so, over TLS with Pebble's certificate.
    assert_eq!(code, "502", "{err}");
}
