//! Whole-process measurements of a fleet, driven from outside like a user would:
//!
//!   fleet_probe propagation --admin http://A --token T --dns C_DNS --zone Z [--count 1000]
//!     writes `count` TXT records through A's admin API, one at a time, and times each from the
//!     moment it is sent until C's DNS answers it; prints p50, p99 and max.
//!   fleet_probe writes --admin http://A --token T [--clients 16] [--seconds 10]
//!     creates services through one node's API with concurrent keep-alive clients; prints
//!     writes per second.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench tool: a failed step ends it

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn required(args: &[String], name: &str) -> String {
    arg(args, name).unwrap_or_else(|| panic!("{name} is required"))
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn post(client: &HttpClient, url: &str, token: &str, body: String) -> u16 {
    let request = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = client.request(request).await.expect("admin API");
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    status
}

fn answered(socket: &UdpSocket, dns: SocketAddr, name: &Name, id: u16) -> bool {
    let mut query = Message::query();
    query.metadata.id = id;
    query.add_query(Query::query(name.clone(), RecordType::TXT));
    socket.send_to(&query.to_vec().unwrap(), dns).unwrap();
    let mut buf = [0u8; 1500];
    loop {
        let Ok(n) = socket.recv(&mut buf) else {
            return false;
        };
        let Ok(reply) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if reply.metadata.id == id {
            return !reply.answers.is_empty();
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn propagation(args: &[String]) {
    let admin = required(args, "--admin");
    let token = required(args, "--token");
    let dns: SocketAddr = required(args, "--dns").parse().unwrap();
    let zone = required(args, "--zone");
    let count: usize = arg(args, "--count").map_or(1000, |c| c.parse().unwrap());
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let run = std::process::id();
    let mut took = Vec::with_capacity(count);
    for i in 0..count {
        let label = format!("p{run}-{i}");
        let name = Name::from_ascii(format!("{label}.{zone}.")).unwrap();
        let body =
            format!(r#"{{"name":"{label}.{zone}","type":"TXT","ttl":60,"data":["\"{i}\""]}}"#);
        let url = format!("{admin}/v1/records");
        let start = Instant::now();
        // The write and the polling of the other node run at once: the clock stops when the
        // other node answers, whether or not the writer has answered yet.
        let (socket2, name2) = (socket.clone(), name.clone());
        let poll = tokio::task::spawn_blocking(move || {
            let deadline = start + Duration::from_secs(10);
            let mut id = 0u16;
            loop {
                id = id.wrapping_add(1);
                if answered(&socket2, dns, &name2, id) {
                    return Some(start.elapsed());
                }
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let status = post(&client, &url, &token, body).await;
        assert_eq!(status, 201, "write {i} refused");
        took.push(
            poll.await
                .unwrap()
                .expect("a change never reached the other node"),
        );
    }
    took.sort();
    println!(
        "propagation of {count} changes, write through A until C's DNS answers: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        percentile(&took, 0.5).as_secs_f64() * 1e3,
        percentile(&took, 0.99).as_secs_f64() * 1e3,
        took.last().unwrap().as_secs_f64() * 1e3,
    );
}

async fn writes(args: &[String]) {
    let admin = required(args, "--admin");
    let token = required(args, "--token");
    let clients: usize = arg(args, "--clients").map_or(16, |c| c.parse().unwrap());
    let seconds: u64 = arg(args, "--seconds").map_or(10, |c| c.parse().unwrap());
    let done = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (admin, token, done) = (admin.clone(), token.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
            let url = format!("{admin}/v1/services");
            while Instant::now() < deadline {
                let status = post(
                    &client,
                    &url,
                    &token,
                    r#"{"backends":["127.0.0.1:9"]}"#.into(),
                )
                .await;
                assert_eq!(status, 201, "a create was refused");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let n = done.load(Ordering::Relaxed);
    println!(
        "{n} creates in {:.1} s with {clients} clients: {:.0} writes/s",
        start.elapsed().as_secs_f64(),
        n as f64 / start.elapsed().as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("propagation") => propagation(&args).await,
        Some("writes") => writes(&args).await,
        _ => eprintln!("usage: fleet_probe propagation|writes ... (see the source's header)"),
    }
}
