//! What keeps a node small and steady with many services: certificates loaded on demand into a
//! bounded cache, and a state file and memory that stop growing under steady churn.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod support;

use std::time::Instant;

use hyper::{Method, Request, StatusCode};
use support::backend::Backend;
use support::tls::{HttpConn, TlsClient, body_text};
use support::{DEADLINE, Node, POLL};

/// A metric's value in a scrape, summed over its series.
fn metric(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A request through the edge on a new connection with a full handshake (a client of its own:
/// a resumed session would show the certificate of the session it resumes); returns the leaf
/// the handshake presented.
async fn get_through(node: &Node, host: &str) -> Vec<u8> {
    let client = TlsClient::new(&node.root_pem(), &[b"http/1.1"]);
    let https = node.listener("https").await;
    let stream = client.connect(https, host).await.expect("TLS handshake");
    let leaf = TlsClient::peer_leaf(&stream);
    let (mut conn, _) = HttpConn::open(stream).await;
    let response = conn
        .send(
            Request::get(format!("https://{host}/echo"))
                .header("host", host)
                .body(http_body_util::Full::new(hyper::body::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{host}");
    let body = body_text(response).await;
    assert!(body.contains("\"backend\""), "{host}: {body}");
    leaf
}

/// More names than the cache holds: every handshake succeeds (a name not in the cache costs a
/// store read), the cache stays at its bound, and a renewal is served to the next handshakes
/// while clients keep connecting.
#[tokio::test(flavor = "multi_thread")]
async fn certificates_load_by_name_into_a_bounded_cache() {
    const CACHE: usize = 3;
    let node = Node::start_edited(|text| {
        text.replace(
            "[proxy]\n",
            &format!("[proxy]\ncertificate_cache = {CACHE}\n"),
        )
    });
    let backend = Backend::start("a").await;
    let mut hosts = Vec::new();
    for _ in 0..8 {
        hosts.push(node.service(&[backend.addr]).await.1);
    }
    let mut leaves = Vec::new();
    for round in 0..3 {
        for (i, host) in hosts.iter().enumerate() {
            let leaf = get_through(&node, host).await;
            if round == 0 {
                leaves.push(leaf);
            } else {
                assert_eq!(leaf, leaves[i], "{host} kept its certificate");
            }
        }
        let metrics = node.metrics().await;
        let entries = metric(&metrics, "portcullis_certificate_cache_entries");
        assert!(
            (1.0..=CACHE as f64).contains(&entries),
            "cache holds {entries} keys, bound {CACHE}"
        );
    }
    let metrics = node.metrics().await;
    let misses = metric(&metrics, "portcullis_certificate_cache_misses_total");
    assert!(
        misses > hosts.len() as f64,
        "cycling 8 names through a cache of {CACHE} reloads some: {misses} misses"
    );

    // A renewal, with handshakes going on: each one succeeds, and they move to the new
    // certificate without a restart.
    let renewed = &hosts[0];
    let reply = node
        .api(
            Method::POST,
            &format!("/v1/certificates/{renewed}/renew"),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let start = Instant::now();
    loop {
        let leaf = get_through(&node, renewed).await;
        // The others keep being served meanwhile, through the same small cache.
        get_through(
            &node,
            &hosts[1 + start.elapsed().subsec_millis() as usize % 7],
        )
        .await;
        if leaf != leaves[0] {
            break;
        }
        if start.elapsed() > DEADLINE {
            let view = node.api(Method::GET, "/v1/certificates", None).await;
            panic!(
                "the renewed certificate never reached new handshakes: {}\n{}",
                String::from_utf8_lossy(&view.body),
                node.log()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let entries = metric(
        &node.metrics().await,
        "portcullis_certificate_cache_entries",
    );
    assert!(entries <= CACHE as f64, "cache holds {entries} keys");
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One round of churn from several clients at once: each creates services, changes their
/// backends, then deletes them; every answer is checked.
async fn churn_round(node: &Node, clients: usize, per_client: usize) {
    let admin = node.admin.clone();
    let token = node.token.clone();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (admin, token) = (admin.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let call = |method, path: String, body: Option<serde_json::Value>| {
                let (admin, token) = (admin.clone(), token.clone());
                async move {
                    support::http(
                        method,
                        &format!("{admin}{path}"),
                        Some(&token),
                        body.map(|b| ("application/json", b.to_string().into_bytes())),
                    )
                    .await
                }
            };
            let mut ids = Vec::new();
            for _ in 0..per_client {
                let reply = call(
                    Method::POST,
                    "/v1/services".into(),
                    Some(serde_json::json!({"backends": ["127.0.0.1:9"]})),
                )
                .await;
                assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.code());
                ids.push(reply.json()["id"].as_str().unwrap().to_string());
            }
            for id in &ids {
                let reply = call(
                    Method::PATCH,
                    format!("/v1/services/{id}"),
                    Some(serde_json::json!({"backends": ["127.0.0.1:10", "127.0.0.1:11"]})),
                )
                .await;
                assert_eq!(reply.status, StatusCode::OK, "{}", reply.code());
            }
            for id in &ids {
                let reply = call(Method::DELETE, format!("/v1/services/{id}"), None).await;
                assert!(reply.status.is_success(), "{}", reply.code());
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Services created, changed and deleted in a loop: once the churn is steady, neither the state
/// file nor the node's memory keeps growing with it.
#[tokio::test(flavor = "multi_thread")]
async fn steady_churn_keeps_the_state_file_and_memory_flat() {
    // Few clients: each concurrent request can hold a blocking thread of the node's runtime,
    // whose stacks and allocator caches would show in RSS as growth that is not per service.
    const CLIENTS: usize = 2;
    const PER_CLIENT: usize = 100;
    let node = Node::start_edited(|text| {
        text.replace(
            "[store]\n",
            "[store]\nhistory = 500\ntombstone_retention = \"1s\"\n",
        )
    });
    let file = node.state_dir().join("state.redb");
    let size = || std::fs::metadata(&file).unwrap().len();
    // Warm up: the change log fills to its bound, allocators and caches reach their size.
    for _ in 0..4 {
        churn_round(&node, CLIENTS, PER_CLIENT).await;
    }
    let (file_before, rss_before) = (size(), rss_bytes(node.pid()));
    const ROUNDS: usize = 8;
    for round in 0..ROUNDS {
        churn_round(&node, CLIENTS, PER_CLIENT).await;
        eprintln!(
            "after round {}: state.redb {} bytes, RSS {} bytes, {} threads",
            round + 5,
            size(),
            rss_bytes(node.pid()),
            threads(node.pid())
        );
    }
    let (file_after, rss_after) = (size(), rss_bytes(node.pid()));
    let churned = (ROUNDS * CLIENTS * PER_CLIENT) as u64;
    // A leak of a service's certificate (its chain and key, a few KiB) shows as KiBs per churned
    // service. redb grows its file in regions (a step of half the file was seen once the churn
    // was steady), so the file's bound is per churned service plus one such step, not a ratio.
    // The RSS bound leaves room for what a debug build does on a loaded machine (tokio's and the
    // allocator's own growth, a MiB or so per round).
    assert!(
        file_after <= file_before + churned * 512 + file_before / 2,
        "state.redb grew from {file_before} to {file_after} bytes over {churned} churned services"
    );
    assert!(
        rss_after <= rss_before + churned * 1024 + 4 * 1024 * 1024,
        "RSS grew from {rss_before} to {rss_after} bytes over {churned} churned services"
    );
    let count = node.api(Method::GET, "/v1/services", None).await.json();
    assert_eq!(
        count["services"].as_array().map(Vec::len),
        Some(0),
        "{count}"
    );
}
