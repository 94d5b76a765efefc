//! Alias domains end to end, in a loopback world that resolves like the Internet: Knot serves
//! the customers' zones, unbound resolves (stub zones to Knot and to the node), the node
//! verifies through unbound, and Pebble validates through unbound too. Clients are the CLI,
//! the admin API and curl trusting Pebble's root only.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use hickory_proto::rr::RecordType;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use support::backend::Backend;
use support::pebble::{Pebble, PebblePlan};
use support::world::{Knot, Unbound};
use support::{DEADLINE, Node, POLL};

struct World {
    node: Node,
    knot: Knot,
    unbound: Unbound,
    _pebble: Pebble,
    /// Pebble's issuing root, the only trust curl is given.
    root: PathBuf,
    https: SocketAddr,
    _root_dir: tempfile::TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        // A failed test shows what the resolver saw.
        if std::thread::panicking() {
            eprintln!(
                "unbound's log:\n{}",
                std::fs::read_to_string(self.unbound.log_path()).unwrap_or_default()
            );
        }
    }
}

/// A node issuing from Pebble and verifying through unbound, Knot serving `zones`.
/// `verify` adds keys to the node's `[verify]` section; `more` adds whole sections.
async fn world(zones: &[(&str, &str)], verify: &str, more: &str) -> World {
    let plan = PebblePlan::new();
    let section = plan.issuer_section();
    let resolver_port = support::free_port();
    let node = Node::start_edited(|t| {
        let t = t.replace("[issuer]\nkind = \"dev\"\n", &section);
        format!(
            "{t}\n[verify]\nresolvers = [\"127.0.0.1:{resolver_port}\"]\ntimeout = \"2s\"\nfirst_retry = \"200ms\"\nmax_retry = \"1s\"\n{verify}\n{more}"
        )
    });
    let knot = Knot::start(zones);
    let mut stubs: Vec<(&str, Vec<SocketAddr>)> =
        zones.iter().map(|(z, _)| (*z, vec![knot.addr])).collect();
    stubs.push(("app.example.test", vec![node.dns_addr().await]));
    let unbound = Unbound::start(resolver_port, &stubs);
    let http = node.listener("http").await;
    let pebble = plan.start(unbound.addr, http.port(), "");
    let root_dir = tempfile::tempdir().unwrap();
    let root = root_dir.path().join("pebble-root.pem");
    std::fs::write(&root, pebble.issuing_root()).unwrap();
    let https = node.listener("https").await;
    World {
        node,
        knot,
        unbound,
        _pebble: pebble,
        root,
        https,
        _root_dir: root_dir,
    }
}

/// curl through `host`, resolved to the node, trusting Pebble's root only: `Ok((status,
/// body))`, or `Err(curl's error)` when no HTTP answer came (e.g. the TLS handshake failed).
fn curl(w: &World, host: &str) -> Result<(u16, String), String> {
    let port = w.https.port();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&w.root)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .args(["-w", "\n%{http_code}"])
        .arg(format!("https://{host}:{port}/"))
        .output()
        .expect("curl");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

async fn wait_domain(node: &Node, name: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let v = node
            .api(Method::GET, &format!("/v1/domains/{name}"), None)
            .await
            .json();
        if ok(&v) {
            return v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{name} never got there: {v}\n{}",
            node.log()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// `domain verify` until it verifies: a resolver may hold the old answer for its TTL (1 s).
fn verify_by_hand(node: &Node, name: &str) -> String {
    support::poll(&format!("`domain verify {name}` to verify"), || {
        let out = node.cli(&["domain", "verify", name]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
}

async fn add(node: &Node, id: &str, name: &str) -> support::Reply {
    node.api(
        Method::POST,
        &format!("/v1/services/{id}/domains"),
        Some(json!({ "name": name })),
    )
    .await
}

fn backend_of(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["backend"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cname_alias_is_verified_certified_by_pebble_and_served() {
    let w = world(&[("example.com", "")], "", "").await;
    let backend = Backend::start("shop").await;
    let (id, canonical) = w.node.service(&[backend.addr]).await;
    w.knot.set_zone(
        "example.com",
        &format!("api CNAME {canonical}.\nelsewhere CNAME app.other-host.net.\n"),
    );
    // The world resolves the alias to the node, as the CA will.
    let resolved = w.unbound.resolve("api.example.com", RecordType::A);
    assert!(
        resolved.iter().any(|r| r.ends_with("A 127.0.0.1")),
        "{resolved:?}"
    );

    let out = w.node.cli(&[
        "service",
        "add-domain",
        &id,
        "api.example.com",
        "--wait",
        "--wait-timeout",
        "30",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "add-domain --wait failed: {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.node.log()
    );
    assert!(stdout.contains("verified"), "{stdout}");
    assert!(stdout.contains("served with its certificate"), "{stdout}");

    // Served by Host and SNI with its own certificate, chained to Pebble's root.
    let (status, body) = curl(&w, "api.example.com").unwrap();
    assert_eq!(
        (status, backend_of(&body).as_str()),
        (200, "shop"),
        "{body}"
    );
    let shown = w
        .node
        .api(Method::GET, "/v1/domains/api.example.com", None)
        .await
        .json();
    assert_eq!(shown["status"], "verified", "{shown}");
    assert_eq!(shown["proof"], "cname", "{shown}");
    assert_eq!(shown["certificate"]["status"], "active", "{shown}");
    assert_eq!(shown["certificate"]["domains"][0], "api.example.com");
    let trace = &shown["trace"];
    assert_eq!(trace["verified"], true, "{shown}");
    let steps = trace["steps"].as_array().unwrap();
    assert!(
        steps.iter().any(|s| s["name"] == "api.example.com"
            && s["type"] == "CNAME"
            && s["resolver"] == w.unbound.addr.to_string()
            && s["rcode"] == "NOERROR"),
        "{trace}"
    );

    // A name pointing elsewhere fails, and the trace names the foreign target.
    let added = add(&w.node, &id, "elsewhere.example.com").await;
    assert_eq!(added.status, StatusCode::ACCEPTED, "{}", added.json());
    let failed = wait_domain(&w.node, "elsewhere.example.com", |v| {
        v["status"] == "failed"
    })
    .await;
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("elsewhere.example.com CNAME app.other-host.net: not this platform"),
        "{failed}"
    );
    assert!(
        failed["trace"]["verdict"]
            .as_str()
            .unwrap()
            .contains("app.other-host.net")
    );
    assert!(failed["next_check_at"].is_string(), "retried: {failed}");
    // Not served: neither routed by Host nor given a certificate for SNI.
    assert!(curl(&w, "elsewhere.example.com").is_err());

    // Another service cannot take a name this one holds.
    let (other, _) = w.node.service(&[backend.addr]).await;
    let taken = add(&w.node, &other, "api.example.com").await;
    assert_eq!(taken.status, StatusCode::CONFLICT);
    assert_eq!(taken.code(), "domain_taken");

    // `domain show` prints the trace; removing frees the name at once.
    let shown = w.node.cli(&["domain", "show", "api.example.com"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{text}");
    assert!(text.contains("api.example.com CNAME"), "{text}");
    let removed = w.node.cli(&["domain", "remove", &id, "api.example.com"]);
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    assert!(curl(&w, "api.example.com").is_err(), "served after removal");
    let free = add(&w.node, &other, "api.example.com").await;
    assert_eq!(free.status, StatusCode::ACCEPTED, "{}", free.json());
    // Deleting the service that holds it frees it too.
    let deleted = w
        .node
        .api(Method::DELETE, &format!("/v1/services/{other}"), None)
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let back = add(&w.node, &id, "api.example.com").await;
    assert_eq!(back.status, StatusCode::ACCEPTED, "{}", back.json());
    wait_domain(&w.node, "api.example.com", |v| {
        v["service"] == id.as_str() && v["certificate"]["status"] == "active"
    })
    .await;
    assert_eq!(curl(&w, "api.example.com").unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apex_names_verify_by_an_alias_mode_https_record_or_by_addresses_and_the_token() {
    let w = world(
        &[("example.org", ""), ("example.net", "@ A 127.0.0.1\n")],
        "",
        "",
    )
    .await;
    let backend = Backend::start("apex").await;
    let (id, canonical) = w.node.service(&[backend.addr]).await;

    // RFC 9460 alias mode at the apex, where a CNAME cannot stand.
    w.knot.set_zone(
        "example.org",
        &format!("@ HTTPS 0 {canonical}.\n@ A 127.0.0.1\n"),
    );
    assert_eq!(
        add(&w.node, &id, "example.org").await.status,
        StatusCode::ACCEPTED
    );
    let verified = wait_domain(&w.node, "example.org", |v| {
        v["status"] == "verified" && v["certificate"]["status"] == "active"
    })
    .await;
    assert_eq!(verified["proof"], "https_alias", "{verified}");
    let (status, body) = curl(&w, "example.org").unwrap();
    assert_eq!((status, backend_of(&body).as_str()), (200, "apex"));

    // Addresses alone do not say which tenant owns the name: the TXT token is missing.
    let added = add(&w.node, &id, "example.net").await.json();
    let token = added["token"].as_str().unwrap().to_string();
    let txt = added["instructions"]["addresses_and_token"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "TXT")
        .cloned()
        .unwrap();
    assert_eq!(txt["name"], "_portcullis.example.net");
    let failed = wait_domain(&w.node, "example.net", |v| v["status"] == "failed").await;
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("_portcullis.example.net has no TXT record"),
        "{failed}"
    );
    // The token is added.
    w.knot.set_zone(
        "example.net",
        &format!("@ A 127.0.0.1\n_portcullis TXT \"{token}\"\n"),
    );
    // The resolver may hold the old answer for its TTL: check by hand until it verifies.
    let text = verify_by_hand(&w.node, "example.net");
    assert!(text.contains("addresses_and_token"), "{text}");
    let served = wait_domain(&w.node, "example.net", |v| {
        v["certificate"]["status"] == "active"
    })
    .await;
    assert_eq!(served["status"], "verified");
    assert_eq!(curl(&w, "example.net").unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_stops_pointing_here_moves_after_the_grace_while_clients_keep_asking() {
    let w = world(
        &[("example.com", "")],
        "grace = \"2s\"\nrecheck_interval = \"300ms\"\n",
        "",
    )
    .await;
    let backend = Backend::start("mine").await;
    let (id, canonical) = w.node.service(&[backend.addr]).await;
    w.knot
        .set_zone("example.com", &format!("www CNAME {canonical}.\n"));
    assert_eq!(
        add(&w.node, &id, "www.example.com").await.status,
        StatusCode::ACCEPTED
    );
    wait_domain(&w.node, "www.example.com", |v| {
        v["status"] == "verified" && v["certificate"]["status"] == "active"
    })
    .await;

    // A client keeps asking through the whole takeover; every answer is checked.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = {
        let (stop, root, port) = (stop.clone(), w.root.clone(), w.https.port());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = Command::new("curl")
                    .args(["-sS", "--max-time", "5", "--cacert"])
                    .arg(&root)
                    .arg("--resolve")
                    .arg(format!("www.example.com:{port}:127.0.0.1"))
                    .args(["-w", "\n%{http_code}"])
                    .arg(format!("https://www.example.com:{port}/"))
                    .output()
                    .expect("curl");
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                seen.push((Instant::now(), out.status.success(), text));
            }
            seen
        })
    };
    // The customer points the name elsewhere.
    w.knot
        .set_zone("example.com", "www CNAME app.other-host.net.\n");
    let away = wait_domain(&w.node, "www.example.com", |v| {
        v["failing_since"].is_string()
    })
    .await;
    assert_eq!(
        away["status"], "verified",
        "still served during the grace: {away}"
    );
    let moved = wait_domain(&w.node, "www.example.com", |v| v["status"] == "moved").await;
    let moved_at = Instant::now();
    assert!(
        moved["reason"]
            .as_str()
            .unwrap()
            .contains("app.other-host.net"),
        "{moved}"
    );
    // Neither Host nor SNI is served now (once this node's Snapshot has the status the API
    // read from the store; the client loop checks that nothing is served a second after).
    support::poll("the moved name to be refused", || {
        curl(&w, "www.example.com").is_err().then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = answers.join().unwrap();
    assert!(!seen.is_empty());
    for (at, ok, text) in &seen {
        if *ok {
            let (body, code) = text.rsplit_once('\n').unwrap();
            if code == "404" {
                // Handshake just before the move, request just after: the edge's page for a
                // name it does not serve, which is right.
                assert!(
                    body.contains("No site is served at www.example.com"),
                    "{text}"
                );
                continue;
            }
            // Every site answer was the service's own, never anything else.
            assert_eq!((code, backend_of(body).as_str()), ("200", "mine"), "{text}");
            // The status write and this client's look can cross by a few milliseconds; a
            // full second after the move nothing is served.
            assert!(
                at.saturating_duration_since(moved_at) < std::time::Duration::from_secs(1),
                "served a second after the move"
            );
        }
    }
    let metrics = w.node.metrics().await;
    assert!(
        metrics.contains("portcullis_domains_moved_total 1")
            && metrics.contains("portcullis_domains{status=\"moved\"} 1")
            && metrics.contains("portcullis_domain_verification_seconds"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("domain"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Pointed back: served again, with no new claim needed.
    w.knot
        .set_zone("example.com", &format!("www CNAME {canonical}.\n"));
    wait_domain(&w.node, "www.example.com", |v| v["status"] == "verified").await;
    support::poll("the alias to be served again", || {
        curl(&w, "www.example.com").ok().filter(|(s, _)| *s == 200)
    });

    // Moved again, the name can be claimed by the service it points at now.
    let newcomer = Backend::start("theirs").await;
    let (theirs, their_canonical) = w.node.service(&[newcomer.addr]).await;
    let held = add(&w.node, &theirs, "www.example.com").await;
    assert_eq!(
        held.code(),
        "domain_taken",
        "verified names are not taken over"
    );
    w.knot
        .set_zone("example.com", &format!("www CNAME {their_canonical}.\n"));
    wait_domain(&w.node, "www.example.com", |v| v["status"] == "moved").await;
    let claimed = add(&w.node, &theirs, "www.example.com").await;
    assert_eq!(claimed.status, StatusCode::ACCEPTED, "{}", claimed.json());
    wait_domain(&w.node, "www.example.com", |v| {
        v["service"] == theirs.as_str() && v["certificate"]["status"] == "active"
    })
    .await;
    let (status, body) = curl(&w, "www.example.com").unwrap();
    assert_eq!((status, backend_of(&body).as_str()), (200, "theirs"));
    let mine = w
        .node
        .api(Method::GET, &format!("/v1/services/{id}/domains"), None)
        .await
        .json();
    assert_eq!(mine["domains"].as_array().unwrap().len(), 0, "{mine}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_why_and_deleting_the_service_frees_its_names_and_a_restart_keeps_status() {
    let mut w = world(
        &[("example.com", "")],
        "",
        "[limits]\ndomains_per_service = 3\n",
    )
    .await;
    let backend = Backend::start("r").await;
    let (id, canonical) = w.node.service(&[backend.addr]).await;
    w.knot
        .set_zone("example.com", &format!("api CNAME {canonical}.\n"));

    // An internationalized name is stored as its A-label.
    let idn = add(&w.node, &id, "Bücher.Example.com").await;
    assert_eq!(idn.status, StatusCode::ACCEPTED, "{}", idn.json());
    assert_eq!(idn.json()["name"], "xn--bcher-kva.example.com");
    let shown = w
        .node
        .cli(&["domain", "show", "bücher.example.com", "--json"]);
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );

    for (name, code) in [
        ("co.uk", "public_suffix"),
        ("github.io", "public_suffix"),
        ("x.app.example.test", "inside_our_zone"),
        ("a..example.com", "invalid_domain"),
        ("exa mple.com", "invalid_domain"),
        ("com", "invalid_domain"),
    ] {
        let refused = add(&w.node, &id, name).await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_REQUEST,
            "{name}: {}",
            refused.json()
        );
        assert_eq!(refused.code(), code, "{name}: {}", refused.json());
        assert!(
            !refused.json()["error"]["message"]
                .as_str()
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(
        add(&w.node, &id, "api.example.com").await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        add(&w.node, &id, "b.example.com").await.status,
        StatusCode::ACCEPTED
    );
    let over = add(&w.node, &id, "c.example.com").await;
    assert_eq!(over.status, StatusCode::CONFLICT);
    assert_eq!(over.code(), "too_many_domains");
    let cli = w.node.cli(&["service", "add-domain", &id, "co.uk"]);
    assert!(!cli.status.success());
    assert!(
        String::from_utf8_lossy(&cli.stderr).contains("public_suffix"),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );

    let verified = wait_domain(&w.node, "api.example.com", |v| {
        v["status"] == "verified" && v["certificate"]["status"] == "active"
    })
    .await;
    let failed = wait_domain(&w.node, "b.example.com", |v| v["status"] == "failed").await;

    // A restart keeps every domain's status, and serves the verified one at once. The
    // customer now also has the node answer for example.com (`dns.zones`): a live alias in a
    // zone it serves is answered like its canonical name, with `HTTPS 1 <canonical>.`.
    w.node.stop();
    let config = w.node.dir.path().join("portcullis.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}\n[dns]\nzones = [\"example.com\"]\n"),
    )
    .unwrap();
    w.node.restart();
    let dns = w.node.dns_addr().await;
    assert_eq!(
        support::dns::rdata(&support::dns::q(dns, "api.example.com", RecordType::A)),
        vec!["127.0.0.1".to_string()]
    );
    let https = support::dns::rdata(&support::dns::q(dns, "api.example.com", RecordType::HTTPS));
    assert_eq!(https.len(), 1, "{https:?}");
    assert!(
        https[0].starts_with(&format!("1 {canonical}.")),
        "{https:?}"
    );
    let failed_name = support::dns::q(dns, "b.example.com", RecordType::A);
    assert_eq!(
        failed_name.metadata.response_code,
        hickory_proto::op::ResponseCode::NXDomain,
        "a failed alias is not answered"
    );
    let again = w
        .node
        .api(Method::GET, "/v1/domains/api.example.com", None)
        .await
        .json();
    assert_eq!(again["status"], "verified");
    assert_eq!(again["verified_at"], verified["verified_at"]);
    let b = w
        .node
        .api(Method::GET, "/v1/domains/b.example.com", None)
        .await
        .json();
    assert_eq!(b["status"], "failed");
    assert!(
        b["reason"].as_str().unwrap().contains("NXDOMAIN"),
        "{b} / {failed}"
    );
    let listed = w
        .node
        .api(Method::GET, &format!("/v1/services/{id}/domains"), None)
        .await
        .json();
    assert_eq!(listed["domains"].as_array().unwrap().len(), 3, "{listed}");
    w.https = w.node.listener("https").await;
    support::poll("the alias to be served after the restart", || {
        curl(&w, "api.example.com").ok().filter(|(s, _)| *s == 200)
    });

    // Deleting the service frees its names at once.
    let deleted = w
        .node
        .api(Method::DELETE, &format!("/v1/services/{id}"), None)
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert!(curl(&w, "api.example.com").is_err());
    // Its names are gone with it (the zone is this node's now, so nobody could claim them
    // again here: the freeing of a name is checked after a removal, above).
    for name in [
        "api.example.com",
        "b.example.com",
        "xn--bcher-kva.example.com",
    ] {
        let gone = w
            .node
            .api(Method::GET, &format!("/v1/domains/{name}"), None)
            .await;
        assert_eq!(
            gone.status,
            StatusCode::NOT_FOUND,
            "{name}: {}",
            gone.json()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_comes_before_cutover_by_dns01_and_a_wildcard_the_same_way() {
    let w = world(&[("example.com", "")], "", "").await;
    let backend = Backend::start("pre").await;
    let (id, canonical) = w.node.service(&[backend.addr]).await;

    // Only `_acme-challenge` is delegated; the name itself still points elsewhere.
    let added = add(&w.node, &id, "shop.example.com").await.json();
    let delegation = &added["instructions"]["acme_challenge"][0];
    assert_eq!(
        delegation["name"], "_acme-challenge.shop.example.com",
        "{added}"
    );
    let target = delegation["value"].as_str().unwrap().to_string();
    assert!(target.ends_with(".acme.app.example.test."), "{target}");
    let mut zone = format!("_acme-challenge.shop CNAME {target}\nshop CNAME app.other-host.net.\n");
    w.knot.set_zone("example.com", &zone);
    let early = wait_domain(&w.node, "shop.example.com", |v| {
        v["certificate"]["status"] == "active"
    })
    .await;
    assert_eq!(early["delegated"], true, "{early}");
    assert_eq!(
        early["status"], "failed",
        "issued, yet not verified: {early}"
    );
    // Issued, not routed: no Host, no SNI.
    assert!(curl(&w, "shop.example.com").is_err());
    // The DNS-01 value was withdrawn once the order ended.
    let left = w
        .unbound
        .resolve("_acme-challenge.shop.example.com", RecordType::TXT);
    assert!(left.iter().all(|r| !r.contains(" TXT ")), "{left:?}");

    // Cutover: served at once, with the certificate it already had.
    zone = format!("_acme-challenge.shop CNAME {target}\nshop CNAME {canonical}.\n");
    w.knot.set_zone("example.com", &zone);
    verify_by_hand(&w.node, "shop.example.com");
    let (status, body) = curl(&w, "shop.example.com").unwrap();
    assert_eq!((status, backend_of(&body).as_str()), (200, "pre"));
    let now = w
        .node
        .api(Method::GET, "/v1/domains/shop.example.com", None)
        .await
        .json();
    assert_eq!(
        now["certificate"]["not_before"],
        early["certificate"]["not_before"]
    );

    // A wildcard alias: proven by a name only the wildcard answers, issued by DNS-01.
    let wild = add(&w.node, &id, "*.example.com").await;
    assert_eq!(wild.status, StatusCode::ACCEPTED, "{}", wild.json());
    let wild = wild.json();
    let target = wild["instructions"]["acme_challenge"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        wild["instructions"]["acme_challenge"][0]["name"],
        "_acme-challenge.example.com"
    );
    // Without the delegation it cannot be certified, and says so.
    zone.push_str(&format!("* CNAME {canonical}.\n"));
    w.knot.set_zone("example.com", &zone);
    let refused = wait_domain(&w.node, "*.example.com", |v| {
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("but a wildcard alias also needs"))
    })
    .await;
    assert_eq!(refused["status"], "failed");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("_acme-challenge.example.com CNAME"),
        "{refused}"
    );
    zone.push_str(&format!("_acme-challenge CNAME {target}\n"));
    w.knot.set_zone("example.com", &zone);
    verify_by_hand(&w.node, "*.example.com");
    let issued = wait_domain(&w.node, "*.example.com", |v| {
        v["certificate"]["status"] == "active"
    })
    .await;
    assert_eq!(
        issued["certificate"]["domains"][0], "*.example.com",
        "{issued}"
    );
    for host in ["a.example.com", "b.example.com"] {
        let (status, body) = curl(&w, host).unwrap();
        assert_eq!((status, backend_of(&body).as_str()), (200, "pre"), "{host}");
    }
    // One label only, as the certificate covers.
    assert!(curl(&w, "x.y.example.com").is_err());
}
