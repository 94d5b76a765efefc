//! Conformance against Knot DNS: the same zone, written as a zone file and served by `knotd` on
//! a loopback port, must get the same answers as Portcullis for a generated set of queries
//! (rcode, AA, TC, answer and authority sections). And Knot as a secondary: it transfers the
//! zone from the node (AXFR) and then answers the same.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hickory_proto::op::Message;
use hickory_proto::rr::{RData, Record, RecordType};
use support::dns::{add, create_service, dns_node, q, query_message};

const ZONE: &str = "app.example.test";

/// Custom records of the zone: name, type, values. Covers wildcards, CNAME chains (in the
/// zone, out of it, to a missing name, from a wildcard), empty non-terminals and a delegation.
const RECORDS: &[(&str, &str, &[&str])] = &[
    ("app.example.test", "MX", &["10 mail.app.example.test."]),
    ("app.example.test", "TXT", &["\"v=spf1 mx -all\""]),
    ("mail.app.example.test", "A", &["192.0.2.25"]),
    ("mail.app.example.test", "AAAA", &["2001:db8::25"]),
    ("www.app.example.test", "CNAME", &["mail.app.example.test."]),
    ("out.app.example.test", "CNAME", &["www.example.org."]),
    (
        "dangling.app.example.test",
        "CNAME",
        &["missing.app.example.test."],
    ),
    (
        "chain.app.example.test",
        "CNAME",
        &["www.app.example.test."],
    ),
    ("*.wild.app.example.test", "A", &["192.0.2.80"]),
    ("*.wild.app.example.test", "TXT", &["\"wildcard\""]),
    ("exact.wild.app.example.test", "TXT", &["\"exact\""]),
    (
        "*.cn.app.example.test",
        "CNAME",
        &["mail.app.example.test."],
    ),
    ("a.b.deep.app.example.test", "A", &["192.0.2.99"]),
    (
        "_sip._tcp.app.example.test",
        "SRV",
        &["10 60 5060 sip.example.net."],
    ),
    (
        "shop.app.example.test",
        "HTTPS",
        &["1 . alpn=h3,h2 port=8443"],
    ),
    ("shop.app.example.test", "CAA", &["0 issue \"example.net\""]),
    ("sub.app.example.test", "NS", &["ns.sub.app.example.test."]),
    ("ns.sub.app.example.test", "A", &["192.0.2.53"]),
];

fn knot_zone_file(serial: u32, services: &[String]) -> String {
    let mut z = String::new();
    writeln!(z, "$ORIGIN {ZONE}.").unwrap();
    writeln!(
        z,
        "@ 3600 IN SOA ns1.{ZONE}. hostmaster.{ZONE}. {serial} 14400 3600 1209600 300"
    )
    .unwrap();
    writeln!(z, "@ 3600 IN NS ns1.{ZONE}.").unwrap();
    writeln!(z, "@ 3600 IN NS ns2.example.net.").unwrap();
    writeln!(z, "@ 3600 IN CAA 0 issue \"letsencrypt.org\"").unwrap();
    writeln!(z, "ns1 300 IN A 192.0.2.10").unwrap();
    writeln!(z, "ns1 300 IN AAAA 2001:db8::10").unwrap();
    for id in services {
        writeln!(z, "{id} 300 IN A 192.0.2.10").unwrap();
        writeln!(z, "{id} 300 IN AAAA 2001:db8::10").unwrap();
        writeln!(
            z,
            "{id} 3600 IN HTTPS 1 . alpn=\"h2,http/1.1\" ipv4hint=192.0.2.10 ipv6hint=2001:db8::10"
        )
        .unwrap();
    }
    for (name, rtype, values) in RECORDS {
        for v in *values {
            writeln!(z, "{name}. 600 IN {rtype} {v}").unwrap();
        }
    }
    z
}

struct Knot {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Knot serving `ZONE` from a zone file, or as a secondary of `primary` when no file is given.
fn start_knot(zone_file: Option<&str>, primary: Option<SocketAddr>) -> Knot {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    if let Some(zone_file) = zone_file {
        std::fs::write(dir.path().join(format!("{ZONE}.zone")), zone_file).unwrap();
    }
    let d = dir.path().display();
    let (remote, master) = match primary {
        Some(p) => (
            format!(
                "remote:\n  - id: primary\n    address: {}@{}\n",
                p.ip(),
                p.port()
            ),
            "    master: primary\n",
        ),
        None => (String::new(), ""),
    };
    let conf = format!(
        r#"server:
    rundir: "{d}"
    listen: 127.0.0.1@{port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "{d}/db"
log:
  - target: stderr
    any: info
{remote}zone:
  - domain: {ZONE}
    storage: "{d}"
    file: "{ZONE}.zone"
    journal-content: none
    zonefile-sync: -1
{master}"#
    );
    let conf_path = dir.path().join("knot.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let log = std::fs::File::create(dir.path().join("knot.log")).unwrap();
    let child = Command::new("knotd")
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("knotd (package knot) is installed by make test");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let knot = Knot {
        child,
        addr,
        _dir: dir,
    };
    // Ready once it answers the SOA (for a secondary: once the first transfer is in).
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let request = query_message(ZONE, RecordType::SOA).to_vec().unwrap();
    let mut buf = [0u8; 4096];
    let start = std::time::Instant::now();
    loop {
        let answered = probe.send_to(&request, addr).is_ok()
            && probe
                .recv(&mut buf)
                .ok()
                .is_some_and(|n| Message::from_vec(&buf[..n]).is_ok_and(|m| !m.answers.is_empty()));
        if answered {
            return knot;
        }
        assert!(
            start.elapsed() < support::DEADLINE,
            "timed out waiting for knotd to answer on {addr}; its log:\n{}",
            std::fs::read_to_string(knot._dir.path().join("knot.log")).unwrap_or_default()
        );
        std::thread::sleep(support::POLL);
    }
}

/// A record in presentation form, lowercased: Knot compresses names in RDATA against the
/// question, so their case follows the query's; DNS names compare without case.
fn line(r: &Record) -> String {
    format!("{} {} {} {}", r.name, r.ttl, r.record_type(), r.data).to_lowercase()
}

/// What is compared: rcode, AA, TC, answer and authority (each sorted: RRset order is free).
fn summary(m: &Message) -> String {
    let mut answer: Vec<String> = m.answers.iter().map(line).collect();
    answer.sort();
    let mut authority: Vec<String> = m.authorities.iter().map(line).collect();
    authority.sort();
    format!(
        "rcode={} aa={} tc={}\n  answer: {answer:?}\n  authority: {authority:?}",
        m.metadata.response_code, m.metadata.authoritative, m.metadata.truncation
    )
}

/// The zone both tests compare: three services and the custom `RECORDS`. Returns the ids.
async fn fill_zone(node: &support::Node) -> Vec<String> {
    let mut services = Vec::new();
    for _ in 0..3 {
        services.push(create_service(node).await);
    }
    for (name, rtype, values) in RECORDS {
        add(node, name, rtype, values).await;
    }
    services
}

#[tokio::test]
async fn answers_match_knot_on_the_same_zone() {
    let node = dns_node();
    let ours = node.dns_addr().await;
    let services = fill_zone(&node).await;
    let serial = match &q(ours, ZONE, RecordType::SOA).answers[0].data {
        RData::SOA(soa) => soa.serial,
        other => panic!("not an SOA: {other:?}"),
    };
    let knot = start_knot(Some(&knot_zone_file(serial, &services)), None);
    compare_with_knot(ours, &knot, &services);
}

/// Knot transfers the zone from the node (AXFR over TCP, in several messages) and, as a
/// secondary, answers every query exactly as the node does.
#[tokio::test]
async fn knot_as_secondary_transfers_the_zone_and_answers_the_same() {
    let node = support::dns::dns_node_with("transfer_from = [\"127.0.0.1/32\"]\n");
    let ours = node.dns_addr().await;
    let services = fill_zone(&node).await;
    // Enough records for several transfer messages.
    for i in 0..250 {
        add(&node, &format!("bulk{i}.{ZONE}"), "TXT", &["\"bulk\""]).await;
    }
    let ours_soa = q(ours, ZONE, RecordType::SOA);
    let knot = start_knot(None, Some(ours));
    assert_eq!(
        q(knot.addr, ZONE, RecordType::SOA).answers,
        ours_soa.answers,
        "Knot holds the zone at the node's serial"
    );
    let bulk = q(knot.addr, &format!("bulk249.{ZONE}"), RecordType::TXT);
    assert_eq!(bulk.answers.len(), 1, "the last transfer message arrived");
    compare_with_knot(ours, &knot, &services);
}

fn compare_with_knot(ours: SocketAddr, knot: &Knot, services: &[String]) {
    let mut names: Vec<String> = RECORDS.iter().map(|(n, _, _)| n.to_string()).collect();
    names.extend(services.iter().map(|id| format!("{id}.{ZONE}")));
    names.extend(
        [
            ZONE,
            "ns1.app.example.test",
            "nothing.app.example.test",
            "x.y.nothing.app.example.test",
            "any.wild.app.example.test",
            "a.b.wild.app.example.test",
            "x.exact.wild.app.example.test",
            "foo.cn.app.example.test",
            "deep.app.example.test",
            "b.deep.app.example.test",
            "c.b.deep.app.example.test",
            "_tcp.app.example.test",
            "www.sub.app.example.test",
            "00000000-0000-4000-8000-000000000000.app.example.test",
            "x.www.app.example.test",
            "WwW.App.Example.Test",
        ]
        .map(String::from),
    );
    names.sort();
    names.dedup();
    let types = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::HTTPS,
        RecordType::TXT,
        RecordType::MX,
        RecordType::CNAME,
        RecordType::NS,
        RecordType::SOA,
        RecordType::CAA,
        RecordType::SRV,
    ];
    let mut differences = String::new();
    let mut compared = 0;
    for name in &names {
        for rtype in types {
            let a = summary(&q(ours, name, rtype));
            let b = summary(&q(knot.addr, name, rtype));
            compared += 1;
            if a != b {
                writeln!(
                    differences,
                    "{name} {rtype}\n portcullis {a}\n knot       {b}"
                )
                .unwrap();
            }
        }
    }
    assert!(compared > 300, "only {compared} queries compared");
    assert!(
        differences.is_empty(),
        "answers that differ from Knot's:\n{differences}"
    );
}
