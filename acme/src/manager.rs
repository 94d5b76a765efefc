//! The loop that keeps certificates issued and renewed: it wakes on every new Snapshot and at
//! the next renewal or retry time, and issues what is due.

use std::sync::Arc;

use futures_util::StreamExt as _;
use std::time::Duration as StdDuration;

use portcullis_config::model::{Certificate, CertificateStatus};
use portcullis_config::{DomainName, ServiceId, SnapshotHandle, State, StateError, keys};
use time::{Duration, OffsetDateTime};
use tokio_util::sync::CancellationToken;

use crate::issuer::Issuer;

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
    /// When a third of the lifetime remains, moved earlier by up to a further twelfth by a
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

pub struct CertificateManager {
    state: State,
    snapshot: SnapshotHandle,
    issuer: Arc<dyn Issuer>,
    policy: RenewalPolicy,
}

/// Longest sleep with nothing due: a safety net should a wake-up be missed.
const IDLE_WAKE: StdDuration = StdDuration::from_secs(3600);
/// How long to wait for our own write to show in the Snapshot before looking again.
const SNAPSHOT_CATCH_UP: StdDuration = StdDuration::from_secs(5);

enum Due {
    Now,
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
        }
    }

    fn due(&self, cert: Option<&Certificate>, now: OffsetDateTime) -> Due {
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
        if cert.status == CertificateStatus::Pending
            || cert.issuer != self.issuer.reference()
            || !cert.is_servable(now)
        {
            return Due::Now;
        }
        match self.policy.renew_at(cert) {
            Some(at) if at > now => Due::At(at),
            _ => Due::Now,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut changes = self.snapshot.subscribe();
        loop {
            let snapshot = self.snapshot.load_full();
            let zone = snapshot.zone().clone();
            let now = OffsetDateTime::now_utc();
            let mut wake = now + IDLE_WAKE;
            let mut due = Vec::new();
            let mut by_status = [0u64; 6];
            let mut next_renewal: Option<OffsetDateTime> = None;
            for service in snapshot.services() {
                let domain = service.id.canonical_domain(&zone);
                let cert = snapshot.certificate(&domain).map(|c| &**c);
                if let Some(cert) = cert {
                    by_status[status_index(cert.status)] += 1;
                    if let Some(not_after) = cert.not_after {
                        metrics::gauge!("portcullis_certificate_expiry_seconds", "domain" => domain.clone())
                            .set((not_after - now).as_seconds_f64());
                    }
                }
                match self.due(cert, now) {
                    Due::Now => due.push(service.id),
                    Due::At(at) => {
                        wake = wake.min(at);
                        if cert.is_some_and(|c| c.status == CertificateStatus::Active) {
                            next_renewal = Some(next_renewal.map_or(at, |n| n.min(at)));
                        }
                    }
                }
            }
            for (status, count) in STATUSES.iter().zip(by_status) {
                metrics::gauge!("portcullis_certificates", "status" => status.to_string())
                    .set(count as f64);
            }
            if let Some(at) = next_renewal {
                metrics::gauge!("portcullis_certificate_next_renewal_timestamp_seconds")
                    .set(at.unix_timestamp() as f64);
            }
            drop(snapshot);
            let mut recorded = false;
            let mut latest = None;
            let (this, zone) = (&self, &zone);
            let mut results = futures_util::stream::iter(due)
                .map(|id| async move { (id, this.issue_for(&id, zone).await) })
                .buffer_unordered(self.policy.concurrent_orders.max(1));
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => return,
                    next = results.next() => next,
                };
                let Some((id, result)) = next else { break };
                match result {
                    Ok(Some(revision)) => {
                        latest = latest.max(Some(revision));
                        recorded = true;
                    }
                    Ok(None) => {} // the service went away meanwhile
                    Err(e) => {
                        // The store failed: try again after the first backoff step, not at once.
                        tracing::warn!(service = %id, error = %e, "cannot record a certificate");
                        wake = wake.min(OffsetDateTime::now_utc() + self.policy.first_retry);
                    }
                }
            }
            drop(results);
            if let Some(revision) = latest {
                self.snapshot.wait_for(revision, SNAPSHOT_CATCH_UP).await;
            }
            changes.borrow_and_update();
            if recorded {
                // What was just recorded has its own next time (a renewal, a retry): look again
                // now rather than sleep until a time computed before it existed.
                continue;
            }
            let sleep = (wake - OffsetDateTime::now_utc())
                .try_into()
                .unwrap_or(StdDuration::ZERO);
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    async fn issue_for(
        &self,
        id: &ServiceId,
        zone: &DomainName,
    ) -> Result<Option<i64>, StateError> {
        let name = id.canonical_domain(zone);
        let domain = DomainName::validate("domain", &name)?;
        let previous = self.snapshot.load().certificate(&name).cloned();
        let mut domains = vec![domain];
        let started = std::time::Instant::now();
        // A first issuance shows its steps in the certificate's status; a renewal keeps showing
        // the certificate that serves.
        let steps = StepWriter {
            manager: self,
            id,
            base: match &previous {
                Some(p) if p.is_servable(OffsetDateTime::now_utc()) => None,
                Some(p) => Some((**p).clone()),
                None => Some(Certificate::pending(
                    domains[0].clone(),
                    self.issuer.reference(),
                    keys::private_key(&name),
                )),
            },
        };
        let cert = match self.issuer.issue(&domains, &steps).await {
            Ok(issued) => {
                tracing::info!(domain = %name, took_ms = started.elapsed().as_millis() as u64, "certificate issued");
                metrics::counter!("portcullis_certificate_orders_total", "outcome" => "issued")
                    .increment(1);
                metrics::histogram!("portcullis_certificate_issuance_seconds")
                    .record(started.elapsed().as_secs_f64());
                let cert = Certificate {
                    domains,
                    status: CertificateStatus::Active,
                    issuer: self.issuer.reference(),
                    chain_pem: issued.chain_pem,
                    key_ref: keys::private_key(&name),
                    not_before: Some(issued.not_before),
                    not_after: Some(issued.not_after),
                    attempts: 0,
                    last_error: None,
                    next_attempt_at: None,
                };
                return self
                    .state
                    .put_certificate(id, &cert, Some(&issued.private_key_pem))
                    .await;
            }
            Err(e) => {
                let attempts = previous.as_ref().map_or(0, |p| p.attempts) + 1;
                let retry = self.policy.retry_after(attempts);
                tracing::warn!(domain = %name, attempts, retry_in_s = retry.as_secs(), error = %e, "issuance failed");
                metrics::counter!("portcullis_certificate_orders_total", "outcome" => "failed")
                    .increment(1);
                // A failed renewal keeps serving the certificate it has.
                let mut cert = match previous {
                    Some(p) => (*p).clone(),
                    None => Certificate::pending(
                        domains.remove(0),
                        self.issuer.reference(),
                        keys::private_key(&name),
                    ),
                };
                cert.status = CertificateStatus::Failed;
                cert.attempts = attempts;
                cert.last_error = Some(e.problem());
                cert.next_attempt_at = Some(OffsetDateTime::now_utc() + retry);
                cert
            }
        };
        self.state.put_certificate(id, &cert, None).await
    }
}

const STATUSES: [CertificateStatus; 6] = [
    CertificateStatus::Pending,
    CertificateStatus::Ordering,
    CertificateStatus::Validating,
    CertificateStatus::Issuing,
    CertificateStatus::Active,
    CertificateStatus::Failed,
];

fn status_index(status: CertificateStatus) -> usize {
    STATUSES.iter().position(|s| *s == status).unwrap_or(0)
}

/// Records a first issuance's steps as the certificate's status.
struct StepWriter<'a> {
    manager: &'a CertificateManager,
    id: &'a ServiceId,
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
            .put_certificate(self.id, &cert, None)
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
}
