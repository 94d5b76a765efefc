//! The node's configuration file (TOML), parsed once at start into plain per-part structs.
//!
//! Every error names the file, the line and the key, so an operator can go straight to it.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::names::DomainName;

/// What every part of the node needs to know, fixed for the life of the process.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node: NodeSection,
    #[serde(default)]
    pub listen: ListenSection,
    pub zone: ZoneSection,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub issuer: IssuerSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub log: LogSection,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawNodeSection")]
pub struct NodeSection {
    pub id: NodeId,
    pub public_ipv4: Vec<Ipv4Addr>,
    pub public_ipv6: Vec<Ipv6Addr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeSection {
    id: NodeId,
    #[serde(default)]
    public_ipv4: Vec<Ipv4Addr>,
    #[serde(default)]
    public_ipv6: Vec<Ipv6Addr>,
}

impl TryFrom<RawNodeSection> for NodeSection {
    type Error = String;
    fn try_from(raw: RawNodeSection) -> Result<Self, Self::Error> {
        if raw.public_ipv4.is_empty() && raw.public_ipv6.is_empty() {
            return Err(
                "a node needs at least one public address: set node.public_ipv4 or node.public_ipv6 (the DNS answers point clients at them)"
                    .into(),
            );
        }
        Ok(NodeSection {
            id: raw.id,
            public_ipv4: raw.public_ipv4,
            public_ipv6: raw.public_ipv6,
        })
    }
}

/// A node's name in the fleet: one DNS label, so it can name a host too.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct NodeId(String);

impl NodeId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        let ok = !value.is_empty()
            && value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !value.starts_with('-')
            && !value.ends_with('-');
        if ok {
            Ok(NodeId(value))
        } else {
            Err(format!(
                "`{value}` is not a node id; use 1 to 63 lowercase letters, digits and inner hyphens, e.g. edge-1"
            ))
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// UDP and TCP on each.
    #[serde(default = "default_dns")]
    pub dns: Vec<SocketAddr>,
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    #[serde(default = "default_https")]
    pub https: SocketAddr,
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
}

fn default_dns() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], 53))]
}
fn default_http() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 80))
}
fn default_https() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9080))
}

impl Default for ListenSection {
    fn default() -> Self {
        ListenSection {
            dns: default_dns(),
            http: default_http(),
            https: default_https(),
            admin: default_admin(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneSection {
    /// The platform zone: every service's canonical name is `<service-id>.<name>`.
    pub name: DomainName,
    #[serde(default)]
    pub nameservers: Vec<DomainName>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    #[default]
    Embedded,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    #[serde(default)]
    pub kind: StoreKind,
    /// The node's state directory: the store file, the dev CA, the admin token by default.
    #[serde(default = "default_state_dir")]
    pub path: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/portcullis")
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            kind: StoreKind::Embedded,
            path: default_state_dir(),
        }
    }
}

impl StoreSection {
    pub fn database_file(&self) -> PathBuf {
        self.path.join("state.redb")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssuerKind {
    /// A local CA in the state directory: certificates with no internet, trusted by whoever
    /// trusts its root (`portcullis ca root`).
    #[default]
    Dev,
}

#[derive(Clone, Debug, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerSection {
    #[serde(default)]
    pub kind: IssuerKind,
}

#[derive(Clone, Debug, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Bearer token for the admin API; generated (mode 0600) when the file does not exist.
    /// Default: `<store.path>/admin.token`.
    pub token_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `portcullis=debug,info`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_log_level() -> String {
    "info".into()
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Text,
            level: default_log_level(),
        }
    }
}

/// A configuration file that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// Dotted path of the key, e.g. `listen.http`.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: None,
            message: format!("cannot read the configuration file: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses `text`; `file` only names it in errors.
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let error = |span: Option<std::ops::Range<usize>>, key: Option<String>, message: &str| {
            ConfigError {
                file: file.to_path_buf(),
                line: span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1),
                key,
                message: message.trim().to_string(),
            }
        };
        let de = toml::Deserializer::parse(text).map_err(|e| error(e.span(), None, e.message()))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let key = (path != ".").then_some(path);
            let inner = e.into_inner();
            error(inner.span(), key, inner.message())
        })
    }

    /// The configuration of `serve --dev`: loopback high ports, zone `app.localhost` (names under
    /// `.localhost` resolve to loopback in curl and browsers), state in `state_dir`.
    pub fn dev(state_dir: &Path) -> Self {
        let lo4 = Ipv4Addr::LOCALHOST;
        NodeConfig {
            node: NodeSection {
                id: NodeId("dev".into()),
                public_ipv4: vec![lo4],
                public_ipv6: vec![Ipv6Addr::LOCALHOST],
            },
            listen: ListenSection {
                dns: vec![SocketAddr::from((lo4, 8053))],
                http: SocketAddr::from((lo4, 8080)),
                https: SocketAddr::from((lo4, 8443)),
                admin: SocketAddr::from((lo4, 9080)),
            },
            zone: ZoneSection {
                // A literal that passes validation; the test below keeps it so.
                name: DomainName::parse("app.localhost").unwrap_or_else(|_| unreachable!()),
                nameservers: Vec::new(),
            },
            store: StoreSection {
                kind: StoreKind::Embedded,
                path: state_dir.to_path_buf(),
            },
            issuer: IssuerSection::default(),
            admin: AdminSection {
                token_file: Some(state_dir.join("admin.token")),
            },
            log: LogSection::default(),
        }
    }

    pub fn admin_token_file(&self) -> PathBuf {
        self.admin
            .token_file
            .clone()
            .unwrap_or_else(|| self.store.path.join("admin.token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../portcullis.example.toml");

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(Path::new("t.toml"), text)
    }

    #[test]
    fn example_parses() {
        let cfg = parse(EXAMPLE).unwrap();
        assert_eq!(cfg.node.id.as_str(), "edge-1");
        assert_eq!(cfg.zone.name.as_str(), "app.example.test");
        assert_eq!(cfg.listen.admin, "127.0.0.1:9080".parse().unwrap());
    }

    #[test]
    fn dev_config_is_valid() {
        let cfg = NodeConfig::dev(Path::new("/tmp/x"));
        assert_eq!(cfg.zone.name.as_str(), "app.localhost");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = EXAMPLE.replacen("[listen]\n", "[listen]\nhttps_port = 4\n", 1);
        let err = parse(&text).unwrap_err();
        let line = text
            .lines()
            .position(|l| l.starts_with("https_port"))
            .unwrap()
            + 1;
        assert_eq!(err.line, Some(line), "{err}");
        assert!(err.to_string().contains("https_port"), "{err}");
        assert_eq!(err.key.as_deref(), Some("listen.https_port"));
    }

    #[test]
    fn bad_value_names_key_and_line() {
        let text = EXAMPLE.replacen("http = \"0.0.0.0:80\"", "http = \"0.0.0.0:eighty\"", 1);
        assert_ne!(text, EXAMPLE);
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("listen.http"), "{err}");
        let line = text.lines().position(|l| l.contains("eighty")).unwrap() + 1;
        assert_eq!(err.line, Some(line), "{err}");
    }

    #[test]
    fn bad_zone_name_is_explained() {
        let text = EXAMPLE.replacen("name = \"app.example.test\"", "name = \"app..test\"", 1);
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("zone.name"), "{err}");
        assert!(err.message.contains("empty label"), "{err}");
    }

    #[test]
    fn node_without_address_is_refused() {
        let text = "[node]\nid = \"a\"\n[zone]\nname = \"z.test\"\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("node"), "{err}");
        assert!(err.message.contains("public address"), "{err}");
    }
}
