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
    wait_for(
        "C's DNS to answer for A's service with every node",
        async || (a_records(c_dns, &host) == everyone).then_some(()),
    )
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
        .api(Method::DELETE, &format!("/v1/records/www.{ZONE}/TXT"), None)
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
    assert!(
        table.contains("node-c") && table.contains("127.0.0.13"),
        "{table}"
    );
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
    eprintln!("B left the answers {took:?} after SIGKILL");
    assert!(
        took < Duration::from_secs(2) + Duration::from_secs(1),
        "B left the answers {took:?} after it died; its lease is 2 s, and the bound is lease + 1 s"
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
    let (status, err) = plan.serve_expecting_exit(0, &cluster.endpoints(), |t| {
        t.replace("127.0.0.11:0", "127.0.0.21:0")
    });
    assert!(!status.success());
    assert!(
        err.contains("another node with id `node-a` is live"),
        "{err}"
    );
    drop(first);
}

/// Requests and queries through every node until `stop`: each one counted, each failure kept.
struct Traffic {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    async fn start(nodes: &[Node], host: &str, client: Arc<TlsClient>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for node in nodes {
            let (https, dns) = support::fleet::addresses(node).await;
            let (stop, done, failures, client, host) = (
                stop.clone(),
                done.clone(),
                failures.clone(),
                client.clone(),
                host.to_string(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match https_get(&client, https, &host).await {
                        Ok((StatusCode::OK, _, _)) => {}
                        Ok((status, body, _)) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{https}: {status} {body}")),
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                    let name = host.clone();
                    let answer = tokio::task::spawn_blocking(move || a_records(dns, &name))
                        .await
                        .unwrap();
                    if answer.is_empty() {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{dns}: no A for {host}"));
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(POLL).await;
                }
            }));
        }
        Traffic {
            stop,
            done,
            failures,
            tasks,
        }
    }

    /// Stops, and fails the test on any failed request or query.
    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let failures = self.failures.lock().unwrap();
        assert!(
            failures.is_empty(),
            "{} failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        assert!(self.done.load(Ordering::Relaxed) > 20);
    }
}

/// A service on `backend`, created through the first node, once every node serves it: its
/// host, and a client trusting every node's CA.
async fn served_everywhere(nodes: &[Node], backend: &Backend) -> (String, Arc<TlsClient>) {
    let id = create(&nodes[0], &[backend.addr]).await;
    let host = format!("{id}.{ZONE}");
    let client = Arc::new(TlsClient::new(&roots(nodes), &[b"http/1.1"]));
    for node in nodes {
        let https = node.listener("https").await;
        wait_for("the service on every node", async || {
            let (status, _, _) = https_get(&client, https, &host).await.ok()?;
            (status == StatusCode::OK).then_some(())
        })
        .await;
    }
    (host, client)
}

async fn add_record(node: &Node, name: &str) -> support::Reply {
    node.api(
        Method::POST,
        "/v1/records",
        Some(json!({ "name": format!("{name}.{ZONE}"), "type": "TXT", "ttl": 60, "data": ["\"x\""] })),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_fails_no_request() {
    let mut cluster = EtcdCluster::start(3);
    let plan = FleetPlan::new();
    let nodes = plan.start(&cluster, 3);
    let backend = Backend::start("steady").await;
    let (host, client) = served_everywhere(&nodes, &backend).await;
    let traffic = Traffic::start(&nodes, &host, client.clone()).await;
    let leader = cluster.leader();
    cluster.kill(leader);
    let killed = Instant::now();
    // Writes come back within seconds, through every node.
    for (i, node) in nodes.iter().enumerate() {
        wait_for("a write to succeed after the leader died", async || {
            let r = add_record(node, &format!("after-{i}")).await;
            (r.status == StatusCode::CREATED).then_some(())
        })
        .await;
    }
    assert!(
        killed.elapsed() < Duration::from_secs(15),
        "{:?}",
        killed.elapsed()
    );
    cluster.restart(leader);
    traffic.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_etcd_member_down_the_fleet_serves_and_refuses_writes() {
    let mut cluster = EtcdCluster::start(3);
    let plan = FleetPlan::new();
    let mut nodes = plan.start(&cluster, 3);
    let backend = Backend::start("steady").await;
    let id = create(&nodes[0], &[backend.addr]).await;
    let host = format!("{id}.{ZONE}");
    // An ACME account, as an issuer would have stored it: challenges are answered from it.
    let thumbprint = "dGhpcyBpcyBhIHRodW1icHJpbnQ";
    let account = json!({
        "directory_url": "https://ca.example.test/dir",
        "account_url": "https://ca.example.test/acct/1",
        "thumbprint": thumbprint,
        "credentials_json": "",
        "created_at": "2026-01-01T00:00:00Z",
    });
    cluster.put(
        &format!("{}acme/account", plan.prefix),
        &account.to_string(),
    );
    let client = Arc::new(TlsClient::new(&roots(&nodes), &[b"http/1.1"]));
    // What the CA asks: the token under the service's own name, over plain HTTP.
    let challenge = async |node: &Node| -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let http = node.listener("http").await;
        let mut tcp = tokio::net::TcpStream::connect(http).await.unwrap();
        let request = format!(
            "GET /.well-known/acme-challenge/tok_en-1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .trim()
            .to_string();
        (status, body)
    };
    for node in &nodes {
        let https = node.listener("https").await;
        wait_for("the service and the account on every node", async || {
            let (status, _, _) = https_get(&client, https, &host).await.ok()?;
            let (answer, _) = challenge(node).await;
            (status == StatusCode::OK && answer == 200).then_some(())
        })
        .await;
    }

    // Through A and B: C is restarted during the outage.
    let traffic = Traffic::start(&nodes[..2], &host, client.clone()).await;
    for member in 0..3 {
        cluster.kill(member);
    }
    // Writes are refused, saying why, and nothing is half-written.
    let refused = wait_for("writes to answer 503", async || {
        let r = add_record(&nodes[1], "during").await;
        (r.status == StatusCode::SERVICE_UNAVAILABLE).then_some(r)
    })
    .await;
    assert_eq!(refused.code(), "store_unavailable");
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unreachable")
    );
    for node in &nodes {
        assert_eq!(
            challenge(node).await,
            (200, format!("tok_en-1.{thumbprint}"))
        );
    }
    // A node restarted meanwhile serves its copy, and says so.
    nodes[2].stop();
    nodes[2].restart();
    let ready = nodes[2].api(Method::GET, "/readyz", None).await.json();
    assert_eq!(ready["store"]["serving_from_cache"], true, "{ready}");
    let https = nodes[2].listener("https").await;
    let (status, _, _) = https_get(&client, https, &host).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let dns = nodes[2].dns_addr().await;
    assert!(!a_records(dns, &host).is_empty());
    traffic.finish().await;

    // etcd returns: a change made now reaches every node, the restarted one too.
    cluster.restart_all();
    let late = wait_for("a write once etcd is back", async || {
        let r = nodes[0]
            .api(
                Method::POST,
                "/v1/services",
                Some(json!({ "backends": [backend.addr.to_string()] })),
            )
            .await;
        (r.status == StatusCode::CREATED).then(|| r.json()["id"].as_str().unwrap().to_string())
    })
    .await;
    for node in &nodes {
        let dns = node.dns_addr().await;
        wait_for("the late service on every node", async || {
            (!a_records(dns, &format!("{late}.{ZONE}")).is_empty()).then_some(())
        })
        .await;
    }
    let ready = nodes[2].api(Method::GET, "/readyz", None).await.json();
    assert_eq!(ready["store"]["reachable"], true, "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_past_a_compaction_reads_everything_again() {
    let mut cluster = EtcdCluster::start(3);
    let plan = FleetPlan::new();
    let endpoints = cluster.endpoints();
    let a = plan.start_node(0, &endpoints[..2], |t| t);
    let c = plan.start_node(2, &endpoints[2..], |t| t);
    let doomed = create(&a, &["127.0.0.1:9".parse().unwrap()]).await;
    let c_dns = c.dns_addr().await;
    wait_for("C to see the first service", async || {
        (!a_records(c_dns, &format!("{doomed}.{ZONE}")).is_empty()).then_some(())
    })
    .await;

    // C's only member goes; the other two go on, and compact past what C has seen.
    cluster.kill(2);
    // The member killed may have led: writes answer 503 for the election's moment (a delete
    // whose outcome was unknown may have happened, and answers 404 the next time).
    wait_for(
        "the delete once the two members have a leader",
        async || {
            let r = a
                .api(Method::DELETE, &format!("/v1/services/{doomed}"), None)
                .await;
            assert!(
                [
                    StatusCode::NO_CONTENT,
                    StatusCode::SERVICE_UNAVAILABLE,
                    StatusCode::NOT_FOUND
                ]
                .contains(&r.status),
                "{}",
                r.json()
            );
            (r.status != StatusCode::SERVICE_UNAVAILABLE).then_some(())
        },
    )
    .await;
    let mut fresh = Vec::new();
    for _ in 0..5 {
        fresh.push(create(&a, &["127.0.0.1:9".parse().unwrap()]).await);
    }
    let revision = a.api(Method::GET, "/readyz", None).await.json()["revision"]
        .as_i64()
        .unwrap();
    cluster.compact(revision);
    assert!(
        !a_records(c_dns, &format!("{doomed}.{ZONE}")).is_empty(),
        "cut off, C still serves what it had"
    );

    cluster.restart(2);
    wait_for("C to converge after re-reading", async || {
        let gone = a_records(c_dns, &format!("{doomed}.{ZONE}")).is_empty();
        let all = fresh
            .iter()
            .all(|id| !a_records(c_dns, &format!("{id}.{ZONE}")).is_empty());
        (gone && all).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_sharing_a_ca_order_each_name_once() {
    let cluster = EtcdCluster::start(3);
    let plan = FleetPlan::new();
    let pebble_plan = support::pebble::PebblePlan::new();
    // Pebble validates http-01 on one port: each node listens on it at its own address, and
    // whichever node DNS names answers every challenge.
    let http_port = support::free_port();
    let issuer = pebble_plan.issuer_section();
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            plan.start_node(i, &cluster.endpoints(), |t| {
                t.replace(
                    &format!("http = \"{}:0\"", node_ip(i)),
                    &format!("http = \"{}:{http_port}\"", node_ip(i)),
                )
                .replace("[issuer]\nkind = \"dev\"\n", &issuer)
            })
        })
        .collect();
    let dns = nodes[0].dns_addr().await;
    let pebble = pebble_plan.start(dns, http_port, "");

    // 60 services created across the three nodes at once.
    let mut creating = Vec::new();
    for i in 0..60 {
        let admin = nodes[i % 3].admin.clone();
        let token = nodes[i % 3].token.clone();
        creating.push(tokio::spawn(async move {
            let r = support::http(
                Method::POST,
                &format!("{admin}/v1/services"),
                Some(&token),
                Some((
                    "application/json",
                    br#"{"backends":["127.0.0.1:9"]}"#.to_vec(),
                )),
            )
            .await;
            assert_eq!(r.status, StatusCode::CREATED);
        }));
    }
    for task in creating {
        task.await.unwrap();
    }
    for node in &nodes {
        let start = Instant::now();
        loop {
            let v = node.api(Method::GET, "/v1/certificates", None).await.json();
            let certs = v["certificates"].as_array().unwrap().clone();
            let active = certs.iter().filter(|c| c["status"] == "active").count();
            if active == 60 {
                break;
            }
            if start.elapsed() > DEADLINE {
                let mut statuses: Vec<String> = certs
                    .iter()
                    .map(|c| format!("{} {}", c["status"], c["last_error"]))
                    .collect();
                statuses.sort();
                statuses.dedup();
                panic!(
                    "{active} of 60 certificates active: {statuses:?}\n{}\n{}",
                    nodes
                        .iter()
                        .map(|n| n.log())
                        .collect::<Vec<_>>()
                        .join("\n----\n"),
                    pebble.log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
    let orders = pebble.log().matches("Added order").count();
    assert_eq!(orders, 60, "orders at Pebble:\n{}", pebble.log());

    // No private key is readable in etcd: certificates' keys and the account's are sealed.
    let raw = cluster.get_prefix_raw(&plan.prefix);
    assert!(!raw.contains("PRIVATE KEY"), "a PEM private key in etcd");
    let keys = cluster.get_prefix_raw(&format!("{}keys/", plan.prefix));
    let sealed = keys.lines().filter(|l| l.starts_with("PCS1")).count();
    assert_eq!(sealed, 60, "every stored key is sealed:\n{keys}");
    let account = cluster.get_prefix_raw(&format!("{}acme/account", plan.prefix));
    assert!(account.contains("\"sealed_credentials\""), "{account}");
    assert!(account.contains("\"credentials_json\":\"\""), "{account}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_endpoints_and_bad_values_are_reported_not_fatal() {
    // Nothing listens there: exit 70 with a line naming the endpoint and why.
    let plan = FleetPlan::new();
    let nowhere = format!("127.0.0.1:{}", support::free_port());
    let (status, err) = plan.serve_expecting_exit(0, std::slice::from_ref(&nowhere), |t| t);
    assert_eq!(status.code(), Some(70), "{err}");
    assert!(
        err.contains(&nowhere) && err.contains("store.etcd.endpoints"),
        "{err}"
    );

    // A value written by hand that does not parse: logged with its key, counted, skipped;
    // everything else is served.
    let cluster = EtcdCluster::start(1);
    let node = plan.start_node(0, &cluster.endpoints(), |t| t);
    let bad = format!(
        "{}services/00000000-0000-4000-8000-000000000001",
        plan.prefix
    );
    cluster.put(&bad, "{not json");
    let id = create(&node, &["127.0.0.1:9".parse().unwrap()]).await;
    let dns = node.dns_addr().await;
    wait_for("the good service in DNS", async || {
        (!a_records(dns, &format!("{id}.{ZONE}")).is_empty()).then_some(())
    })
    .await;
    assert!(
        node.metrics()
            .await
            .contains("portcullis_store_undecodable_values_total 1")
    );
    assert!(
        node.log()
            .contains("services/00000000-0000-4000-8000-000000000001")
    );

    // The same value read at start (a restart loads it from etcd) does not stop the node.
    let mut node = node;
    node.stop();
    node.restart();
    let dns = node.dns_addr().await;
    assert!(!a_records(dns, &format!("{id}.{ZONE}")).is_empty());
}

/// Alias domains in a fleet: added on one node, checked and ordered once for the fleet
/// (whichever node holds the name's lock), served by every node; DNS-01 values answered by
/// whichever node the CA's resolver asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_verify_and_certify_each_alias_once_and_both_serve_it() {
    use support::world::{Knot, Unbound};
    let cluster = EtcdCluster::start(1);
    let plan = FleetPlan::new();
    let pebble_plan = support::pebble::PebblePlan::new();
    let http_port = support::free_port();
    let resolver_port = support::free_port();
    let issuer = pebble_plan.issuer_section();
    let nodes: Vec<Node> = (0..2)
        .map(|i| {
            plan.start_node(i, &cluster.endpoints(), |t| {
                t.replace(
                    &format!("http = \"{}:0\"", node_ip(i)),
                    &format!("http = \"{}:{http_port}\"", node_ip(i)),
                )
                .replace("[issuer]\nkind = \"dev\"\n", &issuer)
                    + &format!(
                        "\n[verify]\nresolvers = [\"127.0.0.1:{resolver_port}\"]\nfirst_retry = \"200ms\"\nmax_retry = \"1s\"\n"
                    )
            })
        })
        .collect();
    let knot = Knot::start(&[("example.com", "")]);
    let platform_dns = vec![nodes[0].dns_addr().await, nodes[1].dns_addr().await];
    let unbound = Unbound::start(
        resolver_port,
        &[("example.com", vec![knot.addr]), (ZONE, platform_dns)],
    );
    let pebble = pebble_plan.start(unbound.addr, http_port, "");
    let backend = Backend::start("fleet").await;
    let id = create(&nodes[0], &[backend.addr]).await;
    let canonical = format!("{id}.{ZONE}");
    const ALIASES: usize = 8;
    let mut zone = String::new();
    for i in 0..ALIASES {
        zone.push_str(&format!("a{i} CNAME {canonical}.\n"));
    }
    // One name proven ahead of cutover: its DNS-01 value lives in the store, and either
    // node may be the one unbound asks.
    let pre = nodes[1]
        .api(
            Method::POST,
            &format!("/v1/services/{id}/domains"),
            Some(json!({ "name": "pre.example.com" })),
        )
        .await
        .json();
    let target = pre["instructions"]["acme_challenge"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    zone.push_str(&format!("_acme-challenge.pre CNAME {target}\n"));
    knot.set_zone("example.com", &zone);
    // Added on both nodes, half each.
    for i in 0..ALIASES {
        let r = nodes[i % 2]
            .api(
                Method::POST,
                &format!("/v1/services/{id}/domains"),
                Some(json!({ "name": format!("a{i}.example.com") })),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.json());
    }
    let pebble_root = pebble.issuing_root();
    let client = Arc::new(TlsClient::new(&pebble_root, &[b"http/1.1"]));
    for node in &nodes {
        let https = node.listener("https").await;
        for i in 0..ALIASES {
            let host = format!("a{i}.example.com");
            wait_for(
                &format!("{host} served by {https}"),
                async || match https_get(&client, https, &host).await {
                    Ok((StatusCode::OK, body, _)) if body.contains("\"fleet\"") => Some(()),
                    _ => None,
                },
            )
            .await;
        }
    }
    let early = wait_for("pre.example.com's certificate", async || {
        let v = nodes[0]
            .api(Method::GET, "/v1/domains/pre.example.com", None)
            .await
            .json();
        (v["certificate"]["status"] == "active").then_some(v)
    })
    .await;
    assert_eq!(early["status"], "failed", "not pointing here yet: {early}");

    // One order per name for the fleet: the canonical name, the aliases, the early one.
    let orders = pebble.log().matches("Added order").count();
    assert_eq!(
        orders,
        1 + ALIASES + 1,
        "orders at Pebble:\n{}",
        pebble.log()
    );
    // One successful check per alias across the fleet, whichever node ran it.
    let mut verified_checks = 0;
    for node in &nodes {
        let metrics = node.metrics().await;
        verified_checks += metrics
            .lines()
            .find(|l| l.starts_with("portcullis_domain_checks_total{outcome=\"verified\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<usize>().ok())
            .unwrap_or(0);
    }
    assert_eq!(verified_checks, ALIASES, "each alias checked once");
    let shown = nodes[1]
        .api(Method::GET, "/v1/domains/a0.example.com", None)
        .await
        .json();
    assert_eq!(shown["status"], "verified", "{shown}");
    let checker = shown["trace"]["node"].as_str().unwrap();
    assert!(checker == "node-a" || checker == "node-b", "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_a_fleet_node_fails_no_request_and_keeps_it_in_the_answers() {
    let cluster = EtcdCluster::start(1);
    let plan = FleetPlan::new();
    let mut nodes = plan.start(&cluster, 2);
    let backend = Backend::start("steady").await;
    let (host, client) = served_everywhere(&nodes, &backend).await;
    let https_a = nodes[0].listener("https").await;
    let dns_b = nodes[1].dns_addr().await;
    let both = vec![node_ip(0), node_ip(1)];
    assert_eq!(a_records(dns_b, &host), both);
    let traffic = Traffic::start(&nodes, &host, client.clone()).await;
    // Every answer the other node gives while node-a reloads still names node-a.
    let watching = Arc::new(AtomicBool::new(true));
    let answers = tokio::spawn({
        let (watching, host, both) = (watching.clone(), host.clone(), both.clone());
        async move {
            let mut wrong = Vec::new();
            while watching.load(Ordering::Relaxed) {
                let name = host.clone();
                let a = tokio::task::spawn_blocking(move || a_records(dns_b, &name))
                    .await
                    .unwrap();
                if a != both {
                    wrong.push(a);
                }
                tokio::time::sleep(POLL).await;
            }
            wrong
        }
    });

    nodes[0].reload().await;
    assert_eq!(nodes[0].listener("https").await, https_a);
    // The new process serves and writes (the fleet's store, its own copy of it).
    let r = add_record(&nodes[0], "after-reload").await;
    assert_eq!(r.status, StatusCode::CREATED);
    wait_for(
        "node-a's entry to be the new process's and live",
        async || {
            let nodes_view = nodes[1].api(Method::GET, "/v1/nodes", None).await.json();
            let live = nodes_view["nodes"]
                .as_array()?
                .iter()
                .any(|n| n["id"] == "node-a" && n["live"] == true);
            live.then_some(())
        },
    )
    .await;
    // The old process ended its lease before it exited: had that taken the entry with it,
    // node-b's answers would drop node-a within moments. Watch them a while longer (counted
    // in rounds of traffic, not time).
    let rounds = traffic.done.load(Ordering::Relaxed) + 40;
    wait_for("more rounds of traffic", async || {
        (traffic.done.load(Ordering::Relaxed) >= rounds).then_some(())
    })
    .await;
    watching.store(false, Ordering::Relaxed);
    let wrong = answers.await.unwrap();
    assert!(wrong.is_empty(), "answers without node-a: {wrong:?}");
    traffic.finish().await;
}
