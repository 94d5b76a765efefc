//! Test support: start a real `portcullis` process on loopback ports, talk to it over HTTP and
//! through its own CLI. Waits poll with a deadline; nothing sleeps for a fixed time.

#![allow(dead_code)] // each test binary uses its own part of this module
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

pub mod backend;
pub mod dns;
pub mod etcd;
pub mod fleet;
pub mod pebble;
pub mod tls;
pub mod world;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub const DEADLINE: Duration = Duration::from_secs(30);
/// Pause between two looks in a poll loop (polling, not waiting: every loop has a deadline).
pub const POLL: Duration = Duration::from_millis(10);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_portcullis")
}

/// Calls `check` until it returns `Some`, or fails the test after `DEADLINE`.
pub fn poll<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(POLL);
    }
}

/// A loopback port free for both TCP and UDP, for a peer (Knot, Pebble) that takes its port
/// from a config file. Taken below the kernel's ephemeral range (`ip_local_port_range` starts
/// at 32768), because a port the kernel hands out is one it may also give, a moment later, to
/// any outgoing connection of the tests, and the peer then fails to bind it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::net::{TcpListener, UdpSocket};
    // A random start (RandomState's keys), so concurrent test processes rarely try the same
    // ports; the odd stride then visits all 10,000.
    let start = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    for i in 0..10_000u64 {
        // 30000 and up is the etcd members' (support/etcd.rs).
        let port = 20_000 + ((start.wrapping_add(i.wrapping_mul(7_919))) % 10_000) as u16;
        let both_free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if both_free {
            return port;
        }
    }
    panic!("no free loopback port in 20000-29999");
}

/// A node started from a config file whose listeners all use port 0.
pub struct Node {
    child: Option<Child>,
    /// The process a reload started, which is not this test's child.
    adopted: Option<u32>,
    /// The program started (a copy, for tests that install a new binary under it).
    program: PathBuf,
    pub dir: tempfile::TempDir,
    config: PathBuf,
    pub admin: String,
    pub token: String,
}

pub fn config_text(state_dir: &Path) -> String {
    format!(
        r#"[node]
id = "test-1"
public_ipv4 = ["127.0.0.1"]

[listen]
dns = ["127.0.0.1:0"]
http = "127.0.0.1:0"
https = "127.0.0.1:0"
admin = "127.0.0.1:0"

[zone]
name = "app.example.test"
nameservers = ["ns1.example.test"]

[store]
kind = "embedded"
path = "{dir}"

[issuer]
kind = "dev"

[admin]
token_file = "{dir}/secret/admin.token"

[proxy]
header_read_timeout = "2s"
connect_timeout = "1s"
response_timeout = "2s"
shutdown_grace = "5s"
idle_timeout = "3s"
"#,
        dir = state_dir.display()
    )
}

impl Node {
    pub fn start() -> Node {
        Self::start_edited(|text| text)
    }

    /// A node whose test configuration `edit` changes first.
    pub fn start_edited(edit: impl FnOnce(String) -> String) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("portcullis.toml");
        let text = edit(config_text(&dir.path().join("state")));
        std::fs::write(&config, text).expect("write config");
        Self::start_with(dir, &config)
    }

    pub fn start_with(dir: tempfile::TempDir, config: &Path) -> Node {
        Self::start_program(dir, config, PathBuf::from(bin()))
    }

    /// A node run from `program` (a copy of the binary a test may replace).
    pub fn start_program(dir: tempfile::TempDir, config: &Path, program: PathBuf) -> Node {
        let mut node = Node {
            child: None,
            adopted: None,
            program,
            admin: String::new(),
            token: String::new(),
            config: config.to_path_buf(),
            dir,
        };
        node.spawn();
        node
    }

    /// Starts the process again on the same configuration and state (after `stop`).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the node first");
        self.spawn();
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("node.log"))
            .expect("log file");
        let child = Command::new(&self.program)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            // mimalloc returns freed pages to the OS after a delay, so RSS lags what is live by
            // megabytes; at once, tests that look at memory see what the node holds.
            .env("MIMALLOC_PURGE_DELAY", "0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start portcullis");
        self.child = Some(child);
        let state = self.state_dir();
        self.admin = poll("the node to write admin.url", || {
            self.assert_running();
            read_trimmed(&state.join("admin.url"))
        });
        self.token = read_trimmed(&state.join("secret/admin.token")).expect("admin token written");
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn pid(&self) -> u32 {
        match self.adopted {
            Some(pid) => pid,
            None => self.child.as_ref().expect("running").id(),
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// After a reload handed the node to process `pid`: waits for the old process to exit by
    /// itself, and follows the new one from now on.
    pub fn follow_reload(&mut self, pid: u32) -> ExitStatus {
        assert_ne!(pid, self.pid(), "a reload starts a new process");
        let old = self.pid();
        let status = match self.child.take() {
            Some(mut child) => poll("the old process to exit", || {
                child.try_wait().expect("wait")
            }),
            None => {
                poll("the old process to exit", || gone(old).then_some(()));
                ExitStatus::default()
            }
        };
        self.adopted = Some(pid);
        status
    }

    /// The dev CA's root certificate (PEM).
    pub fn root_pem(&self) -> String {
        std::fs::read_to_string(self.state_dir().join("dev-ca/root.pem")).expect("dev CA root")
    }

    /// The bound listener addresses, as `/readyz` reports them.
    pub async fn listener(&self, which: &str) -> SocketAddr {
        let ready = http(Method::GET, &format!("{}/readyz", self.admin), None, None).await;
        ready.json()["listeners"][which]
            .as_str()
            .unwrap_or_else(|| panic!("no {which} listener in /readyz"))
            .parse()
            .expect("listener address")
    }

    /// The first DNS address (UDP and TCP), as `/readyz` reports it.
    pub async fn dns_addr(&self) -> SocketAddr {
        let ready = http(Method::GET, &format!("{}/readyz", self.admin), None, None).await;
        ready.json()["listeners"]["dns"][0]
            .as_str()
            .expect("a DNS listener in /readyz")
            .parse()
            .expect("DNS address")
    }

    /// Creates a service through the API and waits until its certificate is served.
    /// Returns its id and canonical host.
    pub async fn service(&self, backends: &[SocketAddr]) -> (String, String) {
        let body = serde_json::json!({
            "backends": backends.iter().map(|b| b.to_string()).collect::<Vec<_>>()
        });
        let created = http(
            Method::POST,
            &format!("{}/v1/services", self.admin),
            Some(&self.token),
            Some(("application/json", body.to_string().into_bytes())),
        )
        .await;
        assert_eq!(
            created.status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&created.body)
        );
        let id = created.json()["id"].as_str().unwrap().to_string();
        self.wait_certificate(&id, |c| c["status"] == "active")
            .await;
        let host = format!("{id}.app.example.test");
        (id, host)
    }

    /// Polls the service until its certificate view satisfies `ok`; returns that view.
    pub async fn wait_certificate(
        &self,
        id: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let url = format!("{}/v1/services/{id}", self.admin);
        let start = Instant::now();
        loop {
            let v = http(Method::GET, &url, Some(&self.token), None)
                .await
                .json();
            if ok(&v["certificate"]) {
                return v["certificate"].clone();
            }
            assert!(
                start.elapsed() < DEADLINE,
                "certificate of {id} never got there: {v}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// A scrape of `/metrics`, as Prometheus gets it (no token).
    pub async fn metrics(&self) -> String {
        let reply = http(Method::GET, &format!("{}/metrics", self.admin), None, None).await;
        assert_eq!(reply.status, StatusCode::OK);
        String::from_utf8(reply.body).expect("metrics are text")
    }

    /// Calls the admin API with the node's token and a JSON body.
    pub async fn api(&self, method: Method, path: &str, body: Option<serde_json::Value>) -> Reply {
        let body = body.map(|b| ("application/json", b.to_string().into_bytes()));
        http(
            method,
            &format!("{}{path}", self.admin),
            Some(&self.token),
            body,
        )
        .await
    }

    fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("portcullis exited early ({status}):\n{}", self.log());
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    /// Runs the CLI against this node off the async runtime (a reload's answer waits for the
    /// new process, which the runtime may be serving traffic to meanwhile).
    pub async fn cli_blocking(&self, args: &[&str]) -> Output {
        let args = self.cli_args(args);
        tokio::task::spawn_blocking(move || run_cli(&args))
            .await
            .expect("the CLI task")
    }

    /// `portcullis reload` through the CLI, which must succeed; then follows the new process
    /// (the old one must exit cleanly). Returns the new process's id.
    pub async fn reload(&mut self) -> u32 {
        let before = self.pid();
        let out = self.cli_blocking(&["--json", "reload"]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(answer["previous_pid"], before);
        let after = answer["pid"].as_u64().unwrap() as u32;
        let status = tokio::task::block_in_place(|| self.follow_reload(after));
        assert!(status.success(), "the old process exits cleanly: {status}");
        after
    }

    /// The CLI's arguments to talk to this node, then `args`: for [`run_cli`] off the runtime.
    pub fn cli_args(&self, args: &[&str]) -> Vec<String> {
        ["--admin", &self.admin, "--token", &self.token]
            .iter()
            .chain(args)
            .map(|s| s.to_string())
            .collect()
    }

    /// Runs the CLI against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(["--admin", &self.admin, "--token", &self.token])
            .args(args)
            .env_remove("PORTCULLIS_ADMIN_URL")
            .env_remove("PORTCULLIS_ADMIN_TOKEN")
            .output()
            .expect("run the CLI")
    }

    /// SIGTERM, then waits for the exit.
    /// The state directory stays until the `Node` is dropped, for the test to inspect.
    pub fn stop(&mut self) -> ExitStatus {
        if let Some(pid) = self.adopted.take() {
            signal(pid, "-TERM");
            poll("the process to exit", || gone(pid).then_some(()));
            return ExitStatus::default();
        }
        let mut child = self.child.take().expect("running");
        terminate(&mut child)
    }
}

impl Node {
    /// SIGKILL: the process finishes nothing. It leaves `admin.url` behind, which is removed so
    /// that `restart` waits for the new process's.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
        let _ = std::fs::remove_file(self.state_dir().join("admin.url"));
    }
}

pub fn terminate(child: &mut Child) -> ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    poll("the process to exit", || child.try_wait().expect("wait"))
}

/// Runs the CLI with `args` (see [`Node::cli_args`]).
pub fn run_cli(args: &[String]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("PORTCULLIS_ADMIN_URL")
        .env_remove("PORTCULLIS_ADMIN_TOKEN")
        .output()
        .expect("run the CLI")
}

/// Sends a signal (`-TERM`, `-HUP`, ...) to a process.
pub fn signal(pid: u32, which: &str) {
    let status = Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {which} {pid}");
}

/// The process has exited (a zombie its new parent has not reaped yet counts as exited).
pub fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(pid) = self.adopted.take() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The stable error code of an API error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {}", String::from_utf8_lossy(&self.body)))
            .to_string()
    }
}

/// One HTTP/1.1 request with an optional bearer token and body.
pub async fn http(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder().method(method).uri(url);
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let body = match body {
        Some((content_type, bytes)) => {
            req = req.header("content-type", content_type);
            Full::new(Bytes::from(bytes))
        }
        None => Full::new(Bytes::new()),
    };
    let response = client
        .request(req.body(body).expect("request"))
        .await
        .expect("HTTP request");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}
