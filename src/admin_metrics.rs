//! The figures `/metrics` makes at scrape time rather than keeping as gauges: certificates from
//! the Snapshot (a deleted service's certificate leaves with it, and the time left is exact
//! when read) and the backends failing their health checks.
//!
//! Every family here has a bounded number of series whatever the number of services: counts
//! by status and by time left, and names only for certificates in trouble (at most
//! [`NAMES_SHOWN`]) or of services that asked for detailed metrics.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt::Write as _;
use std::sync::Mutex;

use portcullis_config::model::{Certificate, CertificateStatus, MetricsDetail};
use portcullis_config::store::Revision;
use portcullis_config::{ServiceId, Snapshot, keys};
use time::{Duration, OffsetDateTime};

/// Certificates in trouble shown by name at most; the rest are in the counts.
pub const NAMES_SHOWN: usize = 100;

/// Backends failing their health checks shown by name at most.
pub const UNHEALTHY_SHOWN: usize = 100;

/// A certificate with less than this left is in trouble: the renewal loop renews with a third
/// of the lifetime left (30 days of Let's Encrypt's 90), so a week left means renewals are not
/// happening.
const TROUBLE_LEFT: Duration = Duration::days(7);

/// The time-left buckets of `portcullis_certificates_expiring`, each counting the certificates
/// that expire within it (so a bucket includes the ones before; `0s`: expired already).
const WITHIN: [(&str, Duration); 4] = [
    ("0s", Duration::ZERO),
    ("1d", Duration::days(1)),
    ("7d", Duration::days(7)),
    ("30d", Duration::days(30)),
];

const STATUSES: [CertificateStatus; 6] = [
    CertificateStatus::Pending,
    CertificateStatus::Ordering,
    CertificateStatus::Validating,
    CertificateStatus::Issuing,
    CertificateStatus::Active,
    CertificateStatus::Failed,
];

/// Services with `options.metrics = "detailed"`, followed through the Snapshot's changes, so a
/// scrape costs the services changed since the last one, not a walk of them all.
#[derive(Default)]
pub struct DetailedServices {
    seen: Mutex<Option<(Revision, BTreeSet<ServiceId>)>>,
}

impl DetailedServices {
    pub fn of(&self, snapshot: &Snapshot) -> Vec<ServiceId> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let detailed = |id: &ServiceId| {
            snapshot
                .service(id)
                .is_some_and(|s| s.options.metrics == MetricsDetail::Detailed)
        };
        let ids = if let Some((revision, mut ids)) = seen.take()
            && let Some(changed) = snapshot.changes_since(revision)
        {
            let changed = changed
                .filter_map(|key| key.strip_prefix(keys::SERVICES)?.parse::<ServiceId>().ok());
            for id in changed {
                if detailed(&id) {
                    ids.insert(id);
                } else {
                    ids.remove(&id);
                }
            }
            ids
        } else {
            // The first scrape, or a Snapshot that cannot say what changed: one full pass.
            snapshot
                .services()
                .filter(|s| s.options.metrics == MetricsDetail::Detailed)
                .map(|s| s.id)
                .collect()
        };
        let list = ids.iter().copied().collect();
        *seen = Some((snapshot.revision(), ids));
        list
    }
}

/// True when a certificate needs someone: its last issuance failed, it has nothing valid to
/// serve although no issuance is under way, or it has less than [`TROUBLE_LEFT`] left (a sixth
/// of its lifetime when that is shorter, so short-lived certificates are judged by their own
/// renewal pace).
fn in_trouble(cert: &Certificate, now: OffsetDateTime) -> bool {
    if cert.status == CertificateStatus::Failed {
        return true;
    }
    let valid =
        cert.not_before.is_some_and(|t| t <= now) && cert.not_after.is_some_and(|t| now < t);
    if !valid && cert.status == CertificateStatus::Active {
        return true;
    }
    let Some(not_after) = cert.not_after else {
        return false;
    };
    let limit = match cert.not_before {
        Some(not_before) => TROUBLE_LEFT.min((not_after - not_before) / 6),
        None => TROUBLE_LEFT,
    };
    not_after - now < limit
}

/// Seconds of validity left; 0 for a name with no certificate yet.
fn seconds_left(cert: &Certificate, now: OffsetDateTime) -> f64 {
    cert.not_after.map_or(0.0, |t| (t - now).as_seconds_f64())
}

/// Appends the certificate families, from `snapshot` at `now`; `detailed`: services whose
/// certificates are shown by name whatever their state.
pub fn certificates(
    snapshot: &Snapshot,
    detailed: &[ServiceId],
    now: OffsetDateTime,
    out: &mut String,
) {
    let mut by_status = [0u64; STATUSES.len()];
    let mut expiring = [0u64; WITHIN.len()];
    let mut soonest: Option<OffsetDateTime> = None;
    let mut troubled = 0u64;
    // The NAMES_SHOWN soonest to expire (a max-heap on time left, so the latest drops out).
    let mut shown: BinaryHeap<(i64, &str)> = BinaryHeap::new();
    for cert in snapshot.certificates() {
        if let Some(i) = STATUSES.iter().position(|s| *s == cert.status) {
            by_status[i] += 1;
        }
        if let Some(not_after) = cert.not_after {
            let left = not_after - now;
            for (count, (_, within)) in expiring.iter_mut().zip(WITHIN) {
                if left <= within {
                    *count += 1;
                }
            }
            soonest = Some(soonest.map_or(not_after, |s| s.min(not_after)));
        }
        if in_trouble(cert, now)
            && let Some(name) = cert.domains.first()
        {
            troubled += 1;
            let left = cert.not_after.map_or(0, |t| (t - now).whole_seconds());
            shown.push((left, name.as_str()));
            if shown.len() > NAMES_SHOWN {
                shown.pop();
            }
        }
    }

    out.push_str(
        "# HELP portcullis_certificates Certificates by status.\n\
         # TYPE portcullis_certificates gauge\n",
    );
    for (status, count) in STATUSES.iter().zip(by_status) {
        let _ = writeln!(
            out,
            "portcullis_certificates{{status=\"{status}\"}} {count}"
        );
    }
    out.push_str(
        "# HELP portcullis_certificates_expiring Certificates that expire within the time given (0s: expired already); each count includes the shorter ones.\n\
         # TYPE portcullis_certificates_expiring gauge\n",
    );
    for ((within, _), count) in WITHIN.iter().zip(expiring) {
        let _ = writeln!(
            out,
            "portcullis_certificates_expiring{{within=\"{within}\"}} {count}"
        );
    }
    if let Some(soonest) = soonest {
        let _ = writeln!(
            out,
            "# HELP portcullis_certificate_soonest_expiry_timestamp_seconds When the first certificate to expire expires (Unix time).\n\
             # TYPE portcullis_certificate_soonest_expiry_timestamp_seconds gauge\n\
             portcullis_certificate_soonest_expiry_timestamp_seconds {}",
            soonest.unix_timestamp()
        );
    }
    let _ = writeln!(
        out,
        "# HELP portcullis_certificates_in_trouble Certificates that failed, have nothing valid to serve, or have under 7 days left.\n\
         # TYPE portcullis_certificates_in_trouble gauge\n\
         portcullis_certificates_in_trouble {troubled}"
    );

    // Names: those in trouble, then those of detailed services; each once, sorted.
    let mut names: BTreeMap<&str, f64> = BTreeMap::new();
    for (_, name) in shown {
        if let Some(cert) = snapshot.certificate(name) {
            names.insert(name, seconds_left(cert, now));
        }
    }
    let zone = snapshot.zone();
    let mut canonical = String::new();
    for id in detailed {
        canonical.clear();
        let _ = write!(canonical, "{id}.{zone}");
        if let Some(cert) = snapshot.certificate(&canonical)
            && let Some(name) = cert.domains.first()
        {
            names.insert(name.as_str(), seconds_left(cert, now));
        }
    }
    if names.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP portcullis_certificate_expiry_seconds Seconds until the certificate of the name expires (0 with none yet), for names in trouble (at most {NAMES_SHOWN}) and of services with detailed metrics.\n\
         # TYPE portcullis_certificate_expiry_seconds gauge"
    );
    for (name, left) in names {
        // Domain names are validated (letters, digits, '-', '.'), so no label escaping.
        let _ = writeln!(
            out,
            "portcullis_certificate_expiry_seconds{{domain=\"{name}\"}} {left}"
        );
    }
}

/// Appends the backends failing their health checks: a count, and a series for each (at most
/// [`UNHEALTHY_SHOWN`]). Healthy backends have none: with a million services a series per
/// backend would be most of the scrape, and which backends are down is what it is read for.
/// Appends alias domains by verification status (a walk at scrape time, like certificates).
pub fn domains(snapshot: &Snapshot, out: &mut String) {
    use portcullis_config::model::VerificationStatus as V;
    const ALL: [V; 4] = [V::Pending, V::Verified, V::Failed, V::Moved];
    let mut counts = [0u64; ALL.len()];
    for domain in snapshot.domains() {
        if let Some(i) = ALL.iter().position(|s| *s == domain.verification) {
            counts[i] += 1;
        }
    }
    out.push_str(
        "# HELP portcullis_domains Alias domains by verification status.\n\
         # TYPE portcullis_domains gauge\n",
    );
    for (status, count) in ALL.iter().zip(counts) {
        let _ = writeln!(out, "portcullis_domains{{status=\"{status}\"}} {count}");
    }
}

pub fn backend_health(health: &portcullis_proxy::Health, out: &mut String) {
    let (count, shown) = health.unhealthy_backends(UNHEALTHY_SHOWN);
    let _ = writeln!(
        out,
        "# HELP portcullis_backends_unhealthy Backends (addresses) failing their active health checks.\n\
         # TYPE portcullis_backends_unhealthy gauge\n\
         portcullis_backends_unhealthy {count}"
    );
    if shown.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP portcullis_backend_healthy 0 for a backend failing its active health checks (at most {UNHEALTHY_SHOWN}); healthy backends have no series.\n\
         # TYPE portcullis_backend_healthy gauge"
    );
    for backend in shown {
        // A backend prints as an IP, a bracketed IPv6 or a validated host name, and a port:
        // nothing to escape.
        let _ = writeln!(out, "portcullis_backend_healthy{{backend=\"{backend}\"}} 0");
    }
}

/// A span written as a number and a unit: `90s`, `30m`, `12h`, `7d`.
pub fn parse_span(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    // Ten years in seconds fits every unit's product in an i64 with room to spare.
    let n: i64 = number.parse().ok().filter(|n| *n <= 315_360_000)?;
    match unit {
        "s" => Some(Duration::seconds(n)),
        "m" => Some(Duration::minutes(n)),
        "h" => Some(Duration::hours(n)),
        "d" => Some(Duration::days(n)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_config::model::{IssuerRef, Service, ServiceOptions, ServiceStatus};
    use portcullis_config::store::KeyValue;
    use portcullis_config::{Backend, DomainName};

    const ZONE: &str = "app.test";

    fn kv(key: String, value: Vec<u8>) -> KeyValue {
        KeyValue {
            key,
            value,
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: None,
        }
    }

    fn service(detail: MetricsDetail) -> Service {
        Service {
            id: ServiceId::new_v4(),
            backends: vec![Backend::parse("10.0.0.1:80").unwrap()],
            status: ServiceStatus::Active,
            options: ServiceOptions {
                metrics: detail,
                ..ServiceOptions::default()
            },
            domains: Vec::new(),
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    /// A certificate of `service`, issued `age` ago for 90 days, in `status`.
    fn cert(service: &Service, status: CertificateStatus, age: Option<Duration>) -> Certificate {
        let name = DomainName::parse(&format!("{}.{ZONE}", service.id)).unwrap();
        let mut cert = Certificate::pending(name, IssuerRef::Dev, "keys/x".into());
        cert.status = status;
        if let Some(age) = age {
            let now = OffsetDateTime::now_utc();
            cert.not_before = Some(now - age);
            cert.not_after = Some(now - age + Duration::days(90));
        }
        cert
    }

    fn snapshot(parts: &[(Service, Option<Certificate>)]) -> Snapshot {
        let mut kvs = Vec::new();
        for (service, cert) in parts {
            kvs.push(kv(
                keys::service(&service.id),
                serde_json::to_vec(service).unwrap(),
            ));
            if let Some(cert) = cert {
                kvs.push(kv(
                    format!("{}{}", keys::CERTIFICATES, cert.domains[0]),
                    serde_json::to_vec(cert).unwrap(),
                ));
            }
        }
        Snapshot::from_kvs(DomainName::parse(ZONE).unwrap(), 1, &kvs)
    }

    #[test]
    fn only_names_in_trouble_or_asked_for_have_series() {
        let basic = || service(MetricsDetail::Basic);
        let healthy = basic();
        let failed = basic();
        let old = basic();
        let waiting = basic();
        let detailed = service(MetricsDetail::Detailed);
        let parts = vec![
            (
                healthy.clone(),
                Some(cert(
                    &healthy,
                    CertificateStatus::Active,
                    Some(Duration::days(1)),
                )),
            ),
            (
                failed.clone(),
                Some(cert(&failed, CertificateStatus::Failed, None)),
            ),
            // 85 of 90 days gone: 5 left, renewals are not happening.
            (
                old.clone(),
                Some(cert(
                    &old,
                    CertificateStatus::Active,
                    Some(Duration::days(85)),
                )),
            ),
            (
                waiting.clone(),
                Some(cert(&waiting, CertificateStatus::Ordering, None)),
            ),
            (
                detailed.clone(),
                Some(cert(
                    &detailed,
                    CertificateStatus::Active,
                    Some(Duration::days(2)),
                )),
            ),
        ];
        let snapshot = snapshot(&parts);
        let ids = DetailedServices::default().of(&snapshot);
        assert_eq!(ids, vec![detailed.id]);
        let mut out = String::new();
        certificates(&snapshot, &ids, OffsetDateTime::now_utc(), &mut out);

        let series = |id: &ServiceId| {
            format!("portcullis_certificate_expiry_seconds{{domain=\"{id}.{ZONE}\"}}")
        };
        assert!(!out.contains(&series(&healthy.id)), "{out}");
        assert!(!out.contains(&series(&waiting.id)), "{out}");
        assert!(
            out.contains(&format!("{} 0\n", series(&failed.id))),
            "{out}"
        );
        assert!(out.contains(&series(&old.id)), "{out}");
        assert!(out.contains(&series(&detailed.id)), "{out}");
        for line in [
            "portcullis_certificates{status=\"active\"} 3",
            "portcullis_certificates{status=\"failed\"} 1",
            "portcullis_certificates{status=\"pending\"} 0",
            "portcullis_certificates_expiring{within=\"0s\"} 0",
            "portcullis_certificates_expiring{within=\"7d\"} 1",
            "portcullis_certificates_expiring{within=\"30d\"} 1",
            "portcullis_certificates_in_trouble 2",
            "portcullis_certificate_soonest_expiry_timestamp_seconds ",
        ] {
            assert!(out.contains(line), "{line} missing:\n{out}");
        }
    }

    #[test]
    fn detailed_services_follow_the_snapshot() {
        let a = service(MetricsDetail::Detailed);
        let detailed = DetailedServices::default();
        assert_eq!(detailed.of(&snapshot(&[(a.clone(), None)])), vec![a.id]);
        // A reload (a Snapshot that cannot say what changed since): a full pass, which drops
        // `a`. The delete only moves the revision on.
        let b = service(MetricsDetail::Basic);
        let mut next = snapshot(&[(b, None)]);
        next.apply(
            2,
            &portcullis_config::store::EventKind::Delete {
                key: keys::service(&a.id),
            },
        );
        assert!(detailed.of(&next).is_empty());
    }

    #[test]
    fn spans_take_a_unit() {
        assert_eq!(parse_span("90s"), Some(Duration::seconds(90)));
        assert_eq!(parse_span("12h"), Some(Duration::hours(12)));
        assert_eq!(parse_span("7d"), Some(Duration::days(7)));
        assert_eq!(parse_span("0s"), Some(Duration::ZERO));
        for bad in [
            "",
            "7",
            "d",
            "7 d",
            "-1d",
            "7w",
            "1.5d",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_span(bad), None, "{bad}");
        }
    }
}
