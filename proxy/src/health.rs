//! Backend health: active checks (one task per service backend, reconciled with each
//! Snapshot) and passive ejection after consecutive connect failures. The router reads the
//! result per request from atomics.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use portcullis_config::model::{Backend, HealthCheck, ServiceStatus, UpstreamProtocol};
use portcullis_config::{ServiceId, SnapshotHandle};
use tokio_util::sync::CancellationToken;

use crate::router::ProxyBody;

/// How long a backend stays out after passive ejection when no active check brings it back
/// sooner (nginx's `fail_timeout`).
const EJECTION: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What this node knows of one backend of one service.
#[derive(Debug)]
pub struct BackendState {
    /// The backend as a URI authority and as text, made once rather than per request.
    pub authority: Option<hyper::http::uri::Authority>,
    pub label: Arc<str>,
    /// As the active checks last decided (a new backend starts healthy).
    healthy: AtomicBool,
    successes: AtomicU32,
    failures: AtomicU32,
    /// Consecutive connect failures seen by the router.
    connect_failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// Requests in flight from this node, for least-requests balancing.
    pub inflight: AtomicUsize,
}

impl BackendState {
    fn new(backend: &Backend) -> Self {
        let label: Arc<str> = backend.to_string().into();
        BackendState {
            authority: label.parse().ok(),
            label,
            ..BackendState::default()
        }
    }
}

impl Default for BackendState {
    fn default() -> Self {
        BackendState {
            authority: None,
            label: Arc::from(""),
            healthy: AtomicBool::new(true),
            successes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            connect_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            inflight: AtomicUsize::new(0),
        }
    }
}

impl BackendState {
    pub fn available(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms()
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn record_check(&self, ok: bool, check: &HealthCheck) -> Option<bool> {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            let n = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
            if !self.healthy() && n >= check.healthy_threshold {
                self.healthy.store(true, Ordering::Relaxed);
                self.ejected_until_ms.store(0, Ordering::Relaxed);
                self.connect_failures.store(0, Ordering::Relaxed);
                return Some(true);
            }
        } else {
            self.successes.store(0, Ordering::Relaxed);
            let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if self.healthy() && n >= check.unhealthy_threshold {
                self.healthy.store(false, Ordering::Relaxed);
                return Some(false);
            }
        }
        None
    }

    /// A request reached the backend.
    pub fn record_success(&self) {
        if self.connect_failures.load(Ordering::Relaxed) != 0 {
            self.connect_failures.store(0, Ordering::Relaxed);
        }
    }

    /// A connection to the backend failed; true when that ejected it.
    pub fn record_connect_failure(&self, threshold: u32) -> bool {
        let n = self.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= threshold {
            self.ejected_until_ms
                .store(now_ms() + EJECTION.as_millis() as u64, Ordering::Relaxed);
            self.connect_failures.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }
}

/// Health of every service backend this node routes to.
#[derive(Default)]
pub struct Health {
    states: DashMap<(ServiceId, Backend), Arc<BackendState>>,
}

impl Health {
    pub fn state(&self, service: ServiceId, backend: &Backend) -> Arc<BackendState> {
        if let Some(state) = self.states.get(&(service, backend.clone())) {
            return state.clone();
        }
        self.states
            .entry((service, backend.clone()))
            .or_insert_with(|| Arc::new(BackendState::new(backend)))
            .clone()
    }

    fn forget(&self, key: &(ServiceId, Backend)) {
        self.states.remove(key);
    }
}

type Key = (ServiceId, Backend);

/// Runs the active checks: reconciles one task per (service, backend) on each Snapshot.
pub async fn run_checks(
    snapshot: SnapshotHandle,
    health: Arc<Health>,
    client: Client<HttpConnector, ProxyBody>,
    h2c_client: Client<HttpConnector, ProxyBody>,
    shutdown: CancellationToken,
) {
    type Wanted = (HealthCheck, UpstreamProtocol);
    let mut tasks: HashMap<Key, (Wanted, CancellationToken)> = HashMap::new();
    let mut changes = snapshot.subscribe();
    loop {
        let current = snapshot.load_full();
        let zone = current.zone().clone();
        let mut wanted: HashMap<Key, (Wanted, String)> = HashMap::new();
        for service in current.services() {
            let check = &service.options.health_check;
            if service.status != ServiceStatus::Active || !check.is_active_for(service.backends.len()) {
                continue;
            }
            for backend in &service.backends {
                wanted.insert(
                    (service.id, backend.clone()),
                    (
                        (check.clone(), service.options.upstream_protocol),
                        service.id.canonical_domain(&zone),
                    ),
                );
            }
        }
        drop(current);
        tasks.retain(|key, (check, stop)| {
            let keep = wanted.get(key).is_some_and(|(c, _)| c == check);
            if !keep {
                stop.cancel();
                if !wanted.contains_key(key) {
                    health.forget(key);
                }
            }
            keep
        });
        for (key, (wanted, host)) in wanted {
            if tasks.contains_key(&key) {
                continue;
            }
            let stop = shutdown.child_token();
            let state = health.state(key.0, &key.1);
            let client = match wanted.1 {
                UpstreamProtocol::Http1 => client.clone(),
                UpstreamProtocol::H2c => h2c_client.clone(),
            };
            tokio::spawn(check_loop(
                client,
                key.1.clone(),
                host,
                wanted.0.clone(),
                state,
                stop.clone(),
            ));
            tasks.insert(key, (wanted, stop));
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

async fn check_loop(
    client: Client<HttpConnector, ProxyBody>,
    backend: Backend,
    host: String,
    check: HealthCheck,
    state: Arc<BackendState>,
    stop: CancellationToken,
) {
    let interval = Duration::from_millis(u64::from(check.interval_ms));
    let timeout = Duration::from_millis(u64::from(check.timeout_ms));
    let url = format!("http://{backend}{}", check.path());
    // Start at a random point of the interval, so checks of many backends spread out.
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    let first = interval.mul_f64(f64::from(byte[0]) / 255.0);
    tokio::select! {
        () = stop.cancelled() => return,
        () = tokio::time::sleep(first) => {}
    }
    let mut first_report = true;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let request = Request::get(&url)
            .header(header::HOST, &host)
            .header(header::USER_AGENT, "portcullis-health-check")
            .body(
                Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed(),
            );
        let Ok(request) = request else {
            return;
        };
        let ok = match tokio::time::timeout(timeout, client.request(request)).await {
            Ok(Ok(response)) => {
                let status = response.status();
                // Drain so the connection goes back to the pool.
                let _ = response.into_body().collect().await;
                status.is_success() || status.is_redirection()
            }
            _ => false,
        };
        let changed = state.record_check(ok, &check);
        if changed.is_some() || first_report {
            first_report = false;
            metrics::gauge!("portcullis_backend_healthy", "host" => host.clone(), "backend" => backend.to_string())
                .set(if state.healthy() { 1.0 } else { 0.0 });
        }
        match changed {
            Some(true) => tracing::info!(backend = %backend, host, "backend healthy again"),
            Some(false) => {
                tracing::warn!(backend = %backend, host, path = check.path(), "backend unhealthy; taking it out")
            }
            None => {}
        }
    }
}
