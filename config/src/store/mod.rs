//! The state store: the one place platform state is written, shaped after etcd v3 so the fleet
//! backend is a thin adapter. A global revision orders every change; a prefix can be watched from
//! any revision still kept; leases expire keys; transactions compare revisions and apply several
//! operations atomically; locks and semaphores are built on those primitives, and locks carry a
//! fencing token.

#[cfg(feature = "contract")]
pub mod contract;
mod dbfile;
mod embedded;
pub mod lock;
mod replica;
pub mod semaphore;

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub use embedded::{DEFAULT_HISTORY, EmbeddedStore};
pub use lock::LockGuard;
pub use replica::{Replica, ReplicatedStore, follow as follow_into_replica};

use crate::error::StoreError;

/// Global revision: every committed change gets the next one. 0 means "none yet".
pub type Revision = i64;

/// A lease's id; keys attached to a lease are deleted when it expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the put that created the key (stays across updates).
    pub create_revision: Revision,
    /// Revision of the last put.
    pub mod_revision: Revision,
    /// Number of puts since creation.
    pub version: i64,
    pub lease: Option<LeaseId>,
}

/// A condition of a [`Txn`], as etcd's `Compare`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists (any value).
    Present(String),
    /// The key's last modification is exactly this revision.
    ModRevision(String, Revision),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete { key: key.into() }
    }

    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// If every comparison holds, apply `success`, else `failure`; atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    /// What every backend refuses, as etcd does: an empty key, or a key written twice in one
    /// branch.
    pub fn check_keys(&self) -> Result<(), StoreError> {
        let mut seen = std::collections::HashSet::new();
        for ops in [&self.success, &self.failure] {
            seen.clear();
            for key in ops.iter().map(Op::key) {
                if key.is_empty() {
                    return Err(StoreError::Invalid("a key cannot be empty".into()));
                }
                if !seen.insert(key) {
                    return Err(StoreError::Invalid(format!(
                        "key `{key}` appears twice in one transaction"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Puts an empty `key` held by `lease`, unless the key exists: how a lease claims a lock's
    /// queue place or a semaphore's slot.
    pub fn claim(key: &str, lease: LeaseId) -> Txn {
        Txn {
            compare: vec![Compare::Absent(key.to_string())],
            success: vec![Op::Put {
                key: key.to_string(),
                value: Vec::new(),
                lease: Some(lease),
            }],
            failure: vec![],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnOutcome {
    pub succeeded: bool,
    /// The store's revision after the transaction (unchanged when nothing was written).
    pub revision: Revision,
}

/// Where a listing page starts and how long it is. Keys come in byte order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// Start strictly after this key (the last key of the previous page).
    pub after: Option<String>,
    pub limit: usize,
}

impl PageRequest {
    pub fn first(limit: usize) -> Self {
        PageRequest { after: None, limit }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<KeyValue>,
    /// The store's revision the page was read at: watch from `revision + 1` to follow on.
    pub revision: Revision,
    /// More keys follow; ask again with `after` = the last key here.
    pub more: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put(KeyValue),
    Delete { key: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub revision: Revision,
    pub kind: EventKind,
}

impl Event {
    pub fn key(&self) -> &str {
        match &self.kind {
            EventKind::Put(kv) => &kv.key,
            EventKind::Delete { key } => key,
        }
    }
}

/// The changes of one revision under a watched prefix, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    pub revision: Revision,
    pub events: Vec<Event>,
}

/// A stream of changes under a prefix. Batches arrive in revision order, each revision once.
/// `None` means the store closed; an error (e.g. [`StoreError::Compacted`]) ends the watch and
/// the caller re-reads the prefix, as with etcd.
pub struct Watch {
    rx: mpsc::Receiver<Result<WatchBatch, StoreError>>,
}

impl Watch {
    pub fn new(rx: mpsc::Receiver<Result<WatchBatch, StoreError>>) -> Self {
        Watch { rx }
    }

    pub async fn next(&mut self) -> Option<Result<WatchBatch, StoreError>> {
        self.rx.recv().await
    }

    /// A batch that is already waiting, without blocking: lets a consumer coalesce bursts.
    pub fn try_next(&mut self) -> Option<Result<WatchBatch, StoreError>> {
        self.rx.try_recv().ok()
    }
}

/// The state store. Implemented by [`EmbeddedStore`] (redb) and, for the fleet, by etcd.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Keys under `prefix`, in byte order, one page at a time.
    async fn list(&self, prefix: &str, page: PageRequest) -> Result<Page, StoreError>;

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;

    /// Changes under `prefix` with revision >= `from` (0: from the next change on).
    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError>;

    async fn current_revision(&self) -> Result<Revision, StoreError>;

    /// Drops the history at or below `revision`: a watch from a revision that old fails with
    /// [`StoreError::Compacted`], and the space it took comes back. Compacting below what is
    /// already compacted does nothing; above the current revision is [`StoreError::Invalid`].
    /// (etcd keeps the events of `revision` itself; a watch from below it fails there too.)
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Renews a lease for its full TTL again.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Ends a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Lets go of the local files so the process a reload starts can open them, until
    /// [`Store::reopen`]; in between, reads and writes fail as [`StoreError::Unavailable`].
    /// Nothing to do for a store other processes share anyway.
    async fn release(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Takes the files back after [`Store::release`] (the new process failed).
    async fn reopen(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        let out = self
            .txn(Txn {
                success: vec![Op::put(key, value)],
                ..Txn::default()
            })
            .await?;
        Ok(out.revision)
    }

    async fn put_with_lease(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<Revision, StoreError> {
        let op = Op::Put {
            key: key.into(),
            value,
            lease: Some(lease),
        };
        let out = self
            .txn(Txn {
                success: vec![op],
                ..Txn::default()
            })
            .await?;
        Ok(out.revision)
    }

    /// Deletes a key; true when it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let out = self
            .txn(Txn {
                compare: vec![Compare::Present(key.into())],
                success: vec![Op::delete(key)],
                failure: vec![],
            })
            .await?;
        Ok(out.succeeded)
    }

    /// Writes `value` only if the key is still at `expected` (`None`: absent). On a conflict
    /// returns `Ok(None)`; the caller re-reads and decides.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Revision>,
        value: Vec<u8>,
    ) -> Result<Option<Revision>, StoreError> {
        let compare = match expected {
            Some(rev) => Compare::ModRevision(key.into(), rev),
            None => Compare::Absent(key.into()),
        };
        let out = self
            .txn(Txn {
                compare: vec![compare],
                success: vec![Op::put(key, value)],
                failure: vec![],
            })
            .await?;
        Ok(out.succeeded.then_some(out.revision))
    }

    /// Every key under `prefix`, read page by page. The pages may come from different
    /// revisions; the returned revision is the last page's. Use a watch to follow on.
    async fn list_all(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let mut items = Vec::new();
        let mut page = PageRequest::first(1000);
        loop {
            let got = self.list(prefix, page.clone()).await?;
            items.extend(got.items);
            if !got.more {
                return Ok((items, got.revision));
            }
            page.after = items.last().map(|kv| kv.key.clone());
        }
    }
}

/// The smallest key greater than every key starting with `prefix` (etcd's range end).
pub fn prefix_end(prefix: &str) -> Option<String> {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0x7f {
            bytes.push(last + 1);
            return String::from_utf8(bytes).ok();
        }
    }
    None
}

pub use lock::{lock, try_lock};
