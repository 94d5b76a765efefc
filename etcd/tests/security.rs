//! etcd reached over mutual TLS and with a user and password, as a production cluster is:
//! a real member started with its own CA (made here with openssl), and the store working
//! through it; a wrong credential is refused with a message that says so.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_config::Store;
use portcullis_etcd::{EtcdOptions, EtcdStore};

const DEADLINE: Duration = Duration::from_secs(30);

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
fn make_pki(dir: &Path) {
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ca.key",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/CN=test etcd CA",
            "-days",
            "2",
            "-out",
            "ca.pem",
        ],
    );
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &format!("{name}.key.sec1"),
            ],
        );
        // PKCS#8, which every TLS stack reads.
        openssl(
            dir,
            &[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                &format!("{name}.key.sec1"),
                "-out",
                &format!("{name}.key"),
            ],
        );
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &format!("/CN={name}"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
}

#[path = "../../tests/support/etcd.rs"]
mod etcd_cluster;
use etcd_cluster::free_port;

struct Member(Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One etcd member that takes clients over TLS with client certificates only.
fn tls_member(dir: &Path) -> (Member, String) {
    let (client, peer) = (free_port(), free_port());
    let client_url = format!("https://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "s0", "--data-dir"])
        .arg(dir.join("s0.etcd"))
        .args([
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("s0={peer_url}")])
        .arg("--cert-file")
        .arg(dir.join("server.pem"))
        .arg("--key-file")
        .arg(dir.join("server.key"))
        .arg("--trusted-ca-file")
        .arg(dir.join("ca.pem"))
        .arg("--client-cert-auth")
        .args(["--logger", "zap", "--log-outputs"])
        .arg(dir.join("s0.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (Debian etcd-server)");
    (Member(child), client_url)
}

fn tls_options(dir: &Path, endpoint: &str) -> EtcdOptions {
    let path = |f: &str| -> Option<PathBuf> { Some(dir.join(f)) };
    EtcdOptions {
        ca: path("ca.pem"),
        cert: path("client.pem"),
        key: path("client.key"),
        prefix: "/secure/".into(),
        request_timeout: Duration::from_secs(3),
        dial_timeout: Duration::from_secs(1),
        ..EtcdOptions::new([endpoint.to_string()])
    }
}

async fn connect_within_deadline(options: &EtcdOptions) -> EtcdStore {
    let start = Instant::now();
    loop {
        match EtcdStore::connect(options.clone()).await {
            Ok(store) => return store,
            Err(e) => assert!(start.elapsed() < DEADLINE, "never connected: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn etcdctl(dir: &Path, endpoint: &str, args: &[&str]) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg(format!("--cacert={}", dir.join("ca.pem").display()))
        .arg(format!("--cert={}", dir.join("client.pem").display()))
        .arg(format!("--key={}", dir.join("client.key").display()))
        .args(args)
        .output()
        .expect("etcdctl");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_and_a_password_reach_etcd_and_wrong_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let (_member, endpoint) = tls_member(dir.path());
    let options = tls_options(dir.path(), &endpoint);

    // Over mutual TLS: the store works.
    let store = connect_within_deadline(&options).await;
    let revision = store.put("services/a", b"1".to_vec()).await.unwrap();
    assert_eq!(
        store.get("services/a").await.unwrap().unwrap().mod_revision,
        revision
    );

    // Without a client certificate, or trusting another CA, it is refused, naming the endpoint.
    let no_client_cert = EtcdOptions {
        cert: None,
        key: None,
        ..options.clone()
    };
    let err = EtcdStore::connect(no_client_cert)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("127.0.0.1"), "{err}");
    let other = tempfile::tempdir().unwrap();
    make_pki(other.path());
    let wrong_ca = EtcdOptions {
        ca: Some(other.path().join("ca.pem")),
        ..options.clone()
    };
    let err = EtcdStore::connect(wrong_ca).await.err().expect("refused");
    assert!(err.to_string().contains("127.0.0.1"), "{err}");

    // With authentication on: the right user and password work, a wrong one is refused as such.
    etcdctl(dir.path(), &endpoint, &["user", "add", "root:root-secret"]);
    etcdctl(dir.path(), &endpoint, &["user", "add", "portcullis:s3cret"]);
    etcdctl(dir.path(), &endpoint, &["role", "add", "edge"]);
    etcdctl(
        dir.path(),
        &endpoint,
        &[
            "role",
            "grant-permission",
            "edge",
            "--prefix=true",
            "readwrite",
            "/secure/",
        ],
    );
    etcdctl(
        dir.path(),
        &endpoint,
        &["user", "grant-role", "portcullis", "edge"],
    );
    etcdctl(dir.path(), &endpoint, &["auth", "enable"]);
    let with_user = EtcdOptions {
        user: Some("portcullis".into()),
        password: Some("s3cret".into()),
        ..options.clone()
    };
    let store = connect_within_deadline(&with_user).await;
    store.put("services/b", b"2".to_vec()).await.unwrap();
    assert_eq!(store.get("services/a").await.unwrap().unwrap().value, b"1");
    let wrong = EtcdOptions {
        password: Some("guess".into()),
        ..with_user.clone()
    };
    let err = EtcdStore::connect(wrong).await.err().expect("refused");
    assert!(
        err.to_string().contains("authentication failed") && err.to_string().contains("127.0.0.1"),
        "{err}"
    );
}
