//! The admin API of a real `portcullis serve` process: auth, validation errors, the CRUD round
//! trip, tombstones, certificates.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod support;

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Node, Reply, http};

const JSON: &str = "application/json";

struct Api<'a> {
    node: &'a Node,
}

impl Api<'_> {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let url = format!("{}{path}", self.node.admin);
        let body = body.map(|b| (JSON, b.to_string().into_bytes()));
        http(method, &url, Some(&self.node.token), body).await
    }

    async fn create(&self, body: Value) -> Reply {
        self.call(Method::POST, "/v1/services", Some(body)).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_is_required_except_for_health() {
    let node = Node::start();
    let url = format!("{}/v1/services", node.admin);

    let none = http(Method::GET, &url, None, None).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.code(), "unauthorized");
    assert_eq!(none.headers["www-authenticate"], "Bearer");

    let wrong = http(Method::GET, &url, Some("not-the-token"), None).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let body = Some((JSON, br#"{"backends":["127.0.0.1:1"]}"#.to_vec()));
    let post = http(Method::POST, &url, Some("x"), body).await;
    assert_eq!(post.status, StatusCode::UNAUTHORIZED, "writes too");

    let right = http(Method::GET, &url, Some(&node.token), None).await;
    assert_eq!(right.status, StatusCode::OK);

    for path in ["/healthz", "/readyz"] {
        let r = http(Method::GET, &format!("{}{path}", node.admin), None, None).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
    }
    let ready = http(Method::GET, &format!("{}/readyz", node.admin), None, None).await;
    assert_eq!(ready.json()["status"], "ready");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_validation_error_names_its_field() {
    let node = Node::start();
    let api = Api { node: &node };
    let cases = [
        (json!({"backends": []}), "backends", "at least one backend"),
        (
            json!({"backends": ["10.0.0.1"]}),
            "backends[0]",
            "has no port",
        ),
        (
            json!({"backends": ["10.0.0.1:0"]}),
            "backends[0]",
            "1 to 65535",
        ),
        (
            json!({"backends": ["10.0.0.1:70000"]}),
            "backends[0]",
            "1 to 65535",
        ),
        (
            json!({"backends": ["10.0.0.300:80"]}),
            "backends[0]",
            "not an IPv4 address",
        ),
        (json!({"backends": ["::1:80"]}), "backends[0]", "brackets"),
        (
            json!({"backends": ["bad_name:80"]}),
            "backends[0]",
            "RFC 1123",
        ),
        (
            json!({"backends": ["10.0.0.1:80", "10.0.0.1:80"]}),
            "backends[1]",
            "listed twice",
        ),
        (
            json!({"backends": ["10.0.0.1:80"], "status": "paused"}),
            "status",
            "not a service status",
        ),
    ];
    for (body, field, words) in cases {
        let r = api.create(body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        let v = r.json();
        assert_eq!(v["error"]["code"], "validation_failed", "{body}: {v}");
        assert_eq!(v["error"]["field"], field, "{body}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{body}: {message}");
    }
    let too_many: Vec<String> = (1..=65).map(|p| format!("10.0.0.1:{p}")).collect();
    let r = api.create(json!({ "backends": too_many })).await;
    assert_eq!(r.json()["error"]["field"], "backends");

    // Shape errors of the body itself.
    let url = format!("{}/v1/services", node.admin);
    let t = Some(node.token.as_str());
    let r = api
        .create(json!({"backends": ["10.0.0.1:80"], "extra": 1}))
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "validation_failed")
    );
    assert!(String::from_utf8_lossy(&r.body).contains("extra"));
    let r = api.create(json!({"backends": "10.0.0.1:80"})).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "validation_failed")
    );
    let r = api.create(json!({})).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "validation_failed")
    );
    assert!(String::from_utf8_lossy(&r.body).contains("backends"));
    let r = http(Method::POST, &url, t, Some((JSON, b"{not json".to_vec()))).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_json")
    );
    let r = http(Method::POST, &url, t, Some(("text/plain", b"{}".to_vec()))).await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(r.code(), "unsupported_media_type");
    let huge = format!(r#"{{"backends":["{}"]}}"#, "a".repeat(100 * 1024));
    let r = http(Method::POST, &url, t, Some((JSON, huge.into_bytes()))).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "body_too_large");

    let r = api.call(Method::GET, "/v1/services?limit=0", None).await;
    assert_eq!(r.json()["error"]["field"], "limit");
    let r = api.call(Method::GET, "/v1/services?after=nope", None).await;
    assert_eq!(r.json()["error"]["field"], "after");
    let r = api.call(Method::GET, "/v1/nothing-here", None).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let r = api.call(Method::PUT, "/v1/services", None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.code(), "method_not_allowed");

    let list = api.call(Method::GET, "/v1/services", None).await.json();
    assert_eq!(list["services"], json!([]), "nothing invalid was stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn crud_round_trip_with_tombstone_and_certificate() {
    let mut node = Node::start();
    let api = Api { node: &node };

    let created = api.create(json!({"backends": ["127.0.0.1:3000"]})).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let service = created.json();
    let id = service["id"].as_str().unwrap().to_string();
    assert_eq!(created.headers["location"], format!("/v1/services/{id}"));
    assert_eq!(
        service["canonical_domain"],
        format!("{id}.app.example.test"),
        "canonical domain is <id>.<zone>"
    );
    assert_eq!(service["status"], "active");
    assert_eq!(service["backends"], json!(["127.0.0.1:3000"]));
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "4", "a UUID v4");
    let cert = &service["certificate"];
    assert_eq!(cert["domains"], json!([format!("{id}.app.example.test")]));

    // The dev issuer takes the pending certificate up without being asked.
    let path = format!("/v1/services/{id}");
    let active = support::poll("the certificate to become active", || {
        let rt = tokio::runtime::Handle::current();
        let v =
            tokio::task::block_in_place(|| rt.block_on(api.call(Method::GET, &path, None))).json();
        (v["certificate"]["status"] == "active").then_some(v)
    });
    assert_eq!(active["certificate"]["issuer"], "dev");
    assert!(active["certificate"]["not_after"].is_string());
    let certs = api.call(Method::GET, "/v1/certificates", None).await.json();
    assert_eq!(certs["certificates"].as_array().unwrap().len(), 1);
    assert!(
        !certs.to_string().contains("PRIVATE KEY"),
        "no key material in listings"
    );

    // Update: backends and status.
    let patched = api
        .call(
            Method::PATCH,
            &path,
            Some(json!({"backends": ["127.0.0.1:3001", "[::1]:3002"], "status": "suspended"})),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK);
    let patched = patched.json();
    assert_eq!(patched["backends"], json!(["127.0.0.1:3001", "[::1]:3002"]));
    assert_eq!(patched["status"], "suspended");
    assert_eq!(patched["created_at"], service["created_at"]);
    assert_ne!(patched["updated_at"], service["updated_at"]);
    let r = api.call(Method::PATCH, &path, Some(json!({}))).await;
    assert_eq!(r.json()["error"]["field"], "body");
    let r = api
        .call(Method::PATCH, &path, Some(json!({"backends": ["x"]})))
        .await;
    assert_eq!(r.json()["error"]["field"], "backends[0]");
    let shown = api.call(Method::GET, &path, None).await.json();
    assert_eq!(
        shown["backends"], patched["backends"],
        "a failed patch changed nothing"
    );

    // Paging over several services.
    let mut ids = vec![id.clone()];
    for port in 1..=4 {
        let r = api
            .create(json!({"backends": [format!("127.0.0.1:{port}")]}))
            .await;
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut query = "/v1/services?limit=2".to_string();
    loop {
        let page = api.call(Method::GET, &query, None).await.json();
        let services = page["services"].as_array().unwrap();
        assert!(services.len() <= 2);
        seen.extend(
            services
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_string()),
        );
        match page["next"].as_str() {
            Some(next) => query = format!("/v1/services?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, ids);

    // A healthy certificate counts in the totals only; once the service asks for detailed
    // metrics its expiry has a series, while the service lives.
    let expiry =
        format!("portcullis_certificate_expiry_seconds{{domain=\"{id}.app.example.test\"}} ");
    let metrics = |reply: Reply| String::from_utf8(reply.body).unwrap();
    let basic = metrics(api.call(Method::GET, "/metrics", None).await);
    assert!(!basic.contains(&expiry), "{basic}");
    for wanted in [
        "portcullis_certificates{status=\"active\"} ",
        "portcullis_certificates_expiring{within=\"7d\"} 0\n",
        "portcullis_certificate_soonest_expiry_timestamp_seconds ",
    ] {
        assert!(basic.contains(wanted), "{wanted} missing:\n{basic}");
    }
    let detailed = json!({"options": {"metrics": "detailed"}});
    let r = api.call(Method::PATCH, &path, Some(detailed)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json());
    assert_eq!(r.json()["options"]["metrics"], "detailed");
    let before = metrics(api.call(Method::GET, "/metrics", None).await);
    let seconds: f64 = before
        .lines()
        .find_map(|l| l.strip_prefix(&expiry))
        .unwrap_or_else(|| panic!("{expiry} missing:\n{before}"))
        .parse()
        .unwrap();
    assert!(seconds > 3600.0, "{seconds}");

    // Delete leaves a tombstone: the id stays gone, with its own error code.
    let r = api.call(Method::DELETE, &path, None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let after = metrics(api.call(Method::GET, "/metrics", None).await);
    assert!(
        !after.contains(&expiry),
        "a deleted service's certificate stays in:\n{after}"
    );
    for method in [Method::GET, Method::DELETE] {
        let r = api.call(method.clone(), &path, None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{method}");
        assert_eq!(r.code(), "service_deleted", "{method}");
    }
    let r = api
        .call(Method::PATCH, &path, Some(json!({"status": "active"})))
        .await;
    assert_eq!(r.code(), "service_deleted");
    let unknown = "/v1/services/00000000-0000-4000-8000-000000000000";
    let r = api.call(Method::GET, unknown, None).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let certs = api.call(Method::GET, "/v1/certificates", None).await.json();
    assert!(
        !certs.to_string().contains(&id),
        "the deleted service's certificate went with it"
    );

    let status = node.stop();
    assert!(status.success(), "SIGTERM exits 0, got {status}");
    assert!(
        !node.state_dir().join("admin.url").exists(),
        "admin.url removed on exit"
    );

    // Everything written survives a restart: the four live services, and the tombstone.
    node.restart();
    let api = Api { node: &node };
    let list = api.call(Method::GET, "/v1/services", None).await.json();
    let mut after: Vec<String> = list["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    after.sort();
    let mut expected = ids.clone();
    expected.retain(|i| *i != id);
    assert_eq!(after, expected);
    let r = api.call(Method::GET, &path, None).await;
    assert_eq!(r.code(), "service_deleted");
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_expiring_within_a_span_are_listed_soonest_first() {
    let node = Node::start();
    let api = Api { node: &node };
    let created = api.create(json!({"backends": ["127.0.0.1:3000"]})).await;
    let id = created.json()["id"].as_str().unwrap().to_string();
    node.wait_certificate(&id, |c| c["status"] == "active")
        .await;
    let domain = format!("{id}.app.example.test");

    let list = |query: &'static str| {
        let api = &api;
        async move {
            let r = api
                .call(Method::GET, &format!("/v1/certificates{query}"), None)
                .await;
            assert_eq!(r.status, StatusCode::OK, "{query}: {}", r.json());
            r.json()["certificates"].as_array().unwrap().clone()
        }
    };
    // The plain listing keeps its shape, and carries no chain or key.
    let all = list("").await;
    assert_eq!(all.len(), 1);
    let mut keys: Vec<&str> = all[0]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "attempts",
            "domains",
            "issuer",
            "last_error",
            "next_attempt_at",
            "not_after",
            "not_before",
            "status"
        ]
    );
    assert_eq!(all[0]["domains"], json!([domain]));

    // The dev CA's certificates last 90 days.
    assert!(list("?expiring_within=7d").await.is_empty());
    assert!(list("?expiring_within=90s").await.is_empty());
    assert!(list("?expiring_within=2000h").await.is_empty());
    let soon = list("?expiring_within=91d").await;
    assert_eq!(soon.len(), 1);
    assert_eq!(soon[0]["domains"], json!([domain]));

    for bad in ["7w", "soon", "", "1.5d", "-1d"] {
        let r = api
            .call(
                Method::GET,
                &format!("/v1/certificates?expiring_within={bad}"),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(r.code(), "validation_failed", "{bad}");
        assert_eq!(r.json()["error"]["field"], "expiring_within", "{bad}");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("e.g. 90s, 12h or 7d"), "{bad}: {message}");
    }
    let r = api
        .call(Method::GET, "/v1/certificates?expiring=7d", None)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "validation_failed");

    // The CLI passes the span on.
    let out = node.cli(&["cert", "list", "--expiring-within", "91d"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&domain),
        "{out:?}"
    );
    let out = node.cli(&["cert", "list", "--expiring-within", "7d"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&domain),
        "{out:?}"
    );
    let out = node.cli(&["cert", "list", "--expiring-within", "7 d"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a span of time"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_can_be_created_under_the_callers_id_once() {
    let node = Node::start();
    let api = Api { node: &node };
    let id = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
    let body = json!({"id": id, "backends": ["127.0.0.1:3000"]});

    let created = api.create(body.clone()).await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.json()["id"], id);
    assert_eq!(
        created.json()["canonical_domain"],
        format!("{id}.app.example.test")
    );
    let shown = api
        .call(Method::GET, &format!("/v1/services/{id}"), None)
        .await;
    assert_eq!(shown.status, StatusCode::OK);

    // The id is taken: a retry of the same request says so rather than make a second service.
    let again = api.create(body.clone()).await;
    assert_eq!(
        (again.status, again.code().as_str()),
        (StatusCode::CONFLICT, "conflict")
    );
    assert!(
        again.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("PATCH")
    );
    let list = api.call(Method::GET, "/v1/services", None).await.json();
    assert_eq!(list["services"].as_array().unwrap().len(), 1);

    // A deleted id stays deleted.
    let deleted = api
        .call(Method::DELETE, &format!("/v1/services/{id}"), None)
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let again = api.create(body).await;
    assert_eq!(
        (again.status, again.code().as_str()),
        (StatusCode::NOT_FOUND, "service_deleted")
    );

    // Not a UUID: the field is named.
    let bad = api
        .create(json!({"id": "web-1", "backends": ["127.0.0.1:3000"]}))
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.json()["error"]["field"], "id");
}

/// Reads from `tcp` until the node closes it; the bytes read, and how long that took.
async fn read_to_close(tcp: &mut tokio::net::TcpStream) -> (String, std::time::Duration) {
    use tokio::io::AsyncReadExt;
    let start = std::time::Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(support::DEADLINE, tcp.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "the admin listener never closed the connection"
    );
    (
        String::from_utf8_lossy(&answer).into_owned(),
        start.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_listener_closes_idle_partial_and_stalled_connections() {
    use tokio::io::AsyncWriteExt;
    let node = support::Node::start_edited(|text| {
        text.replace(
            "header_read_timeout = \"2s\"",
            "header_read_timeout = \"1s\"",
        )
        .replace("idle_timeout = \"3s\"", "idle_timeout = \"1s\"")
    });
    let addr = node.admin.trim_start_matches("http://").to_string();
    let connect = || tokio::net::TcpStream::connect(addr.clone());
    // Closed after about the configured 1s: not at once (the lower bound leaves room for the
    // time between the server's accept and this side's first read on a loaded machine), and
    // not minutes later.
    let soon = std::time::Duration::from_secs(10);

    // Connected, and nothing sent.
    let mut idle = connect().await.unwrap();
    let (_, took) = read_to_close(&mut idle).await;
    assert!(
        took >= std::time::Duration::from_millis(500) && took < soon,
        "idle connection closed after {took:?}"
    );

    // Half a request head.
    let mut partial = connect().await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nX-Half")
        .await
        .unwrap();
    let (_, took) = read_to_close(&mut partial).await;
    assert!(
        took >= std::time::Duration::from_millis(500) && took < soon,
        "partial head closed after {took:?}"
    );

    // A body that stops after two bytes: answered 408 and closed.
    let mut stalled = connect().await.unwrap();
    let head = format!(
        "POST /v1/services HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"",
        node.token
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let (answer, took) = read_to_close(&mut stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(
        took >= std::time::Duration::from_millis(500) && took < soon,
        "stalled body answered after {took:?}"
    );

    // A body declared far over the cap is refused before any of it is read.
    let mut huge = connect().await.unwrap();
    let head = format!(
        "POST /v1/services HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{{\"",
        node.token
    );
    huge.write_all(head.as_bytes()).await.unwrap();
    let (answer, took) = read_to_close(&mut huge).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    assert!(took < soon, "oversized body answered after {took:?}");

    // The API itself is as it was.
    let ok = http(Method::GET, &format!("{}/healthz", node.admin), None, None).await;
    assert_eq!(ok.status, StatusCode::OK);
}
