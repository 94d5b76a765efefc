//! The embedded store on redb: one file, ACID, fsync on every commit, so a node killed at any
//! moment reopens with exactly the writes it acknowledged.
//!
//! Every change is appended to a change log keyed by revision, in the same transaction as the
//! change itself; watchers read the log, so a watch can resume from any revision still kept,
//! exactly as from etcd's history.
//!
//! Writes (transactions and every lease operation) go to one writer thread through a queue. It
//! takes the first write waiting and every other write that queued behind it, applies them in
//! queue order in one redb write transaction, each with its own revision and log entry as if
//! committed alone, commits once (one fsync for the group), and only then answers each caller.
//! A lone write therefore commits at once; under load, the writes that arrive while a commit is
//! syncing share the next one, which is what lets concurrent clients get well past one write
//! per fsync without giving up durability.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{
    MultimapTable, MultimapTableDefinition, ReadableTable, Table, TableDefinition, WriteTransaction,
};
use tokio::sync::{mpsc, oneshot, watch};

use super::dbfile::DbFile;
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

/// Revisions of history kept for watchers that resume, as etcd's compaction keeps a window.
///
/// This node's watchers are in-process (`SnapshotSync`, which every other part follows, and the
/// waiters of locks and semaphores): they read the log within moments of each commit, so history only matters to a watcher that
/// fell behind or restarted, and one that falls out of it gets [`StoreError::Compacted`] and
/// re-reads its prefix, as with etcd. 10,000 revisions is hours at the rate a platform changes
/// and still ten seconds at a burst of 1,000 writes a second, while keeping the log, whose
/// entries hold whole values (a watch event carries the value as of its revision, which a later
/// write may have replaced in the live table), to about 10,000 times a change's size (a service
/// creation is about 1 KiB, an issued certificate with its key a few KiB): megabytes, not the
/// hundreds that 100,000 revisions of certificates took.
pub const DEFAULT_HISTORY: u64 = 10_000;
/// The most memory redb may use to cache pages. Its default (1 GiB) fills as the file grows,
/// and the kernel's page cache holds the same pages again, so a node with a million services
/// would spend a gigabyte on a second copy. Proxy and DNS read the Snapshot; the store is read on
/// a request only when the TLS path's own bounded certificate cache misses, a point read whose
/// upper B-tree pages stay in these 64 MiB and whose leaf costs at most one `pread` served from
/// the kernel's page cache.
const CACHE_SIZE: usize = 64 * 1024 * 1024;
/// The most writes committed in one transaction, so that one group's work (and the latency of
/// its first caller) stays bounded when thousands queue at once.
const MAX_GROUP: usize = 1024;
const LEASE_CHECK_INTERVAL: Duration = Duration::from_millis(100);
const WATCH_BUFFER: usize = 256;

/// The single-node store. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

/// What the clones of one store share. When the last goes, the queue closes: the writer thread
/// finishes what is queued and ends, and with it the database file is closed.
struct Inner {
    shared: Arc<Shared>,
    queue: mpsc::UnboundedSender<Write>,
}

/// What the writer thread, readers and watchers use.
struct Shared {
    db: DbFile,
    history: u64,
    /// The latest committed revision; watchers wait on it.
    revision: watch::Sender<Revision>,
    /// Write transactions committed, to see (in tests) that writes are grouped.
    commits: AtomicU64,
}

pub(super) fn backend<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Backend(e.into().to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`, starts its writer thread and starts expiring
    /// leases in the background. Must be called inside a tokio runtime.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_history(path, DEFAULT_HISTORY).await
    }

    pub async fn open_with_history(
        path: impl AsRef<Path>,
        history: u64,
    ) -> Result<Self, StoreError> {
        let open_path = path.as_ref().to_path_buf();
        let history = history.max(1);
        let (db, current) = tokio::task::spawn_blocking(move || {
            // A store dropped in this process a moment ago may still be closing (its writer
            // thread finishing the last commit): the open waits for it, briefly, rather than
            // fail.
            let db = DbFile::open(&open_path, CACHE_SIZE)?;
            let current = prepare(&db, history)?;
            Ok::<_, StoreError>((db, current))
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))??;
        let (revision, _) = watch::channel(current as Revision);
        let shared = Arc::new(Shared {
            db,
            history,
            revision,
            commits: AtomicU64::new(0),
        });
        let (queue, writes) = mpsc::unbounded_channel();
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run_writer(&writer, writes))
            .map_err(|e| StoreError::Backend(format!("cannot start the store writer: {e}")))?;
        let inner = Arc::new(Inner { shared, queue });
        tokio::spawn(expire_leases(Arc::downgrade(&inner)));
        Ok(EmbeddedStore { inner })
    }

    pub fn path(&self) -> &Path {
        self.inner.shared.db.path()
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = self.inner.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }
}

/// Creates every table, so readers never meet a missing one, and drops the log entries beyond
/// `history` (a store last opened with a longer history). Returns the current revision.
fn prepare(db: &DbFile, history: u64) -> Result<u64, StoreError> {
    let wtx = db.begin_write()?;
    wtx.open_table(KV).map_err(backend)?;
    wtx.open_table(LEASES).map_err(backend)?;
    wtx.open_multimap_table(LEASE_KEYS).map_err(backend)?;
    let current = {
        let mut log = wtx.open_table(LOG).map_err(backend)?;
        let mut meta = wtx.open_table(META).map_err(backend)?;
        let current = read_meta(&meta, META_REVISION)?;
        trim_log(&mut log, &mut meta, current, history)?;
        current
    };
    wtx.commit().map_err(backend)?;
    Ok(current)
}

/// Removes the log entries older than the last `history` revisions before `current`.
fn trim_log(
    log: &mut Table<u64, &[u8]>,
    meta: &mut Table<&str, u64>,
    current: u64,
    history: u64,
) -> Result<(), StoreError> {
    let Some(oldest_gone) = current.checked_sub(history).filter(|r| *r > 0) else {
        return Ok(());
    };
    if read_meta(meta, META_COMPACTED)? >= oldest_gone {
        return Ok(());
    }
    // The range starts at the first entry still there, so this visits only what it removes:
    // as many entries as revisions were added since the last trim.
    log.retain_in(..=oldest_gone, |_, _| false)
        .map_err(backend)?;
    meta.insert(META_COMPACTED, oldest_gone).map_err(backend)?;
    Ok(())
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

pub(super) fn encode_entry(kv: &KeyValue) -> Vec<u8> {
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

/// What a write needs to know of an entry, read without copying its value.
struct Header {
    create_revision: Revision,
    mod_revision: Revision,
    version: i64,
    lease: Option<LeaseId>,
}

fn decode_header(key: &str, bytes: &[u8]) -> Result<Header, StoreError> {
    if bytes.len() < ENTRY_HEADER {
        return Err(StoreError::Corrupt {
            key: key.into(),
            reason: format!("entry of {} bytes is shorter than its header", bytes.len()),
        });
    }
    let lease = u64_at(bytes, 24);
    Ok(Header {
        create_revision: u64_at(bytes, 0) as i64,
        mod_revision: u64_at(bytes, 8) as i64,
        version: u64_at(bytes, 16) as i64,
        lease: (lease != 0).then_some(LeaseId(lease as i64)),
    })
}

/// One page of the keys under `prefix` of a table of encoded entries.
pub(super) fn read_page<T: ReadableTable<&'static str, &'static [u8]>>(
    kv: &T,
    prefix: &str,
    page: &PageRequest,
    revision: Revision,
) -> Result<Page, StoreError> {
    let start = match &page.after {
        Some(after) if after.as_str() >= prefix => after.as_str(),
        _ => prefix,
    };
    let end = prefix_end(prefix);
    let range = match &end {
        Some(end) => kv.range::<&str>(start..end.as_str()),
        None => kv.range::<&str>(start..),
    }
    .map_err(backend)?;
    let limit = page.limit.max(1);
    let mut items = Vec::with_capacity(limit.min(1024));
    let mut more = false;
    for item in range {
        let (key, value) = item.map_err(backend)?;
        let key = key.value();
        if page.after.as_deref() == Some(key) || !key.starts_with(prefix) {
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
}

pub(super) fn decode_entry(key: &str, bytes: &[u8]) -> Result<KeyValue, StoreError> {
    let header = decode_header(key, bytes)?;
    Ok(KeyValue {
        key: key.into(),
        create_revision: header.create_revision,
        mod_revision: header.mod_revision,
        version: header.version,
        lease: header.lease,
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

/// A caller's answer: filled in when its write is applied, sent once its group has committed.
struct Pending<T> {
    reply: oneshot::Sender<Result<T, StoreError>>,
    outcome: Option<Result<T, StoreError>>,
}

impl<T> Pending<T> {
    fn new(reply: oneshot::Sender<Result<T, StoreError>>) -> Self {
        Pending {
            reply,
            outcome: None,
        }
    }

    fn send(self, group_failure: Option<&StoreError>) {
        let result = match (group_failure, self.outcome) {
            (Some(e), _) => Err(e.clone()),
            (None, Some(outcome)) => outcome,
            // A committed group applied every write; this only guards the invariant.
            (None, None) => Err(StoreError::Backend("write was not applied".into())),
        };
        // A caller that went away (a cancelled request) still has its write committed, as a
        // client whose connection drops after sending does with any database.
        let _ = self.reply.send(result);
    }
}

/// One queued write, with where its answer goes.
enum Write {
    Txn(Txn, Pending<TxnOutcome>),
    Grant {
        ttl_ms: u64,
        pending: Pending<LeaseId>,
    },
    KeepAlive(LeaseId, Pending<()>),
    Compact(Revision, Pending<()>),
    /// Ends leases and deletes their keys, in one revision. With `expired_at`, only the leases
    /// whose deadline has passed by then: the sweep read them a moment ago and must not end one
    /// renewed since. Without, every lease named (a revoke).
    EndLeases {
        ids: Vec<u64>,
        expired_at: Option<u64>,
        pending: Pending<()>,
    },
}

/// Why a write was not applied.
enum Refusal {
    /// This write alone (a lease that does not exist, a corrupt entry it reads); it wrote
    /// nothing, so the rest of its group goes on.
    Write(StoreError),
    /// The transaction failed: the whole group fails.
    Group(StoreError),
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal::Group(e)
    }
}

/// Keeps a write's own refusal as its outcome; a group failure goes up.
fn settle<T>(applied: Result<T, Refusal>) -> Result<Result<T, StoreError>, StoreError> {
    match applied {
        Ok(v) => Ok(Ok(v)),
        Err(Refusal::Write(e)) => Ok(Err(e)),
        Err(Refusal::Group(e)) => Err(e),
    }
}

impl Write {
    fn apply(&mut self, t: &mut Tables<'_>) -> Result<(), StoreError> {
        match self {
            Write::Txn(txn, pending) => pending.outcome = Some(settle(t.txn(txn))?),
            Write::Grant { ttl_ms, pending } => {
                pending.outcome = Some(settle(t.grant(*ttl_ms))?);
            }
            Write::KeepAlive(lease, pending) => {
                pending.outcome = Some(settle(t.keep_alive(*lease))?);
            }
            Write::Compact(revision, pending) => {
                pending.outcome = Some(settle(t.compact(*revision))?);
            }
            Write::EndLeases {
                ids,
                expired_at,
                pending,
            } => pending.outcome = Some(settle(t.end_leases(ids, *expired_at))?),
        }
        Ok(())
    }

    fn answer(self, group_failure: Option<&StoreError>) {
        match self {
            Write::Txn(_, pending) => pending.send(group_failure),
            Write::Grant { pending, .. } => pending.send(group_failure),
            Write::KeepAlive(_, pending) => pending.send(group_failure),
            Write::Compact(_, pending) => pending.send(group_failure),
            Write::EndLeases { pending, .. } => pending.send(group_failure),
        }
    }
}

/// The writer thread: commits what is queued, group by group, until every handle is gone.
fn run_writer(shared: &Shared, mut queue: mpsc::UnboundedReceiver<Write>) {
    let mut group = Vec::new();
    while let Some(first) = queue.blocking_recv() {
        group.push(first);
        // No wait for more: only what queued while the last commit was syncing joins.
        while group.len() < MAX_GROUP
            && let Ok(write) = queue.try_recv()
        {
            group.push(write);
        }
        let failure = shared.commit_group(&mut group).err();
        if let Some(e) = &failure {
            tracing::warn!(error = %e, writes = group.len(), "a store commit failed");
        }
        for write in group.drain(..) {
            write.answer(failure.as_ref());
        }
    }
}

impl Shared {
    /// Applies `group` in order in one write transaction and commits it (one fsync), then wakes
    /// the watchers. Each write's own outcome is left in it; an error fails them all.
    fn commit_group(&self, group: &mut [Write]) -> Result<(), StoreError> {
        let wtx = self.db.begin_write()?;
        let (dirty, revision) = {
            let mut t = Tables::open(&wtx)?;
            let start = t.revision;
            for write in group.iter_mut() {
                write.apply(&mut t)?;
            }
            if t.revision > start {
                t.meta
                    .insert(META_REVISION, t.revision as u64)
                    .map_err(backend)?;
                // As many old entries leave as revisions came, so the log stays at `history`
                // entries without a compaction pause.
                trim_log(&mut t.log, &mut t.meta, t.revision as u64, self.history)?;
            }
            (t.dirty, t.revision)
        };
        if !dirty {
            // Only reads and refusals: nothing to make durable, so no fsync.
            wtx.abort().map_err(backend)?;
            return Ok(());
        }
        wtx.commit().map_err(backend)?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.revision.send_if_modified(|rev| {
            let newer = revision > *rev;
            if newer {
                *rev = revision;
            }
            newer
        });
        Ok(())
    }
}

/// The tables of one write transaction, opened once for its whole group, and where the group
/// has got to.
struct Tables<'t> {
    kv: Table<'t, &'static str, &'static [u8]>,
    log: Table<'t, u64, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
    leases: Table<'t, u64, (u64, u64)>,
    lease_keys: MultimapTable<'t, u64, &'static str>,
    /// The revision after the writes applied so far.
    revision: Revision,
    /// Something was written, so the transaction must commit.
    dirty: bool,
}

impl<'t> Tables<'t> {
    fn open(wtx: &'t WriteTransaction) -> Result<Self, StoreError> {
        let meta = wtx.open_table(META).map_err(backend)?;
        let revision = read_meta(&meta, META_REVISION)? as Revision;
        Ok(Tables {
            kv: wtx.open_table(KV).map_err(backend)?,
            log: wtx.open_table(LOG).map_err(backend)?,
            meta,
            leases: wtx.open_table(LEASES).map_err(backend)?,
            lease_keys: wtx.open_multimap_table(LEASE_KEYS).map_err(backend)?,
            revision,
            dirty: false,
        })
    }

    /// The entry's header, if the key exists. A corrupt entry refuses only the write reading it.
    fn header(&self, key: &str) -> Result<Option<Header>, Refusal> {
        match self.kv.get(key).map_err(backend)? {
            Some(v) => Ok(Some(decode_header(key, v.value()).map_err(Refusal::Write)?)),
            None => Ok(None),
        }
    }

    /// Gives `events` (all of the next revision) that revision and its log entry. Returns the
    /// revision the store is at after them: unchanged when there are none.
    fn record(&mut self, events: &[Event]) -> Result<Revision, StoreError> {
        if events.is_empty() {
            return Ok(self.revision);
        }
        let next = self.revision + 1;
        self.log
            .insert(next as u64, encode_events(events).as_slice())
            .map_err(backend)?;
        self.revision = next;
        self.dirty = true;
        Ok(next)
    }

    fn txn(&mut self, txn: &Txn) -> Result<TxnOutcome, Refusal> {
        let mut succeeded = true;
        for cmp in &txn.compare {
            let holds = match cmp {
                Compare::Absent(key) => self.kv.get(key.as_str()).map_err(backend)?.is_none(),
                Compare::Present(key) => self.kv.get(key.as_str()).map_err(backend)?.is_some(),
                Compare::ModRevision(key, rev) => {
                    self.header(key)?.is_some_and(|h| h.mod_revision == *rev)
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
        // Everything that can refuse the transaction is checked before any of it is written,
        // so a refusal leaves the group exactly as it was. (No key appears twice in `ops`, so
        // what is read here is still true when its op is applied.)
        let mut previous = Vec::with_capacity(ops.len());
        for op in ops {
            if let Op::Put {
                lease: Some(lease), ..
            } = op
                && self.leases.get(lease.0 as u64).map_err(backend)?.is_none()
            {
                return Err(Refusal::Write(StoreError::LeaseNotFound(lease.0)));
            }
            previous.push(self.header(op.key())?);
        }
        let next = self.revision + 1;
        let mut events = Vec::with_capacity(ops.len());
        for (op, previous) in ops.iter().zip(previous) {
            match op {
                Op::Put { key, value, lease } => {
                    if let Some(old) = previous.as_ref().and_then(|p| p.lease) {
                        self.lease_keys
                            .remove(old.0 as u64, key.as_str())
                            .map_err(backend)?;
                    }
                    if let Some(lease) = lease {
                        self.lease_keys
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
                    self.kv
                        .insert(key.as_str(), encode_entry(&entry).as_slice())
                        .map_err(backend)?;
                    events.push(Event {
                        revision: next,
                        kind: EventKind::Put(entry),
                    });
                }
                Op::Delete { key } => {
                    let Some(old) = previous else { continue };
                    self.kv.remove(key.as_str()).map_err(backend)?;
                    if let Some(lease) = old.lease {
                        self.lease_keys
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
        let revision = self.record(&events)?;
        Ok(TxnOutcome {
            succeeded,
            revision,
        })
    }

    fn grant(&mut self, ttl_ms: u64) -> Result<LeaseId, Refusal> {
        let id = read_meta(&self.meta, META_LEASE_SEQ)? + 1;
        self.meta.insert(META_LEASE_SEQ, id).map_err(backend)?;
        self.leases
            .insert(id, (ttl_ms, now_ms() + ttl_ms))
            .map_err(backend)?;
        self.dirty = true;
        Ok(LeaseId(id as i64))
    }

    fn keep_alive(&mut self, lease: LeaseId) -> Result<(), Refusal> {
        let ttl = match self.leases.get(lease.0 as u64).map_err(backend)? {
            Some(v) => v.value().0,
            None => return Err(Refusal::Write(StoreError::LeaseNotFound(lease.0))),
        };
        self.leases
            .insert(lease.0 as u64, (ttl, now_ms() + ttl))
            .map_err(backend)?;
        self.dirty = true;
        Ok(())
    }

    fn compact(&mut self, revision: Revision) -> Result<(), Refusal> {
        if revision > self.revision {
            return Err(Refusal::Write(StoreError::Invalid(format!(
                "cannot compact to revision {revision}: the store is at {}",
                self.revision
            ))));
        }
        if revision <= read_meta(&self.meta, META_COMPACTED)? as Revision {
            return Ok(());
        }
        self.log
            .retain_in(..=revision as u64, |_, _| false)
            .map_err(backend)?;
        self.meta
            .insert(META_COMPACTED, revision as u64)
            .map_err(backend)?;
        self.dirty = true;
        Ok(())
    }

    fn end_leases(&mut self, ids: &[u64], expired_at: Option<u64>) -> Result<(), Refusal> {
        let next = self.revision + 1;
        let mut events = Vec::new();
        for id in ids {
            let Some((_ttl, deadline)) = self.leases.get(*id).map_err(backend)?.map(|v| v.value())
            else {
                continue;
            };
            if expired_at.is_some_and(|now| deadline > now) {
                continue;
            }
            self.leases.remove(*id).map_err(backend)?;
            self.dirty = true;
            let keys: Vec<String> = self
                .lease_keys
                .remove_all(*id)
                .map_err(backend)?
                .map(|k| k.map(|k| k.value().to_string()).map_err(backend))
                .collect::<Result<_, _>>()?;
            for key in keys {
                if self.kv.remove(key.as_str()).map_err(backend)?.is_some() {
                    events.push(Event {
                        revision: next,
                        kind: EventKind::Delete { key },
                    });
                }
            }
        }
        self.record(&events)?;
        Ok(())
    }
}

impl Inner {
    /// Queues a write for the writer thread and waits for its group to commit.
    async fn submit<T>(&self, write: impl FnOnce(Pending<T>) -> Write) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(write(Pending::new(reply)))
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

// --- reads ------------------------------------------------------------------------------------

impl Shared {
    fn expired_leases(&self, now: u64) -> Result<Vec<u64>, StoreError> {
        let rtx = self.db.begin_read()?;
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
        let rtx = self.db.begin_read()?;
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
        // Looked for with a read, so a tick with nothing expired costs no commit.
        let shared = strong.shared.clone();
        let now = now_ms();
        let expired = tokio::task::spawn_blocking(move || shared.expired_leases(now))
            .await
            .unwrap_or_else(|e| Err(StoreError::Backend(format!("store task failed: {e}"))));
        let result = match expired {
            Ok(ids) if ids.is_empty() => Ok(0),
            Ok(ids) => {
                let n = ids.len();
                strong
                    .submit(|pending| Write::EndLeases {
                        ids,
                        expired_at: Some(now),
                        pending,
                    })
                    .await
                    .map(|()| n)
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(0) => {}
            Ok(n) => tracing::debug!(leases = n, "leases expired"),
            Err(e) => tracing::warn!(error = %e, "expiring leases failed; retrying"),
        }
    }
}

async fn run_watch(
    shared: Weak<Shared>,
    mut revisions: watch::Receiver<Revision>,
    prefix: String,
    mut next: Revision,
    tx: mpsc::Sender<Result<WatchBatch, StoreError>>,
) {
    loop {
        let current = *revisions.borrow_and_update();
        if next <= current {
            let Some(strong) = shared.upgrade() else {
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
        self.blocking(move |shared| {
            let rtx = shared.db.begin_read()?;
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
        self.blocking(move |shared| {
            let rtx = shared.db.begin_read()?;
            let meta = rtx.open_table(META).map_err(backend)?;
            let revision = read_meta(&meta, META_REVISION)? as Revision;
            let kv = rtx.open_table(KV).map_err(backend)?;
            read_page(&kv, &prefix, &page, revision)
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        txn.check_keys()?;
        self.inner.submit(|pending| Write::Txn(txn, pending)).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<crate::store::Watch, StoreError> {
        let revisions = self.inner.shared.revision.subscribe();
        let current = *revisions.borrow();
        let next = if from <= 0 { current + 1 } else { from };
        if next <= current {
            // Fail now rather than in the stream when the start is already gone.
            let prefix = prefix.to_string();
            self.blocking(move |shared| shared.read_log(&prefix, next, next).map(|_| ()))
                .await?;
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(run_watch(
            Arc::downgrade(&self.inner.shared),
            revisions,
            prefix.to_string(),
            next,
            tx,
        ));
        Ok(Watch::new(rx))
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        Ok(*self.inner.shared.revision.borrow())
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner
            .submit(|pending| Write::Compact(revision, pending))
            .await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl_ms = (ttl.as_millis() as u64).max(1);
        self.inner
            .submit(|pending| Write::Grant { ttl_ms, pending })
            .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner
            .submit(|pending| Write::KeepAlive(lease, pending))
            .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner
            .submit(|pending| Write::EndLeases {
                ids: vec![lease.0 as u64],
                expired_at: None,
                pending,
            })
            .await
    }

    async fn release(&self) -> Result<(), StoreError> {
        self.blocking(|shared| {
            shared.db.release();
            Ok(())
        })
        .await
    }

    async fn reopen(&self) -> Result<(), StoreError> {
        self.blocking(|shared| {
            shared.db.reopen()?;
            // The other process may have written meanwhile: watchers go on from there.
            let rtx = shared.db.begin_read()?;
            let meta = rtx.open_table(META).map_err(backend)?;
            let current = read_meta(&meta, META_REVISION)? as Revision;
            shared.revision.send_if_modified(|rev| {
                let newer = current > *rev;
                if newer {
                    *rev = current;
                }
                newer
            });
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

    use std::collections::BTreeMap;

    use redb::ReadableTableMetadata;

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(30);

    fn create(key: &str, value: &[u8]) -> Txn {
        Txn {
            compare: vec![Compare::Absent(key.into())],
            success: vec![Op::put(key, value)],
            failure: vec![],
        }
    }

    fn queued_txn(txn: Txn) -> (Write, oneshot::Receiver<Result<TxnOutcome, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        (Write::Txn(txn, Pending::new(reply)), answer)
    }

    fn log_len(shared: &Shared) -> u64 {
        let rtx = shared.db.begin_read().unwrap();
        rtx.open_table(LOG).unwrap().len().unwrap()
    }

    /// Commits `writes` as one group, as the writer thread would, and answers them.
    fn commit_as_one_group(shared: &Shared, mut writes: Vec<Write>) {
        let failure = shared.commit_group(&mut writes).err();
        assert!(failure.is_none(), "{failure:?}");
        for write in writes {
            write.answer(None);
        }
    }

    #[tokio::test]
    async fn a_group_applies_its_writes_in_order_as_if_committed_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_with_history(dir.path().join("s.redb"), 3)
            .await
            .unwrap();
        let shared = store.inner.shared.clone();

        let (lease_write, lease_answer) = {
            let (reply, answer) = oneshot::channel();
            let write = Write::Grant {
                ttl_ms: 60_000,
                pending: Pending::new(reply),
            };
            (write, answer)
        };
        let txns = vec![
            // Two creates of one key: the second sees the first.
            create("dup", b"first"),
            create("dup", b"second"),
            // A refused write between others changes nothing of theirs.
            Txn {
                success: vec![Op::Put {
                    key: "leased".into(),
                    value: b"x".to_vec(),
                    lease: Some(LeaseId(999)),
                }],
                ..Txn::default()
            },
            // A compare on the revision an earlier write of the group made.
            Txn {
                compare: vec![Compare::ModRevision("dup".into(), 1)],
                success: vec![Op::put("dup", b"swapped")],
                failure: vec![],
            },
        ];
        let mut writes = Vec::new();
        let mut answers = Vec::new();
        for txn in txns {
            let (write, answer) = queued_txn(txn);
            writes.push(write);
            answers.push(answer);
        }
        writes.push(lease_write);
        // The lease granted earlier in the group holds a key later in it.
        let leased = Txn {
            success: vec![Op::Put {
                key: "leased".into(),
                value: b"y".to_vec(),
                lease: Some(LeaseId(1)),
            }],
            ..Txn::default()
        };
        let delete_missing = Txn {
            compare: vec![Compare::Present("missing".into())],
            success: vec![Op::delete("missing")],
            failure: vec![],
        };
        let more = [leased, delete_missing]
            .into_iter()
            .chain(["a", "b", "c"].map(|k| Txn {
                success: vec![Op::put(k, k.as_bytes())],
                ..Txn::default()
            }));
        for txn in more {
            let (write, answer) = queued_txn(txn);
            writes.push(write);
            answers.push(answer);
        }
        let commits = shared.commits.load(Ordering::Relaxed);
        commit_as_one_group(&shared, writes);
        assert_eq!(shared.commits.load(Ordering::Relaxed), commits + 1);

        let outcomes: Vec<_> = answers
            .into_iter()
            .map(|mut a| a.try_recv().unwrap().map(|o| (o.succeeded, o.revision)))
            .collect();
        assert!(matches!(outcomes[2], Err(StoreError::LeaseNotFound(999))));
        let ok: Vec<_> = outcomes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, o)| *o.as_ref().unwrap())
            .collect();
        assert_eq!(
            ok,
            [
                (true, 1),
                (false, 1),
                (true, 2),
                (true, 3),
                (false, 3),
                (true, 4),
                (true, 5),
                (true, 6)
            ]
        );
        assert_eq!(lease_answer.await.unwrap().unwrap(), LeaseId(1));

        let dup = store.get("dup").await.unwrap().unwrap();
        assert_eq!(dup.value, b"swapped");
        assert_eq!(
            (dup.create_revision, dup.mod_revision, dup.version),
            (1, 2, 2)
        );
        assert_eq!(
            store.get("leased").await.unwrap().unwrap().lease,
            Some(LeaseId(1))
        );
        assert_eq!(store.current_revision().await.unwrap(), 6);

        // Six revisions in one transaction, history 3: three entries stay, three went.
        assert_eq!(log_len(&shared), 3);
        let err = store.watch("", 3).await.err().expect("revision 3 is gone");
        assert!(matches!(err, StoreError::Compacted { .. }), "{err}");
        let mut watch = store.watch("", 4).await.unwrap();
        for revision in 4..=6 {
            let batch = watch.next().await.unwrap().unwrap();
            assert_eq!(batch.revision, revision);
        }

        // A group with nothing to write (a compare that fails) commits nothing.
        let (write, mut answer) = queued_txn(create("a", b"again"));
        commit_as_one_group(&shared, vec![write]);
        assert_eq!(answer.try_recv().unwrap().unwrap().revision, 6);
        assert_eq!(shared.commits.load(Ordering::Relaxed), commits + 1);

        // The expiry sweep does not end a lease whose deadline moved past what it saw.
        let (reply, mut answer) = oneshot::channel();
        let sweep = Write::EndLeases {
            ids: vec![1],
            expired_at: Some(0),
            pending: Pending::new(reply),
        };
        commit_as_one_group(&shared, vec![sweep]);
        answer.try_recv().unwrap().unwrap();
        assert!(store.get("leased").await.unwrap().is_some());
        store.revoke_lease(LeaseId(1)).await.unwrap();
        assert!(store.get("leased").await.unwrap().is_none());
        assert_eq!(store.current_revision().await.unwrap(), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_get_consecutive_revisions_and_watchers_see_each() {
        const WRITERS: usize = 16;
        const TXNS: usize = 200;
        /// Every this many txns, all writers race to create one shared key.
        const RACE_EVERY: usize = 10;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path().join("s.redb"))
            .await
            .unwrap();
        let mut watch = store.watch("", 0).await.unwrap();

        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut acked = Vec::new();
                    for i in 0..TXNS {
                        let key = format!("own/{w}/{i}");
                        let out = store.txn(create(&key, key.as_bytes())).await.unwrap();
                        assert!(out.succeeded, "{key} existed");
                        acked.push((out.revision, key));
                        if i % RACE_EVERY == 0 {
                            let key = format!("race/{i}");
                            let out = store.txn(create(&key, &[w as u8])).await.unwrap();
                            if out.succeeded {
                                acked.push((out.revision, key));
                            }
                        }
                    }
                    acked
                })
            })
            .collect();
        // Each revision, the key its write created.
        let mut acked = BTreeMap::new();
        for task in tasks {
            for (revision, key) in tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap() {
                assert!(
                    acked.insert(revision, key).is_none(),
                    "revision {revision} twice"
                );
            }
        }
        let races = TXNS.div_ceil(RACE_EVERY);
        let total = WRITERS * TXNS + races;
        assert_eq!(
            acked.len(),
            total,
            "each race has exactly one winner, each write one revision"
        );
        assert_eq!(
            acked.keys().copied().collect::<Vec<_>>(),
            (1..=total as Revision).collect::<Vec<_>>(),
            "revisions are consecutive"
        );
        let commits = store.inner.shared.commits.load(Ordering::Relaxed);
        assert!(
            commits < total as u64,
            "{total} writes from {WRITERS} writers took {commits} commits: none grouped"
        );

        for (revision, key) in &acked {
            let kv = store
                .get(key)
                .await
                .unwrap()
                .expect("acknowledged write lost");
            assert_eq!(kv.mod_revision, *revision, "{key}");
        }
        let mut seen = 0;
        while seen < total as Revision {
            let batch = tokio::time::timeout(DEADLINE, watch.next())
                .await
                .expect("watch stalled")
                .unwrap()
                .unwrap();
            assert_eq!(batch.revision, seen + 1, "revisions in order, each once");
            seen = batch.revision;
            let keys: Vec<_> = batch.events.iter().map(|e| e.key()).collect();
            assert_eq!(keys, [acked[&seen].as_str()]);
        }
    }

    #[tokio::test]
    async fn a_shorter_history_trims_the_log_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = EmbeddedStore::open_with_history(&path, 100).await.unwrap();
        for i in 0..50u8 {
            store.put("k", vec![i]).await.unwrap();
        }
        assert_eq!(log_len(&store.inner.shared), 50);
        drop(store);

        let store = EmbeddedStore::open_with_history(&path, 10).await.unwrap();
        assert_eq!(log_len(&store.inner.shared), 10);
        let err = store
            .watch("", 40)
            .await
            .err()
            .expect("revision 40 is gone");
        assert!(matches!(err, StoreError::Compacted { .. }), "{err}");
        let mut watch = store.watch("", 41).await.unwrap();
        assert_eq!(watch.next().await.unwrap().unwrap().revision, 41);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn churn_leaves_the_file_and_the_log_bounded() {
        const HISTORY: u64 = 400;
        const KEYS: usize = 200;
        const WRITERS: usize = 8;
        const ROUNDS: usize = 4;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = EmbeddedStore::open_with_history(&path, HISTORY)
            .await
            .unwrap();
        // A service's worth of value.
        let value = vec![b'v'; 1000];
        // Each round creates every key and deletes it again: 2 x KEYS revisions, from several
        // writers at once, so groups carry several revisions (and several trims) each.
        let churn = |rounds: usize| {
            let tasks: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let (store, value) = (store.clone(), value.clone());
                    tokio::spawn(async move {
                        for _ in 0..rounds {
                            let keys: Vec<_> = (w..KEYS).step_by(WRITERS).collect();
                            for k in &keys {
                                store.put(&format!("k/{k}"), value.clone()).await.unwrap();
                            }
                            for k in &keys {
                                assert!(store.delete(&format!("k/{k}")).await.unwrap());
                            }
                        }
                    })
                })
                .collect();
            async move {
                for task in tasks {
                    tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
                }
            }
        };
        // Past the history first, so the log is full and every revision adds one, drops one.
        churn(ROUNDS).await;
        let after_n = std::fs::metadata(&path).unwrap().len();
        churn(ROUNDS).await;
        let after_2n = std::fs::metadata(&path).unwrap().len();
        assert_eq!(
            store.current_revision().await.unwrap(),
            (2 * ROUNDS * 2 * KEYS) as Revision
        );
        // Slack for redb growing its file by a region at a time.
        assert!(
            after_2n <= after_n + after_n / 10,
            "the file grew with churn alone: {after_n} then {after_2n} bytes"
        );
        assert_eq!(log_len(&store.inner.shared), HISTORY);
    }
}
