//! Alias domains as state: adding one (with every rule a name must pass), removing one, and
//! recording what a verification found. Each is one store transaction over the domain and its
//! service, so a name is never claimed twice and a service never lists a name it does not own.

use base64::Engine as _;
use time::OffsetDateTime;

use crate::error::StateError;
use crate::keys;
use crate::model::{DnsChallenge, Domain, DomainCheck, Service, ServiceId, VerificationStatus};
use crate::names::{AliasName, DomainName};
use crate::state::{CAS_ATTEMPTS, State, Versioned, after_collision, decode, encode};
use crate::store::{Compare, Op, Revision, Txn};

/// What `add_domain` checks a name against.
#[derive(Clone, Debug)]
pub struct DomainRules {
    /// Zones this node answers for (the platform zone, `dns.zones`): names in them are
    /// canonical names or custom records, never aliases.
    pub served_zones: Vec<DomainName>,
    pub per_service: usize,
}

/// An alias domain with the record of its last check, as the API shows it.
#[derive(Clone, Debug)]
pub struct DomainView {
    pub domain: Versioned<Domain>,
    pub check: Option<DomainCheck>,
}

/// The ownership token for the `_portcullis` TXT record: random, so it says nothing about the
/// service and cannot be guessed from the name.
fn new_token() -> String {
    let mut bytes = [0u8; 18];
    // aws-lc's generator does not fail in practice; a zero token would still be unique per
    // check since it is compared as given, but say so in the log.
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        tracing::error!("the system random generator failed; the domain token is weak");
    }
    format!(
        "portcullis-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

impl State {
    /// Claims `input` for `service`: validated, stored as its A-label, `pending` until the
    /// verifier finds it pointing at the service. Adding a name the service already has
    /// answers that domain again. A name held by a service that is gone, or that `moved`
    /// away from its service, is taken over.
    pub async fn add_domain(
        &self,
        service: &ServiceId,
        input: &str,
        rules: &DomainRules,
    ) -> Result<(Domain, Revision), StateError> {
        let name = parse_name(input)?;
        if let Some(suffix) = name.public_suffix() {
            return Err(StateError::Invalid {
                code: "public_suffix",
                field: "name",
                message: format!(
                    "`{suffix}` is a public suffix (on the Public Suffix List): nobody owns all \
                     the names under it. Add a name you registered under it, e.g. `www.example.{suffix}`"
                ),
            });
        }
        if let Ok(base) = DomainName::parse(name.base())
            && let Some(zone) = rules.served_zones.iter().find(|z| base.is_within(z))
        {
            return Err(StateError::Invalid {
                code: "inside_our_zone",
                field: "name",
                message: format!(
                    "`{name}` is inside `{zone}`, a zone this platform serves: its names are \
                     services' canonical names or custom records (POST /v1/records), not aliases"
                ),
            });
        }
        let domain_key = keys::domain(name.as_str());
        let service_key = keys::service(service);
        for attempt in 0..CAS_ATTEMPTS {
            after_collision(attempt).await;
            let Some(owner) = self.get_service(service).await? else {
                return Err(self.missing_service(service).await);
            };
            let existing = self.store().get(&domain_key).await?;
            let mut compare = vec![Compare::ModRevision(
                service_key.clone(),
                owner.mod_revision,
            )];
            let mut success = Vec::new();
            match existing {
                Some(kv) => {
                    let held: Domain = decode(&kv)?;
                    if held.service == *service {
                        return Ok((held, kv.mod_revision));
                    }
                    let holder = self.get_service(&held.service).await?;
                    if holder.is_some() && held.verification != VerificationStatus::Moved {
                        return Err(StateError::Claimed {
                            code: "domain_taken",
                            message: format!(
                                "`{name}` belongs to another service. A name serves one \
                                 service; its owner must remove it first (or it is freed once \
                                 it no longer points at that service)"
                            ),
                        });
                    }
                    compare.push(Compare::ModRevision(domain_key.clone(), kv.mod_revision));
                    // The old claim's trace, certificate and key go; the claim itself is
                    // overwritten below (a key appears once in a transaction).
                    success.extend(
                        forget_domain_ops(&name)
                            .into_iter()
                            .filter(|op| op.key() != domain_key),
                    );
                    if let Some(holder) = holder {
                        let mut previous = holder.value;
                        previous.domains.retain(|d| d != &name);
                        let key = keys::service(&previous.id);
                        compare.push(Compare::ModRevision(key.clone(), holder.mod_revision));
                        success.push(Op::put(key.clone(), encode(&key, &previous)?));
                        tracing::warn!(domain = %name, from = %previous.id, to = %service, "a moved domain is taken over by another service");
                    }
                }
                None => compare.push(Compare::Absent(domain_key.clone())),
            }
            let mut updated: Service = owner.value;
            if updated.domains.len() >= rules.per_service {
                return Err(StateError::Claimed {
                    code: "too_many_domains",
                    message: format!(
                        "service `{service}` has {} domains, the most one service may have \
                         (limits.domains_per_service); remove one first",
                        updated.domains.len()
                    ),
                });
            }
            updated.domains.push(name.clone());
            let now = OffsetDateTime::now_utc();
            let domain = Domain::new(name.clone(), *service, new_token(), now);
            success.push(Op::put(domain_key.clone(), encode(&domain_key, &domain)?));
            success.push(Op::put(
                service_key.clone(),
                encode(&service_key, &updated)?,
            ));
            let out = self
                .store()
                .txn(Txn {
                    compare,
                    success,
                    failure: vec![],
                })
                .await?;
            if out.succeeded {
                return Ok((domain, out.revision));
            }
        }
        Err(StateError::Conflict(format!(
            "`{name}` or service `{service}` is being changed by others; try again"
        )))
    }

    /// Frees an alias domain of `service` at once: its record, trace, certificate and key.
    pub async fn remove_domain(
        &self,
        service: &ServiceId,
        input: &str,
    ) -> Result<Revision, StateError> {
        let name = parse_name(input)?;
        let domain_key = keys::domain(name.as_str());
        let service_key = keys::service(service);
        for attempt in 0..CAS_ATTEMPTS {
            after_collision(attempt).await;
            let Some(owner) = self.get_service(service).await? else {
                return Err(self.missing_service(service).await);
            };
            let held = match self.store().get(&domain_key).await? {
                Some(kv) => Some((decode::<Domain>(&kv)?, kv.mod_revision)),
                None => None,
            };
            let Some((_, held_revision)) = held.filter(|(d, _)| d.service == *service) else {
                return Err(StateError::NotFound {
                    kind: "domain",
                    id: format!("{name} (of service {service})"),
                });
            };
            let mut updated = owner.value;
            updated.domains.retain(|d| d != &name);
            let mut success = forget_domain_ops(&name);
            success.push(Op::put(
                service_key.clone(),
                encode(&service_key, &updated)?,
            ));
            let out = self
                .store()
                .txn(Txn {
                    compare: vec![
                        Compare::ModRevision(service_key.clone(), owner.mod_revision),
                        Compare::ModRevision(domain_key.clone(), held_revision),
                    ],
                    success,
                    failure: vec![],
                })
                .await?;
            if out.succeeded {
                return Ok(out.revision);
            }
        }
        Err(StateError::Conflict(format!(
            "`{name}` is being changed by others; try again"
        )))
    }

    /// Deletes what is left of the domains of a deleted service, a transaction per few names
    /// (etcd caps operations per transaction). Until this runs they are already dead: a
    /// domain whose service is gone is not served and may be claimed again.
    pub async fn forget_domains(&self, names: &[AliasName]) -> Result<(), StateError> {
        for batch in names.chunks(24) {
            let success = batch.iter().flat_map(forget_domain_ops).collect();
            self.store()
                .txn(Txn {
                    compare: vec![],
                    success,
                    failure: vec![],
                })
                .await?;
        }
        Ok(())
    }

    pub async fn get_domain(&self, name: &str) -> Result<Option<Versioned<Domain>>, StateError> {
        match self.store().get(&keys::domain(name)).await? {
            Some(kv) => Ok(Some(Versioned {
                value: decode(&kv)?,
                mod_revision: kv.mod_revision,
            })),
            None => Ok(None),
        }
    }

    /// A domain and its last trace, by the name as a user writes it (U-labels are looked up
    /// as their A-label).
    pub async fn show_domain(&self, input: &str) -> Result<DomainView, StateError> {
        let name = parse_name(input)?;
        let Some(domain) = self.get_domain(name.as_str()).await? else {
            return Err(StateError::NotFound {
                kind: "domain",
                id: name.to_string(),
            });
        };
        let check = match self.store().get(&keys::domain_check(name.as_str())).await? {
            Some(kv) => decode(&kv).ok(),
            None => None,
        };
        Ok(DomainView { domain, check })
    }

    /// Records a verification's outcome, unless the domain changed since it was read at
    /// `read_at` (removed, re-added, checked by another node): `None` then.
    pub async fn record_domain_check(
        &self,
        domain: &Domain,
        read_at: Revision,
        check: Option<&DomainCheck>,
        fence: Option<&crate::store::LockGuard>,
    ) -> Result<Option<Revision>, StateError> {
        let key = keys::domain(domain.name.as_str());
        let mut success = vec![Op::put(key.clone(), encode(&key, domain)?)];
        if let Some(check) = check {
            let check_key = keys::domain_check(domain.name.as_str());
            success.push(Op::put(check_key.clone(), encode(&check_key, check)?));
        }
        let out = self
            .store()
            .txn(Txn {
                compare: std::iter::once(Compare::ModRevision(key, read_at))
                    .chain(std::iter::once(Compare::Present(keys::service(
                        &domain.service,
                    ))))
                    .chain(fence.map(crate::store::LockGuard::fence))
                    .collect(),
                success,
                failure: vec![],
            })
            .await?;
        Ok(out.succeeded.then_some(out.revision))
    }

    /// Asks for a check of `name` now (`domain verify`), also for a domain past
    /// `verify.pending_for`. Returns the domain as it was asked and the revision.
    pub async fn request_domain_check(
        &self,
        input: &str,
    ) -> Result<(Domain, Revision), StateError> {
        for attempt in 0..CAS_ATTEMPTS {
            after_collision(attempt).await;
            let view = self.show_domain(input).await?;
            let mut domain = view.domain.value;
            domain.next_check_at = Some(OffsetDateTime::now_utc());
            if let Some(revision) = self
                .record_domain_check(&domain, view.domain.mod_revision, None, None)
                .await?
            {
                return Ok((domain, revision));
            }
        }
        Err(StateError::Conflict(format!(
            "`{input}` is being changed by others; try again"
        )))
    }
}

impl State {
    /// Adds `value` to the DNS-01 values of `label`; returns the revision that made it.
    pub async fn publish_dns_challenge(
        &self,
        label: &str,
        value: &str,
    ) -> Result<Revision, StateError> {
        self.change_dns_challenge(label, |c| {
            if !c.values.iter().any(|v| v == value) {
                c.values.push(value.to_string());
            }
        })
        .await
    }

    /// Removes `value`; the label goes when it has none left.
    pub async fn withdraw_dns_challenge(
        &self,
        label: &str,
        value: &str,
    ) -> Result<Revision, StateError> {
        self.change_dns_challenge(label, |c| c.values.retain(|v| v != value))
            .await
    }

    async fn change_dns_challenge(
        &self,
        label: &str,
        change: impl Fn(&mut DnsChallenge),
    ) -> Result<Revision, StateError> {
        let key = keys::dns_challenge(label);
        for attempt in 0..CAS_ATTEMPTS {
            after_collision(attempt).await;
            let current = self.store().get(&key).await?;
            let (mut challenge, read_at) = match &current {
                Some(kv) => (decode::<DnsChallenge>(kv)?, Some(kv.mod_revision)),
                None => (DnsChallenge::default(), None),
            };
            change(&mut challenge);
            let compare = match read_at {
                Some(rev) => Compare::ModRevision(key.clone(), rev),
                None => Compare::Absent(key.clone()),
            };
            let op = if challenge.values.is_empty() {
                Op::delete(key.clone())
            } else {
                Op::put(key.clone(), encode(&key, &challenge)?)
            };
            let out = self
                .store()
                .txn(Txn {
                    compare: vec![compare],
                    success: vec![op],
                    failure: vec![],
                })
                .await?;
            if out.succeeded {
                return Ok(out.revision);
            }
        }
        Err(StateError::Conflict(format!(
            "the DNS-01 values of `{label}` are being changed by others; try again"
        )))
    }
}

/// A name as the API takes it, refused with `invalid_domain`.
fn parse_name(input: &str) -> Result<AliasName, StateError> {
    AliasName::parse(input).map_err(|message| StateError::Invalid {
        code: "invalid_domain",
        field: "name",
        message,
    })
}

/// The keys that go with an alias domain: the claim, its trace, its certificate and key.
fn forget_domain_ops(name: &AliasName) -> Vec<Op> {
    vec![
        Op::delete(keys::domain(name.as_str())),
        Op::delete(keys::domain_check(name.as_str())),
        Op::delete(keys::certificate(name.as_str())),
        Op::delete(keys::private_key(name.as_str())),
    ]
}
