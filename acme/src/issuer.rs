use async_trait::async_trait;
use portcullis_config::DomainName;
use portcullis_config::model::IssuerRef;
use time::OffsetDateTime;

/// A freshly issued certificate with its key.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Leaf first.
    pub chain_pem: String,
    pub private_key_pem: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the dev CA at {path} cannot be used: {reason}")]
    DevCa { path: String, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("{kind}: {detail}")]
    Rejected {
        kind: String,
        detail: String,
        /// When the CA said to ask again (its `Retry-After`), if it did.
        retry_after: Option<std::time::Duration>,
    },
    /// Nothing was asked of the CA: its account is backing off after failures that were not
    /// this name's; the name waits without a failure of its own.
    #[error("the ACME account is backing off until {until}: {reason}")]
    Paused {
        until: OffsetDateTime,
        reason: String,
    },
    /// The issuer cannot be set up (config, account); nothing will issue until it is fixed.
    #[error("{0}")]
    Setup(String),
    /// The name cannot validate as things stand (checked before ordering); no order was placed.
    #[error("not ordered: {0}")]
    Preflight(String),
    /// The CA could not be reached or answered nonsense; retried later.
    #[error("the ACME CA failed: {0}")]
    Ca(String),
}

impl IssueError {
    /// The problem as shown in a certificate's status.
    pub fn problem(&self) -> portcullis_config::model::Problem {
        let (kind, detail) = match self {
            IssueError::Rejected { kind, detail, .. } => (kind.clone(), detail.clone()),
            IssueError::Paused { .. } => ("portcullis:account-backoff".into(), self.to_string()),
            IssueError::DevCa { .. } => ("portcullis:dev-ca".into(), self.to_string()),
            IssueError::Generate(_) => ("portcullis:generate".into(), self.to_string()),
            IssueError::Setup(_) => ("portcullis:issuer-setup".into(), self.to_string()),
            IssueError::Ca(_) => ("portcullis:ca-unreachable".into(), self.to_string()),
            IssueError::Preflight(_) => ("portcullis:preflight".into(), self.to_string()),
        };
        portcullis_config::model::Problem { kind, detail }
    }
}

/// Something that turns names into a certificate: the dev CA, an ACME CA.
#[async_trait]
pub trait Issuer: Send + Sync + 'static {
    /// Recorded on each certificate, so a change of issuer can re-issue what the old one made.
    fn reference(&self) -> IssuerRef;

    /// Issues for `domains`, telling `progress` each step it reaches (ordering, validating,
    /// issuing) so users can watch a first issuance. `challenge` says how the names are
    /// proven: http-01 answered by every node, or DNS-01 values published in the platform zone
    /// (names not pointing here yet, wildcards).
    /// `replacing`: the certificate this one replaces (PEM chain), for CAs that track renewals
    /// (ARI's `replaces`, RFC 9773 §5).
    async fn issue(
        &self,
        domains: &[DomainName],
        replacing: Option<&str>,
        progress: &dyn Progress,
        challenge: Challenge<'_>,
    ) -> Result<Issued, IssueError>;

    /// The CA's suggested renewal window for a certificate it issued (ARI, RFC 9773); `None`
    /// when the CA offers none, and then renewal goes by lifetime.
    async fn renewal_window(
        &self,
        _chain_pem: &str,
    ) -> Option<portcullis_config::model::RenewalWindow> {
        None
    }

    /// Revokes a certificate this issuer issued (`chain_pem`: leaf first).
    async fn revoke(&self, _chain_pem: &str) -> Result<(), IssueError> {
        Err(IssueError::Setup(
            "this issuer does not revoke certificates (the dev CA keeps no revocation list); \
             renew the certificate or delete the service instead"
                .into(),
        ))
    }
}

/// How an order proves its names.
#[derive(Clone, Copy)]
pub enum Challenge<'a> {
    Http01,
    Dns01(&'a dyn Dns01),
}

/// Publishes DNS-01 values where the CA will look for them (`_acme-challenge.<name>`, which
/// the owner delegated by CNAME to the platform zone).
#[async_trait]
pub trait Dns01: Send + Sync {
    /// Answered by the platform's DNS once this returns.
    async fn publish(&self, name: &str, value: &str) -> Result<(), String>;
    async fn withdraw(&self, name: &str, value: &str);
}

/// Where an issuer reports its steps.
#[async_trait]
pub trait Progress: Send + Sync {
    async fn step(&self, status: portcullis_config::model::CertificateStatus);
}

/// For callers that do not watch.
pub struct NoProgress;

#[async_trait]
impl Progress for NoProgress {
    async fn step(&self, _: portcullis_config::model::CertificateStatus) {}
}

/// Waits until this node answers what the store holds at a revision (its DNS view has it).
pub type WaitLive =
    std::sync::Arc<dyn Fn(i64) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// DNS-01 values kept in the store (`dns-challenges/<label>`), so every node of the fleet
/// answers them from its Snapshot whichever one the CA asks.
pub struct StoreDns01 {
    pub state: portcullis_config::State,
    pub wait_live: Option<WaitLive>,
    /// Nodes share the store: the CA's resolver may ask any of them, so wait (a bounded
    /// time) until every live node reports having applied the value.
    pub fleet: bool,
}

/// The longest wait for the fleet to apply a DNS-01 value; a node that has not by then (dead,
/// its lease not yet run out) fails at worst this one order, which is retried.
const FLEET_APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

impl StoreDns01 {
    /// Until every node in `nodes/` has reported (`status/<id>`) a revision at or past
    /// `revision`.
    async fn wait_for_fleet(&self, revision: i64) {
        use portcullis_config::keys;
        let deadline = tokio::time::Instant::now() + FLEET_APPLY_WAIT;
        loop {
            let store = self.state.store();
            let applied = async {
                let (nodes, _) = store.list_all(keys::NODES).await.ok()?;
                let (reports, _) = store.list_all(keys::STATUS).await.ok()?;
                let behind = nodes.iter().any(|node| {
                    let id = node.key.strip_prefix(keys::NODES).unwrap_or_default();
                    !reports.iter().any(|r| {
                        r.key.strip_prefix(keys::STATUS) == Some(id)
                            && portcullis_config::state::decode::<
                                portcullis_config::model::NodeStatus,
                            >(r)
                            .is_ok_and(|s| s.applied_revision >= revision)
                    })
                });
                Some(!behind)
            }
            .await;
            if applied == Some(true) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    revision,
                    "not every node reported a DNS-01 value in time; going ahead"
                );
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

#[async_trait]
impl Dns01 for StoreDns01 {
    async fn publish(&self, name: &str, value: &str) -> Result<(), String> {
        let alias = portcullis_config::AliasName::parse(name)?;
        let revision = self
            .state
            .publish_dns_challenge(&alias.acme_label(), value)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(wait) = &self.wait_live {
            wait(revision).await;
        }
        if self.fleet {
            self.wait_for_fleet(revision).await;
        }
        Ok(())
    }

    async fn withdraw(&self, name: &str, value: &str) {
        let Ok(alias) = portcullis_config::AliasName::parse(name) else {
            return;
        };
        if let Err(e) = self
            .state
            .withdraw_dns_challenge(&alias.acme_label(), value)
            .await
        {
            // Harmless if it stays: a used value proves nothing to anyone.
            tracing::warn!(domain = name, error = %e, "cannot withdraw a DNS-01 value");
        }
    }
}
