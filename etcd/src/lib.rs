//! The fleet's state store on etcd v3: [`EtcdStore`] implements `portcullis_config`'s `Store`
//! over `etcd-client`, under one key prefix, and adds what that client leaves to its caller:
//! failover between endpoints, retries of what is safe to retry, watches that resume by
//! themselves without a gap or a duplicate, and errors that name the endpoints and say why.
//! It knows nothing of services, certificates or the Snapshot; only the binary depends on it,
//! so no other crate compiles the gRPC stack.

mod client;
mod convert;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    CompactionOptions, Compare as EtcdCompare, CompareOp, GetOptions, PutOptions, Txn as EtcdTxn,
    TxnOp,
};
use portcullis_config::StoreError;
use portcullis_config::store::{
    Compare, KeyValue, LeaseId, Op, Page, PageRequest, Revision, Store, Txn, TxnOutcome, Watch,
};

use crate::client::Cluster;
use crate::convert::{Prefix, key_value};

/// The most operations etcd takes in one transaction branch (its `--max-txn-ops` default).
pub const MAX_TXN_OPS: usize = 128;

/// How to reach etcd. Endpoints are `host:port` (or `http://`/`https://` URLs); TLS is used
/// when a CA or a client certificate is given.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Every key lives under it, so several deployments can share a cluster.
    pub prefix: String,
    /// CA bundle (PEM) that etcd's server certificates chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// The most one endpoint may take to accept a connection.
    pub dial_timeout: Duration,
    /// The most one store operation may take, every retry and failover included.
    pub request_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            endpoints: Vec::new(),
            prefix: "/portcullis/".into(),
            ca: None,
            cert: None,
            key: None,
            user: None,
            password: None,
            dial_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl EtcdOptions {
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EtcdOptions {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..EtcdOptions::default()
        }
    }
}

/// The `Store` on an etcd cluster. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct EtcdStore {
    cluster: Arc<Cluster>,
    prefix: Prefix,
}

impl EtcdStore {
    /// Connects to the first endpoint that answers, each given `dial_timeout`; fails with
    /// [`StoreError::Unavailable`] naming every endpoint and why, when none does.
    pub async fn connect(options: EtcdOptions) -> Result<EtcdStore, StoreError> {
        let prefix = Prefix::new(&options.prefix)?;
        let cluster = Cluster::connect(options).await?;
        Ok(EtcdStore {
            cluster: Arc::new(cluster),
            prefix,
        })
    }

    /// As [`EtcdStore::connect`] without reaching any member first (bad settings still fail):
    /// for a node that starts while etcd is away and serves its local copy meanwhile.
    pub async fn unconnected(options: EtcdOptions) -> Result<EtcdStore, StoreError> {
        let prefix = Prefix::new(&options.prefix)?;
        let cluster = Cluster::new(options).await?;
        Ok(EtcdStore {
            cluster: Arc::new(cluster),
            prefix,
        })
    }

    /// The endpoint requests go to now (it changes on failover).
    pub fn current_endpoint(&self) -> &str {
        self.cluster.current_endpoint()
    }
}

fn check_txn(txn: &Txn) -> Result<(), StoreError> {
    for (branch, len) in [
        ("compares", txn.compare.len()),
        ("success operations", txn.success.len()),
        ("failure operations", txn.failure.len()),
    ] {
        if len > MAX_TXN_OPS {
            return Err(StoreError::Invalid(format!(
                "a transaction has {len} {branch}; etcd takes at most {MAX_TXN_OPS}: split it"
            )));
        }
    }
    txn.check_keys()
}

/// The first lease a transaction's operations name: the one etcd did not find.
fn txn_lease(txn: &Txn) -> i64 {
    txn.success
        .iter()
        .chain(&txn.failure)
        .find_map(|op| match op {
            Op::Put {
                lease: Some(lease), ..
            } => Some(lease.0),
            _ => None,
        })
        .unwrap_or(0)
}

impl EtcdStore {
    fn etcd_txn(&self, txn: &Txn) -> EtcdTxn {
        let compares: Vec<EtcdCompare> = txn
            .compare
            .iter()
            .map(|c| match c {
                Compare::Absent(key) => {
                    EtcdCompare::version(self.prefix.full(key), CompareOp::Equal, 0)
                }
                Compare::Present(key) => {
                    EtcdCompare::version(self.prefix.full(key), CompareOp::Greater, 0)
                }
                Compare::ModRevision(key, rev) => {
                    EtcdCompare::mod_revision(self.prefix.full(key), CompareOp::Equal, *rev)
                }
            })
            .collect();
        let ops = |ops: &[Op]| -> Vec<TxnOp> {
            ops.iter()
                .map(|op| match op {
                    Op::Put { key, value, lease } => {
                        let options = lease.map(|l| PutOptions::new().with_lease(l.0));
                        TxnOp::put(self.prefix.full(key), value.clone(), options)
                    }
                    Op::Delete { key } => TxnOp::delete(self.prefix.full(key), None),
                })
                .collect()
        };
        EtcdTxn::new()
            .when(compares)
            .and_then(ops(&txn.success))
            .or_else(ops(&txn.failure))
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let full = self.prefix.full(key);
        let mut response = self
            .cluster
            .read("get", |mut conn| {
                let full = full.clone();
                async move { conn.kv.get(full, None).await }
            })
            .await?;
        match response.take_kvs().into_iter().next() {
            Some(kv) => Ok(Some(key_value(&self.prefix, kv)?)),
            None => Ok(None),
        }
    }

    async fn list(&self, prefix: &str, page: PageRequest) -> Result<Page, StoreError> {
        let start = self.prefix.full(prefix);
        let end = convert::range_end(&start);
        let from = match &page.after {
            // The smallest key after `after`: itself with a zero byte appended.
            Some(after) if after.as_str() >= prefix => {
                let mut key = self.prefix.full(after);
                key.push(0);
                key
            }
            _ => start,
        };
        let limit = page.limit.max(1) as i64;
        let mut response = self
            .cluster
            .read("list", |mut conn| {
                let (from, end) = (from.clone(), end.clone());
                async move {
                    let options = GetOptions::new().with_range(end).with_limit(limit);
                    conn.kv.get(from, Some(options)).await
                }
            })
            .await?;
        let revision = convert::header_revision(response.header())?;
        let more = response.more();
        let items = response
            .take_kvs()
            .into_iter()
            .map(|kv| key_value(&self.prefix, kv))
            .collect::<Result<_, _>>()?;
        Ok(Page {
            items,
            revision,
            more,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        check_txn(&txn)?;
        let etcd_txn = self.etcd_txn(&txn);
        let lease = txn_lease(&txn);
        let response = self
            .cluster
            .write("txn", |mut conn| {
                let etcd_txn = etcd_txn.clone();
                async move { conn.kv.txn(etcd_txn).await }
            })
            .await
            .map_err(|e| match e {
                StoreError::LeaseNotFound(_) => StoreError::LeaseNotFound(lease),
                other => other,
            })?;
        Ok(TxnOutcome {
            succeeded: response.succeeded(),
            revision: convert::header_revision(response.header())?,
        })
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        let next = if from <= 0 {
            // "From now" becomes a revision, so a watch that resumes knows where it was.
            self.current_revision().await? + 1
        } else {
            from
        };
        watch::start(self.cluster.clone(), self.prefix.clone(), prefix, next).await
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        let key = self.prefix.full("");
        let response = self
            .cluster
            .read("current_revision", |mut conn| {
                let key = key.clone();
                async move {
                    let options = GetOptions::new().with_count_only();
                    conn.kv.get(key, Some(options)).await
                }
            })
            .await?;
        convert::header_revision(response.header())
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let result = self
            .cluster
            .read("compact", |mut conn| async move {
                let options = CompactionOptions::new().with_physical();
                conn.kv.compact(revision, Some(options)).await
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            // Already compacted through there: nothing to do, as the contract says.
            Err(StoreError::Compacted { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        // etcd counts whole seconds; rounding down could end a lease before its holder expects.
        let seconds = ttl.as_millis().div_ceil(1000).max(1) as i64;
        // A retried grant whose first answer was lost leaves a lease nobody holds; it expires
        // after `ttl` with no key on it, so retrying is harmless.
        let response = self
            .cluster
            .read("grant_lease", |mut conn| async move {
                conn.lease.grant(seconds, None).await
            })
            .await?;
        if !response.error().is_empty() {
            return Err(StoreError::Backend(format!(
                "etcd refused a lease: {}",
                response.error()
            )));
        }
        Ok(LeaseId(response.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.cluster
            .read("keep_alive", |mut conn| async move {
                conn.lease.keep_alive(lease.0).await.map(|_| ())
            })
            .await
            .map_err(|e| match e {
                StoreError::LeaseNotFound(_) => StoreError::LeaseNotFound(lease.0),
                other => other,
            })
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let result = self
            .cluster
            .read("revoke_lease", |mut conn| async move {
                conn.lease.revoke(lease.0).await.map(|_| ())
            })
            .await;
        match result {
            // Gone already (expired, or a retried revoke): what the embedded store answers too.
            Err(StoreError::LeaseNotFound(_)) => Ok(()),
            other => other,
        }
    }
}
