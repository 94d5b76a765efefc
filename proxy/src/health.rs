//! Backend health, kept per target (a backend and how it is checked), not per service: a
//! backend that many services share is checked once, and its result and its passive ejection
//! serve them all. One task follows the Snapshot's changes and runs every check within the
//! node's budget (`proxy.health_checks_per_second`); the router reads the results per request
//! from atomics.

mod schedule;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use portcullis_config::model::{Backend, Service, ServiceOptions, ServiceStatus, UpstreamProtocol};
use portcullis_config::store::Revision;
use portcullis_config::{ServiceId, Snapshot, SnapshotHandle, keys};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::router::ProxyBody;
use schedule::Schedule;

/// How long a backend stays out after passive ejection when no active check brings it back
/// sooner (nginx's `fail_timeout`).
const EJECTION: Duration = Duration::from_secs(10);

/// How often states the router made for backends nobody checks are dropped once at rest.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The health-check request's `User-Agent`, so backends can tell checks from visitors.
pub const USER_AGENT: &str = "portcullis-health-check";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A backend as the node checks it: where it is and how it is checked. Services with the same
/// backend and the same check settings share one target: one check, one state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub backend: Backend,
    pub protocol: UpstreamProtocol,
    pub path: Option<String>,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl Target {
    pub fn new(backend: &Backend, options: &ServiceOptions) -> Self {
        let check = &options.health_check;
        Target {
            backend: backend.clone(),
            protocol: options.upstream_protocol,
            path: check.path.clone(),
            interval_ms: check.interval_ms,
            timeout_ms: check.timeout_ms,
            healthy_threshold: check.healthy_threshold,
            unhealthy_threshold: check.unhealthy_threshold,
        }
    }

    fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }
}

/// What this node knows of one target.
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

    /// Records a check's result; `Some(healthy)` when that changed the verdict.
    fn record_check(&self, ok: bool, target: &Target) -> Option<bool> {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            let n = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
            if !self.healthy() && n >= target.healthy_threshold {
                self.healthy.store(true, Ordering::Relaxed);
                self.ejected_until_ms.store(0, Ordering::Relaxed);
                self.connect_failures.store(0, Ordering::Relaxed);
                return Some(true);
            }
        } else {
            self.successes.store(0, Ordering::Relaxed);
            let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if self.healthy() && n >= target.unhealthy_threshold {
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

    /// Nothing here that a fresh state would not say: dropping it loses nothing.
    fn at_rest(&self, now_ms: u64) -> bool {
        self.healthy()
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
            && self.connect_failures.load(Ordering::Relaxed) == 0
            && self.inflight.load(Ordering::Relaxed) == 0
    }
}

/// Health of the targets this node routes to. The checks task owns the entries of checked
/// targets; the router adds entries for the others as it meets them, and they are dropped
/// again once at rest, so the map follows traffic and checks, not the number of services.
#[derive(Default)]
pub struct Health {
    states: DashMap<Target, Arc<BackendState>>,
    /// Backends (by address) with a target failing its checks, and how many such targets:
    /// read at scrape time, so only backends in trouble have a series.
    unhealthy: Mutex<HashMap<Arc<str>, usize>>,
}

impl Health {
    pub(crate) fn state(&self, target: &Target) -> Arc<BackendState> {
        if let Some(state) = self.states.get(target) {
            return state.clone();
        }
        self.states
            .entry(target.clone())
            .or_insert_with(|| Arc::new(BackendState::new(&target.backend)))
            .clone()
    }

    /// Backends failing their active checks now, by address, sorted, at most `limit`; and how
    /// many there are in all.
    pub fn unhealthy_backends(&self, limit: usize) -> (usize, Vec<String>) {
        let unhealthy = self.unhealthy.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = unhealthy.keys().map(|k| k.to_string()).collect();
        names.sort_unstable();
        names.truncate(limit);
        (unhealthy.len(), names)
    }

    fn mark(&self, label: &Arc<str>, healthy: bool) {
        let mut unhealthy = self.unhealthy.lock().unwrap_or_else(|e| e.into_inner());
        if healthy {
            if let Some(n) = unhealthy.get_mut(label) {
                *n -= 1;
                if *n == 0 {
                    unhealthy.remove(label);
                }
            }
        } else {
            *unhealthy.entry(label.clone()).or_insert(0) += 1;
        }
    }

    /// A target nobody checks any more: a verdict of its checks must not outlive them.
    fn forget(&self, target: &Target) {
        if let Some((_, state)) = self.states.remove(target)
            && !state.healthy()
        {
            self.mark(&state.label, true);
        }
    }

    /// Drops states the router made that hold nothing (and nobody holds).
    fn sweep(&self) {
        let now = now_ms();
        self.states
            .retain(|_, state| Arc::strong_count(state) > 1 || !state.at_rest(now));
    }
}

/// How a target is asked whether it is healthy: over HTTP in the node, a stand-in in tests.
pub(crate) trait Probe: Send + Sync + 'static {
    fn check(
        &self,
        target: &Target,
        state: &BackendState,
    ) -> Pin<Box<dyn Future<Output = bool> + Send>>;
}

/// `GET <path>` with the backend's address as Host: one check serves every service of the
/// backend, so no one service's name fits, and the address never changes under it.
pub(crate) struct HttpProbe {
    pub client: Client<HttpConnector, ProxyBody>,
    pub h2c_client: Client<HttpConnector, ProxyBody>,
}

impl Probe for HttpProbe {
    fn check(
        &self,
        target: &Target,
        state: &BackendState,
    ) -> Pin<Box<dyn Future<Output = bool> + Send>> {
        let client = match target.protocol {
            UpstreamProtocol::Http1 => self.client.clone(),
            UpstreamProtocol::H2c => self.h2c_client.clone(),
        };
        let timeout = Duration::from_millis(u64::from(target.timeout_ms));
        let request = Request::get(format!("http://{}{}", state.label, target.path()))
            .header(header::HOST, &*state.label)
            .header(header::USER_AGENT, USER_AGENT)
            .body(
                Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed(),
            );
        Box::pin(async move {
            // A path that makes no URI was refused by validation; count it as a failure.
            let Ok(request) = request else {
                return false;
            };
            match tokio::time::timeout(timeout, client.request(request)).await {
                Ok(Ok(response)) => {
                    let status = response.status();
                    // Drain so the connection goes back to the pool.
                    let _ = response.into_body().collect().await;
                    status.is_success() || status.is_redirection()
                }
                _ => false,
            }
        })
    }
}

/// The targets of a service that it wants checked actively.
fn checked_targets(service: &Service) -> Vec<Target> {
    if service.status != ServiceStatus::Active
        || !service
            .options
            .health_check
            .is_active_for(service.backends.len())
    {
        return Vec::new();
    }
    service
        .backends
        .iter()
        .map(|b| Target::new(b, &service.options))
        .collect()
}

/// The checks task's state: the schedule, and the Snapshot it was last reconciled with.
struct Checks {
    health: Arc<Health>,
    schedule: Schedule<Arc<BackendState>>,
    seen: Option<Arc<Snapshot>>,
    targets_gauge: metrics::Gauge,
    floor_gauge: metrics::Gauge,
    ok: metrics::Counter,
    failed: metrics::Counter,
}

impl Checks {
    fn new(health: Arc<Health>, checks_per_second: u32, now: Instant) -> Self {
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        Checks {
            health,
            schedule: Schedule::new(checks_per_second, now, u64::from_le_bytes(seed)),
            seen: None,
            targets_gauge: metrics::gauge!("portcullis_health_check_targets"),
            floor_gauge: metrics::gauge!("portcullis_health_check_interval_floor_seconds"),
            ok: metrics::counter!("portcullis_health_checks_total", "result" => "healthy"),
            failed: metrics::counter!("portcullis_health_checks_total", "result" => "unhealthy"),
        }
    }

    /// Brings the schedule in line with `current`: from the services changed since the last
    /// Snapshot when it knows them, by a full pass otherwise (the first time, after a reload).
    fn reconcile(&mut self, current: Arc<Snapshot>, now: Instant) {
        let seen = self.seen.take();
        let changes = seen
            .as_ref()
            .and_then(|seen| current.changes_since(seen.revision()));
        match (changes, &seen) {
            (Some(keys), Some(seen)) => {
                let ids: HashSet<ServiceId> = keys
                    .filter_map(|key| key.strip_prefix(keys::SERVICES)?.parse().ok())
                    .collect();
                let mut added = Vec::new();
                let mut removed = Vec::new();
                for id in ids {
                    let before = seen
                        .service(&id)
                        .map_or_else(Vec::new, |s| checked_targets(s));
                    let after = current
                        .service(&id)
                        .map_or_else(Vec::new, |s| checked_targets(s));
                    if before != after {
                        removed.extend(before);
                        added.extend(after);
                    }
                }
                // Additions first, so a target that a change moves between services, or that
                // a service keeps through an unrelated change, never drops to no reference.
                for target in &added {
                    self.add(target, now);
                }
                for target in &removed {
                    if self.schedule.remove(target) {
                        self.health.forget(target);
                    }
                }
            }
            _ => {
                self.schedule.unreference_all();
                for service in current.services() {
                    for target in checked_targets(service) {
                        self.add(&target, now);
                    }
                }
                for target in self.schedule.sweep() {
                    self.health.forget(&target);
                }
            }
        }
        self.schedule.settle(now);
        self.seen = Some(current);
        self.targets_gauge.set(self.schedule.len() as f64);
        self.floor_gauge.set(self.schedule.floor().as_secs_f64());
    }

    fn add(&mut self, target: &Target, now: Instant) {
        let health = &self.health;
        self.schedule.add(target, || health.state(target), now);
    }

    /// Records the result of the check of `slot`.
    fn finish(&mut self, slot: usize, ok: bool) {
        let Some((target, state, services)) = self.schedule.finish(slot) else {
            return;
        };
        if ok { &self.ok } else { &self.failed }.increment(1);
        let Some(healthy) = state.record_check(ok, target) else {
            return;
        };
        self.health.mark(&state.label, healthy);
        let backend = &*state.label;
        let path = target.path();
        if healthy {
            tracing::info!(backend, path, services, "backend healthy again");
        } else {
            tracing::warn!(backend, path, services, "backend unhealthy; taking it out");
        }
    }
}

/// Runs the active checks of every backend target, reconciled with each Snapshot, until
/// `shutdown`.
pub(crate) async fn run_checks(
    snapshot: SnapshotHandle,
    health: Arc<Health>,
    probe: Arc<dyn Probe>,
    checks_per_second: u32,
    shutdown: CancellationToken,
) {
    let changes = snapshot.subscribe();
    run(
        move || snapshot.load_full(),
        changes,
        health,
        probe,
        checks_per_second,
        shutdown,
    )
    .await;
}

async fn run(
    load: impl Fn() -> Arc<Snapshot>,
    mut changes: watch::Receiver<Revision>,
    health: Arc<Health>,
    probe: Arc<dyn Probe>,
    checks_per_second: u32,
    shutdown: CancellationToken,
) {
    let mut checks = Checks::new(health.clone(), checks_per_second, Instant::now());
    checks.reconcile(load(), Instant::now());
    let mut running = JoinSet::new();
    // Which slot each running check is for, so one whose task failed is still accounted for.
    let mut slots: HashMap<tokio::task::Id, usize> = HashMap::new();
    let mut sweep = tokio::time::interval_at(Instant::now() + SWEEP_EVERY, SWEEP_EVERY);
    loop {
        let now = Instant::now();
        while let Some(start) = checks.schedule.start(now) {
            let check = probe.check(start.target, start.value);
            let task = running.spawn(check);
            slots.insert(task.id(), start.slot);
        }
        let wake = checks.schedule.next_wake();
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                checks.reconcile(load(), Instant::now());
            }
            Some(done) = running.join_next_with_id() => {
                let (id, ok) = match done {
                    Ok((id, ok)) => (id, ok),
                    Err(e) => (e.id(), false),
                };
                if let Some(slot) = slots.remove(&id) {
                    checks.finish(slot, ok);
                }
            }
            () = sleep_until(wake) => {}
            _ = sweep.tick() => health.sweep(),
        }
    }
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::AtomicU64;

    use portcullis_config::DomainName;
    use portcullis_config::model::ServiceOptions;
    use portcullis_config::store::KeyValue;
    use time::OffsetDateTime;

    use super::*;

    fn service(backends: &[&str], options: ServiceOptions) -> Service {
        Service {
            id: ServiceId::new_v4(),
            backends: backends
                .iter()
                .map(|b| Backend::parse(b).unwrap())
                .collect(),
            status: ServiceStatus::Active,
            options,
            domains: Vec::new(),
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn snapshot(services: &[Service], revision: Revision) -> Arc<Snapshot> {
        let kvs: Vec<KeyValue> = services
            .iter()
            .map(|s| KeyValue {
                key: keys::service(&s.id),
                value: serde_json::to_vec(s).unwrap(),
                create_revision: 1,
                mod_revision: 1,
                version: 1,
                lease: None,
            })
            .collect();
        Arc::new(Snapshot::from_kvs(
            DomainName::parse("app.test").unwrap(),
            revision,
            &kvs,
        ))
    }

    /// Counts checks by the (virtual) second they start in; each takes 10 ms and succeeds.
    struct Counting {
        t0: Instant,
        per_second: Arc<Mutex<Vec<u64>>>,
        total: AtomicU64,
    }

    impl Probe for Counting {
        fn check(
            &self,
            _target: &Target,
            _state: &BackendState,
        ) -> Pin<Box<dyn Future<Output = bool> + Send>> {
            let second = (Instant::now() - self.t0).as_secs() as usize;
            let mut per_second = self.per_second.lock().unwrap();
            if per_second.len() <= second {
                per_second.resize(second + 1, 0);
            }
            per_second[second] += 1;
            self.total.fetch_add(1, Ordering::Relaxed);
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                true
            })
        }
    }

    #[test]
    fn only_services_that_want_them_get_active_checks() {
        let two = service(&["10.0.0.1:80", "10.0.0.2:80"], ServiceOptions::default());
        assert_eq!(checked_targets(&two).len(), 2);
        let one = service(&["10.0.0.1:80"], ServiceOptions::default());
        assert!(checked_targets(&one).is_empty());
        let mut always = ServiceOptions::default();
        always.health_check.active = portcullis_config::model::ActiveChecks::Always;
        assert_eq!(checked_targets(&service(&["10.0.0.1:80"], always)).len(), 1);
        let mut suspended = two.clone();
        suspended.status = ServiceStatus::Suspended;
        assert!(checked_targets(&suspended).is_empty());
    }

    #[test]
    fn services_sharing_backends_share_targets_and_state() {
        let health = Arc::new(Health::default());
        let now = Instant::now();
        let mut checks = Checks::new(health.clone(), 200, now);
        let services: Vec<Service> = (0..50)
            .map(|_| service(&["10.0.0.1:80", "10.0.0.2:80"], ServiceOptions::default()))
            .collect();
        checks.reconcile(snapshot(&services, 1), now);
        assert_eq!(checks.schedule.len(), 2);
        let a = Target::new(&services[0].backends[0], &services[0].options);
        let b = Target::new(&services[7].backends[0], &services[7].options);
        assert!(Arc::ptr_eq(&health.state(&a), &health.state(&b)));

        // A full pass without them forgets the targets and their verdicts.
        health.state(&a).healthy.store(false, Ordering::Relaxed);
        health.mark(&health.state(&a).label, false);
        assert_eq!(health.unhealthy_backends(10).0, 1);
        // A reload: no history, so a full pass.
        checks.reconcile(snapshot(&services[..0], 2), now);
        assert_eq!(checks.schedule.len(), 0);
        assert_eq!(health.unhealthy_backends(10).0, 0);
        assert!(health.state(&a).healthy());
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_holds_under_ten_thousand_multi_backend_services() {
        let budget = 200u32;
        let services: Vec<Service> = (0..10_000u32)
            .map(|i| {
                let (x, y) = (i / 250, i % 250);
                service(
                    &[&format!("10.1.{x}.{y}:80"), &format!("10.2.{x}.{y}:80")],
                    ServiceOptions::default(),
                )
            })
            .collect();
        let current = snapshot(&services, 1);
        let (_tx, changes) = watch::channel(current.revision());
        let t0 = Instant::now();
        let probe = Arc::new(Counting {
            t0,
            per_second: Arc::default(),
            total: AtomicU64::new(0),
        });
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            move || current.clone(),
            changes,
            Arc::new(Health::default()),
            probe.clone(),
            budget,
            shutdown.clone(),
        ));
        // 20,000 targets at 5 s would be 4,000 checks a second; the budget stretches each
        // interval to 100 s.
        let seconds = 250;
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        shutdown.cancel();
        task.await.unwrap();
        let per_second = probe.per_second.lock().unwrap().clone();
        let worst = per_second.iter().take(seconds as usize).max().copied();
        assert!(
            worst.unwrap() <= u64::from(budget + budget / 100 + 1),
            "{worst:?} checks in one second"
        );
        let total = probe.total.load(Ordering::Relaxed);
        assert!(
            total >= u64::from(budget) * seconds * 95 / 100,
            "only {total} checks in {seconds} s"
        );
    }
}
