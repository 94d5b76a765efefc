//! The ACME issuer (RFC 8555) on instant-acme: one account per platform, kept in the store so
//! every node answers http-01 challenges from its thumbprint, and orders run with short polling.

use std::cell::Cell;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, CertificateIdentifier,
    ChallengeType, ExternalAccountKey, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use portcullis_config::file::IssuerSection;
use portcullis_config::model::{AcmeAccount, CertificateStatus, IssuerRef, RenewalWindow};
use portcullis_config::{DomainName, State};
use time::OffsetDateTime;
use tokio::sync::RwLock;

use crate::issuer::{Challenge, IssueError, Issued, Issuer, Progress};

/// Polling of orders: a short start, as Pebble and Let's Encrypt validate in tens of
/// milliseconds to seconds; capped by the backoff and bounded overall.
fn retry_policy() -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(Duration::from_millis(20))
        .backoff(1.5)
        .timeout(Duration::from_secs(90))
}

pub struct AcmeIssuer {
    section: IssuerSection,
    state: State,
    /// Made on first use, so a node starts (and serves what it has) while the CA is down.
    account: tokio::sync::OnceCell<Account>,
    /// `issuer.account_key_file`, read at start: the account is this key's.
    account_key: Option<rustls_pki_types::PrivatePkcs8KeyDer<'static>>,
    /// To the CA, shared by every account (clones share one connection pool).
    http: CaClient,
    directory_url: String,
    /// `issuer.fallback_directories`, each with an account on the same key (so the one
    /// thumbprint answers every CA's challenges), made on first use.
    fallbacks: Vec<(String, tokio::sync::OnceCell<Account>)>,
    /// Consecutive failures per name, in memory: after `fallback_after` of them the next
    /// directory is tried, and so on round the list.
    failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    fallback_after: u32,
    /// One per directory, the primary first.
    backoffs: Vec<AccountBackoff>,
    /// New orders exclude authorization fetches: Pebble deadlocks when the two overlap (see
    /// the research note), and serializing them costs little.
    order_lock: RwLock<()>,
}

impl std::fmt::Debug for AcmeIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeIssuer")
            .field("directory_url", &self.directory_url)
            .finish_non_exhaustive()
    }
}

fn setup(detail: impl std::fmt::Display) -> IssueError {
    IssueError::Setup(detail.to_string())
}

fn api(e: instant_acme::Error) -> IssueError {
    match e {
        instant_acme::Error::Api(problem) => IssueError::Rejected {
            kind: problem
                .r#type
                .clone()
                .unwrap_or_else(|| "urn:ietf:params:acme:error:serverInternal".into()),
            detail: problem.detail.clone().unwrap_or_default(),
            retry_after: RETRY_AFTER.try_with(Cell::take).ok().flatten(),
        },
        other => IssueError::Ca(other.to_string()),
    }
}

tokio::task_local! {
    /// The `Retry-After` of the last error response the CA sent to this order, which
    /// instant-acme's problem documents do not carry: [`CaHttp`] notes it here.
    static RETRY_AFTER: Cell<Option<Duration>>;
}

/// The CA client as instant-acme sees it: [`CaClient`], noting the `Retry-After` of error
/// responses (rate limits, an overloaded CA) for the order that got them.
struct CaHttp<C = CaClient>(C);

impl<C: instant_acme::HttpClient> instant_acme::HttpClient for CaHttp<C> {
    fn request(
        &self,
        req: http::Request<BodyWrapper<bytes::Bytes>>,
    ) -> std::pin::Pin<
        Box<dyn Future<Output = Result<instant_acme::BytesResponse, instant_acme::Error>> + Send>,
    > {
        let response = instant_acme::HttpClient::request(&self.0, req);
        Box::pin(async move {
            let response = response.await?;
            let status = response.parts.status;
            if (status.is_client_error() || status.is_server_error())
                && let Some(after) = response
                    .parts
                    .headers
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry_after(v, std::time::SystemTime::now()))
            {
                // Outside an order (account set-up) there is no one to tell.
                let _ = RETRY_AFTER.try_with(|slot| slot.set(Some(after)));
            }
            Ok(response)
        })
    }
}

/// A `Retry-After` value (RFC 9110 §10.2.3): seconds, or an HTTP-date (a date past is zero).
fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Backoff of one account (one per directory) after failures that are the CA's or the
/// account's rather than one name's: the CA unreachable or failing, the account unusable.
/// While it lasts no order goes to that CA, so a CA outage costs one failed order per step,
/// not one per name.
#[derive(Debug, Default)]
struct AccountBackoff {
    state: std::sync::Mutex<BackoffState>,
}

#[derive(Debug, Default)]
struct BackoffState {
    until: Option<OffsetDateTime>,
    /// Steps taken since the last success; the wait doubles with each.
    steps: u32,
    reason: String,
}

const ACCOUNT_BACKOFF_FIRST: Duration = Duration::from_secs(5);
const ACCOUNT_BACKOFF_MAX: Duration = Duration::from_secs(3600);

impl AccountBackoff {
    /// `Err(Paused)` while backing off.
    fn check(&self, now: OffsetDateTime) -> Result<(), IssueError> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.until {
            Some(until) if until > now => Err(IssueError::Paused {
                until,
                reason: state.reason.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Notes how an order ended. Orders already in flight when the backoff began end inside
    /// it and do not lengthen it.
    fn record(&self, outcome: &Result<Issued, IssueError>, now: OffsetDateTime) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Err(e) if is_account_failure(e) => {
                if state.until.is_some_and(|until| until > now) {
                    return;
                }
                let step = ACCOUNT_BACKOFF_FIRST
                    .saturating_mul(1u32 << state.steps.min(16))
                    .min(ACCOUNT_BACKOFF_MAX);
                let mut byte = [0u8; 1];
                let random = getrandom::fill(&mut byte).map(|()| byte[0]).unwrap_or(128);
                let wait = step / 2 + (step / 2).mul_f64(f64::from(random) / 255.0);
                state.steps += 1;
                state.until = Some(now + wait);
                state.reason = e.to_string();
                tracing::warn!(wait_s = wait.as_secs_f64(), error = %e, "ACME account backing off");
            }
            Err(IssueError::Paused { .. }) => {}
            // The CA answered about the name (or issued): it works.
            _ => *state = BackoffState::default(),
        }
    }
}

/// Whether a failure is the CA's or the account's, so every name would meet it.
fn is_account_failure(e: &IssueError) -> bool {
    match e {
        IssueError::Ca(_) | IssueError::Setup(_) => true,
        IssueError::Rejected { kind, .. } => [
            "serverInternal",
            "accountDoesNotExist",
            "userActionRequired",
            "externalAccountRequired",
        ]
        .iter()
        .any(|k| kind.strip_prefix("urn:ietf:params:acme:error:") == Some(*k)),
        _ => false,
    }
}

/// HTTPS to the CA with TCP_NODELAY (instant-acme's default client leaves Nagle on, and every
/// signed POST then waits ~40 ms), trusting `trust_roots` when given, else the system's roots.
type CaClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<bytes::Bytes>>;

fn http_client(trust_roots: &[PathBuf]) -> Result<CaClient, IssueError> {
    let mut roots = rustls::RootCertStore::empty();
    if trust_roots.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    for path in trust_roots {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| setup(format!("issuer.trust_roots {}: {e}", path.display())))?;
        for cert in certs {
            let cert =
                cert.map_err(|e| setup(format!("issuer.trust_roots {}: {e}", path.display())))?;
            roots
                .add(cert)
                .map_err(|e| setup(format!("issuer.trust_roots {}: {e}", path.display())))?;
        }
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

impl AcmeIssuer {
    /// Checks the settings; the account is loaded or created on first use.
    pub fn new(section: &IssuerSection, state: State) -> Result<Self, IssueError> {
        let directory_url = section.directory_url.clone().ok_or_else(|| {
            setup("issuer.kind = \"acme\" needs issuer.directory_url (the CA's directory)")
        })?;
        if section.eab_key_id.is_some() != section.eab_hmac_key.is_some() {
            return Err(setup(
                "issuer.eab_key_id and issuer.eab_hmac_key go together: set both or neither",
            ));
        }
        // Built at start, so unreadable trust roots fail there rather than at the first order.
        let http = http_client(&section.trust_roots)?;
        let account_key = section
            .account_key_file
            .as_deref()
            .map(read_account_key)
            .transpose()?;
        if account_key.is_some() && section.eab_key_id.is_some() {
            return Err(setup(
                "issuer.account_key_file cannot be used with issuer.eab_key_id: the account is \
                 registered from the key alone; drop one of them",
            ));
        }
        Ok(AcmeIssuer {
            section: section.clone(),
            state,
            account: tokio::sync::OnceCell::new(),
            account_key,
            http,
            directory_url,
            fallbacks: section
                .fallback_directories
                .iter()
                .map(|d| (d.clone(), tokio::sync::OnceCell::new()))
                .collect(),
            failures: std::sync::Mutex::new(std::collections::HashMap::new()),
            fallback_after: section.fallback_after_failures.max(1),
            backoffs: (0..=section.fallback_directories.len())
                .map(|_| AccountBackoff::default())
                .collect(),
            order_lock: RwLock::new(()),
        })
    }

    /// The platform's account: from the store, or created at the CA and stored.
    pub async fn account(&self) -> Result<&Account, IssueError> {
        self.account.get_or_try_init(|| self.load_account()).await
    }

    /// The account at fallback directory `i`: the platform account's key, registered there.
    async fn fallback_account(&self, i: usize) -> Result<&Account, IssueError> {
        let (url, cell) = self
            .fallbacks
            .get(i)
            .ok_or_else(|| setup("no such fallback directory"))?;
        cell.get_or_try_init(|| async {
            self.account().await?;
            let stored = self
                .state
                .get_account()
                .await
                .map_err(|e| IssueError::Ca(format!("reading the ACME account: {e}")))?
                .ok_or_else(|| IssueError::Ca("the ACME account is not stored yet".into()))?;
            let credentials: AccountCredentials = serde_json::from_str(&stored.credentials_json)
                .map_err(|e| setup(format!("the stored ACME account does not parse: {e}")))?;
            let der = credentials.private_key().clone_key();
            let key = instant_acme::Key::from_pkcs8_der(der.clone_key())
                .map_err(|e| setup(format!("the account key cannot be used: {e}")))?;
            let (account, _) = Account::builder_with_http(Box::new(CaHttp(self.http.clone())))
                .create_from_key((key, der.into()), url.clone())
                .await
                .map_err(|e| IssueError::Ca(format!("registering the account at {url}: {e}")))?;
            tracing::info!(directory = %url, account = account.id(), "ACME fallback account ready");
            Ok(account)
        })
        .await
    }

    /// The directory to use for `name` now: the primary until it has failed `fallback_after`
    /// times in a row, then each fallback in turn.
    fn directory_for(&self, name: &str) -> usize {
        if self.fallbacks.is_empty() {
            return 0;
        }
        let failures = self
            .failures
            .lock()
            .map_or(0, |f| f.get(name).copied().unwrap_or(0));
        (failures / self.fallback_after) as usize % (self.fallbacks.len() + 1)
    }

    fn record_outcome(&self, name: &str, ok: bool) {
        if let Ok(mut failures) = self.failures.lock() {
            if ok {
                failures.remove(name);
            } else {
                *failures.entry(name.to_string()).or_default() += 1;
            }
        }
    }

    async fn load_account(&self) -> Result<Account, IssueError> {
        let directory_url = &self.directory_url;
        let stored = self
            .state
            .get_account()
            .await
            .map_err(|e| IssueError::Ca(format!("reading the ACME account: {e}")))?;
        let stored = match (stored, &self.account_key) {
            (Some(account), None) if account.directory_url == *directory_url => account,
            (Some(account), Some(key))
                if account.directory_url == *directory_url && stored_key(&account)? == *key =>
            {
                account
            }
            (_, None) => self.create_account().await?,
            (_, Some(key)) => self.register_key(key).await?,
        };
        let credentials: AccountCredentials = serde_json::from_str(&stored.credentials_json)
            .map_err(|e| setup(format!("the stored ACME account does not parse: {e}")))?;
        Account::builder_with_http(Box::new(CaHttp(self.http.clone())))
            .from_credentials(credentials)
            .await
            .map_err(|e| {
                IssueError::Ca(format!(
                    "cannot reach the ACME directory {directory_url}: {e}"
                ))
            })
    }

    /// Registers the operator's key at the directory (or finds the account it already has
    /// there) and stores it, replacing any other: every node given the key does the same and
    /// so holds the same account.
    async fn register_key(
        &self,
        key: &rustls_pki_types::PrivatePkcs8KeyDer<'static>,
    ) -> Result<AcmeAccount, IssueError> {
        let directory_url = &self.directory_url;
        let signing = instant_acme::Key::from_pkcs8_der(key.clone_key())
            .map_err(|e| setup(format!("issuer.account_key_file cannot be used: {e}")))?;
        let (account, credentials) =
            Account::builder_with_http(Box::new(CaHttp(self.http.clone())))
                .create_from_key((signing, key.clone_key().into()), directory_url.clone())
                .await
                .map_err(|e| {
                    IssueError::Ca(format!(
                        "registering the account key at {directory_url}: {e}"
                    ))
                })?;
        if !self.section.contact.is_empty() {
            let contact: Vec<&str> = self.section.contact.iter().map(String::as_str).collect();
            if let Err(e) = account.update_contacts(&contact).await {
                tracing::warn!(error = %e, "the CA did not take the account's contact addresses");
            }
        }
        let record = account_record(directory_url, &account, &credentials)?;
        tracing::info!(account = %record.account_url, "ACME account registered from issuer.account_key_file");
        self.state
            .put_account(&record)
            .await
            .map_err(|e| IssueError::Ca(format!("storing the ACME account: {e}")))?;
        Ok(record)
    }

    async fn create_account(&self) -> Result<AcmeAccount, IssueError> {
        let (section, directory_url, state) = (&self.section, &self.directory_url, &self.state);
        let contact: Vec<&str> = section.contact.iter().map(String::as_str).collect();
        let eab = match (&section.eab_key_id, &section.eab_hmac_key) {
            (Some(id), Some(key)) => {
                use base64::Engine as _;
                let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(key.trim_end_matches('='))
                    .map_err(|e| setup(format!("issuer.eab_hmac_key is not base64url: {e}")))?;
                Some(ExternalAccountKey::new(id.clone(), &key))
            }
            _ => None,
        };
        let (account, credentials) =
            Account::builder_with_http(Box::new(CaHttp(self.http.clone())))
                .create(
                    &NewAccount {
                        contact: &contact,
                        terms_of_service_agreed: true,
                        only_return_existing: false,
                    },
                    directory_url.to_string(),
                    eab.as_ref(),
                )
                .await
                .map_err(|e| {
                    IssueError::Ca(format!("creating the ACME account at {directory_url}: {e}"))
                })?;
        let record = account_record(directory_url, &account, &credentials)?;
        tracing::info!(account = %record.account_url, "ACME account created");
        // Another node may have stored one first: then everyone uses that one.
        state
            .put_account_once(&record)
            .await
            .map_err(|e| IssueError::Ca(format!("storing the ACME account: {e}")))
    }

    async fn order(
        &self,
        domains: &[DomainName],
        replacing: Option<&str>,
        progress: &dyn Progress,
        directory: usize,
        challenge: Challenge<'_>,
        published: &mut Vec<(String, String)>,
    ) -> Result<Issued, IssueError> {
        progress.step(CertificateStatus::Ordering).await;
        let identifiers: Vec<Identifier> = domains
            .iter()
            .map(|d| Identifier::Dns(d.to_string()))
            .collect();
        let name = domains.first().map(|d| d.to_string()).unwrap_or_default();
        let account = match directory {
            0 => self.account().await?,
            i => {
                tracing::info!(domain = %name, directory = %self.fallbacks[i - 1].0, "trying a fallback CA");
                self.fallback_account(i - 1).await?
            }
        };
        // `replaces` only makes sense to the CA that issued the old certificate.
        let replaces = replacing
            .filter(|_| directory == 0)
            .and_then(certificate_id);
        let mut new_order = NewOrder::new(&identifiers);
        if let Some(id) = replaces {
            new_order = new_order.replaces(id);
        }
        let mut order = {
            let _exclusive = self.order_lock.write().await;
            account.new_order(&new_order).await.map_err(api)?
        };
        {
            let _shared = self.order_lock.read().await;
            let mut authorizations = order.authorizations();
            while let Some(authorization) = authorizations.next().await {
                let mut authorization = authorization.map_err(api)?;
                match authorization.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => {
                        return Err(IssueError::Rejected {
                            kind: "urn:ietf:params:acme:error:unauthorized".into(),
                            detail: format!("authorization is {other:?}"),
                            retry_after: None,
                        });
                    }
                }
                let (kind, label) = match challenge {
                    Challenge::Http01 => (ChallengeType::Http01, "http-01"),
                    Challenge::Dns01(_) => (ChallengeType::Dns01, "dns-01"),
                };
                // Without a wildcard's `*.`: DNS-01 proves the base name.
                let identifier = match authorization.identifier().identifier {
                    Identifier::Dns(name) => name.clone(),
                    other => format!("{other:?}"),
                };
                let mut offered =
                    authorization
                        .challenge(kind)
                        .ok_or_else(|| IssueError::Rejected {
                            kind: "urn:ietf:params:acme:error:unsupportedChallenge".into(),
                            detail: format!("the CA offers no {label} challenge"),
                            retry_after: None,
                        })?;
                if let Challenge::Dns01(dns) = challenge {
                    let value = offered.key_authorization().dns_value();
                    dns.publish(&identifier, &value).await.map_err(|e| {
                        IssueError::Ca(format!(
                            "cannot publish the DNS-01 value of {identifier}: {e}"
                        ))
                    })?;
                    published.push((identifier, value));
                }
                offered.set_ready().await.map_err(api)?;
            }
        }
        progress.step(CertificateStatus::Validating).await;
        let status = order.poll_ready(&retry_policy()).await.map_err(api)?;
        if status != OrderStatus::Ready {
            return Err(self.failure(&mut order).await);
        }
        progress.step(CertificateStatus::Issuing).await;
        let private_key_pem = order.finalize().await.map_err(api)?;
        let chain_pem = order.poll_certificate(&retry_policy()).await.map_err(api)?;
        let (not_before, not_after) = validity(&chain_pem)?;
        Ok(Issued {
            chain_pem,
            private_key_pem,
            not_before,
            not_after,
        })
    }

    /// The CA's reason for an order that went invalid: the order's problem, else the first
    /// failed challenge's.
    async fn failure(&self, order: &mut instant_acme::Order) -> IssueError {
        if let Some(problem) = order.state().error.clone() {
            return api(instant_acme::Error::Api(problem));
        }
        let _shared = self.order_lock.read().await;
        let mut authorizations = order.authorizations();
        while let Some(Ok(mut authorization)) = authorizations.next().await {
            if authorization.refresh().await.is_err() {
                continue;
            }
            for challenge in &authorization.challenges {
                if let Some(problem) = &challenge.error {
                    return api(instant_acme::Error::Api(problem.clone()));
                }
            }
        }
        IssueError::Rejected {
            kind: "urn:ietf:params:acme:error:serverInternal".into(),
            detail: "the order became invalid and the CA gave no reason".into(),
            retry_after: None,
        }
    }
}

/// An account as the store keeps it.
fn account_record(
    directory_url: &str,
    account: &Account,
    credentials: &AccountCredentials,
) -> Result<AcmeAccount, IssueError> {
    Ok(AcmeAccount {
        directory_url: directory_url.to_string(),
        account_url: account.id().to_string(),
        thumbprint: account.key_thumbprint().to_string(),
        credentials_json: serde_json::to_string(credentials)
            .map_err(|e| setup(format!("serializing the ACME account: {e}")))?,
        sealed_credentials: None,
        created_at: OffsetDateTime::now_utc(),
    })
}

/// The PKCS#8 key in `issuer.account_key_file`.
fn read_account_key(
    path: &std::path::Path,
) -> Result<rustls_pki_types::PrivatePkcs8KeyDer<'static>, IssueError> {
    use rustls_pki_types::pem::PemObject;
    let what = || format!("issuer.account_key_file {}", path.display());
    let key = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(path).map_err(|e| {
        setup(format!(
            "{}: {e}; it must hold a PKCS#8 \"PRIVATE KEY\" (make one with \
             `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`)",
            what()
        ))
    })?;
    instant_acme::Key::from_pkcs8_der(key.clone_key()).map_err(|e| {
        setup(format!(
            "{}: not an ECDSA P-256 key the CA takes ({e})",
            what()
        ))
    })?;
    Ok(key)
}

/// The private key of a stored account.
fn stored_key(
    account: &AcmeAccount,
) -> Result<rustls_pki_types::PrivatePkcs8KeyDer<'static>, IssueError> {
    let credentials: AccountCredentials = serde_json::from_str(&account.credentials_json)
        .map_err(|e| setup(format!("the stored ACME account does not parse: {e}")))?;
    Ok(credentials.private_key().clone_key())
}

/// ARI answers are asked for again no sooner and no later than this, whatever Retry-After says.
const ARI_MIN_RECHECK: Duration = Duration::from_secs(60);
const ARI_MAX_RECHECK: Duration = Duration::from_secs(24 * 3600);

/// The ARI identifier (authority key id + serial) of the chain's leaf.
fn certificate_id(chain_pem: &str) -> Option<CertificateIdentifier<'static>> {
    use rustls_pki_types::pem::PemObject;
    let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()?
        .ok()?;
    CertificateIdentifier::try_from(&leaf)
        .ok()
        .map(CertificateIdentifier::into_owned)
}

/// notBefore and notAfter of the leaf, the first certificate of the chain.
fn validity(chain_pem: &str) -> Result<(OffsetDateTime, OffsetDateTime), IssueError> {
    use rustls_pki_types::pem::PemObject;
    let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or_else(|| IssueError::Ca("the CA sent an empty certificate chain".into()))?
        .map_err(|e| IssueError::Ca(format!("the CA's certificate does not parse: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf)
        .map_err(|e| IssueError::Ca(format!("the CA's certificate does not parse: {e}")))?;
    Ok((
        cert.validity().not_before.to_datetime(),
        cert.validity().not_after.to_datetime(),
    ))
}

#[async_trait]
impl Issuer for AcmeIssuer {
    fn reference(&self) -> IssuerRef {
        IssuerRef::Acme {
            directory_url: self.directory_url.clone(),
        }
    }

    async fn issue(
        &self,
        domains: &[DomainName],
        replacing: Option<&str>,
        progress: &dyn Progress,
        challenge: Challenge<'_>,
    ) -> Result<Issued, IssueError> {
        let name = domains.first().map(|d| d.as_str()).unwrap_or_default();
        let directory = self.directory_for(name);
        let backoff = &self.backoffs[directory];
        backoff.check(OffsetDateTime::now_utc())?;
        let mut published = Vec::new();
        let order = self.order(
            domains,
            replacing,
            progress,
            directory,
            challenge,
            &mut published,
        );
        // Every issuance is bounded: a CA that stops answering must not hold a name forever.
        let bounded = tokio::time::timeout(Duration::from_secs(180), order);
        let result = match RETRY_AFTER.scope(Cell::new(None), bounded).await {
            Ok(result) => result,
            Err(_) => Err(IssueError::Ca(
                "the order did not complete within 180 s".into(),
            )),
        };
        // DNS-01 values are withdrawn whatever the outcome: they answer one order only.
        if let Challenge::Dns01(dns) = challenge {
            for (name, value) in &published {
                dns.withdraw(name, value).await;
            }
        }
        backoff.record(&result, OffsetDateTime::now_utc());
        self.record_outcome(name, result.is_ok());
        result
    }

    async fn renewal_window(&self, chain_pem: &str) -> Option<RenewalWindow> {
        let id = certificate_id(chain_pem)?;
        let account = self.account().await.ok()?;
        match account.renewal_info(&id).await {
            Ok((info, retry_after)) => Some(RenewalWindow {
                start: info.suggested_window.start,
                end: info.suggested_window.end,
                check_after: OffsetDateTime::now_utc()
                    + retry_after.clamp(ARI_MIN_RECHECK, ARI_MAX_RECHECK),
            }),
            Err(instant_acme::Error::Unsupported(_)) => None,
            Err(e) => {
                tracing::debug!(error = %e, "ACME renewal information unavailable");
                None
            }
        }
    }

    async fn revoke(&self, chain_pem: &str) -> Result<(), IssueError> {
        use rustls_pki_types::pem::PemObject;
        let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .next()
            .ok_or_else(|| setup("there is no certificate to revoke yet"))?
            .map_err(|e| setup(format!("the stored certificate does not parse: {e}")))?;
        let request = instant_acme::RevocationRequest {
            certificate: &leaf,
            reason: None,
        };
        // The certificate may come from a fallback CA: the one that issued it accepts.
        let mut result = self.account().await?.revoke(&request).await.map_err(api);
        for i in 0..self.fallbacks.len() {
            if result.is_ok() {
                break;
            }
            if let Ok(account) = self.fallback_account(i).await {
                result = account.revoke(&request).await.map_err(api);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = httpdate::parse_http_date("Sun, 22 Nov 2026 08:00:00 GMT").unwrap();
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            retry_after("Sun, 22 Nov 2026 09:00:00 GMT", now),
            Some(Duration::from_secs(3600))
        );
        // A date already past: ask again now.
        assert_eq!(
            retry_after("Sun, 22 Nov 2026 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-5", now), None);
    }

    fn rejected(kind: &str) -> Result<Issued, IssueError> {
        Err(IssueError::Rejected {
            kind: format!("urn:ietf:params:acme:error:{kind}"),
            detail: String::new(),
            retry_after: None,
        })
    }

    #[test]
    fn the_account_backs_off_on_ca_failures_only() {
        let backoff = AccountBackoff::default();
        let t0 = OffsetDateTime::UNIX_EPOCH;
        // A name the CA refuses says nothing about the account.
        backoff.record(&rejected("rejectedIdentifier"), t0);
        backoff.record(&rejected("rateLimited"), t0);
        assert!(backoff.check(t0).is_ok());

        // The CA fails: no order for the first step (2.5 to 5 s).
        backoff.record(&Err(IssueError::Ca("connection refused".into())), t0);
        let Err(IssueError::Paused { until, reason }) = backoff.check(t0) else {
            panic!("not paused");
        };
        assert!(reason.contains("connection refused"), "{reason}");
        let first = until - t0;
        assert!(
            first >= time::Duration::milliseconds(2500) && first <= time::Duration::seconds(5),
            "{first}"
        );
        // Orders in flight when it began end inside it and do not lengthen it.
        backoff.record(&rejected("serverInternal"), t0 + time::Duration::seconds(1));
        assert!(
            matches!(backoff.check(until - time::Duration::milliseconds(1)), Err(IssueError::Paused { until: u, .. }) if u == until)
        );
        assert!(backoff.check(until).is_ok());

        // Failing again after it: the next step is longer (5 to 10 s).
        backoff.record(&rejected("serverInternal"), until);
        let Err(IssueError::Paused { until: second, .. }) = backoff.check(until) else {
            panic!("not paused again");
        };
        assert!(
            second - until >= time::Duration::seconds(5),
            "{}",
            second - until
        );

        // One success ends it, and the steps start over.
        backoff.record(&rejected("unauthorized"), second);
        assert!(backoff.check(second).is_ok());
        backoff.record(&Err(IssueError::Setup("no account".into())), second);
        let Err(IssueError::Paused { until: third, .. }) = backoff.check(second) else {
            panic!("not paused");
        };
        assert!(third - second <= time::Duration::seconds(5));
    }

    /// A CA in memory: the directory, nonces, accounts, and new orders refused as rate limited
    /// with a Retry-After.
    struct RateLimitingCa;

    impl instant_acme::HttpClient for RateLimitingCa {
        fn request(
            &self,
            req: http::Request<BodyWrapper<bytes::Bytes>>,
        ) -> std::pin::Pin<
            Box<
                dyn Future<Output = Result<instant_acme::BytesResponse, instant_acme::Error>>
                    + Send,
            >,
        > {
            let base = "http://ca.test";
            let (status, headers, body): (u16, Vec<(&str, String)>, String) =
                match req.uri().path() {
                    "/dir" => (
                        200,
                        vec![],
                        format!(
                            r#"{{"newNonce":"{base}/nonce","newAccount":"{base}/account","newOrder":"{base}/order"}}"#
                        ),
                    ),
                    "/nonce" => (200, vec![], String::new()),
                    "/account" => (
                        201,
                        vec![("location", format!("{base}/account/1"))],
                        r#"{"status":"valid"}"#.into(),
                    ),
                    _ => (
                        429,
                        vec![
                            ("retry-after", "42".into()),
                            ("content-type", "application/problem+json".into()),
                        ],
                        r#"{"type":"urn:ietf:params:acme:error:rateLimited","detail":"too many new orders"}"#.into(),
                    ),
                };
            let mut response = http::Response::builder()
                .status(status)
                .header("replay-nonce", "bm9uY2U");
            for (name, value) in headers {
                response = response.header(name, value);
            }
            let (parts, ()) = response.body(()).unwrap().into_parts();
            Box::pin(async move {
                Ok(instant_acme::BytesResponse {
                    parts,
                    body: Box::new(bytes::Bytes::from(body)),
                })
            })
        }
    }

    #[tokio::test]
    async fn the_cas_retry_after_reaches_the_orders_problem() {
        let (account, _) = Account::builder_with_http(Box::new(CaHttp(RateLimitingCa)))
            .create(
                &NewAccount {
                    contact: &[],
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                "http://ca.test/dir".into(),
                None,
            )
            .await
            .unwrap();
        let identifiers = [Identifier::Dns("a.example.test".into())];
        let order = async {
            account
                .new_order(&NewOrder::new(&identifiers))
                .await
                .map(|_| ())
                .map_err(api)
        };
        let Err(IssueError::Rejected {
            kind, retry_after, ..
        }) = RETRY_AFTER.scope(Cell::new(None), order).await
        else {
            panic!("the order was not refused");
        };
        assert_eq!(kind, "urn:ietf:params:acme:error:rateLimited");
        assert_eq!(retry_after, Some(Duration::from_secs(42)));
    }
}
