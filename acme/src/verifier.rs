//! The loop that verifies alias domains: new ones at once, failed ones with backoff, verified
//! ones every `recheck_interval`, each as its record's `next_check_at` says. In a fleet each
//! name's check runs on one node at a time (a lock per name, as for orders) and every node
//! serves the result, which the store carries.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use futures_util::StreamExt as _;
use portcullis_config::model::{Domain, DomainCheck, VerificationStatus};
use portcullis_config::store::{LeaseId, lock};
use portcullis_config::{SnapshotHandle, State, StateError, Store, keys};
use time::{Duration, OffsetDateTime};
use tokio_util::sync::CancellationToken;

use crate::verify::{Expect, Resolve, Verdict, check};

/// When to check, and when to give up.
#[derive(Clone, Debug)]
pub struct VerifyPolicy {
    pub pending_for: StdDuration,
    pub first_retry: StdDuration,
    pub max_retry: StdDuration,
    pub recheck_interval: StdDuration,
    pub grace: StdDuration,
    pub concurrent_checks: usize,
}

impl VerifyPolicy {
    fn retry_after(&self, attempts: u32) -> Duration {
        let step = self
            .first_retry
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
            .min(self.max_retry);
        Duration::try_from(step).unwrap_or(Duration::HOUR)
    }
}

fn dur(d: StdDuration) -> Duration {
    Duration::try_from(d).unwrap_or(Duration::MAX)
}

/// The domain after a check that found `verdict` at `now`. Pure, so every case of the life
/// cycle is tested without DNS or a clock.
pub fn next_state(
    domain: &Domain,
    verdict: &Verdict,
    policy: &VerifyPolicy,
    now: OffsetDateTime,
) -> Domain {
    let mut next = domain.clone();
    next.checked_at = Some(now);
    next.delegated = verdict.delegated;
    if let Some(proof) = verdict.proof {
        if domain.verification != VerificationStatus::Verified {
            next.verified_at = Some(now);
        }
        next.verification = VerificationStatus::Verified;
        next.proof = Some(proof);
        next.reason = None;
        next.attempts = 0;
        next.failing_since = None;
        next.next_check_at = Some(now + dur(policy.recheck_interval));
        return next;
    }
    next.reason = Some(verdict.text.clone());
    next.attempts = domain.attempts.saturating_add(1);
    let backoff = now + policy.retry_after(next.attempts);
    if verdict.inconclusive {
        // Nothing learnt: no status changes, and a verified name's grace does not run.
        next.next_check_at = Some(backoff);
        return next;
    }
    match domain.verification {
        VerificationStatus::Verified => {
            let since = domain.failing_since.unwrap_or(now);
            next.failing_since = Some(since);
            let moves_at = since + dur(policy.grace);
            if now >= moves_at {
                next.verification = VerificationStatus::Moved;
                next.next_check_at = Some(backoff);
            } else {
                // Look again by the time the grace ends, so a name that stays away moves on time.
                next.next_check_at = Some(backoff.min(moves_at));
            }
        }
        VerificationStatus::Moved => {
            // Still checked, so a name that comes back is served again, until it has been
            // away for `pending_for`.
            let since = domain.failing_since.unwrap_or(now);
            next.next_check_at = (now < since + dur(policy.pending_for)).then_some(backoff);
        }
        VerificationStatus::Pending | VerificationStatus::Failed => {
            next.verification = VerificationStatus::Failed;
            next.next_check_at =
                (now < domain.created_at + dur(policy.pending_for)).then_some(backoff);
        }
    }
    next
}

/// Names with a check due, in time order.
#[derive(Default)]
struct Schedule {
    by_name: HashMap<Arc<str>, OffsetDateTime>,
    timeline: BTreeSet<(OffsetDateTime, Arc<str>)>,
}

impl Schedule {
    fn set(&mut self, name: Arc<str>, at: OffsetDateTime) {
        if let Some(old) = self.by_name.insert(name.clone(), at) {
            self.timeline.remove(&(old, name.clone()));
        }
        self.timeline.insert((at, name));
    }

    fn remove(&mut self, name: &str) {
        if let Some((name, old)) = self.by_name.remove_entry(name) {
            self.timeline.remove(&(old, name));
        }
    }

    fn clear(&mut self) {
        self.by_name.clear();
        self.timeline.clear();
    }

    fn take_due(&mut self, now: OffsetDateTime) -> Vec<Arc<str>> {
        let mut due = Vec::new();
        while let Some((at, _)) = self.timeline.first()
            && *at <= now
        {
            if let Some((_, name)) = self.timeline.pop_first() {
                self.by_name.remove(&name);
                due.push(name);
            }
        }
        due
    }

    fn next(&self) -> Option<OffsetDateTime> {
        self.timeline.first().map(|(at, _)| *at)
    }
}

/// For nodes sharing a store: each name's check is one node's at a time.
pub struct FleetLock {
    pub store: Arc<dyn Store>,
    pub lease: tokio::sync::watch::Receiver<LeaseId>,
}

pub struct DomainVerifier {
    state: State,
    snapshot: SnapshotHandle,
    dns: Arc<dyn Resolve>,
    policy: VerifyPolicy,
    node_id: String,
    fleet: Option<FleetLock>,
}

/// A name another node is checking is looked at again after this, should it die first.
const LEFT_TO_PEER_RECHECK: Duration = Duration::seconds(30);
const IDLE_WAKE: StdDuration = StdDuration::from_secs(3600);

impl DomainVerifier {
    pub fn new(
        state: State,
        snapshot: SnapshotHandle,
        dns: Arc<dyn Resolve>,
        policy: VerifyPolicy,
        node_id: String,
    ) -> Self {
        DomainVerifier {
            state,
            snapshot,
            dns,
            policy,
            node_id,
            fleet: None,
        }
    }

    pub fn with_fleet_lock(mut self, fleet: FleetLock) -> Self {
        self.fleet = Some(fleet);
        self
    }

    fn reschedule(
        &self,
        schedule: &mut Schedule,
        snapshot: &portcullis_config::Snapshot,
        name: &str,
    ) {
        match snapshot.domain(name) {
            Some(domain) => match domain.next_check_at {
                Some(at) => schedule.set(Arc::from(name), at),
                None => schedule.remove(name),
            },
            None => schedule.remove(name),
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut changes = self.snapshot.subscribe();
        let slots = self.policy.concurrent_checks.max(1);
        let mut schedule = Schedule::default();
        let mut queue: VecDeque<Arc<str>> = VecDeque::new();
        let mut in_flight: HashSet<Arc<str>> = HashSet::new();
        let mut running = futures_util::stream::FuturesUnordered::new();
        let mut seen: Option<i64> = None;
        let this = &self;
        loop {
            let snapshot = self.snapshot.load_full();
            let now = OffsetDateTime::now_utc();
            if seen != Some(snapshot.revision()) {
                match seen.and_then(|rev| snapshot.changes_since(rev)) {
                    Some(keys) => {
                        let names: HashSet<&str> =
                            keys.filter_map(|k| k.strip_prefix(keys::DOMAINS)).collect();
                        for name in names {
                            self.reschedule(&mut schedule, &snapshot, name);
                        }
                    }
                    None => {
                        schedule.clear();
                        for domain in snapshot.domains() {
                            if let Some(at) = domain.next_check_at {
                                schedule.set(Arc::from(domain.name.as_str()), at);
                            }
                        }
                    }
                }
                seen = Some(snapshot.revision());
            }
            for name in schedule.take_due(now) {
                if !in_flight.contains(&name) {
                    queue.push_back(name);
                }
            }
            drop(snapshot);
            while running.len() < slots
                && let Some(name) = queue.pop_front()
            {
                in_flight.insert(name.clone());
                running.push(async move {
                    let outcome = this.work_on(&name).await;
                    (name, outcome)
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
                Some((name, outcome)) = running.next(), if !running.is_empty() => {
                    in_flight.remove(&name);
                    let now = OffsetDateTime::now_utc();
                    match outcome {
                        // The record now says when to look again; the Snapshot brings it.
                        Ok(Some(at)) => schedule.set(name, at),
                        Ok(None) => schedule.remove(&name),
                        Err(e) => {
                            tracing::warn!(domain = %name, error = %e, "cannot record a domain check");
                            schedule.set(name, now + dur(self.policy.first_retry));
                        }
                    }
                }
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Checks one name if it is still due (another node, or an earlier check, may have done
    /// it), and records the outcome. Returns when to look at it next.
    async fn work_on(&self, name: &str) -> Result<Option<OffsetDateTime>, StateError> {
        let guard = match &self.fleet {
            None => None,
            Some(fleet) => {
                let lease = *fleet.lease.borrow();
                if lease.0 == 0 {
                    return Ok(Some(OffsetDateTime::now_utc() + Duration::seconds(5)));
                }
                match lock::try_lock(fleet.store.as_ref(), &format!("verify/{name}"), lease).await?
                {
                    Some(guard) => Some(guard),
                    None => {
                        return Ok(Some(OffsetDateTime::now_utc() + LEFT_TO_PEER_RECHECK));
                    }
                }
            }
        };
        let outcome = self.check_and_record(name, guard.as_ref()).await;
        if let (Some(guard), Some(fleet)) = (guard, &self.fleet)
            && let Err(e) = guard.unlock(fleet.store.as_ref()).await
        {
            tracing::warn!(domain = %name, error = %e, "cannot release a verification lock");
        }
        outcome
    }

    async fn check_and_record(
        &self,
        name: &str,
        fence: Option<&lock::LockGuard>,
    ) -> Result<Option<OffsetDateTime>, StateError> {
        let Some(current) = self.state.get_domain(name).await? else {
            return Ok(None);
        };
        let domain = current.value;
        let now = OffsetDateTime::now_utc();
        match domain.next_check_at {
            None => return Ok(None),
            Some(at) if at > now => return Ok(Some(at)),
            Some(_) => {}
        }
        let snapshot = self.snapshot.load_full();
        if snapshot.service(&domain.service).is_none() {
            // Its service is gone: the name is free, and its records are being removed.
            return Ok(None);
        }
        let canonical = domain.service.canonical_domain(snapshot.zone());
        let acme_target = format!("{}.acme.{}", domain.name.acme_label(), snapshot.zone());
        let node_addresses: HashSet<IpAddr> = snapshot
            .nodes()
            .flat_map(|n| {
                n.ipv4
                    .iter()
                    .map(|ip| IpAddr::V4(*ip))
                    .chain(n.ipv6.iter().map(|ip| IpAddr::V6(*ip)))
            })
            .collect();
        drop(snapshot);
        let started = std::time::Instant::now();
        let verdict = check(
            self.dns.as_ref(),
            &domain.name,
            &Expect {
                canonical: &canonical,
                acme_target: &acme_target,
                token: &domain.token,
                node_addresses: &node_addresses,
            },
        )
        .await;
        metrics::histogram!("portcullis_domain_verification_seconds")
            .record(started.elapsed().as_secs_f64());
        let now = OffsetDateTime::now_utc();
        let next = next_state(&domain, &verdict, &self.policy, now);
        let outcome = match (verdict.proof.is_some(), verdict.inconclusive) {
            (true, _) => "verified",
            (false, true) => "inconclusive",
            (false, false) => "failed",
        };
        metrics::counter!("portcullis_domain_checks_total", "outcome" => outcome).increment(1);
        if next.verification != domain.verification {
            tracing::info!(domain = %domain.name, from = %domain.verification, to = %next.verification, verdict = %verdict.text, "domain status changed");
            if next.verification == VerificationStatus::Moved {
                tracing::warn!(domain = %domain.name, service = %domain.service, "domain moved away from its service: no longer routed, answered or renewed");
                metrics::counter!("portcullis_domains_moved_total").increment(1);
            }
        }
        let record = DomainCheck {
            at: now,
            node: self.node_id.clone(),
            steps: verdict.steps,
            verified: verdict.proof.is_some(),
            verdict: verdict.text,
            inconclusive: verdict.inconclusive,
        };
        match self
            .state
            .record_domain_check(&next, current.mod_revision, Some(&record), fence)
            .await?
        {
            Some(_) => Ok(next.next_check_at),
            // Changed meanwhile (removed, checked elsewhere, asked again): its record says.
            None => Ok(Some(now)),
        }
    }
}

#[cfg(test)]
mod tests {
    use portcullis_config::AliasName;
    use portcullis_config::model::Proof;

    use super::*;

    fn policy() -> VerifyPolicy {
        VerifyPolicy {
            pending_for: StdDuration::from_secs(7 * 86_400),
            first_retry: StdDuration::from_secs(5),
            max_retry: StdDuration::from_secs(3600),
            recheck_interval: StdDuration::from_secs(3600),
            grace: StdDuration::from_secs(86_400),
            concurrent_checks: 4,
        }
    }

    fn verdict(proof: Option<Proof>, inconclusive: bool) -> Verdict {
        Verdict {
            proof,
            text: "api.example.com CNAME elsewhere.example.net: not this platform".into(),
            inconclusive,
            delegated: false,
            steps: Vec::new(),
        }
    }

    fn domain(t0: OffsetDateTime) -> Domain {
        Domain::new(
            AliasName::parse("api.example.com").unwrap(),
            portcullis_config::ServiceId::new_v4(),
            "t".into(),
            t0,
        )
    }

    #[test]
    fn pending_fails_with_backoff_then_gives_up_after_pending_for() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let p = policy();
        let d1 = next_state(&domain(t0), &verdict(None, false), &p, t0);
        assert_eq!(d1.verification, VerificationStatus::Failed);
        assert_eq!(d1.next_check_at, Some(t0 + Duration::seconds(5)));
        let d2 = next_state(&d1, &verdict(None, false), &p, t0 + Duration::seconds(5));
        assert_eq!(d2.next_check_at, Some(t0 + Duration::seconds(15)));
        let late = t0 + Duration::days(8);
        let d3 = next_state(&d2, &verdict(None, false), &p, late);
        assert_eq!(d3.verification, VerificationStatus::Failed);
        assert_eq!(d3.next_check_at, None);
        let ok = next_state(&d3, &verdict(Some(Proof::Cname), false), &p, late);
        assert_eq!(ok.verification, VerificationStatus::Verified);
        assert_eq!(ok.verified_at, Some(late));
        assert_eq!(ok.next_check_at, Some(late + Duration::hours(1)));
        assert_eq!((ok.attempts, ok.reason.as_deref()), (0, None));
    }

    #[test]
    fn a_verified_name_moves_only_after_the_grace_and_inconclusive_checks_do_not_count() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let p = policy();
        let v = next_state(&domain(t0), &verdict(Some(Proof::Cname), false), &p, t0);
        let t1 = t0 + Duration::hours(1);
        let silent = next_state(&v, &verdict(None, true), &p, t1);
        assert_eq!(silent.verification, VerificationStatus::Verified);
        assert_eq!(silent.failing_since, None);
        let away = next_state(&silent, &verdict(None, false), &p, t1);
        assert_eq!(away.verification, VerificationStatus::Verified);
        assert_eq!(away.failing_since, Some(t1));
        let still = next_state(&away, &verdict(None, false), &p, t1 + Duration::hours(23));
        assert_eq!(still.verification, VerificationStatus::Verified);
        assert!(still.next_check_at.unwrap() <= t1 + Duration::hours(24));
        let moved = next_state(&still, &verdict(None, false), &p, t1 + Duration::hours(24));
        assert_eq!(moved.verification, VerificationStatus::Moved);
        assert!(!moved.is_live());
        // Back before the grace ended: the failing streak is forgotten.
        let back = next_state(
            &away,
            &verdict(Some(Proof::Cname), false),
            &p,
            t1 + Duration::hours(2),
        );
        assert_eq!(back.failing_since, None);
        assert_eq!(back.verified_at, v.verified_at);
        // Moved, then pointed back: served again.
        let returned = next_state(
            &moved,
            &verdict(Some(Proof::Cname), false),
            &p,
            t1 + Duration::hours(30),
        );
        assert_eq!(returned.verification, VerificationStatus::Verified);
    }
}
