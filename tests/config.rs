//! Configuration errors stop `serve` with exit code 64 and a message naming the key and line.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod support;

use std::process::Command;

use support::{bin, config_text};

fn serve_with(config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = config_text(dir.path());
    let bad = good.replacen("[listen]\n", "[listen]\nhtps = \"127.0.0.1:0\"\n", 1);
    let (code, stderr) = serve_with(&bad);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("listen.htps"), "{stderr}");
    assert!(
        stderr.contains(&format!("portcullis.toml:{}:", line_of(&bad, "htps"))),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn bad_value_is_named_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = config_text(dir.path());
    let bad = good.replacen("admin = \"127.0.0.1:0\"", "admin = \"localhost:nine\"", 1);
    let (code, stderr) = serve_with(&bad);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("listen.admin"), "{stderr}");
    assert!(
        stderr.contains(&format!("portcullis.toml:{}:", line_of(&bad, "nine"))),
        "{stderr}"
    );

    let bad = good.replacen("kind = \"dev\"", "kind = \"letsencrypt\"", 1);
    let (code, stderr) = serve_with(&bad);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("issuer.kind") && stderr.contains("letsencrypt"),
        "{stderr}"
    );

    let bad = good.replacen("id = \"test-1\"", "id = \"Test 1\"", 1);
    let (code, stderr) = serve_with(&bad);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("node.id"), "{stderr}");
}

#[test]
fn missing_file_and_missing_mode_are_usage_errors() {
    let out = Command::new(bin())
        .args(["serve", "--config", "/nonexistent/portcullis.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
    let out = Command::new(bin()).args(["serve"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dev"));
}

#[test]
fn an_unusable_account_key_file_stops_serve_and_says_what_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("account.pem");
    std::fs::write(&key, "not a key\n").unwrap();
    let acme = format!(
        "kind = \"acme\"\ndirectory_url = \"https://127.0.0.1:9/dir\"\naccount_key_file = \"{}\"",
        key.display()
    );
    let bad = config_text(dir.path()).replacen("kind = \"dev\"", &acme, 1);
    let (code, stderr) = serve_with(&bad);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("issuer.account_key_file") && stderr.contains("PRIVATE KEY"),
        "{stderr}"
    );
}

#[test]
fn max_headers_of_zero_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = config_text(dir.path()).replacen("[proxy]\n", "[proxy]\nmax_headers = 0\n", 1);
    let (code, stderr) = serve_with(&bad);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("proxy.max_headers") && stderr.contains("at least 1"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "portcullis.toml:{}:",
            line_of(&bad, "max_headers")
        )),
        "{stderr}"
    );
}
