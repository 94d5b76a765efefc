//! Active health checks at scale, end to end: one check per backend target however many
//! services share it, none for a lone backend unless asked, and never more than the node's
//! budget of checks per second.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod support;

use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use support::backend::Backend;
use support::{DEADLINE, Node};

async fn metrics(node: &Node) -> String {
    let reply = support::http(Method::GET, &format!("{}/metrics", node.admin), None, None).await;
    String::from_utf8(reply.body).unwrap()
}

/// The value of an unlabelled series, once `/metrics` has it.
fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `/metrics` until the series `name` has `wanted`.
async fn wait_metric(node: &Node, name: &str, wanted: f64) {
    let start = Instant::now();
    loop {
        let text = metrics(node).await;
        if value(&text, name) == Some(wanted) {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "{name} never {wanted}:\n{text}");
        tokio::time::sleep(support::POLL).await;
    }
}

/// Polls until `count()` reaches `n`; how long that took.
async fn wait_count(what: &str, n: usize, count: impl Fn() -> usize) -> Duration {
    let start = Instant::now();
    while count() < n {
        assert!(start.elapsed() < DEADLINE, "{what}: {} of {n}", count());
        tokio::time::sleep(support::POLL).await;
    }
    start.elapsed()
}

async fn create(node: &Node, body: Value) -> String {
    let r = node.api(Method::POST, "/v1/services", Some(body)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
    r.json()["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_services_sharing_two_backends_cause_one_check_per_backend() {
    let node = Node::start();
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let check = json!({"interval_ms": 200, "timeout_ms": 100});
    for _ in 0..50 {
        let body = json!({"backends": [a.addr.to_string(), b.addr.to_string()],
                          "options": {"health_check": check}});
        create(&node, body).await;
    }
    wait_metric(&node, "portcullis_health_check_targets", 2.0).await;

    // Ten more checks at a take ten intervals (2 s; less only by network jitter), not a
    // fiftieth of that.
    wait_count("checks at a", 1, || a.checks()).await;
    let from = a.checks();
    let took = wait_count("checks at a", from + 10, || a.checks()).await;
    assert!(
        took >= Duration::from_millis(1_500),
        "10 checks in {took:?}: more than one per interval"
    );
    assert!(b.checks() >= 10, "b has {} checks", b.checks());
    // One check serves every service of the backend, so it names the backend, not a service.
    assert_eq!(
        a.check_host.lock().unwrap().as_deref(),
        Some(a.addr.to_string().as_str())
    );
    assert_eq!(a.hits() + b.hits(), 0, "checks counted as visitors");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lone_backend_is_checked_only_when_the_service_asks() {
    let node = Node::start();
    let lone = Backend::start("lone").await;
    let asked = Backend::start("asked").await;
    let fast = json!({"interval_ms": 100, "timeout_ms": 100});
    let lone_id = create(
        &node,
        json!({"backends": [lone.addr.to_string()], "options": {"health_check": fast}}),
    )
    .await;
    let mut always = fast.clone();
    always["active"] = json!("always");
    let asked_id = create(
        &node,
        json!({"backends": [asked.addr.to_string()], "options": {"health_check": always}}),
    )
    .await;

    // Three checks of the service that asked take two intervals at least; the other service,
    // made first, would have had two of its own by then.
    wait_count("checks at the backend that asked", 3, || asked.checks()).await;
    assert_eq!(lone.checks(), 0, "a lone backend was checked by default");
    let shown = node
        .api(Method::GET, &format!("/v1/services/{lone_id}"), None)
        .await
        .json();
    assert_eq!(
        shown["options"]["health_check"]["active"], "auto",
        "{shown}"
    );
    assert_eq!(shown["options"]["metrics"], "basic", "{shown}");

    // Asking turns them on.
    let path = format!("/v1/services/{lone_id}");
    let r = node
        .api(
            Method::PATCH,
            &path,
            Some(json!({"options": {"health_check": always}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json());
    wait_count("checks at the lone backend", 1, || lone.checks()).await;
    wait_metric(&node, "portcullis_health_check_targets", 2.0).await;

    // The switch from before `active` still works, and is shown as `active`.
    let off = json!({"options": {"health_check": {"enabled": false}}});
    let r = node
        .api(
            Method::PATCH,
            &format!("/v1/services/{asked_id}"),
            Some(off),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json());
    assert_eq!(r.json()["options"]["health_check"]["active"], "never");
    assert!(r.json()["options"]["health_check"].get("enabled").is_none());
    wait_metric(&node, "portcullis_health_check_targets", 1.0).await;

    for (bad, says) in [
        (
            json!({"enabled": false, "active": "always"}),
            "give only `active`",
        ),
        (json!({"active": "sometimes"}), "auto"),
    ] {
        let r = node
            .api(
                Method::PATCH,
                &path,
                Some(json!({"options": {"health_check": bad}})),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(r.code(), "validation_failed");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(says), "{bad}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_budget_holds_with_a_hundred_targets_due_ten_times_a_second() {
    let budget = 20.0;
    let node = Node::start_edited(|text| {
        text.replace("[proxy]\n", "[proxy]\nhealth_checks_per_second = 20\n")
    });
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    // 50 services checking the two backends at paths of their own: 100 targets every 100 ms
    // would be 1,000 checks a second.
    for i in 0..50 {
        let check = json!({"path": format!("/h{i}"), "interval_ms": 100, "timeout_ms": 100});
        let body = json!({"backends": [a.addr.to_string(), b.addr.to_string()],
                          "options": {"health_check": check}});
        create(&node, body).await;
    }
    wait_metric(&node, "portcullis_health_check_targets", 100.0).await;
    // Each target every 100 / 20 = 5 s instead.
    let text = metrics(&node).await;
    assert_eq!(
        value(&text, "portcullis_health_check_interval_floor_seconds"),
        Some(5.0),
        "{text}"
    );

    let total = || a.checks() + b.checks();
    let from = total();
    let n = 40;
    let took = wait_count("checks", from + n, total).await;
    let rate = n as f64 / took.as_secs_f64();
    assert!(
        rate <= budget * 1.2,
        "{rate:.1} checks a second with a budget of {budget}"
    );
}
