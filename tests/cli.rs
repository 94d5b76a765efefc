//! The CLI end to end against a real node, and one run of `serve --dev` itself.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use portcullis_config::model::{Certificate, CertificateStatus};
use portcullis_config::{EmbeddedStore, Store, keys};
use serde_json::Value;
use support::{Node, bin, poll};

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &std::process::Output) -> Value {
    serde_json::from_str(&ok(out)).expect("--json prints JSON")
}

/// Reads the stored certificate of `domain` after the node stopped, and checks that it chains
/// to the dev CA root the CLI prints.
async fn assert_chain_verifies(state_dir: &Path, domain: &str, root_pem: &str) {
    let store: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open(state_dir.join("state.redb"))
            .await
            .unwrap(),
    );
    let kv = store
        .get(&keys::certificate(domain))
        .await
        .unwrap()
        .unwrap();
    let cert: Certificate = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(cert.status, CertificateStatus::Active);
    assert!(cert.chain_pem.is_empty(), "the chain is kept with the key");
    let stored = store
        .get(&cert.key_ref)
        .await
        .unwrap()
        .expect("chain and key stored");
    let material = portcullis_config::CertificateMaterial::decode(&stored.value, None)
        .expect("chain and key as DER");
    let (_, leaf) = x509_parser::parse_x509_certificate(&material.chain[0]).unwrap();
    let (_, root) = x509_parser::pem::parse_x509_pem(root_pem.as_bytes()).unwrap();
    let root = root.parse_x509().unwrap();
    leaf.verify_signature(Some(root.public_key()))
        .expect("leaf signed by the dev CA root");
    let names = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(format!("{:?}", names.value).contains(domain));
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_manages_services_end_to_end() {
    let node = Node::start();

    let created = json(&node.cli(&["service", "create", "--backend", "127.0.0.1:3000", "--json"]));
    let id = created["id"].as_str().unwrap().to_string();
    let domain = created["canonical_domain"].as_str().unwrap().to_string();
    assert_eq!(domain, format!("{id}.app.example.test"));
    assert_eq!(created["backends"], serde_json::json!(["127.0.0.1:3000"]));
    assert_eq!(created["status"], "active");

    let human = ok(&node.cli(&["service", "create", "--backend", "vm-2.internal:8080"]));
    assert!(human.starts_with("created service "), "{human}");
    assert!(human.contains("vm-2.internal:8080"));

    let table = ok(&node.cli(&["service", "list"]));
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains(&id) && table.contains(&domain), "{table}");
    assert_eq!(
        table.lines().count(),
        3,
        "header and two services:\n{table}"
    );
    let listed = json(&node.cli(&["service", "list", "--json"]));
    assert_eq!(listed["services"].as_array().unwrap().len(), 2);

    let updated = json(&node.cli(&[
        "service",
        "set-backends",
        &id,
        "--backend",
        "127.0.0.1:3001",
        "--backend",
        "127.0.0.1:3002",
        "--json",
    ]));
    assert_eq!(
        updated["backends"],
        serde_json::json!(["127.0.0.1:3001", "127.0.0.1:3002"])
    );
    let shown = ok(&node.cli(&["service", "show", &id]));
    assert!(shown.contains("127.0.0.1:3001, 127.0.0.1:3002"), "{shown}");

    poll("the certificate to be issued", || {
        let v = json(&node.cli(&["service", "show", &id, "--json"]));
        (v["certificate"]["status"] == "active").then_some(())
    });
    let certs = ok(&node.cli(&["cert", "list"]));
    assert!(
        certs.contains(&domain) && certs.contains("active"),
        "{certs}"
    );

    // Failures: one line on stderr, a non-zero exit code.
    let bad = node.cli(&["service", "create", "--backend", "127.0.0.1"]);
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("backends[0]") && stderr.contains("validation_failed"),
        "{stderr}"
    );

    let root = ok(&Command::new(bin())
        .args(["ca", "root", "--state-dir"])
        .arg(node.state_dir())
        .output()
        .unwrap());
    assert!(root.starts_with("-----BEGIN CERTIFICATE-----"), "{root}");
    let via_config = ok(&Command::new(bin())
        .args(["ca", "root", "--config"])
        .arg(node.dir.path().join("portcullis.toml"))
        .output()
        .unwrap());
    assert_eq!(root, via_config);

    ok(&node.cli(&["service", "delete", &id]));
    let gone = node.cli(&["service", "show", &id]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("service_deleted"));

    let other = listed["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] != id.as_str())
        .unwrap()["canonical_domain"]
        .as_str()
        .unwrap()
        .to_string();
    let mut node = node;
    let status = node.stop();
    assert!(status.success());
    let state_dir = node.state_dir();
    assert_chain_verifies(&state_dir, &other, &root).await;
}

#[test]
fn cli_reports_unreachable_and_missing_admin() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args([
            "--admin",
            "http://127.0.0.1:1",
            "--token",
            "t",
            "service",
            "list",
        ])
        .current_dir(empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach the admin API"), "{stderr}");
    assert!(stderr.contains("refused"), "the cause is shown: {stderr}");

    let out = Command::new(bin())
        .args(["service", "list"])
        .current_dir(empty.path())
        .env_remove("PORTCULLIS_ADMIN_URL")
        .env_remove("PORTCULLIS_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--admin"));
}

#[test]
fn cli_takes_admin_from_the_environment() {
    let node = Node::start();
    let out = Command::new(bin())
        .args(["service", "list", "--json"])
        .env("PORTCULLIS_ADMIN_URL", &node.admin)
        .env("PORTCULLIS_ADMIN_TOKEN", &node.token)
        .output()
        .unwrap();
    assert_eq!(json(&out)["services"], serde_json::json!([]));
}

/// `serve --dev` on its documented loopback ports, driven through `--state-dir`.
#[test]
fn serve_dev_runs_a_node_with_the_dev_defaults() {
    let cwd = tempfile::tempdir().unwrap();
    let state = cwd.path().join("dev-state");
    let mut child = Command::new(bin())
        .args(["serve", "--dev", "--state-dir"])
        .arg(&state)
        .current_dir(cwd.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = String::new();
    while !banner.contains("admin API") {
        match lines.next() {
            Some(Ok(line)) => banner.push_str(&format!("{line}\n")),
            _ => {
                let status = child.wait().unwrap();
                panic!(
                    "serve --dev ended ({status}) before it was up; is port 9080 taken?\n{banner}"
                );
            }
        }
    }
    assert!(banner.contains("app.localhost"), "{banner}");
    assert!(banner.contains("http://127.0.0.1:9080"), "{banner}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state.join("admin.token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "admin token is private");

    let cli = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .arg("--state-dir")
            .arg(&state)
            .env_remove("PORTCULLIS_ADMIN_URL")
            .env_remove("PORTCULLIS_ADMIN_TOKEN")
            .output()
            .unwrap()
    };
    let created = json(&cli(&[
        "service",
        "create",
        "--backend",
        "127.0.0.1:3000",
        "--json",
    ]));
    let domain = created["canonical_domain"].as_str().unwrap();
    assert!(domain.ends_with(".app.localhost"), "{domain}");
    assert!(created["url"].as_str().unwrap().ends_with(":8443/"));
    let root = ok(&cli(&["ca", "root"]));
    assert!(root.contains("BEGIN CERTIFICATE"));

    let status = support::terminate(&mut child);
    assert!(status.success(), "{status}");
}
