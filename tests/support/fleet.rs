//! Nodes of one fleet on a real etcd cluster: each on its own loopback address (127.0.0.11,
//! .12, ...), so DNS answers name distinct nodes and any node can be reached by the address
//! the answers give.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::Node;
use super::etcd::EtcdCluster;

/// The public (and listening) address of the fleet's `i`-th node.
pub fn node_ip(i: usize) -> String {
    format!("127.0.0.{}", 11 + i)
}

pub fn node_id(i: usize) -> String {
    format!("node-{}", (b'a' + i as u8) as char)
}

/// A fleet's shared settings: the etcd endpoints each node uses, the sealing key file.
pub struct FleetPlan {
    pub dir: tempfile::TempDir,
    pub key_file: PathBuf,
    pub prefix: String,
}

impl FleetPlan {
    pub fn new() -> FleetPlan {
        let dir = tempfile::tempdir().expect("temp dir");
        let key_file = dir.path().join("store.key");
        let out = Command::new(super::bin())
            .args(["store", "new-key", "--id", "test-key"])
            .output()
            .expect("portcullis store new-key");
        assert!(out.status.success());
        std::fs::write(&key_file, &out.stdout).expect("write the key file");
        FleetPlan {
            dir,
            key_file,
            prefix: "/portcullis-test/".into(),
        }
    }

    /// Starts node `i` talking to `endpoints`; `edit` changes its configuration text last.
    pub fn start_node(
        &self,
        i: usize,
        endpoints: &[String],
        edit: impl FnOnce(String) -> String,
    ) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("portcullis.toml");
        std::fs::write(
            &config,
            edit(self.config(i, &dir.path().join("state"), endpoints)),
        )
        .expect("write config");
        Node::start_with(dir, &config)
    }

    pub fn config(&self, i: usize, state: &Path, endpoints: &[String]) -> String {
        let ip = node_ip(i);
        let endpoints = endpoints
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        super::config_text(state)
            .replace(
                "id = \"test-1\"",
                &format!("id = \"{}\"\nlease_ttl = \"2s\"", node_id(i)),
            )
            .replace(
                "public_ipv4 = [\"127.0.0.1\"]",
                &format!("public_ipv4 = [\"{ip}\"]"),
            )
            .replace("dns = [\"127.0.0.1:0\"]", &format!("dns = [\"{ip}:0\"]"))
            .replace("http = \"127.0.0.1:0\"", &format!("http = \"{ip}:0\""))
            .replace("https = \"127.0.0.1:0\"", &format!("https = \"{ip}:0\""))
            .replace(
                "kind = \"embedded\"",
                &format!(
                    "kind = \"etcd\"\nencryption_key_file = \"{}\"",
                    self.key_file.display()
                ),
            )
            + &format!(
                "\n[store.etcd]\nendpoints = [{endpoints}]\nprefix = \"{}\"\nrequest_timeout = \"3s\"\ndial_timeout = \"500ms\"\n\n[dns]\npolicy = \"fleet\"\n",
                self.prefix
            )
    }

    /// Runs `serve` for node `i` in the foreground with `edit` applied to its configuration,
    /// for a start that is expected to fail: its exit status and stderr.
    pub fn serve_expecting_exit(
        &self,
        i: usize,
        endpoints: &[String],
        edit: impl FnOnce(String) -> String,
    ) -> (std::process::ExitStatus, String) {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("portcullis.toml");
        std::fs::write(
            &config,
            edit(self.config(i, &dir.path().join("state"), endpoints)),
        )
        .expect("write config");
        let out = Command::new(super::bin())
            .args(["serve", "--config"])
            .arg(&config)
            .output()
            .expect("run portcullis");
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Three nodes on every member of `cluster`.
    pub fn start(&self, cluster: &EtcdCluster, nodes: usize) -> Vec<Node> {
        (0..nodes)
            .map(|i| self.start_node(i, &cluster.endpoints(), |t| t))
            .collect()
    }
}

/// Every node's dev CA root, concatenated: each node issues with its own, and a certificate is
/// issued once for the whole fleet by whichever node took the name's order lock.
pub fn roots(nodes: &[Node]) -> String {
    nodes.iter().map(|n| n.root_pem()).collect()
}

pub async fn addresses(node: &Node) -> (SocketAddr, SocketAddr) {
    (node.listener("https").await, node.dns_addr().await)
}
