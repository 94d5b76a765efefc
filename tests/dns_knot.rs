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
use hyper::{Method, StatusCode};
use serde_json::json;
use support::dns::{add, create_service, create_service_with_id, dns_node, q, query_message, tcp};

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
    let mut z = knot_zone_file_head(serial, services);
    for (name, rtype, values) in RECORDS {
        for v in *values {
            writeln!(z, "{name}. 600 IN {rtype} {v}").unwrap();
        }
    }
    z
}

/// The apex as the node's config makes it, and the services' records.
fn knot_zone_file_head(serial: u32, services: &[String]) -> String {
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
control:
    listen: "{d}/knot.sock"
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

impl Knot {
    /// Replaces the zone with `zone_file` and waits until Knot answers at `serial`.
    fn reload(&self, zone_file: &str, serial: u32) {
        let dir = self._dir.path();
        std::fs::write(dir.join(format!("{ZONE}.zone")), zone_file).unwrap();
        let out = Command::new("knotc")
            .arg("-s")
            .arg(dir.join("knot.sock"))
            .args(["zone-reload", ZONE])
            .output()
            .expect("knotc (package knot)");
        assert!(
            out.status.success(),
            "knotc zone-reload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        support::poll("Knot to load the new zone", || {
            let soa = q(self.addr, ZONE, RecordType::SOA);
            matches!(soa.answers.first().map(|r| &r.data), Some(RData::SOA(s)) if s.serial == serial)
                .then_some(())
        });
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
    // Negative answers are as small as Knot's: the SOA's names are compressed.
    for (name, rtype) in [
        ("nothing.app.example.test", RecordType::A),
        ("x.y.nothing.app.example.test", RecordType::TXT),
        ("mail.app.example.test", RecordType::TXT),
    ] {
        let request = query_message(name, rtype).to_vec().unwrap();
        let size = |server| support::dns::udp_raw(server, &request).unwrap().len();
        assert_eq!(
            size(ours),
            size(knot.addr),
            "{name} {rtype}: bytes against Knot's"
        );
    }
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

/// A small deterministic generator (xorshift64*), so a failing run replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn uuid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        let v = (u128::from(a) << 64 | u128::from(b)) & !(0xf << 76) & !(0x3 << 62);
        let v = v | (0x4 << 76) | (0x2 << 62);
        uuid::Uuid::from_u128(v).to_string()
    }
}

/// What the test believes the zone holds: live services and custom record sets.
#[derive(Default)]
struct Model {
    services: std::collections::BTreeSet<String>,
    records: std::collections::BTreeMap<(String, String), Vec<String>>,
}

impl Model {
    /// The zone as Knot loads it (apex as the node's config makes it).
    fn zone_file(&self, serial: u32) -> String {
        let services: Vec<String> = self.services.iter().cloned().collect();
        let mut z = knot_zone_file_head(serial, &services);
        for ((name, rtype), values) in &self.records {
            for v in values {
                // The API splits a string past 255 octets; a zone file must have it split.
                let v = match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                    Some(inner) if inner.len() > 255 && !inner.contains(['"', '\\']) => inner
                        .as_bytes()
                        .chunks(255)
                        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
                        .collect::<Vec<_>>()
                        .join(" "),
                    _ => v.clone(),
                };
                writeln!(z, "{name}. 600 IN {rtype} {v}").unwrap();
            }
        }
        z
    }
}

/// Custom record sets the test adds and removes, for service ids `ids`: wildcards above and
/// below services, a delegation whose glue is a service's address, CNAMEs into services and
/// below them, an empty non-terminal, and TXT values with every escape form and a long string.
fn record_pool(ids: &[String]) -> Vec<(String, &'static str, Vec<String>)> {
    let z = ZONE;
    let mut pool = vec![
        (
            format!("*.{z}"),
            "TXT",
            vec![r#""wild\032card""#.to_string()],
        ),
        (format!("*.{z}"), "A", vec!["192.0.2.77".to_string()]),
        (
            format!("sub.{z}"),
            "NS",
            vec![format!("{}.{z}.", ids[0]), "ns.example.net.".to_string()],
        ),
        (format!("c1.{z}"), "CNAME", vec![format!("{}.{z}.", ids[1])]),
        (
            format!("c2.{z}"),
            "CNAME",
            vec![format!("x.{}.{z}.", ids[2])],
        ),
        (format!("a.b.deep.{z}"), "A", vec!["192.0.2.99".to_string()]),
        (
            format!("t.{z}"),
            "TXT",
            vec![
                r#""caf\195\169" "say \"hi\"" "back\\slash" "" a\ b"#.to_string(),
                format!("\"{}\"", "y".repeat(300)),
            ],
        ),
    ];
    for id in ids.iter().take(3) {
        pool.push((format!("*.{id}.{z}"), "TXT", vec![r#""below""#.to_string()]));
        pool.push((
            format!("{id}.{z}"),
            "TXT",
            vec![r#""at the service""#.to_string()],
        ));
    }
    pool
}

/// The names and types asked after every change.
fn questions(ids: &[String]) -> Vec<(String, RecordType)> {
    use RecordType::*;
    let z = ZONE;
    let mut out = Vec::new();
    let mut ask = |name: String, types: &[RecordType]| {
        out.extend(types.iter().map(|t| (name.clone(), *t)));
    };
    ask(z.to_string(), &[SOA, NS, TXT]);
    ask(format!("*.{z}"), &[SOA, TXT, A]);
    ask(format!("nothing.{z}"), &[TXT, A]);
    ask(format!("c1.{z}"), &[A, AAAA, CNAME]);
    ask(format!("c2.{z}"), &[TXT, A]);
    ask(format!("sub.{z}"), &[NS, DS, A]);
    ask(format!("x.sub.{z}"), &[A]);
    ask(format!("b.deep.{z}"), &[A, TXT]);
    ask(format!("a.b.deep.{z}"), &[A]);
    ask(format!("t.{z}"), &[TXT]);
    for id in ids {
        ask(format!("{id}.{z}"), &[A, AAAA, HTTPS, TXT, NS]);
        ask(format!("x.{id}.{z}"), &[TXT, A]);
    }
    out
}

/// The same summary as [`summary`], with the additional section when the answer is a referral
/// (its glue).
fn summary_with_glue(m: &Message) -> String {
    let mut s = summary(m);
    if !m.metadata.authoritative && m.answers.is_empty() {
        let mut glue: Vec<String> = m.additionals.iter().map(line).collect();
        glue.sort();
        write!(s, "\n  glue: {glue:?}").unwrap();
    }
    s
}

/// The UDP answer with its ID cleared and its question's name lowercased: what must not change
/// between a fresh answer and a cached one.
fn normalized(mut bytes: Vec<u8>, qname_len: usize) -> Vec<u8> {
    bytes[0] = 0;
    bytes[1] = 0;
    for b in &mut bytes[12..12 + qname_len] {
        b.make_ascii_lowercase();
    }
    bytes
}

/// Random case, as resolvers with 0x20 randomization ask.
fn mixed_case(name: &str, rng: &mut Rng) -> String {
    name.chars()
        .map(|c| {
            if rng.below(2) == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

/// Random creates, deletes, suspensions and record edits through the API; after each, every
/// question's UDP answer (asked twice, so the second comes from the answer cache, the first
/// possibly too) equals its TCP answer and Knot's for a zone file the test writes itself.
/// `PORTCULLIS_TEST_SEED=N` replays a run; `PORTCULLIS_TEST_CHANGES=N` sets its length.
#[tokio::test]
async fn answers_stay_right_through_random_changes() {
    let seed = std::env::var("PORTCULLIS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let changes: usize = std::env::var("PORTCULLIS_TEST_CHANGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    println!("seed {seed} (replay with PORTCULLIS_TEST_SEED={seed})");
    let mut rng = Rng(seed);
    let node = dns_node();
    let ours = node.dns_addr().await;
    let ids: Vec<String> = (0..5).map(|_| rng.uuid()).collect();
    let pool = record_pool(&ids);
    let questions = questions(&ids);
    let mut model = Model::default();
    let mut deleted = std::collections::BTreeSet::new();
    let knot = start_knot(Some(&model.zone_file(1)), None);
    // Other clients keep asking the same questions while the changes land, so the answer cache
    // is full and busy when each change arrives (and sometimes sees every view, sometimes skips
    // some). Whatever it answers must parse and never be SERVFAIL.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = {
        let stop = stop.clone();
        let requests: Vec<Vec<u8>> = questions
            .iter()
            .map(|(name, rtype)| query_message(name, *rtype).to_vec().unwrap())
            .collect();
        std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut buf = [0u8; 65535];
            let mut asked = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for request in &requests {
                    socket.send_to(request, ours).unwrap();
                    let n = socket.recv(&mut buf).expect("an answer under load");
                    let answer = Message::from_vec(&buf[..n]).expect("a parseable answer");
                    assert_ne!(
                        answer.metadata.response_code,
                        hickory_proto::op::ResponseCode::ServFail
                    );
                    asked += 1;
                }
            }
            asked
        })
    };
    let mut compared = 0;
    for step in 0..changes {
        let what = match rng.below(4) {
            0 => {
                let fresh: Vec<&String> = ids
                    .iter()
                    .filter(|id| !model.services.contains(*id) && !deleted.contains(*id))
                    .collect();
                if fresh.is_empty() {
                    continue;
                }
                let id = fresh[rng.below(fresh.len())].clone();
                create_service_with_id(&node, &id).await;
                model.services.insert(id.clone());
                format!("create service {id}")
            }
            1 => {
                let live: Vec<String> = model.services.iter().cloned().collect();
                if live.is_empty() {
                    continue;
                }
                let id = live[rng.below(live.len())].clone();
                if rng.below(2) == 0 {
                    let r = node
                        .api(Method::DELETE, &format!("/v1/services/{id}"), None)
                        .await;
                    assert_eq!(r.status, StatusCode::NO_CONTENT);
                    model.services.remove(&id);
                    deleted.insert(id.clone());
                    format!("delete service {id}")
                } else {
                    let status = ["suspended", "active"][rng.below(2)];
                    let r = node
                        .api(
                            Method::PATCH,
                            &format!("/v1/services/{id}"),
                            Some(json!({ "status": status })),
                        )
                        .await;
                    assert_eq!(r.status, StatusCode::OK);
                    format!("set service {id} {status}")
                }
            }
            _ => {
                let (name, rtype, values) = &pool[rng.below(pool.len())];
                let key = (name.clone(), rtype.to_string());
                if model.records.remove(&key).is_some() {
                    let r = node
                        .api(Method::DELETE, &format!("/v1/records/{name}/{rtype}"), None)
                        .await;
                    assert_eq!(r.status, StatusCode::NO_CONTENT);
                    format!("remove {name} {rtype}")
                } else {
                    let r = node
                        .api(
                            Method::POST,
                            "/v1/records",
                            Some(json!({"name": name, "type": rtype, "ttl": 600, "data": values})),
                        )
                        .await;
                    match r.status {
                        StatusCode::CREATED => {
                            model.records.insert(key, values.clone());
                            format!("add {name} {rtype}")
                        }
                        // A CNAME beside other data, or the reverse: refused, nothing changed.
                        StatusCode::CONFLICT => continue,
                        other => panic!("add {name} {rtype}: {other} {}", r.json()),
                    }
                }
            }
        };
        let serial = match &tcp(ours, &query_message(ZONE, RecordType::SOA)).answers[0].data {
            RData::SOA(soa) => soa.serial,
            other => panic!("not an SOA: {other:?}"),
        };
        knot.reload(&model.zone_file(serial), serial);
        let mut differences = String::new();
        for (name, rtype) in &questions {
            let request = query_message(name, *rtype);
            let qname_len = name.len() + 2;
            let first = support::dns::udp_raw(ours, &request.to_vec().unwrap()).unwrap();
            let again = query_message(&mixed_case(name, &mut rng), *rtype);
            let second = support::dns::udp_raw(ours, &again.to_vec().unwrap()).unwrap();
            let udp = Message::from_vec(&first).unwrap();
            let a = summary_with_glue(&udp);
            let t = summary_with_glue(&tcp(ours, &request));
            let k = summary_with_glue(&q(knot.addr, name, *rtype));
            compared += 1;
            if normalized(first, qname_len) != normalized(second, qname_len) {
                writeln!(
                    differences,
                    "{name} {rtype}: the cached UDP answer differs from the first"
                )
                .unwrap();
            }
            if a != t || a != k {
                writeln!(
                    differences,
                    "{name} {rtype}\n udp  {a}\n tcp  {t}\n knot {k}"
                )
                .unwrap();
            }
        }
        assert!(
            differences.is_empty(),
            "seed {seed}, step {step} ({what}): answers differ:\n{differences}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let asked = hammer
        .join()
        .expect("the clients asking meanwhile saw only good answers");
    assert!(compared > 500, "only {compared} answers compared");
    assert!(asked > 0, "the clients asking meanwhile asked nothing");
}
