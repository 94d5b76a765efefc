//! A distributed lock over the store's primitives, the way etcd's own `concurrency` package does
//! it: each contender puts `locks/<name>/<lease>` with its lease; the key with the lowest create
//! revision holds the lock; the others wait for the deletion of the key just before theirs. The
//! holder's create revision only grows from holder to holder, so it is the fencing token that
//! writes guarded by the lock carry.

use crate::error::StoreError;
use crate::store::{EventKind, LeaseId, Revision, Store, Txn};

/// A held lock. Release it with [`LockGuard::unlock`]; if the holder dies, its lease expires and
/// the lock passes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockGuard {
    pub key: String,
    pub lease: LeaseId,
    /// Grows strictly from one holder to the next: writers compare it to reject stale holders.
    pub fencing_token: Revision,
}

impl LockGuard {
    pub async fn unlock(self, store: &dyn Store) -> Result<(), StoreError> {
        store.delete(&self.key).await.map(|_| ())
    }
}

/// Waits until this lease holds the lock `name`.
pub async fn lock(store: &dyn Store, name: &str, lease: LeaseId) -> Result<LockGuard, StoreError> {
    let prefix = format!("locks/{name}/");
    let key = format!("{prefix}{:016x}", lease.0);
    store.txn(Txn::claim(&key, lease)).await?;
    loop {
        let (contenders, revision) = store.list_all(&prefix).await?;
        let Some(mine) = contenders.iter().find(|kv| kv.key == key) else {
            // Our key went away: the lease expired while we waited.
            return Err(StoreError::LeaseNotFound(lease.0));
        };
        let predecessor = contenders
            .iter()
            .filter(|kv| kv.create_revision < mine.create_revision)
            .max_by_key(|kv| kv.create_revision);
        let Some(predecessor) = predecessor else {
            return Ok(LockGuard {
                key,
                lease,
                fencing_token: mine.create_revision,
            });
        };
        let mut watch = store.watch(&predecessor.key, revision + 1).await?;
        'wait: while let Some(batch) = watch.next().await {
            for event in batch?.events {
                if matches!(&event.kind, EventKind::Delete { key } if *key == predecessor.key) {
                    break 'wait;
                }
            }
        }
    }
}

/// Takes the lock `name` for this lease if nobody holds or waits for it; `None` when another
/// lease got there first (its holder does the work, and this caller need not wait for it).
pub async fn try_lock(
    store: &dyn Store,
    name: &str,
    lease: LeaseId,
) -> Result<Option<LockGuard>, StoreError> {
    let prefix = format!("locks/{name}/");
    let key = format!("{prefix}{:016x}", lease.0);
    store.txn(Txn::claim(&key, lease)).await?;
    let (contenders, _) = store.list_all(&prefix).await?;
    let Some(mine) = contenders.iter().find(|kv| kv.key == key) else {
        return Err(StoreError::LeaseNotFound(lease.0));
    };
    if contenders
        .iter()
        .any(|kv| kv.create_revision < mine.create_revision)
    {
        store.delete(&key).await?;
        return Ok(None);
    }
    Ok(Some(LockGuard {
        fencing_token: mine.create_revision,
        key,
        lease,
    }))
}

impl LockGuard {
    /// The condition a write guarded by this lock carries: it applies only while this holder
    /// still holds the lock (a holder whose lease expired, and whose lock passed on, writes
    /// nothing).
    pub fn fence(&self) -> crate::store::Compare {
        crate::store::Compare::ModRevision(self.key.clone(), self.fencing_token)
    }
}
