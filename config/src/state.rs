//! Typed operations on platform state: what the admin API and the issuers call. Each write is
//! one store transaction, so a crash never leaves half of an operation behind.

use std::sync::Arc;

use base64::Engine as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::error::StateError;
use crate::keys;
use crate::material::CertificateMaterial;
use crate::model::{
    Backend, Certificate, CertificateStatus, IssuerRef, Node, Record, RecordType, Service,
    ServiceId, ServiceOptions, ServiceStatus, Tombstone,
};
use crate::names::DomainName;
use crate::seal::{Sealer, open_if_sealed};
use crate::store::{Compare, KeyValue, LeaseId, LockGuard, Op, PageRequest, Revision, Store, Txn};

/// How many times a read-modify-write retries when another writer got there first.
pub(crate) const CAS_ATTEMPTS: usize = 32;

/// A pause before retrying a read-modify-write that lost to another writer: random, and
/// growing with the attempt (up to 64 ms), so writers that collided (say, many domains added
/// to one service at once) do not collide again in lockstep until one gives up.
pub(crate) async fn after_collision(attempt: usize) {
    if attempt == 0 {
        return;
    }
    let mut byte = [0u8; 1];
    let random = aws_lc_rs::rand::fill(&mut byte).map_or(128, |()| byte[0]);
    let ceiling_us = 1000u64 << attempt.min(6);
    let pause = ceiling_us * u64::from(random) / 255;
    tokio::time::sleep(std::time::Duration::from_micros(pause)).await;
}

#[derive(Clone)]
pub struct State {
    store: Arc<dyn Store>,
    zone: DomainName,
    /// Seals private keys before they are written (`store.encryption_key_file`).
    sealer: Option<Arc<Sealer>>,
}

/// A change to a service; absent fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServicePatch {
    pub backends: Option<Vec<Backend>>,
    pub status: Option<ServiceStatus>,
    /// Replaces all options.
    pub options: Option<ServiceOptions>,
}

/// A value read from the store with the revision it was written at.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: Revision,
}

pub fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(value).map_err(|e| StateError::Codec {
        key: key.into(),
        reason: e.to_string(),
    })
}

pub fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, StateError> {
    serde_json::from_slice(&kv.value).map_err(|e| StateError::Codec {
        key: kv.key.clone(),
        reason: e.to_string(),
    })
}

impl State {
    pub fn new(store: Arc<dyn Store>, zone: DomainName) -> Self {
        State {
            store,
            zone,
            sealer: None,
        }
    }

    /// Private keys written from now on are sealed with `sealer`; sealed ones are opened with it.
    pub fn with_sealer(mut self, sealer: Arc<Sealer>) -> Self {
        self.sealer = Some(sealer);
        self
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn zone(&self) -> &DomainName {
        &self.zone
    }

    /// Creates a service with a fresh id, and the `pending` certificate of its canonical domain
    /// for the issuer to take up. Returns it and the revision that made it.
    pub async fn create_service(
        &self,
        backends: Vec<Backend>,
        status: ServiceStatus,
        options: ServiceOptions,
        issuer: IssuerRef,
    ) -> Result<(Service, Revision), StateError> {
        // A v4 collision is astronomically unlikely; the compare makes it impossible, even with
        // the id of a deleted service.
        for attempt in 0..CAS_ATTEMPTS {
            after_collision(attempt).await;
            let service = self.new_service(ServiceId::new_v4(), &backends, status, &options);
            if let Some(created) = self.insert_service(service, &issuer).await? {
                return Ok(created);
            }
        }
        Err(StateError::Conflict(
            "could not find an unused service id; try again".into(),
        ))
    }

    /// Creates a service with the id the caller chose (a platform keeping its own ids, or the
    /// same service on nodes that share no store). Refused when the id is taken, or was.
    pub async fn create_service_with_id(
        &self,
        id: ServiceId,
        backends: Vec<Backend>,
        status: ServiceStatus,
        options: ServiceOptions,
        issuer: IssuerRef,
    ) -> Result<(Service, Revision), StateError> {
        let service = self.new_service(id, &backends, status, &options);
        if let Some(created) = self.insert_service(service, &issuer).await? {
            return Ok(created);
        }
        if self.store.get(&keys::tombstone(&id)).await?.is_some() {
            return Err(StateError::Deleted {
                kind: "service",
                id: id.to_string(),
            });
        }
        Err(StateError::Conflict(format!(
            "service `{id}` exists already; change it with PATCH /v1/services/{id}"
        )))
    }

    fn new_service(
        &self,
        id: ServiceId,
        backends: &[Backend],
        status: ServiceStatus,
        options: &ServiceOptions,
    ) -> Service {
        let now = OffsetDateTime::now_utc();
        Service {
            id,
            backends: backends.to_vec(),
            status,
            options: options.clone(),
            domains: Vec::new(),
            created_at: now,
            updated_at: now,
        }
    }

    /// Writes a new service and its pending certificate unless its id is taken or was;
    /// `None` then.
    async fn insert_service(
        &self,
        service: Service,
        issuer: &IssuerRef,
    ) -> Result<Option<(Service, Revision)>, StateError> {
        let key = keys::service(&service.id);
        let domain = service.id.canonical_domain(&self.zone);
        let cert_key = keys::certificate(&domain);
        let cert = Certificate::pending(
            DomainName::validate("domain", &domain)?,
            issuer.clone(),
            keys::private_key(&domain),
        );
        let out = self
            .store
            .txn(Txn {
                compare: vec![
                    Compare::Absent(key.clone()),
                    Compare::Absent(keys::tombstone(&service.id)),
                ],
                success: vec![
                    Op::put(key.clone(), encode(&key, &service)?),
                    Op::put(cert_key.clone(), encode(&cert_key, &cert)?),
                ],
                failure: vec![],
            })
            .await?;
        Ok(out.succeeded.then_some((service, out.revision)))
    }

    pub async fn get_service(
        &self,
        id: &ServiceId,
    ) -> Result<Option<Versioned<Service>>, StateError> {
        match self.store.get(&keys::service(id)).await? {
            Some(kv) => Ok(Some(Versioned {
                value: decode(&kv)?,
                mod_revision: kv.mod_revision,
            })),
            None => Ok(None),
        }
    }

    /// One page of services in id order, and the id to continue after when there are more.
    pub async fn list_services(
        &self,
        after: Option<&ServiceId>,
        limit: usize,
    ) -> Result<(Vec<Service>, Option<ServiceId>), StateError> {
        let page = self
            .store
            .list(
                keys::SERVICES,
                PageRequest {
                    after: after.map(keys::service),
                    limit,
                },
            )
            .await?;
        let services: Vec<Service> = page.items.iter().map(decode).collect::<Result<_, _>>()?;
        let next = if page.more {
            services.last().map(|s| s.id)
        } else {
            None
        };
        Ok((services, next))
    }

    pub async fn is_tombstoned(&self, id: &ServiceId) -> Result<bool, StateError> {
        Ok(self.store.get(&keys::tombstone(id)).await?.is_some())
    }

    pub async fn update_service(
        &self,
        id: &ServiceId,
        patch: ServicePatch,
    ) -> Result<(Service, Revision), StateError> {
        for attempt in 0..CAS_ATTEMPTS {
            after_collision(attempt).await;
            let Some(current) = self.get_service(id).await? else {
                return Err(self.missing_service(id).await);
            };
            let mut service = current.value;
            if let Some(backends) = &patch.backends {
                service.backends = backends.clone();
            }
            if let Some(status) = patch.status {
                service.status = status;
            }
            if let Some(options) = &patch.options {
                service.options = options.clone();
            }
            service.updated_at = OffsetDateTime::now_utc();
            let key = keys::service(id);
            if let Some(rev) = self
                .store
                .compare_and_swap(&key, Some(current.mod_revision), encode(&key, &service)?)
                .await?
            {
                return Ok((service, rev));
            }
        }
        Err(StateError::Conflict(format!(
            "service `{id}` is being changed by others; try again"
        )))
    }

    /// Deletes a service, its certificate and key, and leaves a tombstone so the id and its
    /// canonical name are not given out again while the tombstone is kept
    /// (`store.tombstone_retention`).
    pub async fn delete_service(&self, id: &ServiceId) -> Result<Revision, StateError> {
        let key = keys::service(id);
        let tombstone_key = keys::tombstone(id);
        let tombstone = Tombstone {
            id: *id,
            deleted_at: OffsetDateTime::now_utc(),
        };
        let domain = id.canonical_domain(&self.zone);
        for attempt in 0..CAS_ATTEMPTS {
            after_collision(attempt).await;
            let Some(current) = self.get_service(id).await? else {
                return Err(self.missing_service(id).await);
            };
            let out = self
                .store
                .txn(Txn {
                    compare: vec![Compare::ModRevision(key.clone(), current.mod_revision)],
                    success: vec![
                        Op::delete(key.clone()),
                        Op::put(tombstone_key.clone(), encode(&tombstone_key, &tombstone)?),
                        Op::delete(keys::certificate(&domain)),
                        Op::delete(keys::private_key(&domain)),
                    ],
                    failure: vec![],
                })
                .await?;
            if out.succeeded {
                // Its aliases died with it (a domain without its service is not served and
                // can be claimed again); their records go now, or stay harmless if this fails.
                if let Err(e) = self.forget_domains(&current.value.domains).await {
                    tracing::warn!(service = %id, error = %e, "cannot remove the domains of a deleted service");
                }
                return Ok(out.revision);
            }
        }
        Err(StateError::Conflict(format!(
            "service `{id}` is being changed by others; try again"
        )))
    }

    /// Removes the tombstones of services deleted before `deleted_before`, so their ids may be
    /// used again; returns how many. Runs now and then in the background: it reads every
    /// tombstone, page by page, and deletes in batches, so it never holds them all.
    pub async fn prune_tombstones(
        &self,
        deleted_before: OffsetDateTime,
    ) -> Result<usize, StateError> {
        const PAGE: usize = 1000;
        let mut page = PageRequest::first(PAGE);
        let mut pruned = 0;
        loop {
            let got = self.store.list(keys::TOMBSTONES, page.clone()).await?;
            let expired: Vec<Op> = got
                .items
                .iter()
                .filter(|kv| {
                    // One that does not decode is kept: better an id held than one freed by
                    // mistake.
                    decode::<Tombstone>(kv).is_ok_and(|t| t.deleted_at < deleted_before)
                })
                .map(|kv| Op::delete(kv.key.clone()))
                .collect();
            if !expired.is_empty() {
                pruned += expired.len();
                self.store
                    .txn(Txn {
                        compare: vec![],
                        success: expired,
                        failure: vec![],
                    })
                    .await?;
            }
            if !got.more {
                return Ok(pruned);
            }
            page.after = got.items.last().map(|kv| kv.key.clone());
        }
    }

    /// The error for a service that is not there: deleted (tombstoned) or never existed.
    pub async fn missing_service(&self, id: &ServiceId) -> StateError {
        let (kind, id_text) = ("service", id.to_string());
        match self.is_tombstoned(id).await {
            Ok(true) => StateError::Deleted { kind, id: id_text },
            Ok(false) => StateError::NotFound { kind, id: id_text },
            Err(e) => e,
        }
    }

    pub async fn list_certificates(&self) -> Result<Vec<Certificate>, StateError> {
        let (items, _) = self.store.list_all(keys::CERTIFICATES).await?;
        items.iter().map(decode).collect()
    }

    /// Stores a certificate and its key together, but only while the service it is for still
    /// exists (`owner`), and for an alias domain while the domain does, so an issuance that
    /// finishes after a delete leaves nothing behind.
    pub async fn put_certificate(
        &self,
        owner: &ServiceId,
        certificate: &Certificate,
        material: Option<&CertificateMaterial>,
    ) -> Result<Option<Revision>, StateError> {
        self.put_certificate_fenced(owner, certificate, material, None)
            .await
    }

    /// As [`State::put_certificate`], and only while `fence` (the order lock of the name)
    /// still holds: a node whose lock passed on to another cannot overwrite its work.
    pub async fn put_certificate_fenced(
        &self,
        owner: &ServiceId,
        certificate: &Certificate,
        material: Option<&CertificateMaterial>,
        fence: Option<&LockGuard>,
    ) -> Result<Option<Revision>, StateError> {
        let primary = certificate
            .domains
            .first()
            .ok_or_else(|| StateError::Conflict("a certificate needs at least one name".into()))?;
        let key = keys::certificate(primary.as_str());
        let mut success = vec![Op::put(key.clone(), encode(&key, certificate)?)];
        if let Some(material) = material {
            let value = match &self.sealer {
                Some(sealer) => sealer.seal(&certificate.key_ref, &material.encode())?,
                None => material.encode(),
            };
            success.push(Op::put(certificate.key_ref.clone(), value));
        }
        let out = self
            .store
            .txn(Txn {
                compare: std::iter::once(Compare::Present(keys::service(owner)))
                    // An alias's certificate only while the alias is still claimed.
                    .chain(
                        (primary.as_str() != owner.canonical_domain(&self.zone))
                            .then(|| Compare::Present(keys::domain(primary.as_str()))),
                    )
                    .chain(fence.map(LockGuard::fence))
                    .collect(),
                success,
                failure: vec![],
            })
            .await?;
        Ok(out.succeeded.then_some(out.revision))
    }

    /// The chain and private key of `certificate`, read from the store: one read, or two for
    /// a record written before chains moved next to the key. `None` when nothing is stored.
    pub async fn certificate_material(
        &self,
        certificate: &Certificate,
    ) -> Result<Option<CertificateMaterial>, StateError> {
        let Some(mut kv) = self.store.get(&certificate.key_ref).await? else {
            return Ok(None);
        };
        kv.value = open_if_sealed(
            self.sealer.as_deref(),
            &kv.key,
            std::mem::take(&mut kv.value),
        )?;
        let legacy_chain = if CertificateMaterial::is_legacy(&kv.value) {
            let primary = certificate
                .domains
                .first()
                .map(|d| d.as_str())
                .unwrap_or_default();
            match self.store.get(&keys::certificate(primary)).await? {
                Some(record) => Some(decode::<Certificate>(&record)?.chain_pem),
                None => None,
            }
        } else {
            None
        };
        CertificateMaterial::decode(&kv.value, legacy_chain.as_deref())
            .map(Some)
            .map_err(|e| StateError::Codec {
                key: kv.key,
                reason: e.to_string(),
            })
    }

    /// A certificate record as the store has it now (not as this node's Snapshot last saw it).
    pub async fn get_certificate_versioned(
        &self,
        name: &str,
    ) -> Result<Option<Versioned<Certificate>>, StateError> {
        match self.store.get(&keys::certificate(name)).await? {
            Some(kv) => Ok(Some(Versioned {
                value: decode(&kv)?,
                mod_revision: kv.mod_revision,
            })),
            None => Ok(None),
        }
    }

    /// Asks the issuer to renew a certificate now. The current one keeps being served until
    /// the new one is stored.
    pub async fn request_renewal(&self, name: &str) -> Result<(Certificate, Revision), StateError> {
        let key = keys::certificate(name);
        for attempt in 0..CAS_ATTEMPTS {
            after_collision(attempt).await;
            let Some(kv) = self.store.get(&key).await? else {
                return Err(StateError::NotFound {
                    kind: "certificate",
                    id: name.to_string(),
                });
            };
            let mut cert: Certificate = decode(&kv)?;
            cert.status = CertificateStatus::Pending;
            cert.attempts = 0;
            cert.next_attempt_at = None;
            if let Some(rev) = self
                .store
                .compare_and_swap(&key, Some(kv.mod_revision), encode(&key, &cert)?)
                .await?
            {
                return Ok((cert, rev));
            }
        }
        Err(StateError::Conflict(format!(
            "certificate `{name}` is being changed by others; try again"
        )))
    }

    /// Writes `key` only if it does not exist; the revision, or `None` when it existed.
    async fn put_if_absent(&self, key: String, value: Vec<u8>) -> Result<Option<i64>, StateError> {
        let out = self
            .store
            .txn(Txn {
                compare: vec![Compare::Absent(key.clone())],
                success: vec![Op::put(key, value)],
                failure: vec![],
            })
            .await?;
        Ok(out.succeeded.then_some(out.revision))
    }

    /// Stores a custom record set. `create_only`: fail with a conflict when one exists already
    /// (POST); otherwise replace it (PUT).
    pub async fn put_record(
        &self,
        record: &Record,
        create_only: bool,
    ) -> Result<Revision, StateError> {
        let key = keys::record(&record.name, record.rtype);
        let value = encode(&key, record)?;
        if !create_only {
            return Ok(self.store.put(&key, value).await?);
        }
        match self.put_if_absent(key, value).await? {
            Some(revision) => Ok(revision),
            None => Err(StateError::Conflict(format!(
                "{} {} exists already; replace it with PUT /v1/records/{}/{}",
                record.name, record.rtype, record.name, record.rtype
            ))),
        }
    }

    /// The ACME account, if one was created.
    pub async fn get_account(&self) -> Result<Option<crate::model::AcmeAccount>, StateError> {
        let Some(kv) = self.store.get(keys::ACME_ACCOUNT).await? else {
            return Ok(None);
        };
        let mut account: crate::model::AcmeAccount = decode(&kv)?;
        if let Some(sealed) = account.sealed_credentials.take() {
            let sealed = base64::engine::general_purpose::STANDARD
                .decode(sealed)
                .map_err(|e| StateError::Codec {
                    key: kv.key.clone(),
                    reason: format!("sealed credentials: {e}"),
                })?;
            let plain = open_if_sealed(self.sealer.as_deref(), keys::ACME_ACCOUNT, sealed)?;
            account.credentials_json = String::from_utf8(plain).map_err(|e| StateError::Codec {
                key: kv.key.clone(),
                reason: format!("sealed credentials: {e}"),
            })?;
        }
        Ok(Some(account))
    }

    /// Seals the stored ACME account anew with the first key of the key file when it was
    /// sealed with another (a rotation) or not at all; true when it did. Certificates' keys
    /// need no such pass: each renewal seals its new key with the first key.
    pub async fn reseal_account(&self) -> Result<bool, StateError> {
        let Some(sealer) = &self.sealer else {
            return Ok(false);
        };
        let Some(kv) = self.store.get(keys::ACME_ACCOUNT).await? else {
            return Ok(false);
        };
        let stored: crate::model::AcmeAccount = decode(&kv)?;
        let current = stored.sealed_credentials.as_deref().and_then(|b64| {
            let sealed = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
            crate::seal::sealed_with(&sealed).map(str::to_string)
        });
        if current.as_deref() == Some(sealer.current_id()) {
            return Ok(false);
        }
        let Some(account) = self.get_account().await? else {
            return Ok(false);
        };
        let value = self.account_value(&account)?;
        Ok(self
            .store
            .compare_and_swap(keys::ACME_ACCOUNT, Some(kv.mod_revision), value)
            .await?
            .is_some())
    }

    /// The account as stored: its credentials (the account's private key) sealed when a fleet
    /// key is configured.
    fn account_value(&self, account: &crate::model::AcmeAccount) -> Result<Vec<u8>, StateError> {
        let key = keys::ACME_ACCOUNT;
        match &self.sealer {
            Some(sealer) => {
                let mut stored = account.clone();
                let sealed = sealer.seal(key, stored.credentials_json.as_bytes())?;
                stored.credentials_json = String::new();
                stored.sealed_credentials =
                    Some(base64::engine::general_purpose::STANDARD.encode(sealed));
                encode(key, &stored)
            }
            None => encode(key, account),
        }
    }

    /// Stores the ACME account unless one exists (another node of a fleet may have won the
    /// race); returns the one stored.
    pub async fn put_account_once(
        &self,
        account: &crate::model::AcmeAccount,
    ) -> Result<crate::model::AcmeAccount, StateError> {
        let key = keys::ACME_ACCOUNT.to_string();
        let value = self.account_value(account)?;
        if self.put_if_absent(key, value).await?.is_some() {
            return Ok(account.clone());
        }
        self.get_account().await?.ok_or_else(|| {
            StateError::Conflict("the ACME account vanished while it was being stored".into())
        })
    }

    /// Stores the ACME account, replacing any: for an account whose key the operator gives
    /// (`issuer.account_key_file`), which every node registers to the same account.
    pub async fn put_account(&self, account: &crate::model::AcmeAccount) -> Result<(), StateError> {
        let key = keys::ACME_ACCOUNT.to_string();
        let value = self.account_value(account)?;
        self.store.put(&key, value).await?;
        Ok(())
    }

    pub async fn get_record(
        &self,
        name: &str,
        rtype: RecordType,
    ) -> Result<Option<Record>, StateError> {
        let key = keys::record(name, rtype);
        self.store
            .get(&key)
            .await?
            .map(|kv| decode(&kv))
            .transpose()
    }

    pub async fn list_records(&self) -> Result<Vec<Record>, StateError> {
        let (items, _) = self.store.list_all(keys::RECORDS).await?;
        items.iter().map(decode).collect()
    }

    pub async fn delete_record(
        &self,
        name: &str,
        rtype: RecordType,
    ) -> Result<Revision, StateError> {
        let key = keys::record(name, rtype);
        let out = self
            .store
            .txn(Txn {
                compare: vec![Compare::Present(key.clone())],
                success: vec![Op::delete(key)],
                failure: vec![],
            })
            .await?;
        if out.succeeded {
            Ok(out.revision)
        } else {
            Err(StateError::NotFound {
                kind: "record",
                id: format!("{name} {rtype}"),
            })
        }
    }

    /// Announces this node; the entry lives as long as `lease` is kept alive.
    pub async fn put_node(&self, node: &Node, lease: LeaseId) -> Result<Revision, StateError> {
        let key = keys::node(&node.id);
        Ok(self
            .store
            .put_with_lease(&key, encode(&key, node)?, lease)
            .await?)
    }
}
