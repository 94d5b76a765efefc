//! The loop that keeps certificates issued and renewed: it wakes on every new Snapshot and at
//! the next renewal or retry time, and issues what is due.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use futures_util::StreamExt as _;

use portcullis_config::model::{Certificate, CertificateStatus, IssuerRef, RenewalWindow};
use portcullis_config::store::lock;
use portcullis_config::{
    CertificateMaterial, DomainName, ServiceId, SnapshotHandle, State, StateError, keys,
};
use time::{Duration, OffsetDateTime};
use tokio_util::sync::CancellationToken;

use crate::issuer::{IssueError, Issuer};

/// When to renew, and how to back off after failures.
#[derive(Clone, Debug)]
pub struct RenewalPolicy {
    /// Renew when this fraction of the lifetime remains (Let's Encrypt advises a third).
    pub remaining_fraction: f64,
    pub first_retry: StdDuration,
    pub max_retry: StdDuration,
    /// Orders in flight at once on this node (CAs limit concurrent orders per account too).
    pub concurrent_orders: usize,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        RenewalPolicy {
            remaining_fraction: 1.0 / 3.0,
            first_retry: StdDuration::from_secs(5),
            max_retry: StdDuration::from_secs(3600),
            concurrent_orders: 32,
        }
    }
}

impl RenewalPolicy {
    /// Inside the CA's renewal window when it gave one (ARI); otherwise when a third of the
    /// lifetime remains, moved earlier by up to a further twelfth by a
    /// jitter fixed per certificate (its names and expiry), so certificates issued together, or
    /// nodes of a fleet, do not renew in one burst, and the time does not move between looks.
    pub fn renew_at(&self, cert: &Certificate) -> Option<OffsetDateTime> {
        use std::hash::{Hash, Hasher};
        let (from, to) = (cert.not_before?, cert.not_after?);
        let lifetime = (to - from).as_seconds_f64();
        let mut hasher = std::hash::DefaultHasher::new();
        cert.domains.hash(&mut hasher);
        to.unix_timestamp_nanos().hash(&mut hasher);
        let jitter = (hasher.finish() % 1024) as f64 / 1024.0;
        if let Some(window) = &cert.renewal_window {
            return Some(ari_renew_at(window, jitter));
        }
        let early = lifetime * (self.remaining_fraction + jitter / 12.0);
        Some(to - Duration::seconds_f64(early))
    }

    /// Exponential backoff with jitter: half the step fixed, half random, so nodes and names
    /// that failed together do not retry together.
    pub fn retry_after(&self, attempts: u32) -> StdDuration {
        let step = self
            .first_retry
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
            .min(self.max_retry);
        let mut byte = [0u8; 1];
        let random = getrandom::fill(&mut byte).map(|()| byte[0]).unwrap_or(128);
        step / 2 + (step / 2).mul_f64(f64::from(random) / 255.0)
    }
}

/// A check run before each order: `Err(reason)` when the name cannot validate (our own DNS
/// does not send the CA to this platform), so no order is spent on it. It is given the store
/// revision the name was seen at, so it can wait for its own view to catch up.
pub type Preflight = Arc<
    dyn Fn(DomainName, i64) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

pub struct CertificateManager {
    state: State,
    snapshot: SnapshotHandle,
    issuer: Arc<dyn Issuer>,
    policy: RenewalPolicy,
    preflight: Option<Preflight>,
    fleet_slots: Option<FleetSlots>,
    dns01: Option<Arc<dyn crate::issuer::Dns01>>,
}

/// The cap on orders in flight across every node sharing the store: each order holds one of
/// `limit` slots in the store, with the node's lease, so a node that dies frees its slots.
pub struct FleetSlots {
    pub store: Arc<dyn portcullis_config::Store>,
    pub limit: usize,
    /// The node's lease, replaced when the node announces itself again.
    pub lease: tokio::sync::watch::Receiver<portcullis_config::store::LeaseId>,
}

const ORDER_SLOTS: &str = "acme-orders";

/// Orders wait this long for the node to join the fleet.
const NOT_JOINED_RECHECK: Duration = Duration::seconds(5);

/// A name another node holds the order lock of is looked at again after this, should that
/// node die before it records anything (its lock goes with its lease, well before this).
const LEFT_TO_PEER_RECHECK: Duration = Duration::seconds(30);

/// Longest sleep with nothing due: a safety net should a wake-up be missed.
const IDLE_WAKE: StdDuration = StdDuration::from_secs(3600);

#[derive(Debug, PartialEq)]
enum Due {
    Now,
    /// Only the CA's renewal window is to be asked for again.
    Refresh,
    At(OffsetDateTime),
}

impl CertificateManager {
    pub fn new(
        state: State,
        snapshot: SnapshotHandle,
        issuer: Arc<dyn Issuer>,
        policy: RenewalPolicy,
    ) -> Self {
        CertificateManager {
            state,
            snapshot,
            issuer,
            policy,
            preflight: None,
            fleet_slots: None,
            dns01: None,
        }
    }

    /// Caps orders fleet-wide, for nodes that share a store; alone, the node's own pool
    /// (`RenewalPolicy::concurrent_orders`) is the cap.
    pub fn with_fleet_slots(mut self, slots: FleetSlots) -> Self {
        self.fleet_slots = Some(slots);
        self
    }

    /// Where DNS-01 values go, for alias domains proven ahead of cutover and wildcards.
    pub fn with_dns01(mut self, dns01: Arc<dyn crate::issuer::Dns01>) -> Self {
        self.dns01 = Some(dns01);
        self
    }

    pub fn with_preflight(mut self, preflight: Preflight) -> Self {
        self.preflight = Some(preflight);
        self
    }

    fn due(&self, cert: Option<&Certificate>, now: OffsetDateTime) -> Due {
        due(&self.policy, &self.issuer.reference(), cert, now)
    }
}

/// What to do about one name's certificate at `now`.
fn due(
    policy: &RenewalPolicy,
    issuer: &IssuerRef,
    cert: Option<&Certificate>,
    now: OffsetDateTime,
) -> Due {
    let Some(cert) = cert else {
        return Due::Now;
    };
    if cert.status == CertificateStatus::Failed
        && let Some(at) = cert.next_attempt_at
        && at > now
    {
        return Due::At(at);
    }
    // Pending: new, or renewal asked for (`cert renew`), even while the old one serves.
    if cert.status == CertificateStatus::Pending || cert.issuer != *issuer || !cert.is_servable(now)
    {
        return Due::Now;
    }
    match policy.renew_at(cert) {
        Some(at) if at > now => match cert.renewal_window {
            Some(window) if window.check_after <= now => Due::Refresh,
            Some(window) => Due::At(at.min(window.check_after)),
            None => Due::At(at),
        },
        _ => Due::Now,
    }
}

/// A name that gets a certificate: a service's canonical name, or an alias domain.
type Subject = Arc<str>;

/// When each name's certificate needs work, in time order. Fed by the store keys that change
/// (a service, a domain, a certificate record), so a change costs a few map operations
/// whatever the number of names; the whole Snapshot is walked only at start and after a reload.
#[derive(Default)]
struct Schedule {
    /// Name -> (due at, only the renewal window is due).
    by_service: HashMap<Subject, (OffsetDateTime, bool)>,
    timeline: BTreeSet<(OffsetDateTime, Subject)>,
}

impl Schedule {
    fn clear(&mut self) {
        self.by_service.clear();
        self.timeline.clear();
    }

    fn set(&mut self, id: Subject, at: OffsetDateTime, refresh: bool) {
        if let Some((old, _)) = self.by_service.insert(id.clone(), (at, refresh)) {
            self.timeline.remove(&(old, id.clone()));
        }
        self.timeline.insert((at, id));
    }

    fn remove(&mut self, id: &str) {
        if let Some((id, (old, _))) = self.by_service.remove_entry(id) {
            self.timeline.remove(&(old, id));
        }
    }

    /// Takes the entries due at `now`, earliest first.
    fn take_due(&mut self, now: OffsetDateTime) -> Vec<(Subject, bool)> {
        let mut due = Vec::new();
        while let Some((at, _)) = self.timeline.first()
            && *at <= now
        {
            let Some((_, id)) = self.timeline.pop_first() else {
                break;
            };
            if let Some((_, refresh)) = self.by_service.remove(&id) {
                due.push((id, refresh));
            }
        }
        due
    }

    fn next(&self) -> Option<OffsetDateTime> {
        self.timeline.first().map(|(at, _)| *at)
    }
}

/// The name whose certificate a store key is about, if any: a service's canonical name, an
/// alias domain, or the name of a certificate record.
fn subject_of_key(key: &str, zone: &DomainName) -> Option<String> {
    if let Some(id) = key.strip_prefix(keys::SERVICES) {
        return id
            .parse::<ServiceId>()
            .ok()
            .map(|id| id.canonical_domain(zone));
    }
    key.strip_prefix(keys::DOMAINS)
        .or_else(|| key.strip_prefix(keys::CERTIFICATES))
        .map(str::to_string)
}

/// The service a name's certificate is for, while the name should have one: a service's
/// canonical name, or an alias domain that is live or proven for issuance ahead of cutover.
fn owner_of(snapshot: &portcullis_config::Snapshot, name: &str) -> Option<ServiceId> {
    let zone = snapshot.zone().as_str();
    if let Some(label) = name
        .strip_suffix(zone)
        .and_then(|rest| rest.strip_suffix('.'))
        && let Ok(id) = label.parse::<ServiceId>()
    {
        return snapshot.service(&id).map(|s| s.id);
    }
    let domain = snapshot.domain(name)?;
    (domain.wants_certificate() && snapshot.service(&domain.service).is_some())
        .then_some(domain.service)
}

impl CertificateManager {
    /// Runs orders as a pool: up to `concurrent_orders` at once, each slot refilled as soon as
    /// an order ends, and names that fall due join the queue at once rather than waiting for
    /// the slowest order of a batch.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut changes = self.snapshot.subscribe();
        let slots = self.policy.concurrent_orders.max(1);
        let mut running = futures_util::stream::FuturesUnordered::new();
        let mut in_flight: HashSet<Subject> = HashSet::new();
        let mut schedule = Schedule::default();
        let mut queue: VecDeque<(Subject, bool)> = VecDeque::new();
        // Names just recorded, by the store revision of the record: until the Snapshot shows
        // it, the Snapshot still shows them as due.
        let mut settling: BTreeMap<i64, Vec<Subject>> = BTreeMap::new();
        let mut settling_ids: HashSet<Subject> = HashSet::new();
        // The Snapshot revision the schedule reflects; `None`: walk everything.
        let mut seen: Option<i64> = None;
        let this = &self;
        loop {
            let snapshot = self.snapshot.load_full();
            let now = OffsetDateTime::now_utc();
            if seen != Some(snapshot.revision()) {
                let changed = seen.and_then(|rev| snapshot.changes_since(rev));
                match changed {
                    Some(keys) => {
                        let zone = snapshot.zone();
                        let ids: HashSet<String> =
                            keys.filter_map(|k| subject_of_key(k, zone)).collect();
                        for id in ids {
                            self.reschedule(&mut schedule, &snapshot, Subject::from(id), now);
                        }
                    }
                    None => {
                        schedule.clear();
                        let zone = snapshot.zone();
                        for service in snapshot.services() {
                            let name = Subject::from(service.id.canonical_domain(zone));
                            self.reschedule(&mut schedule, &snapshot, name, now);
                        }
                        for domain in snapshot.domains() {
                            let name = Subject::from(domain.name.as_str());
                            self.reschedule(&mut schedule, &snapshot, name, now);
                        }
                    }
                }
                // Names whose record the Snapshot now shows are scheduled by what it says.
                while let Some(entry) = settling.first_entry()
                    && *entry.key() <= snapshot.revision()
                {
                    for id in entry.remove() {
                        settling_ids.remove(&id);
                        self.reschedule(&mut schedule, &snapshot, id, now);
                    }
                }
                seen = Some(snapshot.revision());
            }
            for (id, refresh) in schedule.take_due(now) {
                // In flight: its end reschedules it. Settling: the Snapshot's view is stale.
                // Gone: a retry time set after the service was deleted.
                if !in_flight.contains(&id)
                    && !settling_ids.contains(&id)
                    && owner_of(&snapshot, &id).is_some()
                {
                    queue.push_back((id, refresh));
                }
            }
            drop(snapshot);
            while running.len() < slots
                && let Some((id, refresh)) = queue.pop_front()
            {
                in_flight.insert(id.clone());
                running.push(async move {
                    let outcome = this.work_on(&id, refresh).await;
                    (id, outcome)
                });
            }
            let wake = schedule
                .next()
                .unwrap_or(now + IDLE_WAKE)
                .min(now + IDLE_WAKE);
            let sleep = (wake - OffsetDateTime::now_utc())
                .try_into()
                .unwrap_or(StdDuration::ZERO);
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                Some((id, result)) = running.next(), if !running.is_empty() => {
                    in_flight.remove(&id);
                    let now = OffsetDateTime::now_utc();
                    match result {
                        Ok(Outcome::Recorded(Some(revision))) => {
                            if revision > self.snapshot.load().revision() {
                                settling.entry(revision).or_default().push(id.clone());
                                settling_ids.insert(id);
                            } else {
                                let snapshot = self.snapshot.load_full();
                                self.reschedule(&mut schedule, &snapshot, id, now);
                            }
                        }
                        Ok(Outcome::Recorded(None)) => {
                            // The service went away meanwhile, or this node lost the name's
                            // order lock (its lease ended) and wrote nothing: look again later.
                            if owner_of(&self.snapshot.load(), &id).is_some() {
                                schedule.set(id, now + self.policy.first_retry, false);
                            }
                        }
                        Ok(Outcome::Deferred(until)) => schedule.set(id, until, false),
                        Err(e) => {
                            // The store failed: try again after the first backoff step.
                            tracing::warn!(service = %id, error = %e, "cannot record a certificate");
                            schedule.set(id, now + self.policy.first_retry, false);
                        }
                    }
                }
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Puts a service's next piece of work in the schedule as its certificate record says, or
    /// takes it out when the service is gone.
    fn reschedule(
        &self,
        schedule: &mut Schedule,
        snapshot: &portcullis_config::Snapshot,
        id: Subject,
        now: OffsetDateTime,
    ) {
        if owner_of(snapshot, &id).is_none() {
            schedule.remove(&id);
            return;
        }
        let cert = snapshot.certificate(&id).map(|c| &**c);
        match self.due(cert, now) {
            Due::Now => schedule.set(id, now, false),
            Due::Refresh => schedule.set(id, now, true),
            Due::At(at) => schedule.set(id, at, false),
        }
    }

    /// Orders (or refreshes the renewal window of) a service's certificate. In a fleet, first
    /// takes the name's order lock: a name another node is ordering is left to it, and the
    /// record is read again from the store, since this node's Snapshot may not show yet what
    /// the last holder wrote.
    async fn work_on(&self, id: &str, refresh: bool) -> Result<Outcome, StateError> {
        let Some(fleet) = &self.fleet_slots else {
            return if refresh {
                self.refresh_window(id, None).await.map(Outcome::Recorded)
            } else {
                self.issue_for(id, None).await
            };
        };
        let name = id;
        let lease = *fleet.lease.borrow();
        if lease.0 == 0 {
            // The node has not joined the fleet yet (its store was away at start): without a
            // lease, a lock would outlive a holder that dies.
            return Ok(Outcome::Deferred(
                OffsetDateTime::now_utc() + NOT_JOINED_RECHECK,
            ));
        }
        let lock_name = format!("orders/{name}");
        let Some(guard) = lock::try_lock(fleet.store.as_ref(), &lock_name, lease).await? else {
            metrics::counter!("portcullis_certificate_orders_left_to_peers_total").increment(1);
            return Ok(Outcome::Deferred(
                OffsetDateTime::now_utc() + LEFT_TO_PEER_RECHECK,
            ));
        };
        let outcome = async {
            let current = self.state.get_certificate_versioned(name).await?;
            let now = OffsetDateTime::now_utc();
            match self.due(current.as_ref().map(|c| &c.value), now) {
                Due::Now => self.issue_for(id, Some(&guard)).await,
                Due::Refresh => self
                    .refresh_window(id, Some(&guard))
                    .await
                    .map(Outcome::Recorded),
                // Done by another node meanwhile: schedule by the record once it is here.
                Due::At(_) => Ok(Outcome::Recorded(current.map(|c| c.mod_revision))),
            }
        }
        .await;
        if let Err(e) = guard.unlock(fleet.store.as_ref()).await {
            // Its lease frees it in the end.
            tracing::warn!(domain = %name, error = %e, "cannot release an order lock");
        }
        outcome
    }

    async fn issue_for(
        &self,
        name: &str,
        fence: Option<&lock::LockGuard>,
    ) -> Result<Outcome, StateError> {
        let Some(owner) = owner_of(&self.snapshot.load(), name) else {
            return Ok(Outcome::Recorded(None));
        };
        let id = &owner;
        let domain = match name.strip_prefix("*.") {
            Some(base) => DomainName::wildcard_of(&DomainName::validate("domain", base)?),
            None => DomainName::validate("domain", name)?,
        };
        // A name that does not point here yet (proven by its delegated `_acme-challenge`), and
        // a wildcard, can only be proven by DNS-01.
        let by_dns = self
            .snapshot
            .load()
            .domain(name)
            .is_some_and(|d| d.name.is_wildcard() || !d.is_live());
        let challenge = match (&self.dns01, by_dns) {
            (Some(dns), true) => crate::issuer::Challenge::Dns01(dns.as_ref()),
            _ => crate::issuer::Challenge::Http01,
        };
        let previous = self.snapshot.load().certificate(name).cloned();
        let mut domains = vec![domain];
        let started = std::time::Instant::now();
        // A first issuance shows its steps in the certificate's status; a renewal keeps showing
        // the certificate that serves.
        let steps = StepWriter {
            manager: self,
            id,
            fence,
            base: match &previous {
                Some(p) if p.is_servable(OffsetDateTime::now_utc()) => None,
                Some(p) => Some((**p).clone()),
                None => Some(Certificate::pending(
                    domains[0].clone(),
                    self.issuer.reference(),
                    keys::private_key(name),
                )),
            },
        };
        // ARI: tell the CA which certificate this one replaces, when it tracks renewals.
        let replacing = match previous.as_ref().filter(|p| p.renewal_window.is_some()) {
            Some(p) => self
                .state
                .certificate_material(p)
                .await
                .unwrap_or_else(|e| {
                    // Renewal info is advice: without the old chain the order just goes ahead.
                    tracing::warn!(domain = %name, error = %e, "cannot read the certificate being replaced");
                    None
                })
                .map(|m| m.chain_pem()),
            None => None,
        };
        let mut preflight = Ok(());
        if let Some(check) = &self.preflight {
            let revision = self.snapshot.load().revision();
            for domain in &domains {
                preflight = check(domain.clone(), revision).await;
                if preflight.is_err() {
                    break;
                }
            }
        }
        let outcome = match preflight {
            Ok(()) => {
                let slot = match &self.fleet_slots {
                    Some(slots) => {
                        let lease = *slots.lease.borrow();
                        Some(
                            portcullis_config::store::semaphore::acquire(
                                slots.store.as_ref(),
                                ORDER_SLOTS,
                                slots.limit,
                                lease,
                            )
                            .await?,
                        )
                    }
                    None => None,
                };
                let outcome = self
                    .issuer
                    .issue(&domains, replacing.as_deref(), &steps, challenge)
                    .await;
                if let (Some(slot), Some(slots)) = (slot, &self.fleet_slots)
                    && let Err(e) = slot.release(slots.store.as_ref()).await
                {
                    // Its lease frees it in the end.
                    tracing::warn!(error = %e, "cannot release an order slot");
                }
                outcome
            }
            Err(reason) => Err(IssueError::Preflight(reason)),
        };
        // What the issuer gave, as the store keeps it (DER); a chain or key that does not
        // parse is this order's failure.
        let outcome = outcome.and_then(|issued| {
            CertificateMaterial::from_pem(&issued.chain_pem, &issued.private_key_pem)
                .map(|material| (issued, material))
                .map_err(|e| IssueError::Ca(format!("the issued chain or key does not load: {e}")))
        });
        let cert = match outcome {
            Ok((issued, material)) => {
                let renewal_window = self.issuer.renewal_window(&issued.chain_pem).await;
                tracing::info!(domain = %name, took_ms = started.elapsed().as_millis() as u64, "certificate issued");
                metrics::counter!("portcullis_certificate_orders_total", "outcome" => "issued")
                    .increment(1);
                metrics::histogram!("portcullis_certificate_issuance_seconds")
                    .record(started.elapsed().as_secs_f64());
                let cert = Certificate {
                    domains,
                    status: CertificateStatus::Active,
                    issuer: self.issuer.reference(),
                    chain_pem: String::new(),
                    key_ref: keys::private_key(name),
                    not_before: Some(issued.not_before),
                    not_after: Some(issued.not_after),
                    attempts: 0,
                    last_error: None,
                    next_attempt_at: None,
                    renewal_window,
                    serial: x509_parser::parse_x509_certificate(&material.chain[0])
                        .ok()
                        .map(|(_, leaf)| leaf.tbs_certificate.raw_serial_as_string()),
                };
                return self
                    .state
                    .put_certificate_fenced(id, &cert, Some(&material), fence)
                    .await
                    .map(Outcome::Recorded);
            }
            Err(IssueError::Paused { until, reason }) => {
                // Not this name's failure: the account waits, and the name with it.
                tracing::debug!(domain = %name, %until, reason, "order put off");
                return Ok(Outcome::Deferred(until));
            }
            Err(e) => {
                let attempts = previous.as_ref().map_or(0, |p| p.attempts) + 1;
                let mut retry = self.policy.retry_after(attempts);
                let problem = e.problem();
                if let IssueError::Rejected {
                    retry_after: Some(after),
                    ..
                } = &e
                {
                    // The CA said when to come back (Retry-After): no sooner, and no later than
                    // our longest backoff.
                    retry = retry.max((*after).min(self.policy.max_retry.max(RATE_LIMITED_RETRY)));
                } else if problem.kind.ends_with(":rateLimited") {
                    // Rate limited without a Retry-After: wait at least an hour, the shortest
                    // Let's Encrypt window.
                    retry = retry.max(RATE_LIMITED_RETRY);
                }
                tracing::warn!(domain = %name, attempts, retry_in_s = retry.as_secs(), error = %e, "issuance failed");
                metrics::counter!("portcullis_certificate_orders_total", "outcome" => "failed")
                    .increment(1);
                // A failed renewal keeps serving the certificate it has.
                let mut cert = match previous {
                    Some(p) => (*p).clone(),
                    None => Certificate::pending(
                        domains.remove(0),
                        self.issuer.reference(),
                        keys::private_key(name),
                    ),
                };
                cert.status = CertificateStatus::Failed;
                cert.attempts = attempts;
                cert.last_error = Some(problem);
                cert.next_attempt_at = Some(OffsetDateTime::now_utc() + retry);
                cert
            }
        };
        self.state
            .put_certificate_fenced(id, &cert, None, fence)
            .await
            .map(Outcome::Recorded)
    }
}

/// How an order (or a look at the renewal window) ended, for the pool.
enum Outcome {
    /// Written to the store at this revision; `None`: the service went away meanwhile.
    Recorded(Option<i64>),
    /// Nothing was asked of the CA: the issuer is backing off until then.
    Deferred(OffsetDateTime),
}

impl CertificateManager {
    /// Asks the CA for a certificate's renewal window again (its Retry-After has passed).
    async fn refresh_window(
        &self,
        name: &str,
        fence: Option<&lock::LockGuard>,
    ) -> Result<Option<i64>, StateError> {
        let Some(id) = owner_of(&self.snapshot.load(), name) else {
            return Ok(None);
        };
        let id = &id;
        let Some(current) = self.snapshot.load().certificate(name).cloned() else {
            return Ok(None);
        };
        let mut cert = (*current).clone();
        let window = match self.state.certificate_material(&cert).await? {
            Some(material) => self.issuer.renewal_window(&material.chain_pem()).await,
            None => None,
        };
        cert.renewal_window = match window {
            Some(window) => Some(window),
            // Unreachable now: keep the window we have and ask again later.
            None => cert.renewal_window.map(|w| RenewalWindow {
                check_after: OffsetDateTime::now_utc() + ARI_FALLBACK_RECHECK,
                ..w
            }),
        };
        self.state
            .put_certificate_fenced(id, &cert, None, fence)
            .await
    }
}

/// The least wait after a `rateLimited` problem.
const RATE_LIMITED_RETRY: StdDuration = StdDuration::from_secs(3600);

/// When a CA that gave a renewal window does not answer, ask again after this.
const ARI_FALLBACK_RECHECK: Duration = Duration::hours(6);

/// The renewal time within a CA's suggested window (RFC 9773 §4.2): a point chosen by
/// `jitter` (0..1, fixed per certificate) between start and end. A window already past means
/// now, which the caller sees as due.
pub fn ari_renew_at(window: &RenewalWindow, jitter: f64) -> OffsetDateTime {
    let span = (window.end - window.start).max(Duration::ZERO);
    window.start + span * jitter.clamp(0.0, 1.0)
}

/// Records a first issuance's steps as the certificate's status.
struct StepWriter<'a> {
    manager: &'a CertificateManager,
    id: &'a ServiceId,
    fence: Option<&'a lock::LockGuard>,
    /// The certificate record to update; `None`: a renewal, whose steps are not shown.
    base: Option<Certificate>,
}

#[async_trait::async_trait]
impl crate::issuer::Progress for StepWriter<'_> {
    async fn step(&self, status: CertificateStatus) {
        let Some(base) = &self.base else {
            return;
        };
        let mut cert = base.clone();
        cert.status = status;
        if let Err(e) = self
            .manager
            .state
            .put_certificate_fenced(self.id, &cert, None, self.fence)
            .await
        {
            tracing::debug!(error = %e, "cannot record an issuance step");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_gives_what_is_due_in_time_order_and_forgets_what_moved() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let ids: Vec<Subject> = (0..4)
            .map(|i| Subject::from(format!("n{i}.example")))
            .collect();
        let mut schedule = Schedule::default();
        schedule.set(ids[0].clone(), t0 + Duration::seconds(30), false);
        schedule.set(ids[1].clone(), t0 + Duration::seconds(10), true);
        schedule.set(ids[2].clone(), t0 + Duration::seconds(20), false);
        schedule.set(ids[3].clone(), t0 + Duration::seconds(5), false);
        // Moved later, then removed: only the latest placement counts.
        schedule.set(ids[3].clone(), t0 + Duration::seconds(40), false);
        schedule.remove(&ids[2]);
        assert_eq!(schedule.next(), Some(t0 + Duration::seconds(10)));
        assert_eq!(schedule.take_due(t0 + Duration::seconds(9)), vec![]);
        assert_eq!(
            schedule.take_due(t0 + Duration::seconds(30)),
            vec![(ids[1].clone(), true), (ids[0].clone(), false)]
        );
        assert_eq!(
            schedule.take_due(t0 + Duration::seconds(100)),
            vec![(ids[3].clone(), false)]
        );
        assert_eq!(schedule.next(), None);
        assert!(schedule.by_service.is_empty());
    }

    #[test]
    fn keys_name_the_certificate_they_touch() {
        let id = ServiceId::new_v4();
        let zone = DomainName::parse("app.example.test").unwrap();
        let canonical = id.canonical_domain(&zone);
        assert_eq!(
            subject_of_key(&keys::service(&id), &zone),
            Some(canonical.clone())
        );
        assert_eq!(
            subject_of_key(&keys::certificate(&canonical), &zone),
            Some(canonical.clone())
        );
        assert_eq!(
            subject_of_key(&keys::domain("api.example.com"), &zone).as_deref(),
            Some("api.example.com")
        );
        assert_eq!(subject_of_key(&keys::private_key(&canonical), &zone), None);
        assert_eq!(
            subject_of_key(&keys::domain_check("api.example.com"), &zone),
            None
        );
    }

    #[test]
    fn renews_with_a_third_left_and_backs_off_with_jitter() {
        let policy = RenewalPolicy::default();
        let start = OffsetDateTime::UNIX_EPOCH;
        let cert = Certificate {
            domains: vec![],
            status: CertificateStatus::Active,
            issuer: portcullis_config::model::IssuerRef::Dev,
            chain_pem: "x".into(),
            key_ref: String::new(),
            not_before: Some(start),
            not_after: Some(start + Duration::days(90)),
            attempts: 0,
            last_error: None,
            next_attempt_at: None,
            renewal_window: None,
            serial: None,
        };
        let at = policy.renew_at(&cert).unwrap();
        // A third of 90 days left, and up to a twelfth (7.5 days) earlier by jitter.
        assert!(at <= start + Duration::days(60), "{at}");
        assert!(
            at >= start + Duration::days(60) - Duration::hours(180),
            "{at}"
        );
        assert_eq!(
            policy.renew_at(&cert),
            Some(at),
            "the same time at every look"
        );
        let spread: std::collections::HashSet<_> = (0..20)
            .map(|i| {
                let mut other = cert.clone();
                other.domains =
                    vec![DomainName::validate("d", &format!("n{i}.example.test")).unwrap()];
                policy.renew_at(&other)
            })
            .collect();
        assert!(spread.len() > 10, "jitter spreads names: {spread:?}");
        for attempts in 1..30 {
            let d = policy.retry_after(attempts);
            let step =
                (policy.first_retry * 2u32.pow((attempts - 1).min(20))).min(policy.max_retry);
            assert!(
                d >= step / 2 && d <= step,
                "attempt {attempts}: {d:?} outside {step:?}"
            );
        }
    }

    /// A window as the CA's ARI response gives it (recorded JSON), checked again in 6 h.
    fn window(json: &str, fetched: OffsetDateTime) -> RenewalWindow {
        let info: instant_acme::RenewalInfo = serde_json::from_str(json).unwrap();
        RenewalWindow {
            start: info.suggested_window.start,
            end: info.suggested_window.end,
            check_after: fetched + Duration::hours(6),
        }
    }

    fn active(not_before: OffsetDateTime, days: i64) -> Certificate {
        Certificate {
            domains: vec![DomainName::validate("d", "a.example.test").unwrap()],
            status: CertificateStatus::Active,
            issuer: IssuerRef::Acme {
                directory_url: "https://ca.example/dir".into(),
            },
            chain_pem: "x".into(),
            key_ref: String::new(),
            not_before: Some(not_before),
            not_after: Some(not_before + Duration::days(days)),
            attempts: 0,
            last_error: None,
            next_attempt_at: None,
            renewal_window: None,
            serial: None,
        }
    }

    #[test]
    fn ari_window_decides_renewal() {
        let policy = RenewalPolicy::default();
        let issuer = IssuerRef::Acme {
            directory_url: "https://ca.example/dir".into(),
        };
        let issued = time::macros::datetime!(2025-01-01 00:00 UTC);
        // RFC 9773 §4.2's example response.
        let recorded = r#"{
            "suggestedWindow": {"start": "2025-01-02T04:00:00Z", "end": "2025-01-03T04:00:00Z"},
            "explanationURL": "https://acme.example.com/docs/ari"
        }"#;
        let w = window(recorded, issued);
        assert_eq!(ari_renew_at(&w, 0.0), w.start);
        assert_eq!(ari_renew_at(&w, 1.0), w.end);
        assert_eq!(ari_renew_at(&w, 0.5), w.start + Duration::hours(12));

        let mut cert = active(issued, 90);
        cert.renewal_window = Some(w);
        // The window wins over the lifetime rule (which would say day 60): a point inside it,
        // the same at every look.
        let at = policy.renew_at(&cert).unwrap();
        assert!(w.start <= at && at <= w.end, "{at}");
        assert_eq!(policy.renew_at(&cert), Some(at));
        // Before the window and before the re-check: sleep until the earlier of the two.
        let now = issued + Duration::hours(1);
        assert_eq!(
            due(&policy, &issuer, Some(&cert), now),
            Due::At(at.min(w.check_after))
        );
        // The Retry-After passed: ask the CA again, do not renew.
        assert!(w.check_after < at);
        assert_eq!(
            due(&policy, &issuer, Some(&cert), w.check_after),
            Due::Refresh
        );
        // Inside the window past the chosen point: renew.
        assert_eq!(due(&policy, &issuer, Some(&cert), w.end), Due::Now);

        // The CA moved the window into the past (it wants this certificate replaced now, e.g.
        // ahead of a revocation): renew at once, at the next look.
        let urgent = window(
            r#"{"suggestedWindow": {"start": "2024-12-31T00:00:00Z", "end": "2024-12-31T01:00:00Z"}}"#,
            issued,
        );
        cert.renewal_window = Some(urgent);
        assert_eq!(due(&policy, &issuer, Some(&cert), now), Due::Now);

        // Without a window (the CA has no ARI, like Pebble 2.4): a third of the lifetime left.
        cert.renewal_window = None;
        let at = policy.renew_at(&cert).unwrap();
        assert!(at <= issued + Duration::days(60) && at >= issued + Duration::days(52));
        assert_eq!(due(&policy, &issuer, Some(&cert), now), Due::At(at));
    }

    /// Counts orders; every one fails.
    struct CountingIssuer(std::sync::atomic::AtomicUsize);

    #[async_trait::async_trait]
    impl Issuer for CountingIssuer {
        fn reference(&self) -> IssuerRef {
            IssuerRef::Dev
        }
        async fn issue(
            &self,
            _: &[DomainName],
            _: Option<&str>,
            _: &dyn crate::issuer::Progress,
            _: crate::issuer::Challenge<'_>,
        ) -> Result<crate::issuer::Issued, IssueError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(IssueError::Ca("refused".into()))
        }
    }

    /// A node's store, Snapshot and certificate manager over `issuer`, in a temporary dir.
    struct Harness {
        _dir: tempfile::TempDir,
        state: State,
        sync: portcullis_config::SnapshotSync,
        zone: DomainName,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        async fn start(issuer: Arc<dyn Issuer>, preflight: Option<Preflight>) -> Harness {
            Self::start_with(issuer, preflight, None).await
        }

        /// With `fleet_limit`, orders also hold slots in the store, as nodes of a fleet do.
        async fn start_with(
            issuer: Arc<dyn Issuer>,
            preflight: Option<Preflight>,
            fleet_limit: Option<usize>,
        ) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let store: Arc<dyn portcullis_config::Store> = Arc::new(
                portcullis_config::EmbeddedStore::open(dir.path().join("state.redb"))
                    .await
                    .unwrap(),
            );
            let zone = DomainName::parse("app.example.test").unwrap();
            let state = State::new(store.clone(), zone.clone());
            let sync = portcullis_config::SnapshotSync::start(store, zone.clone())
                .await
                .unwrap();
            let mut manager = CertificateManager::new(
                state.clone(),
                sync.handle.clone(),
                issuer,
                RenewalPolicy::default(),
            );
            if let Some(preflight) = preflight {
                manager = manager.with_preflight(preflight);
            }
            if let Some(limit) = fleet_limit {
                let lease = state
                    .store()
                    .grant_lease(StdDuration::from_secs(30))
                    .await
                    .unwrap();
                manager = manager.with_fleet_slots(FleetSlots {
                    store: state.store().clone(),
                    limit,
                    lease: tokio::sync::watch::channel(lease).1,
                });
            }
            let stop = CancellationToken::new();
            let task = tokio::spawn(manager.run(stop.clone()));
            Harness {
                _dir: dir,
                state,
                sync,
                zone,
                stop,
                task,
            }
        }

        /// Creates a service; its canonical name.
        async fn service(&self) -> String {
            let (service, _) = self
                .state
                .create_service(
                    vec![portcullis_config::Backend::try_from("127.0.0.1:9".to_string()).unwrap()],
                    portcullis_config::ServiceStatus::Active,
                    Default::default(),
                    IssuerRef::Dev,
                )
                .await
                .unwrap();
            service.id.canonical_domain(&self.zone)
        }

        /// Polls the Snapshot (10 s deadline) until `name`'s certificate has `status`; every
        /// status seen on the way.
        async fn wait_status(
            &self,
            name: &str,
            status: CertificateStatus,
        ) -> (Arc<Certificate>, Vec<CertificateStatus>) {
            let deadline = std::time::Instant::now() + StdDuration::from_secs(10);
            let mut seen = Vec::new();
            loop {
                if let Some(c) = self.sync.handle.load().certificate(name) {
                    if seen.last() != Some(&c.status) {
                        seen.push(c.status);
                    }
                    if c.status == status {
                        return (c.clone(), seen);
                    }
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{name} never became {status:?}; seen {seen:?}"
                );
                tokio::time::sleep(StdDuration::from_millis(20)).await;
            }
        }

        async fn stop(self) {
            self.stop.cancel();
            self.task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_failed_preflight_spends_no_order() {
        let issuer = Arc::new(CountingIssuer(Default::default()));
        let node = Harness::start(
            issuer.clone(),
            Some(Arc::new(|name, _| {
                Box::pin(async move { Err(format!("{name} points nowhere")) })
            })),
        )
        .await;
        let name = node.service().await;
        let (cert, _) = node.wait_status(&name, CertificateStatus::Failed).await;
        let problem = cert.last_error.clone().unwrap();
        assert_eq!(problem.kind, "portcullis:preflight");
        assert!(problem.detail.contains("points nowhere"), "{problem:?}");
        assert_eq!(issuer.0.load(std::sync::atomic::Ordering::SeqCst), 0);
        node.stop().await;
    }

    /// The dev CA, except that orders for names in `held` wait until released (with
    /// `hold_next`, the next order's name joins them), and the first `paused` orders are put
    /// off as if the account were backing off.
    struct ScriptedIssuer {
        ca: crate::DevCa,
        _dir: tempfile::TempDir,
        hold_next: std::sync::atomic::AtomicBool,
        held: std::sync::Mutex<HashSet<String>>,
        /// Orders in the CA now, and the most at once.
        running: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
        release: tokio::sync::Notify,
        paused: std::sync::atomic::AtomicUsize,
    }

    impl ScriptedIssuer {
        fn new() -> ScriptedIssuer {
            let dir = tempfile::tempdir().unwrap();
            ScriptedIssuer {
                ca: crate::DevCa::open_or_create(dir.path(), "t").unwrap(),
                _dir: dir,
                hold_next: Default::default(),
                held: Default::default(),
                running: Default::default(),
                most: Default::default(),
                release: tokio::sync::Notify::new(),
                paused: Default::default(),
            }
        }
    }

    #[async_trait::async_trait]
    impl Issuer for ScriptedIssuer {
        fn reference(&self) -> IssuerRef {
            IssuerRef::Dev
        }
        async fn issue(
            &self,
            domains: &[DomainName],
            _: Option<&str>,
            progress: &dyn crate::issuer::Progress,
            _: crate::issuer::Challenge<'_>,
        ) -> Result<crate::issuer::Issued, IssueError> {
            use std::sync::atomic::Ordering::SeqCst;
            if self
                .paused
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(IssueError::Paused {
                    until: OffsetDateTime::now_utc() + Duration::milliseconds(200),
                    reason: "the CA failed".into(),
                });
            }
            progress.step(CertificateStatus::Ordering).await;
            let now = self.running.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(now, SeqCst);
            // A CA's round trips, so orders overlap.
            tokio::time::sleep(StdDuration::from_millis(20)).await;
            let name = domains[0].to_string();
            if self.hold_next.swap(false, SeqCst) {
                self.held.lock().unwrap().insert(name.clone());
            }
            loop {
                let released = self.release.notified();
                if !self.held.lock().unwrap().contains(&name) {
                    break;
                }
                released.await;
            }
            self.running.fetch_sub(1, SeqCst);
            self.ca.issue_now(domains)
        }
    }

    #[tokio::test]
    async fn a_slow_order_does_not_hold_up_names_that_come_after_it() {
        let issuer = Arc::new(ScriptedIssuer::new());
        let node = Harness::start(issuer.clone(), None).await;
        issuer
            .hold_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // The first name's order hangs.
        let slow = node.service().await;
        node.wait_status(&slow, CertificateStatus::Ordering).await;
        // Names created while it hangs are issued at once, each as it comes.
        for _ in 0..3 {
            let name = node.service().await;
            node.wait_status(&name, CertificateStatus::Active).await;
        }
        assert_eq!(
            node.sync.handle.load().certificate(&slow).unwrap().status,
            CertificateStatus::Ordering
        );
        issuer.held.lock().unwrap().clear();
        issuer.release.notify_waiters();
        node.wait_status(&slow, CertificateStatus::Active).await;
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fleet_slots_cap_the_orders_in_flight() {
        use std::sync::atomic::Ordering::SeqCst;
        let issuer = Arc::new(ScriptedIssuer::new());
        let node = Harness::start_with(issuer.clone(), None, Some(2)).await;
        let names = futures_util::future::join_all((0..8).map(|_| node.service())).await;
        for name in &names {
            node.wait_status(name, CertificateStatus::Active).await;
        }
        let most = issuer.most.load(SeqCst);
        assert!(
            (1..=2).contains(&most),
            "{most} orders at once under a cap of 2"
        );
        // Every slot was given back.
        let (held, _) = node.state.store().list_all("semaphores/").await.unwrap();
        assert!(held.is_empty(), "{held:?}");
        node.stop().await;
    }

    #[tokio::test]
    async fn an_order_put_off_by_the_account_is_no_failure_of_the_name() {
        let issuer = Arc::new(ScriptedIssuer::new());
        issuer.paused.store(2, std::sync::atomic::Ordering::SeqCst);
        let node = Harness::start(issuer.clone(), None).await;
        let name = node.service().await;
        let (cert, seen) = node.wait_status(&name, CertificateStatus::Active).await;
        assert!(!seen.contains(&CertificateStatus::Failed), "{seen:?}");
        assert_eq!(cert.attempts, 0);
        assert_eq!(issuer.paused.load(std::sync::atomic::Ordering::SeqCst), 0);
        node.stop().await;
    }
}
