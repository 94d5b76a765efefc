//! A real etcd cluster on loopback for tests: `members` processes of `/usr/bin/etcd` on free
//! ports below the ephemeral range, data and logs in a temporary directory, short raft timers so
//! an election takes well under a second. Members can be killed, stopped and restarted on their
//! ports and data. Waits poll with a deadline. Calls block (they run `etcdctl`), which is fine
//! in a multi-threaded test runtime.

#![allow(dead_code)] // each test binary uses its own part of this module
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a member may take to become healthy, or to exit after SIGTERM.
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
}

/// A loopback TCP port that is free now, below the kernel's ephemeral range (from 32768), so
/// no outgoing connection of the tests takes it before etcd binds it; and above the range the
/// other test peers take theirs from (20000-29999), so a member starting in one test never
/// takes the port a Pebble or Knot of another was given a moment before.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::net::TcpListener;
    // A random start, so concurrent test processes rarely try the same ports; the odd stride
    // then visits all of them.
    let start = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    for i in 0..10_000u64 {
        let port = 30_000 + ((start.wrapping_add(i.wrapping_mul(7_919))) % 2_700) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 30000-32699");
}

impl EtcdCluster {
    /// Starts `members` members and waits until the cluster is healthy.
    pub fn start(members: usize) -> EtcdCluster {
        assert!(members > 0);
        let dir = tempfile::tempdir().unwrap();
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < members * 2 {
            let port = free_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let members: Vec<Member> = (0..members)
            .map(|i| Member {
                name: format!("n{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("t-{}", ports[0]);
        let mut cluster = EtcdCluster {
            dir,
            members,
            initial_cluster,
            token,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i);
        }
        let all = cluster.endpoints();
        cluster.wait_healthy(&all);
        cluster
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let data = self.dir.path().join(format!("{}.etcd", m.name));
        let log = self.log(i);
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "300"])
            .args(["--logger", "zap", "--log-outputs"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd is installed (Debian package etcd-server)");
        self.members[i].child = Some(child);
    }

    /// Every member's client endpoint, `127.0.0.1:port`, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    /// Members that run now.
    fn running(&self) -> Vec<String> {
        (0..self.members.len())
            .filter(|i| self.members[*i].child.is_some())
            .map(|i| self.endpoint(i))
            .collect()
    }

    fn etcdctl(&self, endpoints: &[String], args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(["--dial-timeout=1s", "--command-timeout=3s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("etcdctl is installed (Debian package etcd-client)")
    }

    fn wait_healthy(&mut self, endpoints: &[String]) {
        let start = Instant::now();
        loop {
            let out = self.etcdctl(endpoints, &["endpoint", "health"]);
            if out.status.success() {
                return;
            }
            for (i, m) in self.members.iter_mut().enumerate() {
                if let Some(child) = m.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    let log = std::fs::read_to_string(self.dir.path().join(format!("n{i}.log")))
                        .unwrap_or_default();
                    let tail: String = log.lines().rev().take(15).collect::<Vec<_>>().join("\n");
                    panic!(
                        "etcd member {i} exited ({status}); last log lines, newest first:\n{tail}"
                    );
                }
            }
            assert!(
                start.elapsed() < DEADLINE,
                "etcd at {endpoints:?} not healthy: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(POLL);
        }
    }

    /// SIGKILL: the member dies at once, mid-request.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and waits for the member to exit (etcd takes a few seconds).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("kill (procps)");
            assert!(status.success());
            let start = Instant::now();
            while child.try_wait().unwrap().is_none() {
                if start.elapsed() > DEADLINE {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("etcd member {i} did not exit after SIGTERM");
                }
                std::thread::sleep(POLL);
            }
        }
    }

    /// Starts a killed or stopped member again on its ports and data, and waits until healthy.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
        self.wait_healthy(&[self.endpoint(i)]);
    }

    /// Starts every stopped member at once (one alone has no quorum), and waits until all are
    /// healthy.
    pub fn restart_all(&mut self) {
        let stopped: Vec<usize> = (0..self.members.len())
            .filter(|i| self.members[*i].child.is_none())
            .collect();
        for &i in &stopped {
            self.spawn(i);
        }
        let endpoints: Vec<String> = stopped.iter().map(|i| self.endpoint(*i)).collect();
        self.wait_healthy(&endpoints);
    }

    /// The index of the member that leads now.
    pub fn leader(&self) -> usize {
        let start = Instant::now();
        loop {
            let out = self.etcdctl(&self.running(), &["endpoint", "status", "-w", "json"]);
            if out.status.success() {
                let statuses: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                for s in statuses.as_array().into_iter().flatten() {
                    let member = &s["Status"]["header"]["member_id"];
                    if !member.is_null() && *member == s["Status"]["leader"] {
                        let endpoint = s["Endpoint"].as_str().unwrap_or_default();
                        if let Some(i) = self
                            .endpoints()
                            .iter()
                            .position(|e| endpoint.ends_with(e.as_str()))
                        {
                            return i;
                        }
                    }
                }
            }
            assert!(start.elapsed() < DEADLINE, "no etcd leader");
            std::thread::sleep(POLL);
        }
    }

    /// Compacts the cluster's history up to `revision` (etcd keeps `revision` itself).
    pub fn compact(&self, revision: i64) {
        let out = self.etcdctl(
            &self.running(),
            &["compact", &revision.to_string(), "--physical"],
        );
        assert!(
            out.status.success(),
            "etcdctl compact: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `etcdctl put`: a value written by hand, behind every node's back.
    pub fn put(&self, key: &str, value: &str) {
        let out = self.etcdctl(&self.running(), &["put", key, value]);
        assert!(
            out.status.success(),
            "etcdctl put: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `etcdctl get --prefix`: keys and values as etcd holds them, one per line.
    pub fn get_prefix_raw(&self, prefix: &str) -> String {
        let out = self.etcdctl(&self.running(), &["get", "--prefix", prefix]);
        assert!(
            out.status.success(),
            "etcdctl get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
