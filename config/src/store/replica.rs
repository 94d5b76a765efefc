//! A fleet node's own copy of the shared store, in a local redb file: what it serves from when
//! etcd cannot be reached, also after a restart. [`follow`] keeps it in step with the upstream
//! store through a watch (a full copy at first, and when the watch's revision was compacted),
//! and [`ReplicatedStore`] answers point reads from it while upstream is away, so the TLS path
//! still loads certificates by name during an outage.
//!
//! The copy keeps upstream's revisions, so a Snapshot loaded from it follows on from the same
//! revision once upstream is back. Locks and semaphores are left out: they mean something only
//! while their holders' leases live upstream.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redb::TableDefinition;
use tokio_util::sync::CancellationToken;

use super::dbfile::DbFile;
use super::embedded::{backend, decode_entry, encode_entry, read_page};
use crate::error::StoreError;
use crate::store::{
    EventKind, KeyValue, LeaseId, Page, PageRequest, Revision, Store, Txn, TxnOutcome, Watch,
    WatchBatch,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("replica_kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("replica_meta");
const META_REVISION: &str = "revision";
/// Keys that are coordination, not state.
const NOT_REPLICATED: [&str; 2] = ["locks/", "semaphores/"];
/// Keys read per page during a full copy.
const COPY_PAGE: usize = 1000;
const RETRY: Duration = Duration::from_millis(500);
/// Modest: the copy is read at start and on point reads during an outage only.
const CACHE_SIZE: usize = 16 * 1024 * 1024;

fn replicated(key: &str) -> bool {
    !NOT_REPLICATED.iter().any(|p| key.starts_with(p))
}

/// The local copy. Cheap to clone.
#[derive(Clone)]
pub struct Replica {
    db: Arc<DbFile>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("path", &self.db.path())
            .finish()
    }
}

impl Replica {
    pub async fn open(path: impl AsRef<Path>) -> Result<Replica, StoreError> {
        let open_path = path.as_ref().to_path_buf();
        let db = tokio::task::spawn_blocking(move || {
            let db = DbFile::open(&open_path, CACHE_SIZE)?;
            let wtx = db.begin_write()?;
            wtx.open_table(KV).map_err(backend)?;
            wtx.open_table(META).map_err(backend)?;
            wtx.commit().map_err(backend)?;
            Ok::<_, StoreError>(db)
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))??;
        Ok(Replica { db: Arc::new(db) })
    }

    pub fn path(&self) -> &Path {
        self.db.path()
    }

    /// See [`Store::release`].
    pub async fn release(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        blocking(move || {
            db.release();
            Ok(())
        })
        .await
    }

    /// See [`Store::reopen`].
    pub async fn reopen(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        blocking(move || db.reopen()).await
    }

    /// The upstream revision the copy is at; 0 for a copy never filled.
    pub async fn revision(&self) -> Result<Revision, StoreError> {
        let db = self.db.clone();
        blocking(move || {
            let rtx = db.begin_read()?;
            let meta = rtx.open_table(META).map_err(backend)?;
            Ok(meta
                .get(META_REVISION)
                .map_err(backend)?
                .map_or(0, |v| v.value()) as Revision)
        })
        .await
    }

    /// Applies watched changes, in order, in one transaction.
    pub async fn apply(&self, batches: Vec<WatchBatch>) -> Result<(), StoreError> {
        let db = self.db.clone();
        blocking(move || {
            let Some(last) = batches.last().map(|b| b.revision) else {
                return Ok(());
            };
            let wtx = db.begin_write()?;
            {
                let mut kv = wtx.open_table(KV).map_err(backend)?;
                for event in batches.iter().flat_map(|b| &b.events) {
                    match &event.kind {
                        EventKind::Put(entry) if replicated(&entry.key) => {
                            kv.insert(entry.key.as_str(), encode_entry(entry).as_slice())
                                .map_err(backend)?;
                        }
                        EventKind::Delete { key } if replicated(key) => {
                            kv.remove(key.as_str()).map_err(backend)?;
                        }
                        _ => {}
                    }
                }
                let mut meta = wtx.open_table(META).map_err(backend)?;
                meta.insert(META_REVISION, last as u64).map_err(backend)?;
            }
            wtx.commit().map_err(backend)
        })
        .await
    }

    /// Replaces the copy with everything upstream holds now, read page by page; the copy is
    /// then at the revision read before the first page (changes made during the copy are
    /// replayed from the watch on top, which ends in the same state). One transaction: a copy
    /// cut short by a crash leaves the previous one.
    pub async fn copy_from(&self, upstream: Arc<dyn Store>) -> Result<Revision, StoreError> {
        let start = upstream.current_revision().await?;
        let db = self.db.clone();
        let runtime = tokio::runtime::Handle::current();
        blocking(move || {
            let wtx = db.begin_write()?;
            {
                wtx.delete_table(KV).map_err(backend)?;
                let mut kv = wtx.open_table(KV).map_err(backend)?;
                let mut page = PageRequest::first(COPY_PAGE);
                loop {
                    let got = runtime.block_on(upstream.list("", page.clone()))?;
                    for entry in got.items.iter().filter(|e| replicated(&e.key)) {
                        kv.insert(entry.key.as_str(), encode_entry(entry).as_slice())
                            .map_err(backend)?;
                    }
                    page.after = got.items.last().map(|e| e.key.clone());
                    if !got.more {
                        break;
                    }
                }
                let mut meta = wtx.open_table(META).map_err(backend)?;
                meta.insert(META_REVISION, start as u64).map_err(backend)?;
            }
            wtx.commit().map_err(backend)?;
            Ok(start)
        })
        .await
    }

    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let db = self.db.clone();
        let key = key.to_string();
        blocking(move || {
            let rtx = db.begin_read()?;
            let kv = rtx.open_table(KV).map_err(backend)?;
            match kv.get(key.as_str()).map_err(backend)? {
                Some(v) => Ok(Some(decode_entry(&key, v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    pub async fn list(&self, prefix: &str, page: PageRequest) -> Result<Page, StoreError> {
        let db = self.db.clone();
        let prefix = prefix.to_string();
        blocking(move || {
            let rtx = db.begin_read()?;
            let meta = rtx.open_table(META).map_err(backend)?;
            let revision = meta
                .get(META_REVISION)
                .map_err(backend)?
                .map_or(0, |v| v.value()) as Revision;
            let kv = rtx.open_table(KV).map_err(backend)?;
            read_page(&kv, &prefix, &page, revision)
        })
        .await
    }

    /// The copy as a read-only [`Store`], to load a Snapshot from.
    pub fn reader(&self) -> Arc<dyn Store> {
        Arc::new(ReplicaReader(self.clone()))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("replica task failed: {e}")))?
}

/// Keeps `replica` in step with `upstream` until `shutdown`: a full copy when it was never
/// filled or its revision was compacted upstream, else a watch from where it is. Errors are
/// logged and retried; the copy only ever moves forward whole.
pub async fn follow(replica: Replica, upstream: Arc<dyn Store>, shutdown: CancellationToken) {
    loop {
        let step = async {
            let mut revision = replica.revision().await?;
            if revision == 0 {
                revision = replica.copy_from(upstream.clone()).await?;
                tracing::info!(revision, "local copy of the store filled");
            }
            let mut watch = match upstream.watch("", revision + 1).await {
                Err(StoreError::Compacted { .. }) => {
                    revision = replica.copy_from(upstream.clone()).await?;
                    tracing::info!(
                        revision,
                        "local copy of the store refilled after compaction"
                    );
                    upstream.watch("", revision + 1).await?
                }
                other => other?,
            };
            while let Some(first) = watch.next().await {
                let mut batches = vec![first?];
                while let Some(next) = watch.try_next() {
                    batches.push(next?);
                }
                replica.apply(batches).await?;
            }
            Ok::<(), StoreError>(())
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            result = step => match result {
                Ok(()) => return, // upstream closed: the node is stopping
                Err(StoreError::Compacted { .. }) => {
                    // Fell out of history while watching: the next round copies anew.
                    if let Err(e) = reset(&replica).await {
                        tracing::warn!(error = %e, "cannot reset the local copy of the store");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "local copy of the store paused"),
            },
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// Marks the copy as needing a full copy, keeping its contents to serve meanwhile.
async fn reset(replica: &Replica) -> Result<(), StoreError> {
    let db = replica.db.clone();
    blocking(move || {
        let wtx = db.begin_write()?;
        {
            let mut meta = wtx.open_table(META).map_err(backend)?;
            meta.insert(META_REVISION, 0).map_err(backend)?;
        }
        wtx.commit().map_err(backend)
    })
    .await
}

struct ReplicaReader(Replica);

fn read_only() -> StoreError {
    StoreError::Unavailable("the node's local copy of the store cannot be written".into())
}

#[async_trait]
impl Store for ReplicaReader {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.0.get(key).await
    }
    async fn list(&self, prefix: &str, page: PageRequest) -> Result<Page, StoreError> {
        self.0.list(prefix, page).await
    }
    async fn txn(&self, _: Txn) -> Result<TxnOutcome, StoreError> {
        Err(read_only())
    }
    async fn watch(&self, _: &str, _: Revision) -> Result<Watch, StoreError> {
        Err(read_only())
    }
    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.0.revision().await
    }
    async fn grant_lease(&self, _: Duration) -> Result<LeaseId, StoreError> {
        Err(read_only())
    }
    async fn keep_alive(&self, _: LeaseId) -> Result<(), StoreError> {
        Err(read_only())
    }
    async fn revoke_lease(&self, _: LeaseId) -> Result<(), StoreError> {
        Err(read_only())
    }
    async fn compact(&self, _: Revision) -> Result<(), StoreError> {
        Err(read_only())
    }
}

/// The fleet's store as a node uses it: everything goes upstream, and a point read that
/// cannot reach upstream is answered from the local copy, so a handshake for a name not in the
/// certificate cache still completes during an outage.
pub struct ReplicatedStore {
    upstream: Arc<dyn Store>,
    replica: Replica,
    /// While upstream is away: until when (ms since the epoch) point reads go straight to the
    /// copy, so a handshake does not wait out a request timeout each time. 0: upstream is up.
    copy_until_ms: AtomicU64,
    /// One read at a time tries upstream again once that time has passed.
    probing: AtomicBool,
}

/// How long point reads go to the copy before upstream is tried again.
const COPY_WINDOW_MS: u64 = 1000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ReplicatedStore {
    pub fn new(upstream: Arc<dyn Store>, replica: Replica) -> Self {
        ReplicatedStore {
            upstream,
            replica,
            copy_until_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    pub fn upstream(&self) -> &Arc<dyn Store> {
        &self.upstream
    }
}

impl ReplicatedStore {
    /// Upstream's answer, or the copy's when upstream could not be reached.
    async fn answer(
        &self,
        key: &str,
        got: Result<Option<KeyValue>, StoreError>,
    ) -> Result<Option<KeyValue>, StoreError> {
        match got {
            Err(StoreError::Unavailable(reason)) => {
                if self
                    .copy_until_ms
                    .swap(now_ms() + COPY_WINDOW_MS, Ordering::Relaxed)
                    == 0
                {
                    tracing::warn!(%reason, "store unreachable: point reads come from the local copy");
                }
                self.replica.get(key).await
            }
            other => {
                if self.copy_until_ms.swap(0, Ordering::Relaxed) != 0 {
                    tracing::info!("store reachable again: point reads go to it");
                }
                other
            }
        }
    }
}

#[async_trait]
impl Store for ReplicatedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let until = self.copy_until_ms.load(Ordering::Relaxed);
        if until != 0 {
            // Upstream was away a moment ago: the copy answers, and one read at a time (once
            // the window has passed) tries upstream again.
            if now_ms() < until || self.probing.swap(true, Ordering::Acquire) {
                return self.replica.get(key).await;
            }
            let probe = self.upstream.get(key).await;
            self.probing.store(false, Ordering::Release);
            return self.answer(key, probe).await;
        }
        let got = self.upstream.get(key).await;
        self.answer(key, got).await
    }
    async fn list(&self, prefix: &str, page: PageRequest) -> Result<Page, StoreError> {
        self.upstream.list(prefix, page).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.upstream.txn(txn).await
    }
    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        self.upstream.watch(prefix, from).await
    }
    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.upstream.current_revision().await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.upstream.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.upstream.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.upstream.revoke_lease(lease).await
    }
    async fn release(&self) -> Result<(), StoreError> {
        self.replica.release().await
    }

    async fn reopen(&self) -> Result<(), StoreError> {
        self.replica.reopen().await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.upstream.compact(revision).await
    }
}
