//! Who gets what from the DNS responder: answers by client network (source address and EDNS
//! Client Subnet), forwarding for allowed networks only, response rate limiting, and zone
//! transfers for allowed networks. A real node, hickory messages over sockets, and `dig`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{IpAddr, UdpSocket};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use support::Node;
use support::dns::{
    add, create_service, dig, dig_from, dns_node_with, query_message, rdata, tcp, udp, udp_from,
};

const ZONE: &str = "app.example.test";

fn with_subnet(name: &str, rtype: RecordType, addr: &str, source: u8) -> Message {
    let mut m = query_message(name, rtype);
    let ip: IpAddr = addr.parse().unwrap();
    m.edns
        .as_mut()
        .unwrap()
        .options_mut()
        .insert(EdnsOption::Subnet(ClientSubnet::new(ip, source, 0)));
    m
}

fn echoed_subnet(m: &Message) -> Option<(IpAddr, u8, u8)> {
    match m.edns.as_ref()?.option(EdnsCode::Subnet)? {
        EdnsOption::Subnet(s) => Some((s.addr(), s.source_prefix(), s.scope_prefix())),
        _ => None,
    }
}

const BY_CLIENT: &str = r#"policy = "by-client"

[[dns.clients]]
networks = ["10.0.0.0/8"]
addresses = ["192.0.2.1"]

[[dns.clients]]
networks = ["127.0.0.0/8"]
nodes = ["test-1"]
addresses = ["192.0.2.2"]

[[dns.clients]]
networks = ["127.0.0.2/32"]
addresses = ["192.0.2.3", "2001:db8::3"]
"#;

#[tokio::test]
async fn by_client_answers_by_source_address_and_client_subnet() {
    let node = dns_node_with(BY_CLIENT);
    let dns = node.dns_addr().await;
    let id = create_service(&node).await;
    let host = format!("{id}.{ZONE}");

    // By source address, with the fast path's cache in between: alternate the two clients.
    for _ in 0..3 {
        let mine = udp_from("127.0.0.1", dns, &query_message(&host, RecordType::A));
        // The group names this node (192.0.2.10) and a static address.
        assert_eq!(rdata(&mine), ["192.0.2.10", "192.0.2.2"]);
        assert!(echoed_subnet(&mine).is_none(), "no ECS asked, none sent");
        let other = udp_from("127.0.0.2", dns, &query_message(&host, RecordType::A));
        assert_eq!(rdata(&other), ["192.0.2.3"]);
    }
    let https = udp_from("127.0.0.2", dns, &query_message(&host, RecordType::HTTPS));
    assert_eq!(
        rdata(&https),
        ["1 . alpn=h2,http/1.1, ipv4hint=192.0.2.3, ipv6hint=2001:db8::3,"]
    );
    // Over TCP too.
    let over_tcp = tcp(dns, &query_message(&host, RecordType::A));
    assert_eq!(rdata(&over_tcp), ["192.0.2.10", "192.0.2.2"]);

    // By EDNS Client Subnet, which wins over the (resolver's) source address. The scope says
    // how wide the answer holds: all of 10/8 here (no other group inside it).
    let ecs = udp(dns, &with_subnet(&host, RecordType::A, "10.1.2.0", 24));
    assert_eq!(rdata(&ecs), ["192.0.2.1"]);
    assert_eq!(
        echoed_subnet(&ecs),
        Some(("10.1.2.0".parse().unwrap(), 24, 8))
    );
    let hints = udp(dns, &with_subnet(&host, RecordType::HTTPS, "10.1.2.0", 24));
    assert!(
        rdata(&hints)[0].contains("ipv4hint=192.0.2.1,"),
        "{hints:?}"
    );
    // A client in no listed network gets the fleet (this node), for a scope that leaves 10/8
    // and 127/8 out: 198.51.100.0 shares no first bit with either, so /1.
    let default = udp(dns, &with_subnet(&host, RecordType::A, "198.51.100.0", 24));
    assert_eq!(rdata(&default), ["192.0.2.10"]);
    assert_eq!(
        echoed_subnet(&default),
        Some(("198.51.100.0".parse().unwrap(), 24, 1))
    );
    // The more specific network inside 127/8 narrows the scope of 127.0.0.0/24 to /31... but
    // the client sent only 24 bits, so the answer holds for those 24 and no more.
    let narrowed = udp(dns, &with_subnet(&host, RecordType::A, "127.0.0.0", 24));
    assert_eq!(rdata(&narrowed), ["192.0.2.10", "192.0.2.2"]);
    assert_eq!(echoed_subnet(&narrowed).map(|e| e.2), Some(24));
    // An answer the same for everyone says so with scope 0.
    let soa = udp(dns, &with_subnet(ZONE, RecordType::SOA, "10.1.2.0", 24));
    assert_eq!(soa.metadata.response_code, ResponseCode::NoError);
    assert_eq!(echoed_subnet(&soa).map(|e| e.2), Some(0));
    // Address bits past the source prefix are a malformed option (RFC 7871 §7.1.2).
    let bad = udp(dns, &with_subnet(&host, RecordType::A, "10.1.2.0", 20));
    assert_eq!(bad.metadata.response_code, ResponseCode::FormErr);

    // dig, a real client, sends ECS and prints the echo with its scope.
    let out = dig(dns, &["+subnet=10.9.0.0/16", &host, "A"]);
    assert!(out.contains("CLIENT-SUBNET: 10.9.0.0/16/8"), "{out}");
    assert!(out.contains("192.0.2.1"), "{out}");
}

#[tokio::test]
async fn by_client_needs_a_client_table() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portcullis.toml");
    let text =
        support::config_text(&dir.path().join("state")) + "\n[dns]\npolicy = \"by-client\"\n";
    std::fs::write(&config, text).unwrap();
    let out = std::process::Command::new(support::bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[[dns.clients]]"), "{stderr}");
}

#[tokio::test]
async fn forwarding_only_for_allowed_networks() {
    // The upstream: another node, authoritative for another zone.
    let upstream = Node::start_edited(|t| t.replace("app.example.test", "other.test"));
    add(&upstream, "www.other.test", "A", &["198.51.100.7"]).await;
    let upstream_dns = upstream.dns_addr().await;

    let node = dns_node_with(&format!(
        "\n[dns.forward]\nallow_from = [\"127.0.0.1/32\"]\nupstreams = [\"{upstream_dns}\"]\n"
    ));
    let dns = node.dns_addr().await;
    let id = create_service(&node).await;

    let allowed = udp_from(
        "127.0.0.1",
        dns,
        &query_message("www.other.test", RecordType::A),
    );
    assert_eq!(allowed.metadata.response_code, ResponseCode::NoError);
    assert_eq!(rdata(&allowed), ["198.51.100.7"]);
    assert!(allowed.metadata.recursion_available);
    assert!(
        !allowed.metadata.authoritative,
        "a forwarded answer is not ours"
    );
    // Again (from hickory-resolver's cache now), and over TCP.
    let again = udp_from(
        "127.0.0.1",
        dns,
        &query_message("www.other.test", RecordType::A),
    );
    assert_eq!(rdata(&again), ["198.51.100.7"]);
    let over_tcp = tcp(dns, &query_message("www.other.test", RecordType::A));
    assert_eq!(rdata(&over_tcp), ["198.51.100.7"]);
    // A name upstream does not have: NXDOMAIN with upstream's SOA.
    let missing = udp_from(
        "127.0.0.1",
        dns,
        &query_message("nope.other.test", RecordType::A),
    );
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(missing.authorities.len(), 1);
    assert_eq!(missing.authorities[0].record_type(), RecordType::SOA);
    // Our own names stay authoritative for the same client.
    let ours = udp_from(
        "127.0.0.1",
        dns,
        &query_message(&format!("{id}.{ZONE}"), RecordType::A),
    );
    assert!(ours.metadata.authoritative);
    assert_eq!(rdata(&ours), ["192.0.2.10"]);

    // Anyone else is refused: never an open resolver.
    let refused = udp_from(
        "127.0.0.2",
        dns,
        &query_message("www.other.test", RecordType::A),
    );
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
    assert!(refused.answers.is_empty());
    // dig from the allowed source, with recursion asked as a stub resolver asks.
    let out = dig_from("127.0.0.1", dns, &["+short", "www.other.test", "A"]);
    assert_eq!(out.trim(), "198.51.100.7");
    let out = dig_from("127.0.0.2", dns, &["www.other.test", "A"]);
    assert!(out.contains("status: REFUSED"), "{out}");
}

#[tokio::test]
async fn rate_limit_drops_and_slips_over_udp_only() {
    let node =
        dns_node_with("\n[dns.rate_limit]\nresponses_per_second = 5\nslip = 2\nexempt = []\n");
    let dns = node.dns_addr().await;
    let id = create_service(&node).await;
    let host = format!("{id}.{ZONE}");
    let request = query_message(&host, RecordType::A).to_vec().unwrap();

    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    const SENT: usize = 40;
    for _ in 0..SENT {
        socket.send_to(&request, dns).unwrap();
    }
    // Read until the node has been quiet for a while: what it dropped never comes.
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let (mut full, mut truncated) = (0, 0);
    let mut buf = [0u8; 2048];
    while let Ok(n) = socket.recv(&mut buf) {
        let m = Message::from_vec(&buf[..n]).unwrap();
        if m.metadata.truncation {
            assert!(m.answers.is_empty());
            assert!(
                n <= request.len(),
                "a slipped answer is no larger than the query"
            );
            truncated += 1;
        } else {
            assert_eq!(rdata(&m), ["192.0.2.10"]);
            full += 1;
        }
    }
    // The burst (5) and whatever the rate refilled while sending (a few ms).
    assert!((5..=7).contains(&full), "{full} full answers");
    assert!(truncated >= 10, "{truncated} truncated answers");
    assert!(full + truncated < SENT, "some answers were dropped");
    // TCP is not limited (its source cannot be spoofed).
    for _ in 0..10 {
        assert_eq!(
            rdata(&tcp(dns, &query_message(&host, RecordType::A))),
            ["192.0.2.10"]
        );
    }
}

#[tokio::test]
async fn zone_transfer_for_allowed_networks_only() {
    let node = dns_node_with("transfer_from = [\"127.0.0.1/32\"]\n");
    let dns = node.dns_addr().await;
    let id = create_service(&node).await;
    add(
        &node,
        "www.app.example.test",
        "CNAME",
        &[&format!("{id}.{ZONE}.")],
    )
    .await;
    // Enough records to need several messages.
    for i in 0..210 {
        add(&node, &format!("t{i}.app.example.test"), "TXT", &["\"x\""]).await;
    }
    let text = dig_from("127.0.0.1", dns, &["+onesoa", "AXFR", ZONE]);
    // dig pads with tabs or spaces by name length: compare with single spaces.
    let records: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert!(records[0].contains(" SOA "), "{text}");
    for wanted in [
        format!("{id}.{ZONE}. 300 IN A 192.0.2.10"),
        format!("{id}.{ZONE}. 300 IN AAAA 2001:db8::10"),
        format!("www.{ZONE}. 600 IN CNAME {id}.{ZONE}."),
        format!("ns1.{ZONE}. 300 IN A 192.0.2.10"),
        format!("{ZONE}. 3600 IN NS ns1.{ZONE}."),
        format!("{ZONE}. 3600 IN CAA 0 issue \"letsencrypt.org\""),
        format!("t209.{ZONE}. 600 IN TXT \"x\""),
    ] {
        assert!(records.contains(&wanted), "{wanted} missing from\n{text}");
    }
    assert!(
        records.iter().any(|r| r.contains(" HTTPS 1 . alpn=")),
        "{text}"
    );
    // SOA, NS ×2, CAA, glue for ns1 (made A, AAAA), service A/AAAA/HTTPS, CNAME, 210 TXT;
    // +onesoa prints the closing SOA once.
    assert_eq!(records.len(), 1 + 2 + 1 + 2 + 3 + 1 + 210, "{text}");
    let size = text
        .lines()
        .find(|l| l.starts_with(";; XFR size"))
        .unwrap_or_default();
    assert!(
        !size.contains("messages 1,"),
        "several messages expected: {size}"
    );

    // From another source: refused, as is AXFR over UDP from anyone.
    let out = dig_from("127.0.0.2", dns, &["AXFR", ZONE]);
    assert!(out.contains("Transfer failed"), "{out}");
    let over_udp = udp(dns, &query_message(ZONE, RecordType::AXFR));
    assert_eq!(over_udp.metadata.response_code, ResponseCode::Refused);
}
