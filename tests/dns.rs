//! The authoritative DNS responder, end to end: a real node, queried with hickory's message
//! types over sockets and with `dig`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::RecordType;
use hyper::{Method, StatusCode};
use serde_json::json;
use support::dns::{
    add, create_service, create_service_with_id, dig, dig_short, dns_node, q, query_message, rdata,
    tcp, udp, udp_raw,
};

const ZONE: &str = "app.example.test";

#[tokio::test]
async fn service_names_answer_addresses_and_https() {
    let node = dns_node();
    let dns = node.dns_addr().await;
    let id = create_service(&node).await;
    let host = format!("{id}.{ZONE}");

    let a = q(dns, &host, RecordType::A);
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.metadata.authoritative);
    assert_eq!(rdata(&a), ["192.0.2.10"]);
    assert_eq!(a.answers[0].ttl, 300);
    assert_eq!(dig_short(dns, &host, "A"), ["192.0.2.10"]);
    assert_eq!(dig_short(dns, &host, "AAAA"), ["2001:db8::10"]);
    assert_eq!(
        dig_short(dns, &host, "HTTPS"),
        [r#"1 . alpn="h2,http/1.1" ipv4hint=192.0.2.10 ipv6hint=2001:db8::10"#]
    );
    // Case in the question is kept; the answer is the same.
    let mixed = q(dns, &host.to_uppercase(), RecordType::A);
    assert_eq!(rdata(&mixed), ["192.0.2.10"]);
    assert_eq!(
        mixed.queries[0].name().to_ascii(),
        format!("{}.", host.to_uppercase())
    );
    // A type the name lacks: NODATA with the SOA, negative TTL = min(SOA TTL, MINIMUM).
    let txt = q(dns, &host, RecordType::TXT);
    assert_eq!(txt.metadata.response_code, ResponseCode::NoError);
    assert!(txt.answers.is_empty());
    assert_eq!(txt.authorities[0].record_type(), RecordType::SOA);
    assert_eq!(txt.authorities[0].ttl, 300);
    // An unknown service id: NXDOMAIN.
    let missing = q(dns, &format!("{}.{ZONE}", uuid_like()), RecordType::A);
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    assert!(missing.metadata.authoritative);
}

fn uuid_like() -> &'static str {
    "00000000-0000-4000-8000-000000000000"
}

#[tokio::test]
async fn apex_has_soa_ns_with_glue_and_caa() {
    let node = dns_node();
    let dns = node.dns_addr().await;
    let soa = dig_short(dns, ZONE, "SOA");
    assert_eq!(soa.len(), 1);
    assert!(
        soa[0].starts_with("ns1.app.example.test. hostmaster.app.example.test. "),
        "{soa:?}"
    );
    assert!(soa[0].ends_with(" 14400 3600 1209600 300"), "{soa:?}");
    assert_eq!(
        dig_short(dns, ZONE, "NS"),
        ["ns1.app.example.test.", "ns2.example.net."]
    );
    // Glue for the in-zone nameserver only.
    let ns = q(dns, ZONE, RecordType::NS);
    let glue: Vec<String> = ns
        .additionals
        .iter()
        .map(|r| format!("{} {}", r.name, r.data))
        .collect();
    assert_eq!(
        glue,
        [
            "ns1.app.example.test. 192.0.2.10",
            "ns1.app.example.test. 2001:db8::10"
        ]
    );
    assert_eq!(dig_short(dns, "ns1.app.example.test", "A"), ["192.0.2.10"]);
    assert_eq!(
        dig_short(dns, ZONE, "CAA"),
        [r#"0 issue "letsencrypt.org""#]
    );

    // The serial rises with a change of zone data.
    let serial = |m: &Message| match &m.answers[0].data {
        hickory_proto::rr::RData::SOA(soa) => soa.serial,
        other => panic!("not an SOA: {other:?}"),
    };
    let before = serial(&q(dns, ZONE, RecordType::SOA));
    create_service(&node).await;
    let after = serial(&q(dns, ZONE, RecordType::SOA));
    assert!(after > before, "serial {before} -> {after}");
}

#[tokio::test]
async fn custom_records_of_every_type_answer_through_dig() {
    let node = dns_node();
    let dns = node.dns_addr().await;
    add(
        &node,
        "web-server.internal",
        "A",
        &["10.0.0.10", "10.0.0.11"],
    )
    .await;
    add(&node, "web-server.internal", "AAAA", &["fd00::10"]).await;
    add(&node, "db.internal", "CNAME", &["web-server.internal"]).await;
    add(&node, "info.app.example.test", "TXT", &[r#""v=spf1 -all""#]).await;
    add(
        &node,
        "app.example.test",
        "MX",
        &["10 mail.app.example.test."],
    )
    .await;
    add(&node, "mail.app.example.test", "A", &["192.0.2.25"]).await;
    add(
        &node,
        "_sip._tcp.app.example.test",
        "SRV",
        &["10 60 5060 sip.example.net."],
    )
    .await;
    add(
        &node,
        "shop.app.example.test",
        "CAA",
        &[r#"0 issuewild ";""#],
    )
    .await;
    add(
        &node,
        "shop.app.example.test",
        "HTTPS",
        &["1 . alpn=h3 port=8443"],
    )
    .await;
    add(
        &node,
        "_dns.app.example.test",
        "SVCB",
        &["1 dns.example.net. alpn=dot"],
    )
    .await;
    add(
        &node,
        "sub.app.example.test",
        "NS",
        &["ns.sub.app.example.test."],
    )
    .await;
    add(&node, "ns.sub.app.example.test", "A", &["192.0.2.53"]).await;

    assert_eq!(
        dig_short(dns, "web-server.internal", "A"),
        ["10.0.0.10", "10.0.0.11"]
    );
    assert_eq!(dig_short(dns, "web-server.internal", "AAAA"), ["fd00::10"]);
    // CNAME chased inside our zones.
    assert_eq!(
        dig_short(dns, "db.internal", "A"),
        ["10.0.0.10", "10.0.0.11", "web-server.internal."]
    );
    assert_eq!(
        dig_short(dns, "db.internal", "CNAME"),
        ["web-server.internal."]
    );
    assert_eq!(
        dig_short(dns, "info.app.example.test", "TXT"),
        [r#""v=spf1 -all""#]
    );
    assert_eq!(dig_short(dns, ZONE, "MX"), ["10 mail.app.example.test."]);
    assert_eq!(
        dig_short(dns, "_sip._tcp.app.example.test", "SRV"),
        ["10 60 5060 sip.example.net."]
    );
    assert_eq!(
        dig_short(dns, "shop.app.example.test", "CAA"),
        [r#"0 issuewild ";""#]
    );
    assert_eq!(
        dig_short(dns, "shop.app.example.test", "HTTPS"),
        ["1 . alpn=\"h3\" port=8443"]
    );
    assert_eq!(
        dig_short(dns, "_dns.app.example.test", "SVCB"),
        ["1 dns.example.net. alpn=\"dot\""]
    );
    // A delegation: a referral, not authoritative, with glue.
    let referral = q(dns, "www.sub.app.example.test", RecordType::A);
    assert_eq!(referral.metadata.response_code, ResponseCode::NoError);
    assert!(!referral.metadata.authoritative);
    assert!(referral.answers.is_empty());
    assert_eq!(referral.authorities[0].record_type(), RecordType::NS);
    assert_eq!(referral.additionals[0].data.to_string(), "192.0.2.53");
    let out = dig(dns, &["www.sub.app.example.test", "A"]);
    assert!(
        out.contains("AUTHORITY: 1") && !out.contains(" aa"),
        "{out}"
    );
    // The internal zone has an SOA too, and NXDOMAIN below it.
    let nx = q(dns, "nope.internal", RecordType::A);
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(nx.authorities[0].name.to_ascii(), "internal.");
}

#[tokio::test]
async fn wildcards_empty_non_terminals_and_cname_loops() {
    let node = dns_node();
    let dns = node.dns_addr().await;
    add(&node, "*.dev.internal", "A", &["10.1.0.1"]).await;
    add(&node, "a.b.c.internal", "TXT", &[r#""deep""#]).await;
    add(&node, "host.dev.internal", "TXT", &[r#""exact""#]).await;
    add(&node, "loop1.internal", "CNAME", &["loop2.internal"]).await;
    add(&node, "loop2.internal", "CNAME", &["loop1.internal"]).await;
    add(&node, "*.wild.internal", "CNAME", &["a.b.c.internal"]).await;

    // Synthesized from the wildcard, owner = the name asked.
    let w = q(dns, "anything.dev.internal", RecordType::A);
    assert_eq!(rdata(&w), ["10.1.0.1"]);
    assert_eq!(w.answers[0].name.to_ascii(), "anything.dev.internal.");
    // An existing name blocks the wildcard for its other types (NODATA, not synthesis).
    let exact = q(dns, "host.dev.internal", RecordType::A);
    assert_eq!(exact.metadata.response_code, ResponseCode::NoError);
    assert!(exact.answers.is_empty());
    // Below an existing name the closest encloser is that name: no `*.dev` there (RFC 4592).
    let below = q(dns, "x.host.dev.internal", RecordType::A);
    assert_eq!(below.metadata.response_code, ResponseCode::NXDomain);
    // Empty non-terminals: NODATA, and NXDOMAIN right beside them.
    for ent in ["c.internal", "b.c.internal"] {
        let m = q(dns, ent, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{ent}");
        assert!(m.answers.is_empty());
    }
    assert_eq!(
        q(dns, "x.c.internal", RecordType::A).metadata.response_code,
        ResponseCode::NXDomain
    );
    // A CNAME loop is answered, with the chain, not followed forever.
    let l = q(dns, "loop1.internal", RecordType::A);
    assert_eq!(l.metadata.response_code, ResponseCode::NoError);
    assert_eq!(l.answers.len(), 2);
    // A wildcard CNAME is synthesized and then chased.
    let wc = q(dns, "foo.wild.internal", RecordType::TXT);
    assert_eq!(rdata(&wc), ["a.b.c.internal.", "deep"]);
}

#[tokio::test]
async fn refused_notimp_formerr_badvers_and_any() {
    let node = dns_node();
    let dns = node.dns_addr().await;
    // Outside our zones: REFUSED, never a recursive answer.
    let out = q(dns, "example.com", RecordType::A);
    assert_eq!(out.metadata.response_code, ResponseCode::Refused);
    assert!(!out.metadata.authoritative);
    assert!(dig(dns, &["www.example.com", "A"]).contains("status: REFUSED"));
    // AXFR is refused (TCP, as zone transfers go).
    let axfr = tcp(dns, &query_message(ZONE, RecordType::AXFR));
    assert_eq!(axfr.metadata.response_code, ResponseCode::Refused);
    // NOTIFY and UPDATE are not implemented.
    let mut notify = query_message(ZONE, RecordType::SOA);
    notify.metadata.op_code = OpCode::Notify;
    assert_eq!(
        udp(dns, &notify).metadata.response_code,
        ResponseCode::NotImp
    );
    // EDNS version 1: BADVERS.
    let mut v1 = query_message(ZONE, RecordType::SOA);
    v1.edns.as_mut().unwrap().set_version(1);
    // 16 is BADVERS with an OPT (BADSIG shares the number in TSIG's registry).
    assert_eq!(u16::from(udp(dns, &v1).metadata.response_code), 16);
    // Two questions: FORMERR.
    let mut two = query_message(ZONE, RecordType::SOA);
    two.add_query(query_message(ZONE, RecordType::NS).queries[0].clone());
    assert_eq!(udp(dns, &two).metadata.response_code, ResponseCode::FormErr);
    // Garbage after a valid header: FORMERR with the same id; a bare fragment: no answer.
    let garbage = [
        0xab, 0xcd, 0x00, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xff, 0xff,
    ];
    let reply = udp_raw(dns, &garbage).expect("an answer to a bad query");
    assert_eq!(&reply[..2], &[0xab, 0xcd]);
    assert_eq!(reply[3] & 0x0f, 1);
    // ANY: one RRset (RFC 8482), not the whole name.
    let any = q(dns, ZONE, RecordType::ANY);
    assert_eq!(any.metadata.response_code, ResponseCode::NoError);
    assert!(!any.answers.is_empty());
    let types: std::collections::HashSet<_> = any.answers.iter().map(|r| r.record_type()).collect();
    assert_eq!(types.len(), 1);
}

#[tokio::test]
async fn truncated_udp_answers_retry_over_tcp() {
    let node = dns_node();
    let dns = node.dns_addr().await;
    let values: Vec<String> = (0..40)
        .map(|i| format!("\"{i:02} {}\"", "x".repeat(60)))
        .collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    add(&node, "big.internal", "TXT", &refs).await;

    let m = q(dns, "big.internal", RecordType::TXT);
    assert!(
        m.metadata.truncation,
        "a 2.8 kB answer must not fit 1232 bytes"
    );
    assert!(
        m.answers.is_empty(),
        "truncated answers are empty, as Knot's"
    );
    assert!(m.edns.is_some(), "OPT is kept in a truncated answer");
    let full = tcp(dns, &query_message("big.internal", RecordType::TXT));
    assert!(!full.metadata.truncation);
    assert_eq!(full.answers.len(), 40);
    // dig sees TC and retries over TCP by itself.
    let out = dig(dns, &["big.internal", "TXT"]);
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert!(out.contains("ANSWER: 40"), "{out}");
}

#[tokio::test]
async fn store_changes_are_answered_within_100ms() {
    let node = dns_node();
    let dns = node.dns_addr().await;
    let name = "late.internal";
    // Cache an NXDOMAIN first: the cache must forget it when the record arrives.
    for _ in 0..3 {
        assert_eq!(
            q(dns, name, RecordType::A).metadata.response_code,
            ResponseCode::NXDomain
        );
    }
    add(&node, name, "A", &["10.9.9.9"]).await;
    let written = Instant::now();
    loop {
        let m = q(dns, name, RecordType::A);
        if rdata(&m) == ["10.9.9.9"] {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_millis(100),
            "the record was not answered within 100 ms of the write"
        );
    }
    // A new service, and its removal, the same way (the per-name cache invalidation path).
    let id = create_service(&node).await;
    let host = format!("{id}.{ZONE}");
    let written = Instant::now();
    while q(dns, &host, RecordType::A).answers.is_empty() {
        assert!(written.elapsed() < Duration::from_millis(100));
    }
    let r = node
        .api(Method::DELETE, &format!("/v1/services/{id}"), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let deleted = Instant::now();
    while q(dns, &host, RecordType::A).metadata.response_code != ResponseCode::NXDomain {
        assert!(deleted.elapsed() < Duration::from_millis(100));
    }
    let r = node
        .api(Method::DELETE, "/v1/records/late.internal/A", None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let removed = Instant::now();
    while !q(dns, name, RecordType::A).answers.is_empty() {
        assert!(removed.elapsed() < Duration::from_millis(100));
    }
}

#[tokio::test]
async fn records_api_validates_and_protects_managed_names() {
    let node = dns_node();
    let id = create_service(&node).await;
    let post = |body: serde_json::Value| node.api(Method::POST, "/v1/records", Some(body));

    let r = post(json!({ "name": "x.example.com", "type": "A", "data": ["10.0.0.1"] })).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["field"], "name");
    let r = post(json!({ "name": "x.internal", "type": "A", "data": ["10.0.0.1", "nope"] })).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["field"], "data[1]");
    let r =
        post(json!({ "name": "x.internal", "type": "A", "ttl": 0, "data": ["10.0.0.1"] })).await;
    assert_eq!(r.json()["error"]["field"], "ttl");
    let r = post(json!({ "name": "x.internal", "type": "SOA", "data": ["x"] })).await;
    assert_eq!(r.json()["error"]["field"], "type");
    // The node's own names.
    let r =
        post(json!({ "name": format!("{id}.{ZONE}"), "type": "A", "data": ["10.0.0.1"] })).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = post(json!({ "name": ZONE, "type": "NS", "data": ["ns.example.net."] })).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    // TXT beside a service's addresses is fine (e.g. a verification token).
    let r =
        post(json!({ "name": format!("{id}.{ZONE}"), "type": "TXT", "data": ["\"ok\""] })).await;
    assert_eq!(r.status, StatusCode::CREATED);
    // CNAME alone at its name, both ways round.
    add(&node, "c.internal", "CNAME", &["target.internal."]).await;
    let r = post(json!({ "name": "c.internal", "type": "TXT", "data": ["\"no\""] })).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    add(&node, "t.internal", "TXT", &["\"yes\""]).await;
    let r = post(json!({ "name": "t.internal", "type": "CNAME", "data": ["x.internal."] })).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    // POST twice: conflict; PUT replaces; GET shows; DELETE removes; then 404.
    let r = post(json!({ "name": "t.internal", "type": "TXT", "data": ["\"again\""] })).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = node
        .api(
            Method::PUT,
            "/v1/records/t.internal/txt",
            Some(json!({ "ttl": 60, "data": ["\"replaced\""] })),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let r = node
        .api(Method::GET, "/v1/records/T.internal./TXT", None)
        .await;
    assert_eq!(r.json()["data"][0], "\"replaced\"");
    assert_eq!(r.json()["ttl"], 60);
    let r = node
        .api(Method::DELETE, "/v1/records/t.internal/TXT", None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = node
        .api(Method::DELETE, "/v1/records/t.internal/TXT", None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn records_cli_adds_lists_and_removes() {
    let node = dns_node();
    let dns: SocketAddr = node.dns_addr().await;
    let out = node.cli(&["records", "add", "web-server.internal", "A", "10.0.0.10"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dig_short(dns, "web-server.internal", "A"), ["10.0.0.10"]);
    let list = node.cli(&["records", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("web-server.internal") && text.contains("10.0.0.10"),
        "{text}"
    );
    // A refused record: the API's message and exit code 1.
    let bad = node.cli(&["records", "add", "x.example.com", "A", "10.0.0.1"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not inside a zone"));
    let out = node.cli(&["records", "remove", "web-server.internal", "A"]);
    assert!(out.status.success());
    assert!(dig_short(dns, "web-server.internal", "A").is_empty());
}

/// A UDP answer twice (the second from the answer cache) and the TCP answer (never cached):
/// all three must say the same.
fn udp_twice_and_tcp(dns: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let first = q(dns, name, rtype);
    let second = q(dns, name, rtype);
    let over_tcp = tcp(dns, &query_message(name, rtype));
    assert_eq!(
        first.answers, second.answers,
        "{name} {rtype}: cached answer"
    );
    assert_eq!(first.authorities, second.authorities, "{name} {rtype}");
    assert_eq!(first.additionals, second.additionals, "{name} {rtype}");
    assert_eq!(
        first.metadata.response_code,
        over_tcp.metadata.response_code
    );
    assert_eq!(
        first.answers, over_tcp.answers,
        "{name} {rtype}: UDP vs TCP"
    );
    assert_eq!(first.authorities, over_tcp.authorities, "{name} {rtype}");
    assert_eq!(first.additionals, over_tcp.additionals, "{name} {rtype}");
    second
}

/// RFC 4592: once `<id>` exists it is the closest encloser of `x.<id>`, and `*.<zone>` no
/// longer applies there. A cached wildcard answer must not outlive the service's creation.
#[tokio::test]
async fn cached_wildcard_answer_gives_way_to_a_new_service() {
    let node = dns_node();
    let dns = node.dns_addr().await;
    add(&node, &format!("*.{ZONE}"), "TXT", &["\"wild\""]).await;
    let id = "5f0e8c2a-6f7d-4b1e-9a3c-2d4e6f8a0b1c";
    let below = format!("x.{id}.{ZONE}");
    let before = udp_twice_and_tcp(dns, &below, RecordType::TXT);
    assert_eq!(rdata(&before), ["wild"]);
    create_service_with_id(&node, id).await;
    let after = udp_twice_and_tcp(dns, &below, RecordType::TXT);
    assert_eq!(after.metadata.response_code, ResponseCode::NXDomain);
}

/// A delegation whose nameserver is a service's name: its glue goes when the service does.
#[tokio::test]
async fn referral_glue_leaves_with_a_deleted_service() {
    let node = dns_node();
    let dns = node.dns_addr().await;
    let id = create_service(&node).await;
    add(
        &node,
        &format!("sub.{ZONE}"),
        "NS",
        &[&format!("{id}.{ZONE}.")],
    )
    .await;
    let name = format!("x.sub.{ZONE}");
    let referral = udp_twice_and_tcp(dns, &name, RecordType::A);
    assert!(!referral.metadata.authoritative);
    assert_eq!(referral.additionals.len(), 2, "A and AAAA glue");
    let r = node
        .api(Method::DELETE, &format!("/v1/services/{id}"), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let referral = udp_twice_and_tcp(dns, &name, RecordType::A);
    assert_eq!(referral.authorities.len(), 1, "still a referral");
    assert!(referral.additionals.is_empty(), "{referral:?}");
}

fn soa_serial(records: &[hickory_proto::rr::Record]) -> u32 {
    match records.first().map(|r| &r.data) {
        Some(hickory_proto::rr::RData::SOA(soa)) => soa.serial,
        other => panic!("not an SOA: {other:?}"),
    }
}

/// Negative answers carry the SOA, whose serial every change moves: a cached NODATA must too.
#[tokio::test]
async fn cached_negative_answers_carry_the_current_serial() {
    let node = dns_node();
    let dns = node.dns_addr().await;
    let id = create_service(&node).await;
    let other = create_service(&node).await;
    // Certificates issued, so the one write below is the only change.
    for service in [&id, &other] {
        node.wait_certificate(service, |c| c["status"] == "active")
            .await;
    }
    let name = format!("{id}.{ZONE}");
    let before = udp_twice_and_tcp(dns, &name, RecordType::TXT);
    let r = node
        .api(
            Method::PATCH,
            &format!("/v1/services/{other}"),
            Some(json!({ "status": "suspended" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let after = udp_twice_and_tcp(dns, &name, RecordType::TXT);
    let current = soa_serial(&q(dns, ZONE, RecordType::SOA).answers);
    assert!(soa_serial(&after.authorities) > soa_serial(&before.authorities));
    assert_eq!(soa_serial(&after.authorities), current);
}

/// `*.<zone>` asked literally is a name like any other (RFC 4592 §2.1.1), never the apex.
#[tokio::test]
async fn literal_wildcard_owner_is_not_the_apex() {
    let node = dns_node();
    let dns = node.dns_addr().await;
    let star = format!("*.{ZONE}");
    for rtype in [
        RecordType::SOA,
        RecordType::NS,
        RecordType::CAA,
        RecordType::A,
    ] {
        let m = udp_twice_and_tcp(dns, &star, rtype);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{rtype}");
        assert!(m.answers.is_empty() && m.additionals.is_empty(), "{rtype}");
    }
    add(&node, &star, "TXT", &["\"any\""]).await;
    let soa = udp_twice_and_tcp(dns, &star, RecordType::SOA);
    assert_eq!(soa.metadata.response_code, ResponseCode::NoError);
    assert!(
        soa.answers.is_empty(),
        "NODATA: the name exists, with TXT only"
    );
    assert_eq!(
        rdata(&udp_twice_and_tcp(dns, &star, RecordType::TXT)),
        ["any"]
    );
    // The apex is untouched.
    assert_eq!(q(dns, ZONE, RecordType::SOA).answers.len(), 1);
}

/// Every zone-file escape form in TXT, read as RFC 1035 §5.1 says and as Knot and dig do.
#[tokio::test]
async fn txt_escapes_are_served_as_written() {
    let node = dns_node();
    let dns = node.dns_addr().await;
    add(
        &node,
        "e.internal",
        "TXT",
        &[r#""caf\195\169" "say \"hi\"" "back\\slash" "" a\ b "\065\066""#],
    )
    .await;
    let m = udp_twice_and_tcp(dns, "e.internal", RecordType::TXT);
    let Some(hickory_proto::rr::RData::TXT(txt)) = m.answers.first().map(|r| &r.data) else {
        panic!("no TXT: {m:?}");
    };
    let strings: Vec<&[u8]> = txt.txt_data.iter().map(|s| &**s).collect();
    assert_eq!(
        strings,
        [
            "café".as_bytes(),
            b"say \"hi\"",
            b"back\\slash",
            b"",
            b"a b",
            b"AB"
        ]
    );
    assert_eq!(
        dig_short(dns, "e.internal", "TXT"),
        [r#""caf\195\169" "say \"hi\"" "back\\slash" "" "a b" "AB""#]
    );
    // CAA values are character-strings too.
    add(
        &node,
        "e.internal",
        "CAA",
        &[r#"0 issue "ca.example\059 account=1""#],
    )
    .await;
    assert_eq!(
        dig_short(dns, "e.internal", "CAA"),
        [r#"0 issue "ca.example; account=1""#]
    );
}

/// What the records API accepts, the server serves: a long TXT string is split into strings
/// of 255 octets; what cannot be encoded is refused with a 400 naming the data; an NS cannot
/// delegate a service's name away.
#[tokio::test]
async fn records_the_server_cannot_serve_are_refused() {
    let node = dns_node();
    let dns = node.dns_addr().await;
    let post = |body: serde_json::Value| node.api(Method::POST, "/v1/records", Some(body));
    let long = "x".repeat(300);
    add(&node, "long.internal", "TXT", &[&format!("\"{long}\"")]).await;
    let m = udp_twice_and_tcp(dns, "long.internal", RecordType::TXT);
    let Some(hickory_proto::rr::RData::TXT(txt)) = m.answers.first().map(|r| &r.data) else {
        panic!("no TXT: {m:?}");
    };
    assert_eq!(
        txt.txt_data.iter().map(|s| s.len()).collect::<Vec<_>>(),
        [255, 45]
    );
    for (rtype, value) in [
        ("HTTPS", "1 . alpn="),
        ("TXT", "\"unclosed"),
        ("TXT", "\"\\300\""),
        ("A", "10.0.0.\\049"),
        ("CAA", "0 issue"),
    ] {
        let r = post(json!({ "name": "bad.internal", "type": rtype, "data": [value] })).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{rtype} {value}");
        assert!(
            r.json()["error"]["field"]
                .as_str()
                .is_some_and(|f| f.starts_with("data")),
            "{}",
            r.json()
        );
    }
    // A TXT set too big for any DNS message (65,699 bytes), in a body under the API's 64 KiB.
    let huge: Vec<String> = (0..64)
        .map(|i| format!("\"{i:02}{}\"", "z".repeat(1008)))
        .collect();
    let r = post(json!({ "name": "huge.internal", "type": "TXT", "data": huge })).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.json()["error"]);
    // The node's names cannot be delegated away.
    let id = create_service(&node).await;
    let r =
        post(json!({ "name": format!("{id}.{ZONE}"), "type": "NS", "data": ["ns.example.net."] }))
            .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.json());
    let r =
        post(json!({ "name": format!("ns1.{ZONE}"), "type": "NS", "data": ["ns.example.net."] }))
            .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.json());
    assert_eq!(
        rdata(&q(dns, &format!("{id}.{ZONE}"), RecordType::A)),
        ["192.0.2.10"]
    );
}

/// DS lives on the parent side of a zone cut (RFC 4035 §3.1.4.1): NODATA with AA, not a
/// referral; below the cut, a referral still.
#[tokio::test]
async fn ds_at_a_delegation_is_answered_by_the_parent() {
    let node = dns_node();
    let dns = node.dns_addr().await;
    add(&node, &format!("sub.{ZONE}"), "NS", &["ns.example.net."]).await;
    let ds = udp_twice_and_tcp(dns, &format!("sub.{ZONE}"), RecordType::DS);
    assert_eq!(ds.metadata.response_code, ResponseCode::NoError);
    assert!(ds.metadata.authoritative);
    assert!(ds.answers.is_empty());
    assert_eq!(ds.authorities[0].record_type(), RecordType::SOA);
    let below = udp_twice_and_tcp(dns, &format!("x.sub.{ZONE}"), RecordType::DS);
    assert!(!below.metadata.authoritative);
    assert_eq!(below.authorities[0].record_type(), RecordType::NS);
}
