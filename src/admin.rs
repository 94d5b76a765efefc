//! The admin API: JSON over HTTP on the admin listener. Every error is
//! `{"error": {"code": "...", "message": "...", "field"?: "..."}}` with a stable `code`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State as AxumState};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use portcullis_config::model::{
    Certificate, IssuerRef, Record, RecordType, Service, ServiceOptions, ServiceStatus,
    validate_backends,
};
use portcullis_config::state::ServicePatch;
use portcullis_config::{ServiceId, SnapshotHandle, State, StateError, StoreError};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::admin_metrics;

/// Largest request body: a service with the maximum number of long backends fits many times.
pub const MAX_BODY: usize = 64 * 1024;
const MAX_PAGE: usize = 1000;
/// A write answers once it is live in this node's Snapshot, or after this long.
const LIVE_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Admin {
    pub state: State,
    pub snapshot: SnapshotHandle,
    pub token: Arc<str>,
    /// Port of the HTTPS listener, for the URLs the API shows.
    pub https_port: u16,
    /// Who issues the certificates of new services.
    pub issuer: IssuerRef,
    /// The issuer itself, for revocation.
    pub revoker: Arc<dyn portcullis_acme::Issuer>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub listeners: Arc<crate::serve::Listeners>,
    /// What record checks need to know of the zones served.
    pub dns: Arc<portcullis_dns::ZoneSettings>,
    pub dns_views: portcullis_dns::ViewHandle,
    /// What the edge's health checks found.
    pub health: Arc<portcullis_proxy::Health>,
    /// Services with detailed metrics, kept between scrapes.
    pub detailed: Arc<admin_metrics::DetailedServices>,
    /// What an alias domain must pass to be added.
    pub domain_rules: Arc<portcullis_config::domains::DomainRules>,
    /// How long `domain verify` waits for the check it asked for.
    pub verify_wait: Duration,
    /// Hands the node over to a new process (`portcullis reload`).
    pub reloader: Arc<crate::reload::Reloader>,
}

pub fn router(admin: Admin) -> Router {
    let v1 = Router::new()
        .route("/services", get(list_services).post(create_service))
        .route(
            "/services/{id}",
            get(show_service)
                .patch(patch_service)
                .delete(delete_service),
        )
        .route("/records", get(list_records).post(create_record))
        .route(
            "/records/{name}/{rtype}",
            get(show_record).put(put_record).delete(delete_record),
        )
        .route("/nodes", get(list_nodes))
        .route("/node/reload", post(reload_node))
        .route(
            "/services/{id}/domains",
            get(crate::admin_domains::list).post(crate::admin_domains::add),
        )
        .route(
            "/services/{id}/domains/{name}",
            axum::routing::delete(crate::admin_domains::remove),
        )
        .route("/domains/{name}", get(crate::admin_domains::show))
        .route("/domains/{name}/verify", post(crate::admin_domains::verify))
        .route("/certificates", get(list_certificates))
        .route("/certificates/{name}/renew", post(renew_certificate))
        .route("/certificates/{name}/revoke", post(revoke_certificate))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(admin.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render_metrics))
        .nest("/v1", v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(admin)
}

// --- errors -----------------------------------------------------------------------------------

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Validation(v) => ApiError {
                status: StatusCode::BAD_REQUEST,
                code: "validation_failed",
                message: v.to_string(),
                field: Some(v.field),
            },
            StateError::Deleted { .. } => ApiError::new(
                StatusCode::NOT_FOUND,
                "service_deleted",
                format!("{e}; its id is never reused, create a new service"),
            ),
            StateError::NotFound { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            StateError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            StateError::Invalid {
                code,
                field,
                message,
            } => ApiError {
                status: StatusCode::BAD_REQUEST,
                code,
                message,
                field: Some(field.into()),
            },
            StateError::Claimed { code, message } => {
                ApiError::new(StatusCode::CONFLICT, code, message)
            }
            StateError::Store(StoreError::Unavailable(_)) => {
                tracing::warn!(error = %e, "state store unreachable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    format!(
                        "{e}. Nothing was changed; this node keeps serving its last state. \
                         Retry once the store is back"
                    ),
                )
            }
            StateError::Store(StoreError::Closed) | StateError::Store(StoreError::Backend(_)) => {
                tracing::error!(error = %e, "state store failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    format!("{e}; retry later, and see the node's log"),
                )
            }
            other => {
                tracing::error!(error = %other, "admin request failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("{other}; see the node's log"),
                )
            }
        }
    }
}

impl From<portcullis_config::ValidationError> for ApiError {
    fn from(v: portcullis_config::ValidationError) -> Self {
        StateError::Validation(v).into()
    }
}

/// `Json<T>` whose rejections are API errors (413 for a body over the limit, 415 for a wrong
/// content type, 400 for bad JSON) instead of axum's plain-text ones.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) if crate::admin_listener::is_stalled_body(&rejection) => {
                Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    "the request body stopped arriving; send it whole",
                ))
            }
            Err(rejection) => {
                let (status, code, message) = match &rejection {
                    // Valid JSON of the wrong shape (unknown field, wrong type): the body does
                    // not validate, like any other field error.
                    JsonRejection::JsonDataError(e) => {
                        (StatusCode::BAD_REQUEST, "validation_failed", e.body_text())
                    }
                    JsonRejection::MissingJsonContentType(_) => (
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "unsupported_media_type",
                        "send the body as JSON with `Content-Type: application/json`".into(),
                    ),
                    r if r.status() == StatusCode::PAYLOAD_TOO_LARGE => (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!("the request body is larger than {MAX_BODY} bytes"),
                    ),
                    r => (StatusCode::BAD_REQUEST, "invalid_json", r.body_text()),
                };
                Err(ApiError::new(status, code, message))
            }
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see the API section of the README",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method; see the API section of the README",
    )
}

async fn require_token(
    AxumState(admin): AxumState<Admin>,
    request: Request,
    next: Next,
) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), admin.token.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer token is wrong; use the token from the node's admin token file",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: Bearer <token>` with the token from the node's admin token file",
        )
        .into_response(),
    }
}

/// Compares without an early exit, so response timing does not reveal a token prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// --- views ------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CertificateView {
    pub domains: Vec<String>,
    pub status: String,
    pub issuer: String,
    #[serde(with = "time::serde::rfc3339::option")]
    pub not_before: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub not_after: Option<OffsetDateTime>,
    pub attempts: u32,
    pub last_error: Option<portcullis_config::model::Problem>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
}

impl From<&Certificate> for CertificateView {
    fn from(c: &Certificate) -> Self {
        CertificateView {
            domains: c.domains.iter().map(|d| d.to_string()).collect(),
            status: c.status.to_string(),
            issuer: match &c.issuer {
                portcullis_config::model::IssuerRef::Dev => "dev".into(),
                portcullis_config::model::IssuerRef::Acme { directory_url } => {
                    format!("acme {directory_url}")
                }
            },
            not_before: c.not_before,
            not_after: c.not_after,
            attempts: c.attempts,
            last_error: c.last_error.clone(),
            next_attempt_at: c.next_attempt_at,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ServiceView {
    pub id: String,
    pub canonical_domain: String,
    pub url: String,
    pub backends: Vec<String>,
    pub status: ServiceStatus,
    pub options: ServiceOptions,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// The canonical domain's certificate; `None` until the issuer has taken it up.
    pub certificate: Option<CertificateView>,
    /// Its alias domains (see `GET /v1/services/{id}/domains` for their status).
    #[serde(default)]
    pub domains: Vec<String>,
}

impl Admin {
    fn view(&self, service: &Service) -> ServiceView {
        let domain = service.id.canonical_domain(self.state.zone());
        let certificate = self
            .snapshot
            .load()
            .certificate(&domain)
            .map(|c| CertificateView::from(&**c));
        let url = match self.https_port {
            443 => format!("https://{domain}/"),
            port => format!("https://{domain}:{port}/"),
        };
        ServiceView {
            id: service.id.to_string(),
            canonical_domain: domain,
            url,
            backends: service.backends.iter().map(|b| b.to_string()).collect(),
            status: service.status,
            options: service.options.clone(),
            created_at: service.created_at,
            updated_at: service.updated_at,
            certificate,
            domains: service.domains.iter().map(|d| d.to_string()).collect(),
        }
    }

    /// Waits until this node serves what the write at `revision` changed.
    pub(crate) async fn live(&self, revision: i64) {
        // Live means routed and answered in DNS: the responder's view follows the Snapshot.
        let live = self.snapshot.wait_for(revision, LIVE_WAIT).await
            && self.dns_views.wait_for(revision, LIVE_WAIT).await;
        if !live {
            tracing::warn!(
                revision,
                "change not live within {LIVE_WAIT:?}; answering anyway"
            );
        }
    }
}

// --- handlers ---------------------------------------------------------------------------------

async fn render_metrics(AxumState(admin): AxumState<Admin>) -> Response {
    let mut body = admin
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    // A whole walk of the certificates: the Snapshot held as an Arc, not a short-lived guard.
    let snapshot = admin.snapshot.load_full();
    let detailed = admin.detailed.of(&snapshot);
    admin_metrics::certificates(
        &snapshot,
        &detailed,
        time::OffsetDateTime::now_utc(),
        &mut body,
    );
    admin_metrics::domains(&snapshot, &mut body);
    admin_metrics::backend_health(&admin.health, &mut body);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn ready(AxumState(admin): AxumState<Admin>) -> Response {
    let snapshot = admin.snapshot.load();
    Json(serde_json::json!({
        "status": "ready",
        "revision": snapshot.revision(),
        "services": snapshot.service_count(),
        "listeners": &*admin.listeners,
        "store": store_health(&admin.snapshot),
    }))
    .into_response()
}

/// Whether the store answers. A node whose store is away still serves (ready), from the last
/// state it has, and says so here.
fn store_health(snapshot: &SnapshotHandle) -> serde_json::Value {
    let health = snapshot.health();
    match health.outage() {
        None if !health.serving_cache() => serde_json::json!({ "reachable": true }),
        outage => {
            let (reason, since) = outage.unzip();
            serde_json::json!({
                "reachable": health.reachable(),
                "serving_from_cache": true,
                "since": since.and_then(|s| s.format(&time::format_description::well_known::Rfc3339).ok()),
                "reason": reason,
                "message": "the store cannot be reached: this node serves the last state it has (HTTPS, DNS, ACME challenges); changes answer 503 until the store is back",
            })
        }
    }
}

#[derive(Serialize)]
struct NodeView {
    id: String,
    ipv4: Vec<std::net::Ipv4Addr>,
    ipv6: Vec<std::net::Ipv6Addr>,
    /// Its lease is alive: it is in DNS answers.
    live: bool,
    /// The store revision it last reported having applied.
    applied_revision: Option<i64>,
    /// Revisions of platform state it had not applied at its last report, as this node sees it.
    lag: Option<i64>,
    #[serde(with = "time::serde::rfc3339::option")]
    reported_at: Option<time::OffsetDateTime>,
}

use portcullis_config::model::NodeStatus;

/// Starts this node's binary again with the configuration file as it is now, hands it the
/// listeners and the store, and answers once it serves (this process then finishes its
/// requests and exits).
async fn reload_node(AxumState(admin): AxumState<Admin>) -> Result<Response, ApiError> {
    let previous = std::process::id();
    match admin.reloader.reload().await {
        Ok(pid) => {
            Ok(Json(serde_json::json!({ "pid": pid, "previous_pid": previous })).into_response())
        }
        Err(e) => {
            let status = match e {
                crate::reload::ReloadError::Config { .. } => StatusCode::BAD_REQUEST,
                crate::reload::ReloadError::Busy => StatusCode::CONFLICT,
                crate::reload::ReloadError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            Err(ApiError::new(status, e.code(), e.to_string()))
        }
    }
}

async fn list_nodes(AxumState(admin): AxumState<Admin>) -> Result<Response, ApiError> {
    let snapshot = admin.snapshot.load_full();
    let (reports, _) = admin
        .state
        .store()
        .list_all(portcullis_config::keys::STATUS)
        .await
        .map_err(StateError::from)?;
    let mut statuses = std::collections::HashMap::new();
    for kv in &reports {
        let Some(id) = kv.key.strip_prefix(portcullis_config::keys::STATUS) else {
            continue;
        };
        if let Ok(status) = portcullis_config::state::decode::<NodeStatus>(kv) {
            statuses.insert(id.to_string(), status);
        }
    }
    let nodes: Vec<NodeView> = snapshot
        .nodes()
        .map(|node| {
            // This node's own figure is live, not its last report.
            let own = (node.id == admin.listeners.node_id).then(|| NodeStatus {
                applied_revision: snapshot.revision(),
                reported_at: time::OffsetDateTime::now_utc(),
            });
            let status = own.as_ref().or_else(|| statuses.get(&node.id));
            NodeView {
                id: node.id.clone(),
                ipv4: node.ipv4.clone(),
                ipv6: node.ipv6.clone(),
                live: true,
                applied_revision: status.map(|s| s.applied_revision),
                lag: status.map(|s| (snapshot.data_revision() - s.applied_revision).max(0)),
                reported_at: status.map(|s| s.reported_at),
            }
        })
        .collect();
    Ok(Json(serde_json::json!({
        "revision": snapshot.revision(),
        "nodes": nodes,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateService {
    /// The id to create the service under; absent: a fresh one.
    #[serde(default)]
    id: Option<String>,
    backends: Vec<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    options: ServiceOptions,
}

async fn create_service(
    AxumState(admin): AxumState<Admin>,
    ApiJson(body): ApiJson<CreateService>,
) -> Result<Response, ApiError> {
    let backends = validate_backends("backends", &body.backends)?;
    let status = match body.status.as_deref() {
        Some(s) => s.parse()?,
        None => ServiceStatus::Active,
    };
    body.options.validate()?;
    let issuer = admin.issuer.clone();
    let (service, revision) = match body.id.as_deref() {
        Some(id) => {
            let id: portcullis_config::ServiceId = id.parse()?;
            admin
                .state
                .create_service_with_id(id, backends, status, body.options, issuer)
                .await?
        }
        None => {
            admin
                .state
                .create_service(backends, status, body.options, issuer)
                .await?
        }
    };
    admin.live(revision).await;
    let location = format!("/v1/services/{}", service.id);
    let mut response = (StatusCode::CREATED, Json(admin.view(&service))).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
}

#[derive(Serialize)]
struct ServiceList {
    services: Vec<ServiceView>,
    /// Pass as `after` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

async fn list_services(
    AxumState(admin): AxumState<Admin>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ServiceList>, ApiError> {
    let Query(query) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "validation_failed", e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(portcullis_config::ValidationError::new(
            "limit",
            format!("`{limit}` is not a page size from 1 to {MAX_PAGE}"),
        )
        .into());
    }
    let after = match query.after.as_deref() {
        Some(a) => Some(
            a.parse::<ServiceId>()
                .map_err(|e| portcullis_config::ValidationError::new("after", e.message))?,
        ),
        None => None,
    };
    let (services, next) = admin.state.list_services(after.as_ref(), limit).await?;
    Ok(Json(ServiceList {
        services: services.iter().map(|s| admin.view(s)).collect(),
        next: next.map(|id| id.to_string()),
    }))
}

pub(crate) fn parse_id(id: &str) -> Result<ServiceId, ApiError> {
    id.parse::<ServiceId>().map_err(|e| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{}; list services with GET /v1/services", e.message),
        )
    })
}

async fn show_service(
    AxumState(admin): AxumState<Admin>,
    Path(id): Path<String>,
) -> Result<Json<ServiceView>, ApiError> {
    let id = parse_id(&id)?;
    match admin.state.get_service(&id).await? {
        Some(s) => Ok(Json(admin.view(&s.value))),
        None => Err(admin.state.missing_service(&id).await.into()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchService {
    backends: Option<Vec<String>>,
    status: Option<String>,
    options: Option<ServiceOptions>,
}

async fn patch_service(
    AxumState(admin): AxumState<Admin>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PatchService>,
) -> Result<Json<ServiceView>, ApiError> {
    let id = parse_id(&id)?;
    let patch = ServicePatch {
        backends: body
            .backends
            .as_deref()
            .map(|b| validate_backends("backends", b))
            .transpose()?,
        status: body.status.as_deref().map(str::parse).transpose()?,
        options: body.options,
    };
    if let Some(options) = &patch.options {
        options.validate()?;
    }
    if patch == ServicePatch::default() {
        return Err(portcullis_config::ValidationError::new(
            "body",
            "nothing to change; give `backends`, `status` or `options`",
        )
        .into());
    }
    let (service, revision) = admin.state.update_service(&id, patch).await?;
    admin.live(revision).await;
    Ok(Json(admin.view(&service)))
}

async fn delete_service(
    AxumState(admin): AxumState<Admin>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    let revision = admin.state.delete_service(&id).await?;
    admin.live(revision).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize)]
struct CertificateList {
    certificates: Vec<CertificateView>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateQuery {
    /// Only certificates that expire within this span from now (`90s`, `12h`, `7d`).
    expiring_within: Option<String>,
}

/// The certificates of the Snapshot, by name; with `expiring_within`, those whose validity ends
/// within that span (expired ones too), soonest first. Names with no certificate yet do not
/// expire, so they are left out there: their `status` says where they are.
async fn list_certificates(
    AxumState(admin): AxumState<Admin>,
    query: Result<Query<CertificateQuery>, QueryRejection>,
) -> Result<Json<CertificateList>, ApiError> {
    let Query(query) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "validation_failed", e.body_text()))?;
    let within = match query.expiring_within.as_deref() {
        Some(text) => Some(admin_metrics::parse_span(text).ok_or_else(|| {
            portcullis_config::ValidationError::new(
                "expiring_within",
                format!(
                    "`{text}` is not a span of time; write a whole number and s, m, h or d, e.g. 90s, 12h or 7d"
                ),
            )
        })?),
        None => None,
    };
    let snapshot = admin.snapshot.load_full();
    let mut certificates: Vec<&Certificate> = snapshot.certificates().map(|c| &**c).collect();
    match within {
        Some(within) => {
            let until = OffsetDateTime::now_utc() + within;
            certificates.retain(|c| c.not_after.is_some_and(|t| t <= until));
            certificates.sort_by_key(|c| c.not_after);
        }
        None => certificates.sort_by(|a, b| a.domains.first().cmp(&b.domains.first())),
    }
    Ok(Json(CertificateList {
        certificates: certificates
            .into_iter()
            .map(CertificateView::from)
            .collect(),
    }))
}

async fn renew_certificate(
    AxumState(admin): AxumState<Admin>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<CertificateView>), ApiError> {
    let name = portcullis_config::DomainName::validate("name", &name)?;
    let (cert, revision) = admin.state.request_renewal(name.as_str()).await?;
    admin.live(revision).await;
    Ok((StatusCode::ACCEPTED, Json(CertificateView::from(&cert))))
}

/// Revokes the certificate at the CA, then asks for a new one (a revoked certificate fails in
/// clients that check); the revoked one is served until its replacement is stored.
async fn revoke_certificate(
    AxumState(admin): AxumState<Admin>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<CertificateView>), ApiError> {
    let name = portcullis_config::DomainName::validate("name", &name)?;
    let current = admin
        .snapshot
        .load()
        .certificate(name.as_str())
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no certificate for {name}; list them with GET /v1/certificates"),
            )
        })?;
    let material = if current.not_after.is_some() {
        admin.state.certificate_material(&current).await?
    } else {
        None
    };
    let Some(material) = material else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("{name} has no issued certificate yet, so there is nothing to revoke"),
        ));
    };
    admin
        .revoker
        .revoke(&material.chain_pem())
        .await
        .map_err(|e| match e {
            portcullis_acme::IssueError::Setup(m) => {
                ApiError::new(StatusCode::CONFLICT, "cannot_revoke", m)
            }
            other => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "ca_refused",
                format!("the CA did not revoke {name}: {other}; try again later"),
            ),
        })?;
    tracing::info!(domain = %name, "certificate revoked");
    let (cert, revision) = admin.state.request_renewal(name.as_str()).await?;
    admin.live(revision).await;
    Ok((StatusCode::ACCEPTED, Json(CertificateView::from(&cert))))
}

// --- records ----------------------------------------------------------------------------------

/// Default TTL of a custom record when the request gives none.
const DEFAULT_RECORD_TTL: u32 = 300;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordBody {
    name: String,
    #[serde(rename = "type")]
    rtype: String,
    #[serde(default)]
    ttl: Option<u32>,
    data: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordUpdate {
    #[serde(default)]
    ttl: Option<u32>,
    data: Vec<String>,
}

#[derive(Serialize)]
struct RecordList {
    records: Vec<Record>,
}

/// A record owner as stored: lowercase, no trailing dot, `*.` allowed in front.
fn record_name(input: &str) -> Result<String, ApiError> {
    let lower = input.trim_end_matches('.').to_ascii_lowercase();
    let (wild, rest) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    // Owner names are DNS names, not host names: `_sip._tcp` and `_acme-challenge` are fine.
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if rest.is_empty() || rest.len() > 253 || !rest.split('.').all(label_ok) {
        return Err(portcullis_config::ValidationError::new(
            "name",
            format!(
                "`{input}` is not a record name; use labels of 1 to 63 letters, digits, `-` or `_`, optionally after `*.`"
            ),
        )
        .into());
    }
    Ok(if wild {
        format!("*.{rest}")
    } else {
        rest.to_string()
    })
}

fn record_type(input: &str) -> Result<RecordType, ApiError> {
    Ok(input.parse::<RecordType>()?)
}

impl Admin {
    fn check_record(&self, record: &Record) -> Result<(), ApiError> {
        let snapshot = self.snapshot.load();
        portcullis_dns::check_record(record, &self.dns, &snapshot).map_err(|e| match e {
            portcullis_dns::RecordError::Invalid(v) => v.into(),
            portcullis_dns::RecordError::Conflict(m) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", m)
            }
        })
    }
}

async fn list_records(AxumState(admin): AxumState<Admin>) -> Result<Json<RecordList>, ApiError> {
    let records = admin.state.list_records().await?;
    Ok(Json(RecordList { records }))
}

async fn create_record(
    AxumState(admin): AxumState<Admin>,
    ApiJson(body): ApiJson<RecordBody>,
) -> Result<(StatusCode, Json<Record>), ApiError> {
    let record = Record {
        name: record_name(&body.name)?,
        rtype: record_type(&body.rtype)?,
        ttl: body.ttl.unwrap_or(DEFAULT_RECORD_TTL),
        data: body.data,
    };
    admin.check_record(&record)?;
    let revision = admin.state.put_record(&record, true).await?;
    admin.live(revision).await;
    Ok((StatusCode::CREATED, Json(record)))
}

async fn show_record(
    AxumState(admin): AxumState<Admin>,
    Path((name, rtype)): Path<(String, String)>,
) -> Result<Json<Record>, ApiError> {
    let name = record_name(&name)?;
    let rtype = record_type(&rtype)?;
    match admin.state.get_record(&name, rtype).await? {
        Some(record) => Ok(Json(record)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("there is no {rtype} record at `{name}`; list them with GET /v1/records"),
        )),
    }
}

async fn put_record(
    AxumState(admin): AxumState<Admin>,
    Path((name, rtype)): Path<(String, String)>,
    ApiJson(body): ApiJson<RecordUpdate>,
) -> Result<Json<Record>, ApiError> {
    let record = Record {
        name: record_name(&name)?,
        rtype: record_type(&rtype)?,
        ttl: body.ttl.unwrap_or(DEFAULT_RECORD_TTL),
        data: body.data,
    };
    admin.check_record(&record)?;
    let revision = admin.state.put_record(&record, false).await?;
    admin.live(revision).await;
    Ok(Json(record))
}

async fn delete_record(
    AxumState(admin): AxumState<Admin>,
    Path((name, rtype)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let name = record_name(&name)?;
    let rtype = record_type(&rtype)?;
    let revision = admin.state.delete_record(&name, rtype).await?;
    admin.live(revision).await;
    Ok(StatusCode::NO_CONTENT)
}
