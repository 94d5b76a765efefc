//! The [`Store`] contract as async functions, so every backend's tests run the same checks: the
//! embedded store's in `config/tests/store.rs`, etcd's in `etcd/tests/`.
//!
//! Each function takes a `prefix` and touches only keys under it (and the lock and semaphore
//! names made from it), so it works on a store that holds other keys. No function assumes an
//! absolute revision, because etcd's do not start at 1; each compares revisions it saw itself.
//! They do assume that nothing else writes to the store while they run, since they check that a
//! write takes exactly one revision. A failed check panics, as a test's assertion does.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the calling test

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use crate::error::StoreError;
use crate::store::{
    Compare, Event, EventKind, LeaseId, Op, PageRequest, Revision, Store, Txn, Watch, lock,
    semaphore,
};

/// How long anything the contract waits for may take, even on a loaded machine.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// Pause between two looks in a poll loop; every loop also has [`DEADLINE`].
const POLL: Duration = Duration::from_millis(20);
/// Short enough for tests, long enough for etcd, whose shortest lease is about a second.
const SHORT_TTL: Duration = Duration::from_secs(1);
const LONG_TTL: Duration = Duration::from_secs(60);

/// Every contract function by name, for a backend's tests to run them all.
pub const ALL: &[&str] = &[
    "revisions_and_crud",
    "paging_in_key_order",
    "transactions",
    "compare_and_swap_conflicts",
    "watch_from_a_revision",
    "watch_from_a_compacted_revision",
    "leases",
    "lock_is_exclusive_and_passes_on",
    "semaphore_caps_holders",
];

/// Runs the contract function `name` (one of [`ALL`]).
pub async fn run(name: &str, store: &Arc<dyn Store>, prefix: &str) {
    match name {
        "revisions_and_crud" => revisions_and_crud(store, prefix).await,
        "paging_in_key_order" => paging_in_key_order(store, prefix).await,
        "transactions" => transactions(store, prefix).await,
        "compare_and_swap_conflicts" => compare_and_swap_conflicts(store, prefix).await,
        "watch_from_a_revision" => watch_from_a_revision(store, prefix).await,
        "watch_from_a_compacted_revision" => watch_from_a_compacted_revision(store, prefix).await,
        "leases" => leases(store, prefix).await,
        "lock_is_exclusive_and_passes_on" => lock_is_exclusive_and_passes_on(store, prefix).await,
        "semaphore_caps_holders" => semaphore_caps_holders(store, prefix).await,
        other => panic!("no contract function `{other}`"),
    }
}

async fn next_batch(watch: &mut Watch) -> Result<crate::store::WatchBatch, StoreError> {
    tokio::time::timeout(DEADLINE, watch.next())
        .await
        .expect("watch stalled")
        .expect("watch ended")
}

/// Polls `check` until it holds, failing after [`DEADLINE`].
async fn poll_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Puts and deletes give revisions, create/mod revisions and versions as etcd does.
pub async fn revisions_and_crud(store: &Arc<dyn Store>, prefix: &str) {
    let a = format!("{prefix}a");
    assert_eq!(store.get(&a).await.unwrap(), None);
    let before = store.current_revision().await.unwrap();

    let r1 = store.put(&a, b"1".to_vec()).await.unwrap();
    assert_eq!(r1, before + 1, "a write takes the next revision");
    let r2 = store.put(&a, b"2".to_vec()).await.unwrap();
    assert_eq!(r2, r1 + 1);
    assert_eq!(store.current_revision().await.unwrap(), r2);
    let kv = store.get(&a).await.unwrap().unwrap();
    assert_eq!(kv.key, a);
    assert_eq!(kv.value, b"2");
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r1, r2, 2)
    );
    assert_eq!(kv.lease, None);

    assert!(store.delete(&a).await.unwrap());
    assert!(
        !store.delete(&a).await.unwrap(),
        "deleting twice reports absence"
    );
    assert_eq!(store.get(&a).await.unwrap(), None);
    assert_eq!(
        store.current_revision().await.unwrap(),
        r2 + 1,
        "a delete of an absent key takes no revision"
    );

    let r4 = store.put(&a, b"3".to_vec()).await.unwrap();
    let kv = store.get(&a).await.unwrap().unwrap();
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r4, r4, 1),
        "a re-created key starts over"
    );
    let value = vec![0u8, 255, 7];
    store.put(&a, value.clone()).await.unwrap();
    assert_eq!(
        store.get(&a).await.unwrap().unwrap().value,
        value,
        "values are bytes"
    );
}

/// Pages come in key order, only from under the prefix, `after` exclusive, `more` exact.
pub async fn paging_in_key_order(store: &Arc<dyn Store>, prefix: &str) {
    let p = format!("{prefix}p/");
    for i in (0..25u8).rev() {
        store.put(&format!("{p}{i:02}"), vec![i]).await.unwrap();
    }
    // Keys that share the prefix's first bytes but are not under it.
    store
        .put(&format!("{prefix}p0"), b"outside".to_vec())
        .await
        .unwrap();
    store
        .put(&format!("{prefix}o/1"), b"outside".to_vec())
        .await
        .unwrap();
    let current = store.current_revision().await.unwrap();

    let mut seen = Vec::new();
    let mut page = PageRequest::first(10);
    let mut sizes = Vec::new();
    loop {
        let got = store.list(&p, page.clone()).await.unwrap();
        assert_eq!(
            got.revision, current,
            "a page names the revision it was read at"
        );
        sizes.push(got.items.len());
        seen.extend(got.items.iter().map(|kv| kv.key.clone()));
        if !got.more {
            break;
        }
        page.after = got.items.last().map(|kv| kv.key.clone());
    }
    assert_eq!(sizes, [10, 10, 5]);
    let expected: Vec<String> = (0..25).map(|i| format!("{p}{i:02}")).collect();
    assert_eq!(seen, expected);

    let exact = store.list(&p, PageRequest::first(25)).await.unwrap();
    assert_eq!(exact.items.len(), 25);
    assert!(!exact.more, "no more keys after exactly `limit`");
    let kv = &exact.items[3];
    assert_eq!(kv.value, [3]);

    let after_last = PageRequest {
        after: Some(format!("{p}24")),
        limit: 10,
    };
    let empty = store.list(&p, after_last).await.unwrap();
    assert!(empty.items.is_empty() && !empty.more);

    let (all, revision) = store.list_all(&p).await.unwrap();
    assert_eq!(all.len(), 25);
    assert_eq!(revision, current);
    let none = store
        .list(&format!("{prefix}nothing/"), PageRequest::first(10))
        .await
        .unwrap();
    assert!(none.items.is_empty() && !none.more);
}

/// Compares choose the branch; a branch's operations land together in one revision; a
/// transaction that writes nothing takes no revision; a malformed one is refused.
pub async fn transactions(store: &Arc<dyn Store>, prefix: &str) {
    let k = format!("{prefix}k");
    let (s, f) = (format!("{prefix}s"), format!("{prefix}f"));
    let rk = store.put(&k, b"v".to_vec()).await.unwrap();

    let holds = Txn {
        compare: vec![
            Compare::Present(k.clone()),
            Compare::ModRevision(k.clone(), rk),
            Compare::Absent(s.clone()),
        ],
        success: vec![Op::put(&s, b"yes".to_vec()), Op::delete(&k)],
        failure: vec![Op::put(&f, b"no".to_vec())],
    };
    let out = store.txn(holds.clone()).await.unwrap();
    assert!(out.succeeded);
    assert_eq!(out.revision, rk + 1, "several operations, one revision");
    let s_kv = store.get(&s).await.unwrap().unwrap();
    assert_eq!(s_kv.mod_revision, out.revision);
    assert_eq!(store.get(&k).await.unwrap(), None);
    assert_eq!(store.get(&f).await.unwrap(), None);

    // The same transaction again: every compare now fails, so the failure branch runs.
    let out = store.txn(holds).await.unwrap();
    assert!(!out.succeeded);
    assert_eq!(out.revision, rk + 2);
    assert_eq!(store.get(&f).await.unwrap().unwrap().value, b"no");
    assert_eq!(store.get(&s).await.unwrap().unwrap(), s_kv);

    // A failed compare with nothing in its failure branch writes nothing.
    let before = store.current_revision().await.unwrap();
    let out = store
        .txn(Txn {
            compare: vec![Compare::Absent(s.clone())],
            success: vec![Op::put(&s, b"again".to_vec())],
            failure: vec![],
        })
        .await
        .unwrap();
    assert!(!out.succeeded);
    assert_eq!(
        out.revision, before,
        "a failed transaction takes no revision"
    );
    assert_eq!(store.current_revision().await.unwrap(), before);

    // Many keys at once.
    let many: Vec<Op> = (0..50)
        .map(|i| Op::put(format!("{prefix}many/{i:02}"), vec![i]))
        .collect();
    let out = store
        .txn(Txn {
            success: many,
            ..Txn::default()
        })
        .await
        .unwrap();
    assert_eq!(out.revision, before + 1);
    let (all, _) = store.list_all(&format!("{prefix}many/")).await.unwrap();
    assert_eq!(all.len(), 50);
    assert!(all.iter().all(|kv| kv.mod_revision == out.revision));

    let dup = store
        .txn(Txn {
            success: vec![Op::put(&k, b"1".to_vec()), Op::delete(&k)],
            ..Txn::default()
        })
        .await;
    assert!(matches!(dup, Err(StoreError::Invalid(_))), "{dup:?}");
    assert_eq!(store.current_revision().await.unwrap(), out.revision);
}

/// Compare-and-swap: exactly one writer from a revision wins; a stale one loses.
pub async fn compare_and_swap_conflicts(store: &Arc<dyn Store>, prefix: &str) {
    let k = format!("{prefix}cas");
    let created = store
        .compare_and_swap(&k, None, b"v1".to_vec())
        .await
        .unwrap()
        .expect("create-if-absent of a new key");
    assert_eq!(
        store
            .compare_and_swap(&k, None, b"again".to_vec())
            .await
            .unwrap(),
        None,
        "create-if-absent fails on an existing key"
    );
    let swapped = store
        .compare_and_swap(&k, Some(created), b"v2".to_vec())
        .await
        .unwrap()
        .expect("swap from the current revision");
    assert!(swapped > created);
    assert_eq!(
        store
            .compare_and_swap(&k, Some(created), b"stale".to_vec())
            .await
            .unwrap(),
        None,
        "a writer holding an old revision loses"
    );
    assert_eq!(store.get(&k).await.unwrap().unwrap().value, b"v2");

    let tasks: Vec<_> = (0..8u8)
        .map(|i| {
            let (store, k) = (store.clone(), k.clone());
            tokio::spawn(async move {
                store
                    .compare_and_swap(&k, Some(swapped), vec![i])
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        winners += t.await.unwrap().is_some() as usize;
    }
    assert_eq!(winners, 1, "one of racing swaps from one revision wins");
}

/// Watches deliver each revision's changes under the prefix once, in order, one batch per
/// revision (a transaction's events together), live and replayed from history alike.
pub async fn watch_from_a_revision(store: &Arc<dyn Store>, prefix: &str) {
    let w = format!("{prefix}w/");
    let other = format!("{prefix}other");
    let mut live = store.watch(&w, 0).await.unwrap();

    let first = store.put(&format!("{w}a"), b"1".to_vec()).await.unwrap();
    store.put(&other, b"noise".to_vec()).await.unwrap();
    let txn = store
        .txn(Txn {
            success: vec![
                Op::put(format!("{w}b"), b"2".to_vec()),
                Op::put(format!("{w}c"), b"3".to_vec()),
                Op::delete(format!("{w}a")),
                Op::put(&other, b"noise again".to_vec()),
            ],
            ..Txn::default()
        })
        .await
        .unwrap()
        .revision;

    let writers: Vec<_> = (0..2)
        .map(|n| {
            let (store, w, other) = (store.clone(), w.clone(), other.clone());
            tokio::spawn(async move {
                for i in 0..30 {
                    let key = format!("{w}{n}/{}", i % 7);
                    if i % 5 == 4 {
                        store.delete(&key).await.unwrap();
                    } else {
                        store.put(&key, format!("{i}").into_bytes()).await.unwrap();
                    }
                    store.put(&other, b"noise".to_vec()).await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    // A marker: once the watch shows it, it has shown everything before.
    let end = store.put(&format!("{w}end"), Vec::new()).await.unwrap();

    let mut seen: Vec<(Revision, Vec<Event>)> = Vec::new();
    let mut last = 0;
    while last < end {
        let batch = next_batch(&mut live).await.unwrap();
        assert!(batch.revision > last, "revisions go forward, each once");
        last = batch.revision;
        assert!(!batch.events.is_empty());
        for e in &batch.events {
            assert!(e.key().starts_with(&w), "{} is outside the prefix", e.key());
            assert_eq!(e.revision, batch.revision);
        }
        seen.push((batch.revision, batch.events));
    }
    assert_eq!(last, end);
    assert_eq!(seen[0].0, first);
    match &seen[0].1[..] {
        [
            Event {
                kind: EventKind::Put(kv),
                ..
            },
        ] => {
            assert_eq!(kv.value, b"1");
            assert_eq!(
                (kv.create_revision, kv.mod_revision, kv.version),
                (first, first, 1)
            );
        }
        other => panic!("first batch: {other:?}"),
    }
    assert_eq!(seen[1].0, txn, "the noise between is not shown");
    let txn_keys: BTreeSet<String> = seen[1]
        .1
        .iter()
        .map(|e| match &e.kind {
            EventKind::Put(kv) => format!("put {}", kv.key),
            EventKind::Delete { key } => format!("delete {key}"),
        })
        .collect();
    let expected: BTreeSet<String> = [
        format!("put {w}b"),
        format!("put {w}c"),
        format!("delete {w}a"),
    ]
    .into();
    assert_eq!(txn_keys, expected, "a transaction's events in one batch");
    let puts = seen
        .iter()
        .flat_map(|(_, events)| events)
        .filter(|e| matches!(e.kind, EventKind::Put(_)))
        .count();
    // a, b, c, the writers' 2 x 24 puts, the marker.
    assert_eq!(puts, 3 + 48 + 1);

    // History replayed from the first revision is exactly what the live watch saw.
    let mut replay = store.watch(&w, first).await.unwrap();
    let mut replayed = Vec::new();
    while replayed.len() < seen.len() {
        let batch = next_batch(&mut replay).await.unwrap();
        replayed.push((batch.revision, batch.events));
    }
    assert_eq!(replayed, seen);

    // A watch from after the marker sees only what comes next.
    let mut later = store.watch(&w, end + 1).await.unwrap();
    let next = store.put(&format!("{w}next"), Vec::new()).await.unwrap();
    assert_eq!(next_batch(&mut later).await.unwrap().revision, next);
}

/// After compaction a watch from below it fails with `Compacted`; from above it works.
pub async fn watch_from_a_compacted_revision(store: &Arc<dyn Store>, prefix: &str) {
    let k = format!("{prefix}c/k");
    let mut revisions = Vec::new();
    for i in 0..5u8 {
        revisions.push(store.put(&k, vec![i]).await.unwrap());
    }
    let through = revisions[2];
    store.compact(through).await.unwrap();
    store
        .compact(revisions[0])
        .await
        .expect("compacting below what is compacted does nothing");

    let old = revisions[1];
    match store.watch(&format!("{prefix}c/"), old).await {
        Err(StoreError::Compacted {
            requested,
            compacted_through,
        }) => {
            assert_eq!(requested, old);
            assert!(compacted_through >= old);
        }
        Err(e) => panic!("watch from a compacted revision: {e}"),
        // A backend may also tell it in the stream, first thing.
        Ok(mut watch) => {
            let err = next_batch(&mut watch).await.expect_err("compacted");
            assert!(matches!(err, StoreError::Compacted { .. }), "{err}");
            let end = tokio::time::timeout(DEADLINE, watch.next()).await.unwrap();
            assert!(end.is_none(), "the watch ends after `Compacted`");
        }
    }

    let mut kept = store
        .watch(&format!("{prefix}c/"), through + 1)
        .await
        .unwrap();
    let batch = next_batch(&mut kept).await.unwrap();
    assert_eq!(batch.revision, revisions[3]);

    let current = store.current_revision().await.unwrap();
    let future = store.compact(current + 1000).await;
    assert!(matches!(future, Err(StoreError::Invalid(_))), "{future:?}");
}

/// Expiry deletes a lease's keys with a delete event; keep-alive holds them; revoke deletes at
/// once; an unknown lease is `LeaseNotFound` (revoking one is not an error).
pub async fn leases(store: &Arc<dyn Store>, prefix: &str) {
    let l = format!("{prefix}l/");
    let (short_key, kept_key) = (format!("{l}short"), format!("{l}kept"));
    // Taken before the grant: the lease cannot end sooner than its TTL after this.
    let granted = Instant::now();
    let short = store.grant_lease(SHORT_TTL).await.unwrap();
    let kept = store.grant_lease(SHORT_TTL).await.unwrap();
    assert_ne!(short, kept);
    let mut watch = store.watch(&l, 0).await.unwrap();
    store
        .put_with_lease(&short_key, b"x".to_vec(), short)
        .await
        .unwrap();
    store
        .put_with_lease(&kept_key, b"y".to_vec(), kept)
        .await
        .unwrap();
    assert_eq!(
        store.get(&short_key).await.unwrap().unwrap().lease,
        Some(short)
    );

    let start = Instant::now();
    while store.get(&short_key).await.unwrap().is_some() {
        assert!(start.elapsed() < DEADLINE, "lease did not expire");
        store.keep_alive(kept).await.unwrap();
        tokio::time::sleep(POLL).await;
    }
    // Whole milliseconds (or seconds) on the store's side: allow for truncation.
    let lived = granted.elapsed();
    assert!(
        lived >= SHORT_TTL - Duration::from_millis(10),
        "expired early: {lived:?}"
    );
    assert!(
        store.get(&kept_key).await.unwrap().is_some(),
        "a kept-alive lease lives on"
    );

    let mut deleted = None;
    while deleted.is_none() {
        let batch = next_batch(&mut watch).await.unwrap();
        deleted = batch.events.into_iter().find_map(|e| match e.kind {
            EventKind::Delete { key } => Some(key),
            _ => None,
        });
    }
    assert_eq!(deleted, Some(short_key.clone()));

    let gone = store.keep_alive(short).await;
    assert!(
        matches!(gone, Err(StoreError::LeaseNotFound(_))),
        "{gone:?}"
    );
    let gone = store
        .put_with_lease(&format!("{l}again"), b"z".to_vec(), short)
        .await;
    assert!(
        matches!(gone, Err(StoreError::LeaseNotFound(_))),
        "{gone:?}"
    );
    assert_eq!(store.get(&format!("{l}again")).await.unwrap(), None);

    store.revoke_lease(kept).await.unwrap();
    assert_eq!(
        store.get(&kept_key).await.unwrap(),
        None,
        "revoke deletes at once"
    );
    store
        .revoke_lease(kept)
        .await
        .expect("revoking a lease that is gone is not an error");
    let unknown = store.keep_alive(LeaseId(0x7e57_0000_0001)).await;
    assert!(
        matches!(unknown, Err(StoreError::LeaseNotFound(_))),
        "{unknown:?}"
    );
}

/// Waits until `prefix` holds `n` keys: a contender has queued.
async fn wait_for_keys(store: &Arc<dyn Store>, prefix: &str, n: usize) {
    poll_until(&format!("{n} keys under {prefix}"), || async {
        store.list_all(prefix).await.unwrap().0.len() >= n
    })
    .await;
}

/// The lock is held by one lease at a time; fencing tokens grow from holder to holder; a
/// holder that unlocks or whose lease expires passes it on.
pub async fn lock_is_exclusive_and_passes_on(store: &Arc<dyn Store>, prefix: &str) {
    let name = format!("{prefix}lock");
    let queue = format!("locks/{name}/");
    let a = store.grant_lease(LONG_TTL).await.unwrap();
    let b = store.grant_lease(LONG_TTL).await.unwrap();
    let held = lock(store.as_ref(), &name, a).await.unwrap();

    let contender = {
        let (store, name) = (store.clone(), name.clone());
        tokio::spawn(async move { lock(store.as_ref(), &name, b).await.unwrap() })
    };
    wait_for_keys(store, &queue, 2).await;
    assert!(
        !contender.is_finished(),
        "a second holder got the lock while the first held it"
    );
    let first_token = held.fencing_token;
    held.unlock(store.as_ref()).await.unwrap();
    let second = tokio::time::timeout(DEADLINE, contender)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.lease, b);
    assert!(second.fencing_token > first_token);

    // A holder that dies: its lease is not kept alive, and expires.
    let dying = store.grant_lease(SHORT_TTL).await.unwrap();
    let second_token = second.fencing_token;
    second.unlock(store.as_ref()).await.unwrap();
    let doomed = lock(store.as_ref(), &name, dying).await.unwrap();
    let c = store.grant_lease(LONG_TTL).await.unwrap();
    let waiter = {
        let (store, name) = (store.clone(), name.clone());
        tokio::spawn(async move { lock(store.as_ref(), &name, c).await.unwrap() })
    };
    let third = tokio::time::timeout(DEADLINE, waiter)
        .await
        .expect("the lock passes on when its holder's lease expires")
        .unwrap();
    assert_eq!(third.lease, c);
    assert!(third.fencing_token > doomed.fencing_token);
    assert!(doomed.fencing_token > second_token);
    third.unlock(store.as_ref()).await.unwrap();
    for lease in [a, b, c] {
        store.revoke_lease(lease).await.unwrap();
    }
}

/// A semaphore's cap holds among holders with different leases, is reached, and a dead
/// holder's slots free themselves when its lease expires.
pub async fn semaphore_caps_holders(store: &Arc<dyn Store>, prefix: &str) {
    let name = format!("{prefix}orders");
    let slots = format!("semaphores/{name}/");
    let nodes = [
        store.grant_lease(LONG_TTL).await.unwrap(),
        store.grant_lease(LONG_TTL).await.unwrap(),
    ];
    let holding = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (store, holding, most) = (store.clone(), holding.clone(), most.clone());
            let (name, lease) = (name.clone(), nodes[i % 2]);
            tokio::spawn(async move {
                for _ in 0..2 {
                    let slot = semaphore::acquire(store.as_ref(), &name, 3, lease)
                        .await
                        .unwrap();
                    let now = holding.fetch_add(1, SeqCst) + 1;
                    most.fetch_max(now, SeqCst);
                    assert!(now <= 3, "{now} holders of 3 slots");
                    // Work done under the slot, long enough for holders to overlap.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    holding.fetch_sub(1, SeqCst);
                    slot.release(store.as_ref()).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    }
    assert!(most.load(SeqCst) <= 3);
    assert!(store.list_all(&slots).await.unwrap().0.is_empty());

    // The cap is reached, not just respected: a dying node takes every slot; the other node's
    // waiter gets one only when the dying node's lease expires.
    let dying = store.grant_lease(SHORT_TTL).await.unwrap();
    for _ in 0..3 {
        semaphore::acquire(store.as_ref(), &name, 3, dying)
            .await
            .unwrap();
    }
    let waiter = {
        let (store, name) = (store.clone(), name.clone());
        tokio::spawn(async move {
            semaphore::acquire(store.as_ref(), &name, 3, nodes[1])
                .await
                .unwrap()
        })
    };
    let (held, _) = store.list_all(&slots).await.unwrap();
    assert_eq!(held.len(), 3);
    assert!(held.iter().all(|kv| kv.lease == Some(dying)));
    assert!(!waiter.is_finished(), "a fourth holder of 3 slots");
    let slot = tokio::time::timeout(DEADLINE, waiter)
        .await
        .expect("a dead holder's slots free")
        .unwrap();
    assert!(slot.key.starts_with(&slots));
    let (held, _) = store.list_all(&slots).await.unwrap();
    assert_eq!(held.len(), 1);
    slot.release(store.as_ref()).await.unwrap();
    for lease in nodes {
        store.revoke_lease(lease).await.unwrap();
    }
}
