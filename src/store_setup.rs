//! Opens the store `store.kind` names: the embedded redb file for a node alone, or etcd for a
//! fleet, with the node's local copy beside it that it serves from while etcd is away.

use std::fs;
use std::sync::Arc;

use anyhow::{Context, Result};
use portcullis_config::file::StoreKind;
use portcullis_config::store::{Replica, ReplicatedStore, follow_into_replica};
use portcullis_config::{EmbeddedStore, NodeConfig, Store, StoreError};
use portcullis_etcd::{EtcdOptions, EtcdStore};
use tokio_util::sync::CancellationToken;

pub struct OpenedStore {
    pub store: Arc<dyn Store>,
    /// The fleet node's local copy, to start from when etcd is away.
    pub replica: Option<Replica>,
    /// Other processes share the store (a fleet): a node id must be unique among them.
    pub shared: bool,
    /// etcd did not answer at start (why): the node starts from its copy at once.
    pub unreachable: Option<String>,
    /// Keeps the local copy in step with etcd; spawned once the Snapshot is loaded, so a
    /// joining node's first full copy does not slow its own start.
    pub follower: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

pub async fn open(config: &NodeConfig, shutdown: CancellationToken) -> Result<OpenedStore> {
    match config.store.kind {
        StoreKind::Embedded => open_embedded(config).await,
        StoreKind::Etcd => open_etcd(config, shutdown).await,
    }
}

async fn open_embedded(config: &NodeConfig) -> Result<OpenedStore> {
    let db = config.store.database_file();
    let store = EmbeddedStore::open_with_history(&db, config.store.history)
        .await
        .with_context(|| format!("opening the state store {}", db.display()))?;
    make_private(&db);
    Ok(OpenedStore {
        store: Arc::new(store),
        replica: None,
        shared: false,
        unreachable: None,
        follower: None,
    })
}

async fn open_etcd(config: &NodeConfig, shutdown: CancellationToken) -> Result<OpenedStore> {
    let etcd = &config.store.etcd;
    let password = match &etcd.password_file {
        Some(path) => Some(
            fs::read_to_string(path)
                .with_context(|| format!("reading store.etcd.password_file {}", path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        ),
        None => None,
    };
    let options = EtcdOptions {
        endpoints: etcd.endpoints.clone(),
        prefix: etcd.prefix.clone(),
        ca: etcd.ca.clone(),
        cert: etcd.cert.clone(),
        key: etcd.key.clone(),
        user: etcd.user.clone(),
        password,
        dial_timeout: etcd.dial_timeout.0,
        request_timeout: etcd.request_timeout.0,
    };
    let copy_path = config.store.path.join("replica.redb");
    let replica = Replica::open(&copy_path).await.with_context(|| {
        format!(
            "opening this node's copy of the store {}",
            copy_path.display()
        )
    })?;
    make_private(&copy_path);
    let mut unreachable = None;
    let upstream = match EtcdStore::connect(options.clone()).await {
        Ok(store) => store,
        // With a copy to serve, a node starts anyway and catches up when etcd is back.
        Err(StoreError::Unavailable(reason)) if replica.revision().await? > 0 => {
            unreachable = Some(reason);
            EtcdStore::unconnected(options).await?
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "connecting to etcd ({}); check store.etcd.endpoints and credentials",
                etcd.endpoints.join(", ")
            )));
        }
    };
    let upstream: Arc<dyn Store> = Arc::new(upstream);
    let follower = Box::pin(follow_into_replica(
        replica.clone(),
        upstream.clone(),
        shutdown,
    ));
    Ok(OpenedStore {
        store: Arc::new(ReplicatedStore::new(upstream, replica.clone())),
        replica: Some(replica),
        shared: true,
        unreachable,
        follower: Some(follower),
    })
}

/// The store holds private keys (certificates', the ACME account's): owner only, whatever the
/// umask or a state directory made by hand.
fn make_private(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Err(e) = fs::set_permissions(path, fs::Permissions::from_mode(0o600)) {
        tracing::warn!(file = %path.display(), error = %e, "cannot make the state store private");
    }
}
