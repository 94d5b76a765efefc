//! The embedded store on redb: one file, ACID, fsync on every commit, so a node killed at any
//! moment reopens with exactly the writes it acknowledged.
//!
//! Every change is appended to a change log keyed by revision, in the same transaction as the
//! change itself; watchers read the log, so a watch can resume from any revision still kept,
//! exactly as from etcd's history.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use tokio::sync::{mpsc, watch};

use crate::error::StoreError;
use crate::store::{
    Compare, Event, EventKind, KeyValue, LeaseId, Op, Page, PageRequest, Revision, Store, Txn,
    TxnOutcome, Watch, WatchBatch, prefix_end,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// revision -> the events of that revision.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// lease id -> (ttl in ms, deadline in ms since the Unix epoch).
const LEASES: TableDefinition<u64, (u64, u64)> = TableDefinition::new("leases");
const LEASE_KEYS: MultimapTableDefinition<u64, &str> = MultimapTableDefinition::new("lease_keys");

const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";
const META_LEASE_SEQ: &str = "lease_seq";

/// Revisions of history kept for watchers that resume: at two changes a second, about 14 hours.
pub const DEFAULT_HISTORY: u64 = 100_000;
const LEASE_CHECK_INTERVAL: Duration = Duration::from_millis(100);
const WATCH_BUFFER: usize = 256;
const REOPEN_WAIT: Duration = Duration::from_secs(2);

/// The single-node store. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    history: u64,
    /// The latest committed revision; watchers wait on it.
    revision: watch::Sender<Revision>,
}

fn backend<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Backend(e.into().to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path` and starts expiring leases in the background.
    /// Must be called inside a tokio runtime.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_history(path, DEFAULT_HISTORY).await
    }

    pub async fn open_with_history(
        path: impl AsRef<Path>,
        history: u64,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let open_path = path.clone();
        let db = tokio::task::spawn_blocking(move || {
            // A store dropped in this process a moment ago may still be closing (its background
            // task finishing a lease check): wait for it, briefly, rather than fail.
            let deadline = Instant::now() + REOPEN_WAIT;
            loop {
                match Database::create(&open_path) {
                    Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    other => return other,
                }
            }
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
        .map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let current = {
            let wtx = db.begin_write().map_err(backend)?;
            // Create every table up front so readers never meet a missing one.
            wtx.open_table(KV).map_err(backend)?;
            wtx.open_table(LOG).map_err(backend)?;
            wtx.open_table(LEASES).map_err(backend)?;
            wtx.open_multimap_table(LEASE_KEYS).map_err(backend)?;
            let current = {
                let meta = wtx.open_table(META).map_err(backend)?;
                read_meta(&meta, META_REVISION)?
            };
            wtx.commit().map_err(backend)?;
            current
        };
        let (revision, _) = watch::channel(current as Revision);
        let inner = Arc::new(Inner {
            db,
            path,
            history: history.max(1),
            revision,
        });
        tokio::spawn(expire_leases(Arc::downgrade(&inner)));
        Ok(EmbeddedStore { inner })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }
}

fn read_meta<T: ReadableTable<&'static str, u64>>(meta: &T, key: &str) -> Result<u64, StoreError> {
    Ok(meta
        .get(key)
        .map_err(backend)?
        .map(|v| v.value())
        .unwrap_or(0))
}

// --- value encoding ---------------------------------------------------------------------------

const ENTRY_HEADER: usize = 32;

fn encode_entry(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENTRY_HEADER + kv.value.len());
    out.extend_from_slice(&(kv.create_revision as u64).to_le_bytes());
    out.extend_from_slice(&(kv.mod_revision as u64).to_le_bytes());
    out.extend_from_slice(&(kv.version as u64).to_le_bytes());
    out.extend_from_slice(&kv.lease.map(|l| l.0 as u64).unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn decode_entry(key: &str, bytes: &[u8]) -> Result<KeyValue, StoreError> {
    if bytes.len() < ENTRY_HEADER {
        return Err(StoreError::Corrupt {
            key: key.into(),
            reason: format!("entry of {} bytes is shorter than its header", bytes.len()),
        });
    }
    let lease = u64_at(bytes, 24);
    Ok(KeyValue {
        key: key.into(),
        create_revision: u64_at(bytes, 0) as i64,
        mod_revision: u64_at(bytes, 8) as i64,
        version: u64_at(bytes, 16) as i64,
        lease: (lease != 0).then_some(LeaseId(lease as i64)),
        value: bytes[ENTRY_HEADER..].to_vec(),
    })
}

const EVENT_PUT: u8 = 1;
const EVENT_DELETE: u8 = 2;

fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for event in events {
        let (tag, key, entry) = match &event.kind {
            EventKind::Put(kv) => (EVENT_PUT, kv.key.as_str(), encode_entry(kv)),
            EventKind::Delete { key } => (EVENT_DELETE, key.as_str(), Vec::new()),
        };
        out.push(tag);
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        out.extend_from_slice(&entry);
    }
    out
}

fn decode_events(revision: Revision, mut bytes: &[u8]) -> Result<Vec<Event>, StoreError> {
    let corrupt = || StoreError::Corrupt {
        key: format!("log/{revision}"),
        reason: "truncated event".into(),
    };
    let take = |n: usize, bytes: &mut &[u8]| -> Result<Vec<u8>, StoreError> {
        if bytes.len() < n {
            return Err(corrupt());
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Ok(head.to_vec())
    };
    let mut events = Vec::new();
    while !bytes.is_empty() {
        let tag = take(1, &mut bytes)?[0];
        let len = u32::from_le_bytes(take(4, &mut bytes)?.try_into().map_err(|_| corrupt())?);
        let key = String::from_utf8(take(len as usize, &mut bytes)?).map_err(|_| corrupt())?;
        let len = u32::from_le_bytes(take(4, &mut bytes)?.try_into().map_err(|_| corrupt())?);
        let entry = take(len as usize, &mut bytes)?;
        let kind = match tag {
            EVENT_PUT => EventKind::Put(decode_entry(&key, &entry)?),
            EVENT_DELETE => EventKind::Delete { key },
            _ => return Err(corrupt()),
        };
        events.push(Event { revision, kind });
    }
    Ok(events)
}

// --- writes -----------------------------------------------------------------------------------

impl Inner {
    /// Runs `change` in one write transaction that, if it produced events, gets the next
    /// revision and a log entry; then wakes the watchers.
    fn write<T>(
        &self,
        change: impl FnOnce(&WriteTransaction, Revision) -> Result<(T, Vec<Event>), StoreError>,
    ) -> Result<(T, Revision), StoreError> {
        let wtx = self.db.begin_write().map_err(backend)?;
        let current = {
            let meta = wtx.open_table(META).map_err(backend)?;
            read_meta(&meta, META_REVISION)? as Revision
        };
        let next = current + 1;
        let (out, events) = change(&wtx, next)?;
        if events.is_empty() {
            // Leases may have changed (grant, keep-alive) without a revision.
            wtx.commit().map_err(backend)?;
            return Ok((out, current));
        }
        {
            let mut log = wtx.open_table(LOG).map_err(backend)?;
            log.insert(next as u64, encode_events(&events).as_slice())
                .map_err(backend)?;
            let mut meta = wtx.open_table(META).map_err(backend)?;
            meta.insert(META_REVISION, next as u64).map_err(backend)?;
            // One old entry leaves for each new one, so the log stays at `history` entries
            // without a compaction pause.
            if next as u64 > self.history {
                let oldest_kept = next as u64 - self.history;
                log.remove(oldest_kept).map_err(backend)?;
                meta.insert(META_COMPACTED, oldest_kept).map_err(backend)?;
            }
        }
        wtx.commit().map_err(backend)?;
        self.revision.send_if_modified(|rev| {
            // Commits are serialized, but these notifications may race: never go backwards.
            let newer = next > *rev;
            if newer {
                *rev = next;
            }
            newer
        });
        Ok((out, next))
    }

    fn apply_txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let mut seen = HashSet::new();
        for ops in [&txn.success, &txn.failure] {
            seen.clear();
            for op in ops {
                let key = match op {
                    Op::Put { key, .. } | Op::Delete { key } => key,
                };
                if key.is_empty() {
                    return Err(StoreError::Invalid("a key cannot be empty".into()));
                }
                if !seen.insert(key.as_str()) {
                    return Err(StoreError::Invalid(format!(
                        "key `{key}` appears twice in one transaction"
                    )));
                }
            }
        }
        let (succeeded, revision) = self.write(|wtx, next| {
            let mut kv = wtx.open_table(KV).map_err(backend)?;
            let mut succeeded = true;
            for cmp in &txn.compare {
                let holds = match cmp {
                    Compare::Absent(key) => kv.get(key.as_str()).map_err(backend)?.is_none(),
                    Compare::Present(key) => kv.get(key.as_str()).map_err(backend)?.is_some(),
                    Compare::ModRevision(key, rev) => {
                        match kv.get(key.as_str()).map_err(backend)? {
                            Some(v) => decode_entry(key, v.value())?.mod_revision == *rev,
                            None => false,
                        }
                    }
                };
                if !holds {
                    succeeded = false;
                    break;
                }
            }
            let ops = if succeeded {
                &txn.success
            } else {
                &txn.failure
            };
            let leases = wtx.open_table(LEASES).map_err(backend)?;
            let mut lease_keys = wtx.open_multimap_table(LEASE_KEYS).map_err(backend)?;
            let mut events = Vec::with_capacity(ops.len());
            for op in ops {
                match op {
                    Op::Put { key, value, lease } => {
                        if let Some(lease) = lease
                            && leases.get(lease.0 as u64).map_err(backend)?.is_none()
                        {
                            return Err(StoreError::LeaseNotFound(lease.0));
                        }
                        let previous = match kv.get(key.as_str()).map_err(backend)? {
                            Some(v) => Some(decode_entry(key, v.value())?),
                            None => None,
                        };
                        if let Some(old) = previous.as_ref().and_then(|p| p.lease) {
                            lease_keys
                                .remove(old.0 as u64, key.as_str())
                                .map_err(backend)?;
                        }
                        if let Some(lease) = lease {
                            lease_keys
                                .insert(lease.0 as u64, key.as_str())
                                .map_err(backend)?;
                        }
                        let entry = KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision: previous.as_ref().map_or(next, |p| p.create_revision),
                            mod_revision: next,
                            version: previous.as_ref().map_or(1, |p| p.version + 1),
                            lease: *lease,
                        };
                        kv.insert(key.as_str(), encode_entry(&entry).as_slice())
                            .map_err(backend)?;
                        events.push(Event {
                            revision: next,
                            kind: EventKind::Put(entry),
                        });
                    }
                    Op::Delete { key } => {
                        let removed = match kv.remove(key.as_str()).map_err(backend)? {
                            Some(v) => Some(decode_entry(key, v.value())?),
                            None => None,
                        };
                        if let Some(old) = removed {
                            if let Some(lease) = old.lease {
                                lease_keys
                                    .remove(lease.0 as u64, key.as_str())
                                    .map_err(backend)?;
                            }
                            events.push(Event {
                                revision: next,
                                kind: EventKind::Delete { key: key.clone() },
                            });
                        }
                    }
                }
            }
            Ok((succeeded, events))
        })?;
        Ok(TxnOutcome {
            succeeded,
            revision,
        })
    }

    /// Deletes the leases in `ids` and every key attached to them, in one revision.
    fn end_leases(&self, ids: &[u64]) -> Result<(), StoreError> {
        self.write(|wtx, next| {
            let mut kv = wtx.open_table(KV).map_err(backend)?;
            let mut leases = wtx.open_table(LEASES).map_err(backend)?;
            let mut lease_keys = wtx.open_multimap_table(LEASE_KEYS).map_err(backend)?;
            let mut events = Vec::new();
            for id in ids {
                leases.remove(*id).map_err(backend)?;
                let keys: Vec<String> = lease_keys
                    .remove_all(*id)
                    .map_err(backend)?
                    .map(|k| k.map(|k| k.value().to_string()).map_err(backend))
                    .collect::<Result<_, _>>()?;
                for key in keys {
                    if kv.remove(key.as_str()).map_err(backend)?.is_some() {
                        events.push(Event {
                            revision: next,
                            kind: EventKind::Delete { key },
                        });
                    }
                }
            }
            Ok(((), events))
        })
        .map(|_| ())
    }

    fn expired_leases(&self, now: u64) -> Result<Vec<u64>, StoreError> {
        let rtx = self.db.begin_read().map_err(backend)?;
        let leases = rtx.open_table(LEASES).map_err(backend)?;
        let mut expired = Vec::new();
        for item in leases.iter().map_err(backend)? {
            let (id, value) = item.map_err(backend)?;
            let (_ttl, deadline) = value.value();
            if deadline <= now {
                expired.push(id.value());
            }
        }
        Ok(expired)
    }

    /// Log entries `from..=to` whose events fall under `prefix`.
    fn read_log(
        &self,
        prefix: &str,
        from: Revision,
        to: Revision,
    ) -> Result<Vec<WatchBatch>, StoreError> {
        let rtx = self.db.begin_read().map_err(backend)?;
        let meta = rtx.open_table(META).map_err(backend)?;
        let compacted = read_meta(&meta, META_COMPACTED)? as Revision;
        if from <= compacted {
            return Err(StoreError::Compacted {
                requested: from,
                compacted_through: compacted,
            });
        }
        let log = rtx.open_table(LOG).map_err(backend)?;
        let mut batches = Vec::new();
        for item in log.range(from as u64..=to as u64).map_err(backend)? {
            let (rev, bytes) = item.map_err(backend)?;
            let revision = rev.value() as Revision;
            let events: Vec<Event> = decode_events(revision, bytes.value())?
                .into_iter()
                .filter(|e| e.key().starts_with(prefix))
                .collect();
            if !events.is_empty() {
                batches.push(WatchBatch { revision, events });
            }
        }
        Ok(batches)
    }
}

async fn expire_leases(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(LEASE_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let result = tokio::task::spawn_blocking(move || {
            let expired = strong.expired_leases(now_ms())?;
            if !expired.is_empty() {
                strong.end_leases(&expired)?;
            }
            Ok::<_, StoreError>(expired.len())
        })
        .await;
        match result {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(leases = n, "leases expired"),
            Ok(Err(e)) => tracing::warn!(error = %e, "expiring leases failed; retrying"),
            Err(e) => tracing::warn!(error = %e, "lease expiry task failed; retrying"),
        }
    }
}

async fn run_watch(
    inner: Weak<Inner>,
    mut revisions: watch::Receiver<Revision>,
    prefix: String,
    mut next: Revision,
    tx: mpsc::Sender<Result<WatchBatch, StoreError>>,
) {
    loop {
        let current = *revisions.borrow_and_update();
        if next <= current {
            let Some(strong) = inner.upgrade() else {
                return;
            };
            let prefix = prefix.clone();
            let read = tokio::task::spawn_blocking(move || strong.read_log(&prefix, next, current))
                .await
                .unwrap_or_else(|e| Err(StoreError::Backend(e.to_string())));
            match read {
                Ok(batches) => {
                    for batch in batches {
                        if tx.send(Ok(batch)).await.is_err() {
                            return;
                        }
                    }
                    next = current + 1;
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        tokio::select! {
            changed = revisions.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_string();
        self.blocking(move |inner| {
            let rtx = inner.db.begin_read().map_err(backend)?;
            let kv = rtx.open_table(KV).map_err(backend)?;
            match kv.get(key.as_str()).map_err(backend)? {
                Some(v) => Ok(Some(decode_entry(&key, v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list(&self, prefix: &str, page: PageRequest) -> Result<Page, StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |inner| {
            let rtx = inner.db.begin_read().map_err(backend)?;
            let meta = rtx.open_table(META).map_err(backend)?;
            let revision = read_meta(&meta, META_REVISION)? as Revision;
            let kv = rtx.open_table(KV).map_err(backend)?;
            let start = match &page.after {
                Some(after) if after.as_str() >= prefix.as_str() => after.clone(),
                _ => prefix.clone(),
            };
            let end = prefix_end(&prefix);
            let range = match &end {
                Some(end) => kv.range::<&str>(start.as_str()..end.as_str()),
                None => kv.range::<&str>(start.as_str()..),
            }
            .map_err(backend)?;
            let limit = page.limit.max(1);
            let mut items = Vec::with_capacity(limit.min(1024));
            let mut more = false;
            for item in range {
                let (key, value) = item.map_err(backend)?;
                let key = key.value();
                if page.after.as_deref() == Some(key) || !key.starts_with(prefix.as_str()) {
                    continue;
                }
                if items.len() == limit {
                    more = true;
                    break;
                }
                items.push(decode_entry(key, value.value())?);
            }
            Ok(Page {
                items,
                revision,
                more,
            })
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.blocking(move |inner| inner.apply_txn(txn)).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<crate::store::Watch, StoreError> {
        let revisions = self.inner.revision.subscribe();
        let current = *revisions.borrow();
        let next = if from <= 0 { current + 1 } else { from };
        if next <= current {
            // Fail now rather than in the stream when the start is already gone.
            let prefix = prefix.to_string();
            self.blocking(move |inner| inner.read_log(&prefix, next, next).map(|_| ()))
                .await?;
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(run_watch(
            Arc::downgrade(&self.inner),
            revisions,
            prefix.to_string(),
            next,
            tx,
        ));
        Ok(Watch::new(rx))
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        Ok(*self.inner.revision.borrow())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl_ms = (ttl.as_millis() as u64).max(1);
        self.blocking(move |inner| {
            let (id, _) = inner.write(|wtx, _| {
                let mut meta = wtx.open_table(META).map_err(backend)?;
                let id = read_meta(&meta, META_LEASE_SEQ)? + 1;
                meta.insert(META_LEASE_SEQ, id).map_err(backend)?;
                let mut leases = wtx.open_table(LEASES).map_err(backend)?;
                leases
                    .insert(id, (ttl_ms, now_ms() + ttl_ms))
                    .map_err(backend)?;
                Ok((LeaseId(id as i64), Vec::new()))
            })?;
            Ok(id)
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |inner| {
            inner.write(|wtx, _| {
                let mut leases = wtx.open_table(LEASES).map_err(backend)?;
                let ttl = match leases.get(lease.0 as u64).map_err(backend)? {
                    Some(v) => v.value().0,
                    None => return Err(StoreError::LeaseNotFound(lease.0)),
                };
                leases
                    .insert(lease.0 as u64, (ttl, now_ms() + ttl))
                    .map_err(backend)?;
                Ok(((), Vec::new()))
            })?;
            Ok(())
        })
        .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |inner| inner.end_leases(&[lease.0 as u64]))
            .await
    }
}
