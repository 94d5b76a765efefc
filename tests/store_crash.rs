//! A node killed (SIGKILL) in the middle of a burst of creates from concurrent clients keeps
//! every create it answered: the store answers a write only after the fsync of the group it was
//! committed in, however many writes share it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod support;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{DEADLINE, Node};
use tokio::sync::mpsc;

const CLIENTS: usize = 8;
/// Creates answered before the kill: enough for groups of several writes to have committed, and
/// for the kill to land while every client has a create in flight.
const BEFORE_KILL: usize = 150;

/// Posts creates on one keep-alive connection until the node goes away, sending the id of each
/// one answered `201`.
async fn create_until_killed(url: String, token: String, acked: mpsc::UnboundedSender<String>) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = Bytes::from_static(br#"{"backends":["127.0.0.1:9"]}"#);
    loop {
        let request = Request::builder()
            .method(Method::POST)
            .uri(&url)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))
            .unwrap();
        // An error is the kill: this request's create may or may not have committed.
        let Ok(response) = client.request(request).await else {
            return;
        };
        let status = response.status();
        let Ok(body) = response.into_body().collect().await else {
            return;
        };
        let body = body.to_bytes();
        assert_eq!(
            status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&body)
        );
        let created: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let id = created["id"].as_str().expect("an id").to_string();
        if acked.send(id).is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_create_answered_before_sigkill_is_there_after_restart() {
    let mut node = Node::start();
    let (acked_tx, mut acked_rx) = mpsc::unbounded_channel();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(create_until_killed(
                format!("{}/v1/services", node.admin),
                node.token.clone(),
                acked_tx.clone(),
            ))
        })
        .collect();
    drop(acked_tx);

    let mut acked = Vec::new();
    while acked.len() < BEFORE_KILL {
        let id = tokio::time::timeout(DEADLINE, acked_rx.recv())
            .await
            .expect("creates too slow")
            .expect("every client stopped before the kill");
        acked.push(id);
    }
    node.kill();
    for client in clients {
        tokio::time::timeout(DEADLINE, client)
            .await
            .expect("a client hung on the killed node")
            .unwrap();
    }
    // The answers that arrived between the count and the kill.
    while let Ok(id) = acked_rx.try_recv() {
        acked.push(id);
    }

    node.restart();
    for id in &acked {
        let got = node
            .api(Method::GET, &format!("/v1/services/{id}"), None)
            .await;
        assert_eq!(
            got.status,
            StatusCode::OK,
            "service {id}, answered 201, is lost"
        );
    }
    // And the store takes writes again.
    let after = node
        .api(
            Method::POST,
            "/v1/services",
            Some(serde_json::json!({"backends": ["127.0.0.1:9"]})),
        )
        .await;
    assert_eq!(after.status, StatusCode::CREATED);
    eprintln!("{} creates answered before the kill, all kept", acked.len());
}
