//! Opens the store `store.kind` names: the embedded redb file for a node alone, or etcd for a
//! fleet, with the node's local copy beside it that it serves from while etcd is away.

use std::fs;
use std::sync::Arc;

use anyhow::{Context, Result};
use portcullis_config::file::StoreKind;
use portcullis_config::store::Replica;
use portcullis_config::{EmbeddedStore, NodeConfig, Store};
use tokio_util::sync::CancellationToken;

pub struct OpenedStore {
    pub store: Arc<dyn Store>,
    /// The fleet node's local copy, to start from when etcd is away.
    pub replica: Option<Replica>,
    /// Other processes share the store (a fleet): a node id must be unique among them.
    pub shared: bool,
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
    })
}

async fn open_etcd(_config: &NodeConfig, _shutdown: CancellationToken) -> Result<OpenedStore> {
    anyhow::bail!("etcd store not wired yet")
}

/// The store holds private keys (certificates', the ACME account's): owner only, whatever the
/// umask or a state directory made by hand.
fn make_private(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Err(e) = fs::set_permissions(path, fs::Permissions::from_mode(0o600)) {
        tracing::warn!(file = %path.display(), error = %e, "cannot make the state store private");
    }
}
