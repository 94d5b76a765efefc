//! Alias domains in the admin API: add, list, show (with the last trace), check now, remove.
//! Every answer says which DNS records make the name verifiable, so an owner never has to
//! guess what "pending" wants.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State as AxumState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use portcullis_config::StateError;
use portcullis_config::model::{Domain, DomainCheck, Proof, VerificationStatus};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::admin::{Admin, ApiError, ApiJson, CertificateView, parse_id};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DnsRecordView {
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: String,
    pub value: String,
}

/// The records that prove a name, one set per kind of proof: any one set is enough.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Instructions {
    /// A CNAME (not at a zone apex).
    pub cname: Vec<DnsRecordView>,
    /// An alias-mode HTTPS record: works at a zone apex too.
    pub https_alias: Vec<DnsRecordView>,
    /// At an apex that keeps A/AAAA records: the nodes' addresses and the token.
    pub addresses_and_token: Vec<DnsRecordView>,
    /// For a certificate before the name points here (and for a wildcard): DNS-01 through
    /// the platform.
    pub acme_challenge: Vec<DnsRecordView>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DomainView {
    pub name: String,
    pub service: String,
    pub status: VerificationStatus,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub verified_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub proof: Option<Proof>,
    /// Why the last check failed, and what to do.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub checked_at: Option<OffsetDateTime>,
    /// `None`: checked again only by hand (`POST /v1/domains/{name}/verify`).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub next_check_at: Option<OffsetDateTime>,
    /// Verified, but pointing elsewhere since then: `moved` after `verify.grace`.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub failing_since: Option<OffsetDateTime>,
    /// `_acme-challenge` is delegated to the platform: a certificate can be had by DNS-01.
    pub delegated: bool,
    pub token: String,
    /// The name's own certificate; `None` until the issuer has taken it up.
    pub certificate: Option<CertificateView>,
    pub instructions: Instructions,
    /// The last check, step by step (in `GET /v1/domains/{name}` and after `verify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<DomainCheck>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DomainList {
    pub domains: Vec<DomainView>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddDomain {
    name: String,
}

fn record(name: impl Into<String>, rtype: &str, value: impl Into<String>) -> DnsRecordView {
    DnsRecordView {
        name: name.into(),
        rtype: rtype.into(),
        value: value.into(),
    }
}

impl Admin {
    fn domain_view(&self, domain: &Domain, trace: Option<DomainCheck>) -> DomainView {
        let snapshot = self.snapshot.load();
        let canonical = domain.service.canonical_domain(snapshot.zone());
        let name = domain.name.as_str();
        let mut addresses: Vec<DnsRecordView> = Vec::new();
        for node in snapshot.nodes() {
            addresses.extend(node.ipv4.iter().map(|ip| record(name, "A", ip.to_string())));
            addresses.extend(
                node.ipv6
                    .iter()
                    .map(|ip| record(name, "AAAA", ip.to_string())),
            );
        }
        addresses.sort_by(|a, b| (&a.rtype, &a.value).cmp(&(&b.rtype, &b.value)));
        addresses.dedup();
        let token_owner = format!("_portcullis.{}", domain.name.base());
        addresses.push(record(token_owner, "TXT", format!("\"{}\"", domain.token)));
        let acme = format!("{}.acme.{}.", domain.name.acme_label(), snapshot.zone());
        let instructions = Instructions {
            cname: vec![record(name, "CNAME", format!("{canonical}."))],
            https_alias: if domain.name.is_wildcard() {
                Vec::new()
            } else {
                vec![record(name, "HTTPS", format!("0 {canonical}."))]
            },
            addresses_and_token: if domain.name.is_wildcard() {
                Vec::new()
            } else {
                addresses
            },
            acme_challenge: vec![record(
                format!("_acme-challenge.{}", domain.name.base()),
                "CNAME",
                acme,
            )],
        };
        DomainView {
            name: name.to_string(),
            service: domain.service.to_string(),
            status: domain.verification,
            verified_at: domain.verified_at,
            proof: domain.proof,
            reason: domain.reason.clone(),
            checked_at: domain.checked_at,
            next_check_at: domain.next_check_at,
            failing_since: domain.failing_since,
            delegated: domain.delegated,
            token: domain.token.clone(),
            certificate: snapshot
                .certificate(name)
                .map(|c| CertificateView::from(&**c)),
            instructions,
            trace,
            created_at: domain.created_at,
        }
    }
}

/// `POST /v1/services/{id}/domains`: claims the name; `202` because verification, and then the
/// certificate, follow in the background.
pub async fn add(
    AxumState(admin): AxumState<Admin>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<AddDomain>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let (domain, revision) = admin
        .state
        .add_domain(&id, &body.name, &admin.domain_rules)
        .await?;
    admin.live(revision).await;
    Ok((StatusCode::ACCEPTED, Json(admin.domain_view(&domain, None))).into_response())
}

pub async fn list(
    AxumState(admin): AxumState<Admin>,
    Path(id): Path<String>,
) -> Result<Json<DomainList>, ApiError> {
    let id = parse_id(&id)?;
    let Some(service) = admin.state.get_service(&id).await? else {
        return Err(admin.state.missing_service(&id).await.into());
    };
    let mut domains = Vec::with_capacity(service.value.domains.len());
    for name in &service.value.domains {
        if let Some(domain) = admin.state.get_domain(name.as_str()).await? {
            domains.push(admin.domain_view(&domain.value, None));
        }
    }
    Ok(Json(DomainList { domains }))
}

pub async fn show(
    AxumState(admin): AxumState<Admin>,
    Path(name): Path<String>,
) -> Result<Json<DomainView>, ApiError> {
    let view = admin.state.show_domain(&name).await?;
    Ok(Json(admin.domain_view(&view.domain.value, view.check)))
}

/// `POST /v1/domains/{name}/verify`: checks now (on whichever node takes the name's turn) and
/// answers with the outcome; `202` with the domain as it stands when the check takes longer
/// than `verify.timeout` allows.
pub async fn verify(
    AxumState(admin): AxumState<Admin>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let asked = OffsetDateTime::now_utc();
    let (domain, revision) = admin.state.request_domain_check(&name).await?;
    admin.live(revision).await;
    let deadline = tokio::time::Instant::now() + admin.verify_wait;
    let mut changes = admin.snapshot.subscribe();
    loop {
        let checked = admin
            .snapshot
            .load()
            .domain(domain.name.as_str())
            .map(|d| d.checked_at.is_some_and(|at| at >= asked));
        match checked {
            None => {
                return Err(StateError::NotFound {
                    kind: "domain",
                    id: domain.name.to_string(),
                }
                .into());
            }
            Some(true) => {
                let view = admin.state.show_domain(&name).await?;
                return Ok(Json(admin.domain_view(&view.domain.value, view.check)).into_response());
            }
            Some(false) => {}
        }
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            let view = admin.state.show_domain(&name).await?;
            return Ok((
                StatusCode::ACCEPTED,
                Json(admin.domain_view(&view.domain.value, view.check)),
            )
                .into_response());
        }
    }
}

pub async fn remove(
    AxumState(admin): AxumState<Admin>,
    Path((id, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    let revision = admin.state.remove_domain(&id, &name).await?;
    admin.live(revision).await;
    Ok(StatusCode::NO_CONTENT)
}

/// How long `verify` waits: a check asks a handful of questions, each within the timeout.
pub fn verify_wait(timeout: Duration) -> Duration {
    timeout.saturating_mul(6).max(Duration::from_secs(5))
}
