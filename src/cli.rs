//! Command-line interface: arguments, and the human and JSON output of each command.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use hyper::Method;
use portcullis_config::NodeConfig;
use serde_json::{Value, json};

use crate::admin::{CertificateView, ServiceView};
use crate::client::{AdminClient, DEFAULT_STATE_DIR};
use crate::exit::{CliError, EX_SOFTWARE, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "portcullis",
    version,
    about = "Ingress edge for hosting platforms"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: Global,
}

#[derive(Args, Debug)]
struct Global {
    /// Admin API URL, e.g. http://127.0.0.1:9080
    #[arg(long = "admin", global = true, env = "PORTCULLIS_ADMIN_URL")]
    admin_url: Option<String>,
    /// Admin API bearer token
    #[arg(
        long,
        global = true,
        env = "PORTCULLIS_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// A node's state directory: `serve --dev` keeps its state there; the other commands read
    /// the admin URL and token a node wrote there [default: ./.portcullis]
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Print JSON instead of tables
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node
    Serve(ServeArgs),
    /// Manage services
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Show certificates
    #[command(subcommand)]
    Cert(CertCommand),
    /// Manage custom DNS records in the zones the node serves
    #[command(subcommand)]
    Records(RecordsCommand),
    /// The dev issuer's certificate authority
    #[command(subcommand)]
    Ca(CaCommand),
    /// Alias domains: their status, the last check's trace, checks by hand
    #[command(subcommand)]
    Domain(DomainCommand),
    /// The nodes of the fleet
    #[command(subcommand)]
    Node(NodeCommand),
    /// The state store
    #[command(subcommand)]
    Store(StoreCommand),
    /// Apply the configuration file as it is now, or a new binary installed where the running
    /// one was started from: a new process takes over the listeners and the store, the old one
    /// finishes its requests. No request fails and no connection is refused. (SIGHUP does the
    /// same.)
    Reload,
    /// Run a tiny HTTP backend that echoes each request's method, path and Host
    DemoBackend {
        #[arg(long, default_value = "127.0.0.1:3000")]
        listen: SocketAddr,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Configuration file (see portcullis.example.toml)
    #[arg(long, conflicts_with = "dev")]
    config: Option<PathBuf>,
    /// Development node: no config, loopback ports, zone app.localhost, the dev CA
    #[arg(long)]
    dev: bool,
}

#[derive(Subcommand, Debug)]
enum ServiceCommand {
    /// Create a service; it gets an id and the canonical domain <id>.<zone>
    Create {
        /// host:port of a backend; repeat for several
        #[arg(long = "backend", required = true)]
        backends: Vec<String>,
        /// `active` (default) or `suspended`
        #[arg(long)]
        status: Option<String>,
        /// Create it under this id (a UUID) rather than a fresh one: the platform's own id, or
        /// the same service on nodes that share no store
        #[arg(long)]
        id: Option<String>,
        /// Follow the first certificate's issuance, a line per step, until it is active (exit 0)
        /// or has failed (exit 69 with the CA's reason)
        #[arg(long)]
        wait: bool,
        /// Seconds to wait with --wait
        #[arg(long, default_value_t = 300)]
        wait_timeout: u64,
    },
    /// List services
    List,
    /// Show one service
    Show { id: String },
    /// Delete a service (its id is never reused)
    Delete { id: String },
    /// Bring an alias domain to a service: it is verified through public DNS, gets its own
    /// certificate, and is served once it points here
    AddDomain {
        id: String,
        name: String,
        /// Follow it, a line per step, until it is served with its certificate (exit 0) or
        /// fails (exit 69 with the reason and the records to create)
        #[arg(long)]
        wait: bool,
        /// Seconds to wait with --wait
        #[arg(long, default_value_t = 300)]
        wait_timeout: u64,
    },
    /// Replace a service's backends
    SetBackends {
        id: String,
        #[arg(long = "backend", required = true)]
        backends: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum RecordsCommand {
    /// Add a record set, e.g. `records add web-server.internal A 10.0.0.10`
    Add {
        name: String,
        #[arg(value_name = "TYPE")]
        rtype: String,
        /// One value per argument, in zone-file form: `10 mail.example.com.`, `"v=spf1 -all"`
        #[arg(required = true)]
        data: Vec<String>,
        #[arg(long)]
        ttl: Option<u32>,
        /// Replace the record set if it exists
        #[arg(long)]
        replace: bool,
    },
    /// List custom records
    List,
    /// Remove a record set
    Remove {
        name: String,
        #[arg(value_name = "TYPE")]
        rtype: String,
    },
}

#[derive(Subcommand, Debug)]
enum CertCommand {
    /// List certificates and their status
    List {
        /// Only those that expire within this span from now, soonest first: 90s, 12h, 7d
        #[arg(long, value_name = "SPAN")]
        expiring_within: Option<String>,
    },
    /// Renew a certificate now; the current one is served until the new one is stored
    Renew { name: String },
    /// Revoke a certificate at its CA, and get a new one in its place
    Revoke { name: String },
}

#[derive(Subcommand, Debug)]
enum DomainCommand {
    /// A domain's status, certificate, the records that verify it, and the last check's trace
    Show { name: String },
    /// Check a domain now (also one past verify.pending_for) and show what was found
    Verify { name: String },
    /// Remove an alias domain from its service; it stops being served at once
    Remove { id: String, name: String },
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// List the live nodes: addresses, the revision each has applied, and its lag
    List,
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Print a new key for store.encryption_key_file: `<id> <base64 key>`. To rotate, put the
    /// new line first in the file and keep the old ones after it
    NewKey {
        /// The key's id, recorded in every value it seals [default: today's date]
        #[arg(long)]
        id: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Print the dev issuer's root certificate (PEM), to trust it in a client
    Root {
        /// Read the state directory from this configuration file instead of --state-dir
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn load_config(path: &std::path::Path) -> Result<NodeConfig, CliError> {
    NodeConfig::load(path).map_err(|e| CliError::new(EX_USAGE, e.to_string()))
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    let global = cli.global;
    match cli.command {
        Command::Serve(args) => {
            let (config, dev) = match (&args.config, args.dev) {
                (Some(path), _) => (load_config(path)?, false),
                (None, true) => {
                    let dir = global
                        .state_dir
                        .clone()
                        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
                    (NodeConfig::dev(&dir), true)
                }
                (None, false) => {
                    return Err(CliError::new(
                        EX_USAGE,
                        "serve needs --config FILE, or --dev for a development node",
                    ));
                }
            };
            crate::serve::init_logging(&config);
            crate::serve::run(config, dev, args.config)
                .await
                .map_err(|e| {
                    // An issuer the config cannot set up is a config error, like any other.
                    let code = match e.downcast_ref::<portcullis_acme::IssueError>() {
                        Some(portcullis_acme::IssueError::Setup(_)) => EX_USAGE,
                        _ => EX_SOFTWARE,
                    };
                    CliError::new(code, format!("{e:#}"))
                })
        }
        Command::DemoBackend { listen } => crate::demo::run(listen)
            .await
            .map_err(|e| CliError::new(EX_SOFTWARE, format!("{e:#}"))),
        Command::Ca(CaCommand::Root { config }) => {
            let dir = match config {
                Some(path) => load_config(&path)?.store.path,
                None => global
                    .state_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            };
            let path = portcullis_acme::DevCa::root_path(&dir.join("dev-ca"));
            let pem = std::fs::read_to_string(&path).map_err(|e| {
                CliError::new(
                    EX_USAGE,
                    format!(
                        "cannot read the dev CA root {}: {e}; start the node once (`portcullis serve --dev`) or pass the --state-dir it uses",
                        path.display()
                    ),
                )
            })?;
            print!("{pem}");
            Ok(())
        }
        Command::Service(cmd) => {
            let client = connect(&global)?;
            service(cmd, &client, global.json).await
        }
        Command::Domain(cmd) => {
            let client = connect(&global)?;
            match cmd {
                DomainCommand::Show { name } => {
                    crate::cli_domains::show(&client, &name, global.json).await
                }
                DomainCommand::Verify { name } => {
                    crate::cli_domains::verify(&client, &name, global.json).await
                }
                DomainCommand::Remove { id, name } => {
                    crate::cli_domains::remove(&client, &id, &name, global.json).await
                }
            }
        }
        Command::Store(StoreCommand::NewKey { id }) => {
            let id = id.unwrap_or_else(|| {
                let today = time::OffsetDateTime::now_utc().date();
                format!("k{}", today.to_string().replace('-', ""))
            });
            let line = portcullis_config::Sealer::new_key_line(&id)
                .map_err(|e| CliError::new(EX_SOFTWARE, e.to_string()))?;
            println!("{line}");
            Ok(())
        }
        Command::Reload => {
            let client = connect(&global)?;
            let value = client
                .call(Method::POST, "/v1/node/reload", None)
                .await?
                .unwrap_or(Value::Null);
            if global.json {
                return print_json(&value);
            }
            println!(
                "reloaded: process {} serves now; process {} finishes its requests and exits",
                value["pid"], value["previous_pid"]
            );
            Ok(())
        }
        Command::Node(NodeCommand::List) => {
            let client = connect(&global)?;
            let value = client
                .call(Method::GET, "/v1/nodes", None)
                .await?
                .unwrap_or(Value::Null);
            if global.json {
                return print_json(&value);
            }
            let nodes = value["nodes"].as_array().cloned().unwrap_or_default();
            let addresses = |n: &Value| {
                ["ipv4", "ipv6"]
                    .iter()
                    .flat_map(|k| n[*k].as_array().cloned().unwrap_or_default())
                    .filter_map(|a| a.as_str().map(str::to_string))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let number = |v: &Value| v.as_i64().map_or("-".into(), |n| n.to_string());
            let rows = nodes
                .iter()
                .map(|n| {
                    vec![
                        n["id"].as_str().unwrap_or_default().to_string(),
                        addresses(n),
                        if n["live"].as_bool() == Some(true) {
                            "live".into()
                        } else {
                            "gone".into()
                        },
                        number(&n["applied_revision"]),
                        number(&n["lag"]),
                    ]
                })
                .collect();
            print_table(&["ID", "ADDRESSES", "STATE", "APPLIED", "LAG"], rows);
            Ok(())
        }
        Command::Records(cmd) => {
            let client = connect(&global)?;
            records(cmd, &client, global.json).await
        }
        Command::Cert(CertCommand::Revoke { name }) => {
            let client = connect(&global)?;
            let done = format!(
                "revoked the certificate of {name}; a new one is being issued in its place"
            );
            cert_action(&client, &name, "revoke", global.json, &done).await
        }
        Command::Cert(CertCommand::Renew { name }) => {
            let client = connect(&global)?;
            let done = format!(
                "renewal of {name} requested; the current certificate is served until the new one is stored"
            );
            cert_action(&client, &name, "renew", global.json, &done).await
        }
        Command::Cert(CertCommand::List { expiring_within }) => {
            let client = connect(&global)?;
            let path = match expiring_within {
                // The node checks the span; here only that it cannot alter the query.
                Some(span)
                    if !span.is_empty() && span.bytes().all(|b| b.is_ascii_alphanumeric()) =>
                {
                    format!("/v1/certificates?expiring_within={span}")
                }
                Some(span) => {
                    return Err(CliError::new(
                        EX_USAGE,
                        format!(
                            "`{span}` is not a span of time; write a whole number and s, m, h or d, e.g. 7d"
                        ),
                    ));
                }
                None => "/v1/certificates".into(),
            };
            let value = client
                .call(Method::GET, &path, None)
                .await?
                .unwrap_or(Value::Null);
            if global.json {
                return print_json(&value);
            }
            let certs: Vec<CertificateView> =
                serde_json::from_value(value["certificates"].clone()).map_err(unexpected)?;
            let rows = certs
                .iter()
                .map(|c| {
                    vec![
                        c.domains.join(","),
                        c.status.clone(),
                        c.issuer.clone(),
                        c.not_after.map_or("-".into(), fmt_time),
                        c.last_error
                            .as_ref()
                            .map_or(String::new(), |p| p.detail.clone()),
                    ]
                })
                .collect();
            print_table(
                &["DOMAINS", "STATUS", "ISSUER", "NOT AFTER", "LAST ERROR"],
                rows,
            );
            Ok(())
        }
    }
}

/// A record name or type as one path segment: what DNS allows, nothing that could alter the path.
fn path_segment(what: &str, value: &str) -> Result<String, CliError> {
    let ok = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'*' | b'_'));
    if ok {
        Ok(value.to_string())
    } else {
        Err(CliError::new(
            EX_USAGE,
            format!("`{value}` is not a record {what}"),
        ))
    }
}

async fn records(cmd: RecordsCommand, client: &AdminClient, json: bool) -> Result<(), CliError> {
    match cmd {
        RecordsCommand::Add {
            name,
            rtype,
            data,
            ttl,
            replace,
        } => {
            let value = if replace {
                let path = format!(
                    "/v1/records/{}/{}",
                    path_segment("name", &name)?,
                    path_segment("type", &rtype)?
                );
                let mut body = json!({ "data": data });
                if let Some(ttl) = ttl {
                    body["ttl"] = json!(ttl);
                }
                client.call(Method::PUT, &path, Some(body)).await?
            } else {
                let mut body = json!({ "name": name, "type": rtype, "data": data });
                if let Some(ttl) = ttl {
                    body["ttl"] = json!(ttl);
                }
                client.call(Method::POST, "/v1/records", Some(body)).await?
            }
            .unwrap_or(Value::Null);
            if json {
                return print_json(&value);
            }
            print_records(std::slice::from_ref(&value));
            Ok(())
        }
        RecordsCommand::List => {
            let value = client
                .call(Method::GET, "/v1/records", None)
                .await?
                .unwrap_or(Value::Null);
            if json {
                return print_json(&value);
            }
            let list = value["records"].as_array().cloned().unwrap_or_default();
            print_records(&list);
            Ok(())
        }
        RecordsCommand::Remove { name, rtype } => {
            let path = format!(
                "/v1/records/{}/{}",
                path_segment("name", &name)?,
                path_segment("type", &rtype)?
            );
            client.call(Method::DELETE, &path, None).await?;
            if json {
                return print_json(&json!({ "removed": { "name": name, "type": rtype } }));
            }
            println!("removed {name} {}", rtype.to_ascii_uppercase());
            Ok(())
        }
    }
}

fn print_records(records: &[Value]) {
    let rows = records
        .iter()
        .map(|r| {
            let data = r["data"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(" | ")
                })
                .unwrap_or_default();
            vec![
                r["name"].as_str().unwrap_or_default().to_string(),
                r["type"].as_str().unwrap_or_default().to_string(),
                r["ttl"].to_string(),
                data,
            ]
        })
        .collect();
    print_table(&["NAME", "TYPE", "TTL", "DATA"], rows);
}

fn connect(global: &Global) -> Result<AdminClient, CliError> {
    AdminClient::resolve(
        global.admin_url.clone(),
        global.token.clone(),
        global.state_dir.as_deref(),
    )
}

fn unexpected(e: serde_json::Error) -> CliError {
    CliError::new(
        1,
        format!(
            "the admin API answered in a shape this CLI does not know ({e}); are the CLI and the node the same version?"
        ),
    )
}

pub(crate) fn print_json(value: &Value) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(unexpected)?;
    println!("{text}");
    Ok(())
}

fn fmt_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn encode_id(id: &str) -> Result<String, CliError> {
    // Ids are UUIDs; anything else would only get a 404, but must not alter the path.
    if id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !id.is_empty() {
        Ok(id.to_string())
    } else {
        Err(CliError::new(
            EX_USAGE,
            format!("`{id}` is not a service id; list them with `portcullis service list`"),
        ))
    }
}

async fn service(cmd: ServiceCommand, client: &AdminClient, json: bool) -> Result<(), CliError> {
    match cmd {
        ServiceCommand::Create {
            backends,
            status,
            id,
            wait,
            wait_timeout,
        } => {
            let mut body = json!({ "backends": backends });
            if let Some(status) = status {
                body["status"] = json!(status);
            }
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            let id = service_reply(
                client,
                Method::POST,
                "/v1/services",
                Some(body),
                json,
                "created service",
            )
            .await?;
            if wait {
                follow_issuance(client, &id, Duration::from_secs(wait_timeout), json).await?;
            }
            Ok(())
        }
        ServiceCommand::List => {
            let mut all = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let path = match &after {
                    Some(a) => format!("/v1/services?limit=1000&after={a}"),
                    None => "/v1/services?limit=1000".to_string(),
                };
                let value = client
                    .call(Method::GET, &path, None)
                    .await?
                    .unwrap_or(Value::Null);
                let page: Vec<Value> = value["services"].as_array().cloned().unwrap_or_default();
                all.extend(page);
                match value["next"].as_str() {
                    Some(next) => after = Some(encode_id(next)?),
                    None => break,
                }
            }
            if json {
                return print_json(&json!({ "services": all }));
            }
            let views: Vec<ServiceView> =
                serde_json::from_value(Value::Array(all)).map_err(unexpected)?;
            let rows = views
                .iter()
                .map(|v| {
                    vec![
                        v.id.clone(),
                        status_name(&v.status),
                        v.certificate
                            .as_ref()
                            .map_or("none".into(), |c| c.status.clone()),
                        v.backends.join(","),
                        v.canonical_domain.clone(),
                    ]
                })
                .collect();
            print_table(&["ID", "STATUS", "CERT", "BACKENDS", "DOMAIN"], rows);
            Ok(())
        }
        ServiceCommand::Show { id } => {
            let path = format!("/v1/services/{}", encode_id(&id)?);
            service_reply(client, Method::GET, &path, None, json, "service")
                .await
                .map(drop)
        }
        ServiceCommand::Delete { id } => {
            let path = format!("/v1/services/{}", encode_id(&id)?);
            client.call(Method::DELETE, &path, None).await?;
            if json {
                return print_json(&json!({ "deleted": id }));
            }
            println!("deleted service {id}");
            Ok(())
        }
        ServiceCommand::AddDomain {
            id,
            name,
            wait,
            wait_timeout,
        } => {
            let wait = wait.then(|| Duration::from_secs(wait_timeout));
            crate::cli_domains::add(client, &id, &name, wait, json).await
        }
        ServiceCommand::SetBackends { id, backends } => {
            let path = format!("/v1/services/{}", encode_id(&id)?);
            let body = json!({ "backends": backends });
            service_reply(
                client,
                Method::PATCH,
                &path,
                Some(body),
                json,
                "updated service",
            )
            .await
            .map(drop)
        }
    }
}

/// Sends a request that answers with a service, and prints it under `heading` (or as JSON);
/// returns its id.
async fn service_reply(
    client: &AdminClient,
    method: Method,
    path: &str,
    body: Option<Value>,
    json: bool,
    heading: &str,
) -> Result<String, CliError> {
    let value = client
        .call(method, path, body)
        .await?
        .unwrap_or(Value::Null);
    if json {
        print_json(&value)?;
        return Ok(value["id"].as_str().unwrap_or_default().to_string());
    }
    let view: ServiceView = serde_json::from_value(value).map_err(unexpected)?;
    println!("{heading} {}", view.id);
    print_service(&view);
    Ok(view.id)
}

/// `POST /v1/certificates/{name}/{action}`, then `done` (or the reply as JSON).
async fn cert_action(
    client: &AdminClient,
    name: &str,
    action: &str,
    json: bool,
    done: &str,
) -> Result<(), CliError> {
    check_cert_name(name)?;
    let value = client
        .call(
            Method::POST,
            &format!("/v1/certificates/{name}/{action}"),
            None,
        )
        .await?
        .unwrap_or(Value::Null);
    if json {
        return print_json(&value);
    }
    println!("{done}");
    Ok(())
}

fn check_cert_name(name: &str) -> Result<(), CliError> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'*')
    {
        return Err(CliError::new(
            EX_USAGE,
            format!("`{name}` is not a domain name"),
        ));
    }
    Ok(())
}

/// Prints each step of a service's first issuance until its certificate is active or failed.
async fn follow_issuance(
    client: &AdminClient,
    id: &str,
    timeout: Duration,
    json: bool,
) -> Result<(), CliError> {
    let path = format!("/v1/services/{}", encode_id(id)?);
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let value = client
            .call(Method::GET, &path, None)
            .await?
            .unwrap_or(Value::Null);
        let cert = &value["certificate"];
        let status = cert["status"].as_str().unwrap_or("pending").to_string();
        if status != last {
            if json {
                println!("{}", json!({ "certificate": cert }));
            } else {
                let until = cert["not_after"]
                    .as_str()
                    .map_or(String::new(), |t| format!(" until {t}"));
                println!("certificate {status}{until}");
            }
            last = status.clone();
        }
        match status.as_str() {
            "active" => return Ok(()),
            "failed" => {
                return Err(CliError::new(
                    EX_UNAVAILABLE,
                    format!(
                        "the certificate for {id} failed: {}: {} (attempt {}; the node retries at {})",
                        cert["last_error"]["type"].as_str().unwrap_or("unknown"),
                        cert["last_error"]["detail"].as_str().unwrap_or(""),
                        cert["attempts"],
                        cert["next_attempt_at"].as_str().unwrap_or("a later time"),
                    ),
                ));
            }
            _ => {}
        }
        if std::time::Instant::now() >= deadline {
            return Err(CliError::new(
                EX_TEMPFAIL,
                format!(
                    "the certificate for {id} is still {status} after {} s; \
                     follow it with `portcullis service show {id}`",
                    timeout.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn status_name(status: &portcullis_config::ServiceStatus) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn print_service(view: &ServiceView) {
    println!("  domain       {}", view.canonical_domain);
    println!("  url          {}", view.url);
    println!("  status       {}", status_name(&view.status));
    println!("  backends     {}", view.backends.join(", "));
    match &view.certificate {
        Some(c) => {
            let until = c
                .not_after
                .map_or(String::new(), |t| format!(" until {}", fmt_time(t)));
            println!("  certificate  {} ({}){until}", c.status, c.issuer);
            if let Some(problem) = &c.last_error {
                println!("  last error   {}: {}", problem.kind, problem.detail);
            }
        }
        None => println!("  certificate  not yet requested"),
    }
    println!("  created      {}", fmt_time(view.created_at));
}

fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}
