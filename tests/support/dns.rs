//! DNS clients for tests: hickory-proto messages over plain sockets, and `dig`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RecordType};
use hyper::{Method, StatusCode};
use serde_json::json;

use super::Node;

const TIMEOUT: Duration = Duration::from_secs(5);

/// A query as most resolvers send it: RD clear (we ask an authority), EDNS with 1232 bytes.
pub fn query_message(name: &str, rtype: RecordType) -> Message {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    m.set_edns(edns);
    m
}

pub fn udp_raw(server: SocketAddr, request: &[u8]) -> Option<Vec<u8>> {
    udp_raw_from("127.0.0.1", server, request)
}

/// A UDP exchange from a chosen loopback source address (all of 127/8 is local on Linux).
pub fn udp_raw_from(source: &str, server: SocketAddr, request: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind((source, 0)).expect("bind");
    socket.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    socket.send_to(request, server).expect("send");
    let mut buf = vec![0u8; 65535];
    match socket.recv(&mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

pub fn udp(server: SocketAddr, message: &Message) -> Message {
    let bytes = udp_raw(server, &message.to_vec().expect("encode")).expect("a UDP answer");
    Message::from_vec(&bytes).expect("a parseable answer")
}

pub fn udp_from(source: &str, server: SocketAddr, message: &Message) -> Message {
    let bytes =
        udp_raw_from(source, server, &message.to_vec().expect("encode")).expect("a UDP answer");
    Message::from_vec(&bytes).expect("a parseable answer")
}

pub fn tcp(server: SocketAddr, message: &Message) -> Message {
    let mut stream = TcpStream::connect(server).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let bytes = message.to_vec().expect("encode");
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    stream.write_all(&framed).expect("write");
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).expect("length");
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut body).expect("body");
    Message::from_vec(&body).expect("a parseable answer")
}

/// `q(server, "name", A)` over UDP.
pub fn q(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    udp(server, &query_message(name, rtype))
}

/// Runs dig against `server` with `args` and returns its stdout.
pub fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+norec", "+time=3", "+tries=1"])
        .args(args)
        .output()
        .expect("dig (package dnsutils) is installed by make test");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs dig as a stub resolver would (recursion desired), from a chosen loopback source.
pub fn dig_from(source: &str, server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .args(["-b", source, &format!("@{}", server.ip())])
        .args(["-p", &server.port().to_string()])
        .args(args)
        .output()
        .expect("dig (package dnsutils) is installed by make test");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dig +short`: the answer's RDATA lines, sorted.
pub fn dig_short(server: SocketAddr, name: &str, rtype: &str) -> Vec<String> {
    let mut lines: Vec<String> = dig(server, &["+short", name, rtype])
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

/// Answer RDATA in presentation form, sorted.
pub fn rdata(message: &Message) -> Vec<String> {
    let mut v: Vec<String> = message.answers.iter().map(|r| r.data.to_string()).collect();
    v.sort();
    v
}

/// A node for DNS tests: public addresses 192.0.2.10 and 2001:db8::10, nameservers
/// `ns1.app.example.test` (in the zone, so with glue) and `ns2.example.net`, a CAA, the extra
/// zone `internal`, one UDP worker.
pub fn dns_node() -> Node {
    dns_node_with("")
}

/// [`dns_node`] with more of the `[dns]` section (keys, then sub-tables) after its own keys.
pub fn dns_node_with(dns: &str) -> Node {
    Node::start_edited(|text| {
        text.replace(
            r#"public_ipv4 = ["127.0.0.1"]"#,
            "public_ipv4 = [\"192.0.2.10\"]\npublic_ipv6 = [\"2001:db8::10\"]",
        )
        .replace(
            r#"nameservers = ["ns1.example.test"]"#,
            r#"nameservers = ["ns1.app.example.test", "ns2.example.net"]"#,
        ) + "\n[dns]\nzones = [\"internal\"]\ncaa = ['0 issue \"letsencrypt.org\"']\nudp_workers = 1\n"
            + dns
    })
}

/// Adds a record set (TTL 600) through the API.
pub async fn add(node: &Node, name: &str, rtype: &str, data: &[&str]) {
    let r = node
        .api(
            Method::POST,
            "/v1/records",
            Some(json!({ "name": name, "type": rtype, "ttl": 600, "data": data })),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{name} {rtype}: {}",
        String::from_utf8_lossy(&r.body)
    );
}

/// Creates a service (its backend unused) and returns its id.
pub async fn create_service(node: &Node) -> String {
    let r = node
        .api(
            Method::POST,
            "/v1/services",
            Some(json!({ "backends": ["127.0.0.1:9"] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    r.json()["id"].as_str().unwrap().to_string()
}

/// Creates a service (its backend unused) under the caller's `id`.
pub async fn create_service_with_id(node: &Node, id: &str) {
    let r = node
        .api(
            Method::POST,
            "/v1/services",
            Some(json!({ "id": id, "backends": ["127.0.0.1:9"] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
}
