//! A fleet of nodes on a real three-member etcd cluster: one platform served by every node,
//! node liveness in DNS answers, and nothing lost when a node or etcd fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use serde_json::json;

use support::backend::Backend;
use support::dns::{q, rdata};
use support::etcd::EtcdCluster;
use support::fleet::{FleetPlan, node_ip, roots};
use support::tls::{HttpConn, TlsClient, body_text};
use support::{DEADLINE, Node, POLL};

const ZONE: &str = "app.example.test";

/// One HTTPS request on a new connection (a full handshake, so certificate selection runs):
/// the status, the body and the leaf certificate served.
async fn https_get(
    client: &TlsClient,
    https: SocketAddr,
    host: &str,
) -> Result<(StatusCode, String, Vec<u8>), String> {
    let stream = client
        .connect(https, host)
        .await
        .map_err(|e| format!("TLS to {https}: {e}"))?;
    let leaf = TlsClient::peer_leaf(&stream);
    let (mut conn, _) = HttpConn::open(stream).await;
    let request = Request::builder()
        .uri(format!("https://{host}/"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = conn
        .send(request)
        .await
        .map_err(|e| format!("request to {https}: {e}"))?;
    let status = response.status();
    Ok((status, body_text(response).await, leaf))
}

/// The A records a node's DNS gives for `name`, sorted.
fn a_records(dns: SocketAddr, name: &str) -> Vec<String> {
    rdata(&q(dns, name, RecordType::A))
}

async fn wait_for<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

async fn create(node: &Node, backends: &[SocketAddr]) -> String {
    let r = node
        .api(
            Method::POST,
            "/v1/services",
            Some(json!({ "backends": backends.iter().map(|b| b.to_string()).collect::<Vec<_>>() })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
    r.json()["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_serve_one_platform() {
    let cluster = EtcdCluster::start(3);
    let plan = FleetPlan::new();
    let nodes = plan.start(&cluster, 3);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let backend = Backend::start("one").await;
    let client = TlsClient::new(&roots(&nodes), &[b"http/1.1"]);

    // Created on A: answers in DNS on C, with every live node; served through B.
    let id = create(a, &[backend.addr]).await;
    let host = format!("{id}.{ZONE}");
    let c_dns = c.dns_addr().await;
    let everyone: Vec<String> = (0..3).map(node_ip).collect();
    wait_for("C's DNS to answer for A's service with every node", async || {
        (a_records(c_dns, &host) == everyone).then_some(())
    })
    .await;
    let mut leaves = Vec::new();
    for node in &nodes {
        let https = node.listener("https").await;
        let (status, body, leaf) = wait_for("the service over HTTPS", async || {
            https_get(&client, https, &host).await.ok()
        })
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        leaves.push(leaf);
    }
    assert!(
        leaves.windows(2).all(|w| w[0] == w[1]),
        "every node serves the one certificate issued for the fleet"
    );

    // Changed on B: holds on A and C.
    let other = Backend::start("two").await;
    let r = b
        .api(
            Method::PATCH,
            &format!("/v1/services/{id}"),
            Some(json!({ "backends": [other.addr.to_string()], "status": "suspended" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json());
    for node in [a, c] {
        let https = node.listener("https").await;
        wait_for("the suspension on every node", async || {
            let (status, _, _) = https_get(&client, https, &host).await.ok()?;
            (status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
        })
        .await;
    }
    let r = b
        .api(
            Method::PATCH,
            &format!("/v1/services/{id}"),
            Some(json!({ "status": "active" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    for node in [a, c] {
        let https = node.listener("https").await;
        let hits = other.hits();
        wait_for("the new backend behind every node", async || {
            let (status, _, _) = https_get(&client, https, &host).await.ok()?;
            (status == StatusCode::OK && other.hits() > hits).then_some(())
        })
        .await;
    }

    // Custom records: added on C, answered by A; removed on A, gone from B.
    let r = c
        .api(
            Method::POST,
            "/v1/records",
            Some(json!({ "name": format!("www.{ZONE}"), "type": "TXT", "ttl": 60, "data": ["\"fleet\""] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
    let a_dns = a.dns_addr().await;
    let b_dns = b.dns_addr().await;
    wait_for("the TXT record on A", async || {
        (rdata(&q(a_dns, &format!("www.{ZONE}"), RecordType::TXT)) == ["fleet"]).then_some(())
    })
    .await;
    let r = a
        .api(
            Method::DELETE,
            &format!("/v1/records/www.{ZONE}/TXT"),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    wait_for("the TXT record gone from B", async || {
        rdata(&q(b_dns, &format!("www.{ZONE}"), RecordType::TXT))
            .is_empty()
            .then_some(())
    })
    .await;

    // Deleted on C: gone everywhere.
    let r = c
        .api(Method::DELETE, &format!("/v1/services/{id}"), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    for node in &nodes {
        let dns = node.dns_addr().await;
        wait_for("the deletion in every node's DNS", async || {
            a_records(dns, &host).is_empty().then_some(())
        })
        .await;
    }

    // Every node lists the fleet, each up to date.
    let listed = wait_for("every node to report its revision", async || {
        let v = a.api(Method::GET, "/v1/nodes", None).await.json();
        let nodes = v["nodes"].as_array()?.clone();
        (nodes.len() == 3 && nodes.iter().all(|n| n["lag"] == 0)).then_some(v)
    })
    .await;
    assert_eq!(listed["nodes"][1]["id"], "node-b");
    let out = b.cli(&["node", "list"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("node-c") && table.contains("127.0.0.13"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_dns_within_its_lease_and_comes_back() {
    let cluster = EtcdCluster::start(3);
    let plan = FleetPlan::new();
    let mut nodes = plan.start(&cluster, 3);
    let id = create(&nodes[0], &["127.0.0.1:9".parse().unwrap()]).await;
    let host = format!("{id}.{ZONE}");
    let a_dns = nodes[0].dns_addr().await;
    let c_dns = nodes[2].dns_addr().await;
    let everyone: Vec<String> = (0..3).map(node_ip).collect();
    let without_b = vec![node_ip(0), node_ip(2)];
    wait_for("every node in the answers", async || {
        (a_records(a_dns, &host) == everyone).then_some(())
    })
    .await;

    // Clients keep asking A and C throughout; every answer names A and C, and B or not.
    let stop = Arc::new(AtomicBool::new(false));
    let asked = Arc::new(AtomicUsize::new(0));
    let mut askers = Vec::new();
    for dns in [a_dns, c_dns] {
        let (stop, asked, host, everyone, without_b) = (
            stop.clone(),
            asked.clone(),
            host.clone(),
            everyone.clone(),
            without_b.clone(),
        );
        askers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let answer = a_records(dns, &host);
                assert!(
                    answer == everyone || answer == without_b,
                    "{dns} answered {answer:?}"
                );
                asked.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(POLL);
            }
        }));
    }
    nodes[1].kill();
    let killed = Instant::now();
    for dns in [a_dns, c_dns] {
        wait_for("B to leave the answers", async || {
            (a_records(dns, &host) == without_b).then_some(())
        })
        .await;
    }
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(3) + Duration::from_secs(1),
        "B left the answers {took:?} after it died; its lease is 2 s"
    );

    // Restarted on the same state: it takes its own entry back at once and is answered again.
    nodes[1].restart();
    for dns in [a_dns, c_dns] {
        wait_for("B back in the answers", async || {
            (a_records(dns, &host) == everyone).then_some(())
        })
        .await;
    }

    // A graceful stop leaves the answers before the node stops serving.
    let b_https = nodes[1].listener("https").await;
    let term = std::process::Command::new("kill")
        .args(["-TERM", &nodes[1].pid().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    wait_for("B to leave the answers on SIGTERM", async || {
        (a_records(a_dns, &host) == without_b).then_some(())
    })
    .await;
    assert!(
        tokio::net::TcpStream::connect(b_https).await.is_ok(),
        "B still serves once the answers no longer name it"
    );
    nodes[1].stop();

    stop.store(true, Ordering::Relaxed);
    for asker in askers {
        asker.join().unwrap();
    }
    assert!(asked.load(Ordering::Relaxed) > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_a_live_nodes_id_is_refused() {
    let cluster = EtcdCluster::start(1);
    let plan = FleetPlan::new();
    let first = plan.start_node(0, &cluster.endpoints(), |t| t);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        plan.config(0, &dir.path().join("state"), &cluster.endpoints())
            .replace("127.0.0.11:0", "127.0.0.21:0"),
    )
    .unwrap();
    let out = std::process::Command::new(support::bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("another node with id `node-a` is live"),
        "{err}"
    );
    drop(first);
}
