//! A counting semaphore over the store's primitives: at most `limit` holders of `name` among
//! every node sharing the store (the fleet's cap on concurrent ACME orders). A holder puts one
//! of the keys `semaphores/<name>/<slot>` with its lease; the compare-and-put makes a slot one
//! holder's, and a holder that dies frees its slots when its lease expires.

use std::collections::HashSet;

use crate::error::StoreError;
use crate::store::{EventKind, LeaseId, Store, Txn};

/// A held slot. Release it with [`SlotGuard::release`]; if the holder dies, its lease expires
/// and the slot frees itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotGuard {
    pub key: String,
}

impl SlotGuard {
    pub async fn release(self, store: &dyn Store) -> Result<(), StoreError> {
        store.delete(&self.key).await.map(|_| ())
    }
}

/// Waits until this lease holds one of the `limit` slots of `name`.
pub async fn acquire(
    store: &dyn Store,
    name: &str,
    limit: usize,
    lease: LeaseId,
) -> Result<SlotGuard, StoreError> {
    let limit = limit.max(1);
    let prefix = format!("semaphores/{name}/");
    // Holders start their search at different slots, so nodes racing for the last free ones
    // do not all compare the same key first.
    let start = (lease.0 as u64 as usize) % limit;
    loop {
        let (held, revision) = store.list_all(&prefix).await?;
        let taken: HashSet<&str> = held.iter().map(|kv| kv.key.as_str()).collect();
        for i in (0..limit).map(|i| (start + i) % limit) {
            let key = format!("{prefix}{i:05}");
            if taken.contains(key.as_str()) {
                continue;
            }
            if store.txn(Txn::claim(&key, lease)).await?.succeeded {
                return Ok(SlotGuard { key });
            }
        }
        // Every slot is held: wait for one to be freed (released, or its lease gone), then look
        // again; another waiter may take it first.
        let mut watch = store.watch(&prefix, revision + 1).await?;
        'wait: while let Some(batch) = watch.next().await {
            for event in batch?.events {
                if matches!(event.kind, EventKind::Delete { .. }) {
                    break 'wait;
                }
            }
        }
    }
}
