//! Any bytes as a DNS request, over UDP or TCP, from clients in and out of the by-client table:
//! the responder must answer or stay silent, never panic, and every UDP answer must fit the
//! limit. The zone has the hard cases: wildcards, CNAME chains and loops, a delegation with
//! glue, services, an extra zone.

#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, LazyLock};

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use portcullis_config::file::{AnswerPolicy, ClientGroup, NodeConfig};
use portcullis_config::names::DomainName;
use portcullis_config::store::KeyValue;
use portcullis_config::{Snapshot, keys};
use portcullis_dns::answer::{self, Transport};
use portcullis_dns::view::{self, ViewHandle};
use portcullis_dns::{ZoneSettings, wire};

const SERVICE: &str = "0b9f7c1e-4a52-4c1a-9d3e-8f6a2b1c0d4e";

/// A stored key-value as the Snapshot reads it from the store.
fn stored(key: String, value: &serde_json::Value) -> KeyValue {
    KeyValue {
        key,
        value: serde_json::to_vec(value).unwrap_or_default(),
        create_revision: 1,
        mod_revision: 1,
        version: 1,
        lease: None,
    }
}

fn record(name: &str, rtype: &str, data: &[&str]) -> KeyValue {
    let value = serde_json::json!({ "name": name, "type": rtype, "ttl": 300, "data": data });
    stored(format!("{}{name}/{rtype}", keys::RECORDS), &value)
}

fn build() -> ViewHandle {
    let mut config = NodeConfig::dev(Path::new("/nonexistent"));
    config.zone.name = DomainName::parse("app.example").unwrap_or_else(|_| unreachable!());
    config.zone.nameservers =
        vec![DomainName::parse("ns1.app.example").unwrap_or_else(|_| unreachable!())];
    config.dns.zones = vec![DomainName::parse("internal").unwrap_or_else(|_| unreachable!())];
    config.dns.caa = vec!["0 issue \"ca.example\"".into()];
    config.dns.policy = AnswerPolicy::ByClient;
    config.dns.clients = vec![ClientGroup {
        networks: vec!["10.0.0.0/8".parse().unwrap_or_else(|_| unreachable!())],
        nodes: Vec::new(),
        addresses: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))],
    }];
    let settings = ZoneSettings::from_config(&config).unwrap_or_else(|e| panic!("{e}"));
    let service = serde_json::json!({
        "id": SERVICE, "backends": ["127.0.0.1:9"], "status": "active",
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
    });
    let kvs = vec![
        stored(format!("{}{SERVICE}", keys::SERVICES), &service),
        record("*.app.example", "TXT", &["\"wild\""]),
        record("*.w.app.example", "CNAME", &["a.app.example."]),
        record("a.app.example", "A", &["192.0.2.7"]),
        record("loop1.app.example", "CNAME", &["loop2.app.example."]),
        record("loop2.app.example", "CNAME", &["loop1.app.example."]),
        record("out.app.example", "CNAME", &["example.org."]),
        record("sub.app.example", "NS", &["ns.sub.app.example."]),
        record("ns.sub.app.example", "A", &["192.0.2.53"]),
        record("x.y.z.app.example", "MX", &["10 mail.app.example."]),
        record(
            "_sip._tcp.app.example",
            "SRV",
            &["10 5 5060 sip.app.example."],
        ),
        record(
            "h.app.example",
            "HTTPS",
            &["1 . alpn=h2 ipv4hint=192.0.2.9"],
        ),
        record("web.internal", "A", &["10.0.0.10"]),
        record("big.app.example", "TXT", &[&"\"0123456789\" ".repeat(60)]),
    ];
    let zone = config.zone.name.clone();
    let snapshot = Snapshot::from_kvs(zone, 2, &kvs);
    view::fixed(Arc::new(snapshot), Arc::new(settings))
}

static VIEW: LazyLock<ViewHandle> = LazyLock::new(build);

fuzz_target!(|data: &[u8]| {
    let Some((&selector, request)) = data.split_first() else {
        return;
    };
    let view = VIEW.load();
    let transport = if selector & 1 == 0 {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let client = if selector & 2 == 0 {
        IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    };
    let reply = answer::answer_bytes(&view.zone, request, transport, 1232, client);
    if let Some(reply) = &reply {
        if transport == Transport::Udp {
            let limit = Message::from_vec(request).map_or(512, |m| answer::udp_limit(&m, 1232));
            assert!(
                reply.len() <= limit,
                "{} bytes over a {limit} limit",
                reply.len()
            );
        }
        // The cache's path: an answer patched for another ID and another case of the question
        // is byte for byte the answer made fresh for that query.
        let mut key = Vec::new();
        if transport == Transport::Udp
            && let Some(fast) = wire::parse_query(request, 1232, 0, &mut key)
            && wire::cacheable(reply, &fast)
        {
            let mut other = request.to_vec();
            other[0] ^= 0x5a;
            other[1] ^= 0xa5;
            // Flip the case of every letter of the question's name (labels start at 12).
            let mut at = 12;
            while let Some(&len) = other.get(at) {
                if len == 0 || len > 63 {
                    break;
                }
                for b in other.iter_mut().skip(at + 1).take(usize::from(len)) {
                    if b.is_ascii_alphabetic() {
                        *b ^= 0x20;
                    }
                }
                at += 1 + usize::from(len);
            }
            let patched = wire::patch(reply, &other, &fast);
            let fresh = answer::answer_bytes(&view.zone, &other, transport, 1232, client);
            assert_eq!(Some(patched), fresh, "a patched cached answer differs from a fresh one");
        }
    }
    // The direct NXDOMAIN writer must say what the general path says.
    let mut key = Vec::new();
    if let Some(fast) = wire::parse_query(request, 1232, 0, &mut key)
        && let Some(direct) = answer::fast_nxdomain(&view.zone, request, &fast, &key, 1232)
    {
        let general = answer::answer_bytes(&view.zone, request, Transport::Udp, 1232, client);
        assert_eq!(Some(&direct), general.as_ref(), "the NXDOMAIN writer differs");
        let direct = Message::from_vec(&direct).unwrap_or_else(|e| panic!("{e}"));
        assert!(direct.answers.is_empty() && direct.additionals.is_empty());
    }
    if let Ok(message) = Message::from_vec(request) {
        if let Some(query) = message.queries.first() {
            let _ = view.zone.transfer(query.name());
        }
        let _ = answer::forwardable(&view.zone, &message);
    }
    let _ = wire::question_end(request);
});
