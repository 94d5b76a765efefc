//! The outside world of alias domains, on loopback: Knot as the customers' authoritative
//! server, unbound as the recursive resolver (stub zones to Knot and to the node), and Pebble
//! validating through that same resolver, so names resolve as they would on the Internet.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hickory_proto::op::Message;
use hickory_proto::rr::{RData, RecordType};

use super::dns::query_message;

/// Zone serials: each write gets a higher one, so a reload is seen to have taken.
static SERIAL: AtomicU32 = AtomicU32::new(1);

/// A customer zone file: SOA, NS and `body` (relative names, TTL 1 so changes show at once).
pub fn zone_file(zone: &str, serial: u32, body: &str) -> String {
    format!(
        "$ORIGIN {zone}.\n$TTL 1\n@ SOA ns.{zone}. hostmaster.{zone}. {serial} 60 60 600 1\n@ NS ns.{zone}.\nns A 127.0.0.1\n{body}\n"
    )
}

/// Knot serving customer zones from files it reloads on demand; stopped on drop.
pub struct Knot {
    child: Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Knot {
    /// Serves `zones`, each with `body` (see [`zone_file`]).
    pub fn start(zones: &[(&str, &str)]) -> Knot {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = super::free_port();
        let d = dir.path().display();
        let mut zone_conf = String::new();
        for (zone, body) in zones {
            let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
            std::fs::write(
                dir.path().join(format!("{zone}.zone")),
                zone_file(zone, serial, body),
            )
            .expect("write zone");
            zone_conf.push_str(&format!(
                "  - domain: {zone}\n    storage: \"{d}\"\n    file: \"{zone}.zone\"\n    journal-content: none\n    zonefile-sync: -1\n"
            ));
        }
        let conf = format!(
            "server:\n    rundir: \"{d}\"\n    listen: 127.0.0.1@{port}\n    udp-workers: 1\n    tcp-workers: 1\n    background-workers: 1\ncontrol:\n    listen: \"{d}/knot.sock\"\ndatabase:\n    storage: \"{d}/db\"\nlog:\n  - target: stderr\n    any: info\nzone:\n{zone_conf}"
        );
        let conf_path = dir.path().join("knot.conf");
        std::fs::write(&conf_path, conf).expect("write knot.conf");
        let log = std::fs::File::create(dir.path().join("knot.log")).expect("log");
        let child = Command::new("knotd")
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("knotd (package knot) is installed by make test");
        let knot = Knot {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        for (zone, _) in zones {
            knot.wait_for_soa(zone, None);
        }
        knot
    }

    fn wait_for_soa(&self, zone: &str, serial: Option<u32>) {
        super::poll(&format!("Knot to serve {zone}"), || {
            let answer = try_query(self.addr, zone, RecordType::SOA)?;
            match answer.answers.first().map(|r| &r.data) {
                Some(RData::SOA(soa)) if serial.is_none_or(|s| soa.serial == s) => Some(()),
                _ => None,
            }
        });
    }

    /// Replaces `zone`'s records with `body` and waits until Knot answers with them.
    pub fn set_zone(&self, zone: &str, body: &str) {
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        std::fs::write(
            self.dir.path().join(format!("{zone}.zone")),
            zone_file(zone, serial, body),
        )
        .expect("write zone");
        let out = Command::new("knotc")
            .arg("-s")
            .arg(self.dir.path().join("knot.sock"))
            .args(["zone-reload", zone])
            .output()
            .expect("knotc (package knot)");
        assert!(
            out.status.success(),
            "knotc zone-reload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_for_soa(zone, Some(serial));
    }
}

/// One UDP question; `recursion_desired` for a resolver, clear for an authority.
fn try_query(server: SocketAddr, name: &str, rtype: RecordType) -> Option<Message> {
    let socket = UdpSocket::bind("127.0.0.1:0").ok()?;
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .ok()?;
    let mut message = query_message(name, rtype);
    message.metadata.recursion_desired = true;
    let request = message.to_vec().ok()?;
    socket.send_to(&request, server).ok()?;
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    Message::from_vec(&buf[..n]).ok()
}

/// unbound as the recursive resolver of the test world; stopped on drop.
pub struct Unbound {
    child: Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Unbound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Unbound {
    /// Resolves each of `stubs` (zone, its authoritative servers) through those servers;
    /// `port` was chosen before (the node's config names it).
    pub fn start(port: u16, stubs: &[(&str, Vec<SocketAddr>)]) -> Unbound {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path().display();
        let mut stub_conf = String::new();
        let mut nodefault = String::new();
        for (zone, servers) in stubs {
            stub_conf.push_str(&format!("stub-zone:\n  name: \"{zone}\"\n"));
            for server in servers {
                stub_conf.push_str(&format!("  stub-addr: {}@{}\n", server.ip(), server.port()));
            }
            // unbound answers special-use names itself (`test.`, `invalid.`, ...): not ours.
            if let Some(tld) = zone.rsplit('.').next() {
                nodefault.push_str(&format!("  local-zone: \"{tld}.\" nodefault\n"));
            }
        }
        let conf = format!(
            "server:\n  interface: 127.0.0.1\n  port: {port}\n  do-ip6: no\n  do-not-query-localhost: no\n  access-control: 127.0.0.0/8 allow\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 2\n  module-config: \"iterator\"\n  cache-max-ttl: 1\n  cache-max-negative-ttl: 1\n  qname-minimisation: no\n  num-threads: 1\n{nodefault}remote-control:\n  control-enable: no\n{stub_conf}"
        );
        let conf_path = dir.path().join("unbound.conf");
        std::fs::write(&conf_path, conf).expect("write unbound.conf");
        let log = std::fs::File::create(dir.path().join("unbound.log")).expect("log");
        let child = Command::new("unbound")
            .args(["-d", "-c"])
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("unbound (package unbound) is installed by make test");
        let unbound = Unbound {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        let (zone, _) = stubs.first().expect("at least one stub zone");
        super::poll("unbound to resolve", || {
            try_query(unbound.addr, zone, RecordType::SOA)
                .filter(|m| !m.answers.is_empty())
                .map(|_| ())
        });
        unbound
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("unbound.log")
    }

    /// What a client of this resolver gets: every record of the answer, in presentation form.
    pub fn resolve(&self, name: &str, rtype: RecordType) -> Vec<String> {
        try_query(self.addr, name, rtype)
            .map(|m| m.answers)
            .unwrap_or_default()
            .into_iter()
            .map(|r| format!("{} {} {}", r.name, r.record_type(), r.data))
            .collect()
    }
}
