//! Wiring of a node: opens the store, follows it into the Snapshot, starts the issuer and the
//! admin API, announces the node, and shuts all of it down on SIGTERM or Ctrl-C.

use std::fs;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use portcullis_acme::{AcmeIssuer, CertificateManager, DevCa, Issuer, RenewalPolicy};
use portcullis_config::file::{IssuerKind, LogFormat};
use portcullis_config::{NodeConfig, SnapshotSync, State};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use portcullis_dns::Dns;
use portcullis_proxy::Proxy;

use crate::admin::{self, Admin};
use crate::admin_listener::{self, AdminLimits};

/// After SIGTERM, how long the node waits for its own Snapshot to drop its entry (which the
/// fleet's DNS answers follow) before it stops serving.
const LEAVE_WAIT: Duration = Duration::from_secs(2);

pub fn init_logging(config: &NodeConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the state directory {}", dir.display()))
}

/// Reads the admin token, or creates it (mode 0600) when the file does not exist.
pub fn load_or_create_token(path: &Path) -> Result<String> {
    match fs::read_to_string(path) {
        Ok(token) => {
            let token = token.trim().to_string();
            anyhow::ensure!(
                token.len() >= 16,
                "the admin token in {} is shorter than 16 characters; put a longer one there, or delete the file to have one generated",
                path.display()
            );
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                ensure_private_dir(parent)?;
            }
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| {
                    format!("cannot create the admin token file {}", path.display())
                })?;
            writeln!(file, "{token}")?;
            Ok(token)
        }
        Err(e) => {
            Err(e).with_context(|| format!("cannot read the admin token file {}", path.display()))
        }
    }
}

/// Runs a node until SIGTERM, or until a reload's new process took over. `config_path`: the
/// file `config` came from, which a reload reads again (none for a dev node).
pub async fn run(config: NodeConfig, dev: bool, config_path: Option<PathBuf>) -> Result<()> {
    let mut successor = crate::reload::Successor::from_env();
    let result = serve(config, dev, config_path, &mut successor).await;
    if let (Err(e), Some(successor)) = (&result, successor.as_mut()) {
        successor.failed(&format!("{e:#}")).await;
    }
    result
}

async fn serve(
    config: NodeConfig,
    dev: bool,
    config_path: Option<PathBuf>,
    successor: &mut Option<crate::reload::Successor>,
) -> Result<()> {
    let state_dir = config.store.path.clone();
    ensure_private_dir(&state_dir)?;
    let shutdown = CancellationToken::new();
    // First, so every part's metrics land in it.
    let metrics = metrics_handle(shutdown.clone());
    let token: Arc<str> = load_or_create_token(&config.admin_token_file())?.into();

    if let Some(successor) = successor.as_mut() {
        successor.take_store().await?;
    }
    let mut opened = crate::store_setup::open(&config, shutdown.clone()).await?;
    let store = opened.store.clone();
    let reloader = Arc::new(crate::reload::Reloader::new(config_path, store.clone())?);
    let mut state = State::new(store.clone(), config.zone.name.clone());
    if let Some(path) = &config.store.encryption_key_file {
        let sealer = portcullis_config::Sealer::from_file(path).with_context(
            || "reading store.encryption_key_file (make one with `portcullis store new-key`)",
        )?;
        tracing::info!(
            key = sealer.current_id(),
            "private keys are sealed before they are stored"
        );
        state = state.with_sealer(Arc::new(sealer));
        match state.reseal_account().await {
            Ok(true) => tracing::info!(
                "the ACME account's key is now sealed with the first key of store.encryption_key_file"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot seal the ACME account anew; it stays as it is")
            }
        }
    }
    let sync = match (opened.unreachable.clone(), opened.replica.clone()) {
        (Some(reason), Some(copy)) => {
            SnapshotSync::start_from_copy(store.clone(), copy, config.zone.name.clone(), reason)
                .await
        }
        (_, copy) => {
            SnapshotSync::start_with_cache(store.clone(), copy, config.zone.name.clone()).await
        }
    }
    .context("loading state from the store")?;
    let snapshot = sync.handle.clone();
    if let Some(follower) = opened.follower.take() {
        tokio::spawn(follower);
    }

    let issuer = match config.issuer.kind {
        IssuerKind::Dev => {
            let dir = state_dir.join("dev-ca");
            let node_id = config.node.id.to_string();
            let ca = tokio::task::spawn_blocking(move || DevCa::open_or_create(&dir, &node_id))
                .await??;
            Arc::new(ca)
        }
        IssuerKind::Acme => {
            let acme = Arc::new(
                AcmeIssuer::new(&config.issuer, state.clone())
                    .context("setting up the ACME issuer")?,
            );
            // Have the account (and so the thumbprint every node answers challenges with)
            // before the first order needs it; a CA that is down now is retried by that order.
            let early = acme.clone();
            tokio::spawn(async move {
                if let Err(e) = early.account().await {
                    tracing::warn!(error = %e, "ACME account not ready yet; orders will retry");
                }
            });
            acme as Arc<dyn Issuer>
        }
    };
    let issuer_ref = issuer.reference();
    let revoker = issuer.clone();

    let membership = crate::membership::Membership::join(
        state.clone(),
        snapshot.clone(),
        &config,
        opened.shared,
    )
    .await?;
    let lease = membership.lease();
    let leaving = CancellationToken::new();
    let membership_task = tokio::spawn(membership.keep(leaving.clone()));

    let proxy = Proxy::bind(
        config.listen.http,
        config.listen.https,
        0,
        config.proxy.clone(),
        config.log.access,
        config.node.workers,
    )
    .await?;
    let http_addr = proxy.http_addr()?;
    let health = proxy.health();
    let https_addr = proxy.https_addr()?;
    let dns = Dns::start(&config, snapshot.clone())
        .await
        .context("starting the DNS responder (listen.dns, [dns])")?;

    // Orders start once this node can answer the CA: DNS and the HTTP listener are up.
    let mut manager = CertificateManager::new(
        state.clone(),
        snapshot.clone(),
        issuer,
        RenewalPolicy {
            concurrent_orders: config.issuer.max_concurrent_orders.max(1),
            ..RenewalPolicy::default()
        },
    );
    {
        let views = dns.views.clone();
        manager = manager.with_dns01(Arc::new(portcullis_acme::StoreDns01 {
            state: state.clone(),
            fleet: opened.shared,
            wait_live: Some(Arc::new(move |revision| {
                let views = views.clone();
                Box::pin(async move {
                    views.wait_for(revision, Duration::from_secs(2)).await;
                })
            })),
        }));
    }
    if config.issuer.kind == IssuerKind::Acme {
        let views = dns.views.clone();
        manager = manager.with_preflight(Arc::new(move |name, revision| {
            let views = views.clone();
            Box::pin(async move {
                // Answer as the DNS will once it has the change that made this name.
                views.wait_for(revision, Duration::from_secs(2)).await;
                match views.load().zone.resolves_to_addresses(name.as_str()) {
                    Some(false) => Err(format!(
                        "this platform's DNS gives no A or AAAA for {name}, so the CA could \
                         not reach a node; set node.public_ipv4 or node.public_ipv6"
                    )),
                    _ => Ok(()),
                }
            })
        }));
    }
    // A fleet: one order per name across every node on the store, and at most
    // max_concurrent_orders of them at once fleet-wide. Alone on its own file, no other process
    // can order, and the node's own pool already keeps one order per name: the locks' writes
    // (five fsyncs an order) would only slow issuance.
    if opened.shared {
        manager = manager.with_fleet_slots(portcullis_acme::FleetSlots {
            store: store.clone(),
            limit: config.issuer.max_concurrent_orders.max(1),
            lease: lease.clone(),
        });
    }
    let manager_task = tokio::spawn(manager.run(shutdown.clone()));
    let mut verifier = portcullis_acme::DomainVerifier::new(
        state.clone(),
        snapshot.clone(),
        public_dns(&config.verify)?,
        portcullis_acme::VerifyPolicy {
            pending_for: config.verify.pending_for.0,
            first_retry: config.verify.first_retry.0,
            max_retry: config.verify.max_retry.0,
            recheck_interval: config.verify.recheck_interval.0,
            grace: config.verify.grace.0,
            concurrent_checks: config.verify.concurrent_checks.max(1),
        },
        config.node.id.to_string(),
    );
    if opened.shared {
        verifier = verifier.with_fleet_lock(portcullis_acme::FleetLock {
            store: store.clone(),
            lease,
        });
    }
    tokio::spawn(verifier.run(shutdown.clone()));
    tokio::spawn(prune_tombstones(
        state.clone(),
        config.store.tombstone_retention.0,
        shutdown.clone(),
    ));

    let listener = portcullis_config::sockets::tcp_listener("admin", config.listen.admin, false)
        .and_then(tokio::net::TcpListener::from_std)
        .with_context(|| {
            format!(
                "cannot listen on {} for the admin API (listen.admin); is another node running?",
                config.listen.admin
            )
        })?;
    let admin_addr = listener.local_addr()?;
    let admin_url = format!("http://{admin_addr}");
    let url_file = state_dir.join("admin.url");
    fs::write(&url_file, format!("{admin_url}\n"))
        .with_context(|| format!("cannot write {}", url_file.display()))?;

    let listeners = Listeners {
        node_id: config.node.id.to_string(),
        admin: admin_url.clone(),
        http: http_addr.to_string(),
        https: https_addr.to_string(),
        dns: dns.local_addrs.iter().map(|a| a.to_string()).collect(),
    };
    print_banner(&config, dev, &listeners);
    let proxy_task = tokio::spawn(proxy.serve(snapshot.clone(), state.clone(), shutdown.clone()));

    let router = admin::router(Admin {
        state: state.clone(),
        snapshot: snapshot.clone(),
        token,
        https_port: https_addr.port(),
        issuer: issuer_ref,
        revoker,
        listeners: Arc::new(listeners),
        metrics,
        dns: dns.settings.clone(),
        dns_views: dns.views.clone(),
        health,
        detailed: Arc::default(),
        domain_rules: Arc::new(portcullis_config::domains::DomainRules {
            served_zones: std::iter::once(config.zone.name.clone())
                .chain(config.dns.zones.iter().cloned())
                .collect(),
            per_service: config.limits.domains_per_service,
        }),
        verify_wait: crate::admin_domains::verify_wait(config.verify.timeout.0),
        reloader: reloader.clone(),
    });
    let stop = shutdown.clone();
    let handed_over = reloader.handed_over.clone();
    let leave = tokio::spawn(async move {
        let reloaded = tokio::select! {
            () = wait_for_signal() => {
                tracing::info!("shutting down: leaving the fleet's DNS answers first");
                false
            }
            () = handed_over.cancelled() => true,
            () = stop.cancelled() => false,
        };
        leaving.cancel();
        if let Ok(membership) = membership_task.await {
            if reloaded {
                // The node stays in the answers: the new process serves under its name.
                membership.hand_over().await;
            } else {
                membership.leave(LEAVE_WAIT).await;
            }
        }
        stop.cancel();
        // The listeners close with their parts, so new clients are refused (or, after a
        // reload, taken by the new process) rather than queued here.
        portcullis_config::sockets::forget_all();
    });
    tokio::spawn(reload_on_hangup(reloader.clone()));
    portcullis_config::sockets::close_unclaimed();
    if let Some(mut successor) = successor.take() {
        successor.ready().await;
    }
    let pid_file = state_dir.join("portcullis.pid");
    if let Err(e) = fs::write(&pid_file, format!("{}\n", std::process::id())) {
        tracing::warn!(file = %pid_file.display(), error = %e, "cannot write the pid file");
    }
    admin_listener::serve(
        listener,
        router,
        AdminLimits::from_proxy(&config.proxy),
        shutdown.clone(),
    )
    .await;

    shutdown.cancel();
    match proxy_task.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "proxy stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "proxy task failed"),
        Ok(Ok(())) => {}
    }
    let _ = manager_task.await;
    dns.shutdown().await;
    let _ = leave.await;
    // The files name this process; after a reload they are the new one's.
    if !reloader.handed_over.is_cancelled() {
        let _ = fs::remove_file(&url_file);
        let _ = fs::remove_file(&pid_file);
    }
    sync.task.abort();
    Ok(())
}
/// Installs the Prometheus recorder the parts report to. `None` when one is installed already
/// (a second node in one process), which leaves `/metrics` empty.
fn metrics_handle(
    shutdown: CancellationToken,
) -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .ok()?
        .install_recorder()
        .ok()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        // Histograms are folded here, every few seconds, not on the request path.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => upkeep.run_upkeep(),
            }
        }
    });
    Some(handle)
}

/// Where this node listens, as bound (port 0 in the config becomes the real port here).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Listeners {
    /// This node's id in the fleet.
    pub node_id: String,
    pub admin: String,
    pub http: String,
    pub https: String,
    /// UDP and TCP on each.
    pub dns: Vec<String>,
}

fn print_banner(config: &NodeConfig, dev: bool, listeners: &Listeners) {
    let dir = config.store.path.display();
    let mut out = std::io::stdout().lock();
    let kind = if dev { "dev node" } else { "node" };
    let _ = writeln!(out, "portcullis {kind} `{}` is up", config.node.id);
    let _ = writeln!(out, "  zone        {}", config.zone.name);
    let _ = writeln!(out, "  HTTPS       {}", listeners.https);
    let _ = writeln!(
        out,
        "  HTTP        {}  (redirects to HTTPS)",
        listeners.http
    );
    let _ = writeln!(
        out,
        "  admin API   {}  (token in {})",
        listeners.admin,
        config.admin_token_file().display()
    );
    let _ = writeln!(out, "  state       {dir}");
    if config.issuer.kind == IssuerKind::Dev {
        let _ = writeln!(out, "  dev CA root {dir}/dev-ca/root.pem");
    }
    let _ = writeln!(
        out,
        "  DNS         {}  (UDP and TCP, authoritative for {})",
        listeners.dns.join(", "),
        std::iter::once(config.zone.name.as_str())
            .chain(config.dns.zones.iter().map(|z| z.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = out.flush();
}

/// Frees the ids of services deleted longer ago than `retention`, a few times per retention
/// period (at most hourly). Every node may do it: deleting a tombstone twice is harmless.
async fn prune_tombstones(state: State, retention: Duration, shutdown: CancellationToken) {
    let every = (retention / 4).min(Duration::from_secs(3600));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(retention) = time::Duration::try_from(retention) else {
            continue;
        };
        match state
            .prune_tombstones(OffsetDateTime::now_utc() - retention)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(tombstones = n, "deleted services' ids freed"),
            Err(e) => tracing::warn!(error = %e, "cannot prune tombstones; trying again later"),
        }
    }
}

/// SIGHUP: reload, as `portcullis reload` does through the admin API.
async fn reload_on_hangup(reloader: Arc<crate::reload::Reloader>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        return;
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading");
        match reloader.reload().await {
            Ok(pid) => tracing::info!(pid, "reloaded"),
            Err(e) => tracing::error!(error = %e, code = e.code(), "reload failed"),
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
}

/// The resolvers alias domains are verified through. A node whose system has none still
/// starts (it may have no alias domains); each check then says what to set.
fn public_dns(
    section: &portcullis_config::file::VerifySection,
) -> anyhow::Result<Arc<dyn portcullis_acme::verify::Resolve>> {
    use portcullis_acme::verify::ResolverSetupError;
    match portcullis_acme::PublicDns::new(&section.resolvers, section.timeout.0) {
        Ok(dns) => {
            tracing::info!(resolvers = ?dns.resolvers(), "alias domains are verified through these resolvers");
            Ok(Arc::new(dns))
        }
        Err(e @ ResolverSetupError::System(_)) => {
            tracing::warn!(error = %e, "alias domains cannot be verified until verify.resolvers is set");
            Ok(Arc::new(portcullis_acme::verify::NoResolvers(
                e.to_string(),
            )))
        }
        Err(e) => Err(anyhow::Error::new(e).context("verify.resolvers")),
    }
}
