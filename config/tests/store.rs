//! The embedded store against the Store contract: CRUD, paging, compare-and-swap, ordered
//! watches, leases, locks, semaphores, and crash safety under SIGKILL.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_config::model::{Backend, IssuerRef, ServiceStatus};
use portcullis_config::store::{
    Compare, EmbeddedStore, EventKind, Op, PageRequest, Store, Txn, lock, semaphore,
};
use portcullis_config::{DomainName, ServiceId, State, StoreError};

const DEADLINE: Duration = Duration::from_secs(10);

async fn open(dir: &tempfile::TempDir) -> EmbeddedStore {
    EmbeddedStore::open(dir.path().join("state.redb"))
        .await
        .unwrap()
}

#[tokio::test]
async fn crud_and_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    assert_eq!(store.current_revision().await.unwrap(), 0);
    assert_eq!(store.get("a").await.unwrap(), None);

    let r1 = store.put("a", b"1".to_vec()).await.unwrap();
    let r2 = store.put("a", b"2".to_vec()).await.unwrap();
    assert_eq!((r1, r2), (1, 2));
    let kv = store.get("a").await.unwrap().unwrap();
    assert_eq!(kv.value, b"2");
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 2, 2));

    assert!(store.delete("a").await.unwrap());
    assert!(
        !store.delete("a").await.unwrap(),
        "deleting twice reports absence"
    );
    assert_eq!(store.get("a").await.unwrap(), None);
    assert_eq!(
        store.current_revision().await.unwrap(),
        3,
        "a no-op delete takes no revision"
    );

    store.put("a", b"3".to_vec()).await.unwrap();
    let kv = store.get("a").await.unwrap().unwrap();
    assert_eq!(
        (kv.create_revision, kv.version),
        (4, 1),
        "re-created key starts over"
    );
}

#[tokio::test]
async fn paging_in_key_order_within_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    for i in (0..25).rev() {
        store.put(&format!("p/{i:02}"), vec![i]).await.unwrap();
    }
    store.put("p0", b"outside".to_vec()).await.unwrap();
    store.put("o/1", b"outside".to_vec()).await.unwrap();

    let mut seen = Vec::new();
    let mut page = PageRequest::first(10);
    let mut pages = 0;
    loop {
        let got = store.list("p/", page.clone()).await.unwrap();
        pages += 1;
        assert!(got.items.len() <= 10);
        seen.extend(got.items.iter().map(|kv| kv.key.clone()));
        if !got.more {
            break;
        }
        page.after = got.items.last().map(|kv| kv.key.clone());
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..25).map(|i| format!("p/{i:02}")).collect();
    assert_eq!(seen, expected);
    let (all, rev) = store.list_all("p/").await.unwrap();
    assert_eq!(all.len(), 25);
    assert_eq!(rev, 27);
}

#[tokio::test]
async fn compare_and_swap_detects_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let created = store
        .compare_and_swap("k", None, b"v1".to_vec())
        .await
        .unwrap();
    assert_eq!(created, Some(1));
    assert_eq!(
        store
            .compare_and_swap("k", None, b"again".to_vec())
            .await
            .unwrap(),
        None,
        "create-if-absent must fail on an existing key"
    );
    let r2 = store
        .compare_and_swap("k", Some(1), b"v2".to_vec())
        .await
        .unwrap();
    assert_eq!(r2, Some(2));
    assert_eq!(
        store
            .compare_and_swap("k", Some(1), b"stale".to_vec())
            .await
            .unwrap(),
        None,
        "a writer holding an old revision loses"
    );
    assert_eq!(store.get("k").await.unwrap().unwrap().value, b"v2");

    // The failure branch runs when a compare does not hold; nothing of the success branch lands.
    let out = store
        .txn(Txn {
            compare: vec![Compare::ModRevision("k".into(), 1)],
            success: vec![Op::put("s", b"yes".to_vec())],
            failure: vec![Op::put("f", b"no".to_vec())],
        })
        .await
        .unwrap();
    assert!(!out.succeeded);
    assert_eq!(store.get("s").await.unwrap(), None);
    assert!(store.get("f").await.unwrap().is_some());

    // Racing writers: exactly one of many CAS attempts from the same revision wins.
    let base = store.get("k").await.unwrap().unwrap().mod_revision;
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .compare_and_swap("k", Some(base), vec![i])
                .await
                .unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += t.await.unwrap().is_some() as usize;
    }
    assert_eq!(winners, 1);

    let dup = store
        .txn(Txn {
            success: vec![Op::put("d", b"1".to_vec()), Op::delete("d")],
            ..Txn::default()
        })
        .await;
    assert!(matches!(dup, Err(StoreError::Invalid(_))), "{dup:?}");
}

#[tokio::test]
async fn watch_delivers_every_change_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    store.put("other/x", b"start".to_vec()).await.unwrap();
    let mut watch = store.watch("w/", 0).await.unwrap();

    let writers: Vec<_> = (0..2)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    let key = format!("w/{w}/{}", i % 7);
                    if i % 5 == 4 {
                        store.delete(&key).await.unwrap();
                    } else {
                        store.put(&key, format!("{i}").into_bytes()).await.unwrap();
                    }
                    store.put("other/x", b"noise".to_vec()).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    // A final marker under the watched prefix: once the watch shows it, it has shown the rest.
    let end = store.put("w/end", b"".to_vec()).await.unwrap();

    let mut live = Vec::new();
    let mut last = 0;
    while last < end {
        let batch = tokio::time::timeout(DEADLINE, watch.next())
            .await
            .expect("watch stalled")
            .unwrap()
            .unwrap();
        assert!(batch.revision > last, "revisions go forward");
        last = batch.revision;
        for e in batch.events {
            assert!(
                e.key().starts_with("w/"),
                "{} is outside the prefix",
                e.key()
            );
            assert_eq!(e.revision, batch.revision);
            live.push(e);
        }
    }
    assert_eq!(last, end);

    // The history replayed from revision 1 is exactly what the live watch saw.
    let mut replay = store.watch("w/", 1).await.unwrap();
    let mut history = Vec::new();
    while history.len() < live.len() {
        let batch = tokio::time::timeout(DEADLINE, replay.next())
            .await
            .expect("history replays without waiting")
            .unwrap()
            .unwrap();
        history.extend(batch.events);
    }
    assert_eq!(history, live);
    // 2 writers x 80 puts + the marker; each put is one event.
    let puts = live
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Put(_)))
        .count();
    assert_eq!(puts, 161);
    // And each delete of an existing key is one event, in between.
    assert!(
        live.iter()
            .any(|e| matches!(e.kind, EventKind::Delete { .. }))
    );
}

#[tokio::test]
async fn watch_from_a_compacted_revision_fails() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_with_history(dir.path().join("s.redb"), 10)
        .await
        .unwrap();
    for i in 0..30 {
        store.put("k", vec![i]).await.unwrap();
    }
    let err = store.watch("", 5).await.err().expect("revision 5 is gone");
    assert!(matches!(err, StoreError::Compacted { .. }), "{err}");
    let mut ok = store.watch("", 25).await.unwrap();
    let first = ok.next().await.unwrap().unwrap();
    assert_eq!(first.revision, 25);
}

#[tokio::test]
async fn leases_expire_keys_and_keep_alive_holds_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    // Taken before the grant: the lease cannot end sooner than its TTL after this.
    let granted = Instant::now();
    let short = store.grant_lease(Duration::from_millis(300)).await.unwrap();
    let kept = store.grant_lease(Duration::from_millis(300)).await.unwrap();
    let mut watch = store.watch("l/", 0).await.unwrap();
    store
        .put_with_lease("l/short", b"x".to_vec(), short)
        .await
        .unwrap();
    store
        .put_with_lease("l/kept", b"y".to_vec(), kept)
        .await
        .unwrap();

    let start = Instant::now();
    while store.get("l/short").await.unwrap().is_some() {
        assert!(start.elapsed() < DEADLINE, "lease did not expire");
        store.keep_alive(kept).await.unwrap();
        tokio::task::yield_now().await;
    }
    // Deadlines are kept in whole milliseconds: allow for the truncation.
    assert!(
        granted.elapsed() >= Duration::from_millis(298),
        "expired early: {:?}",
        granted.elapsed()
    );
    assert!(
        store.get("l/kept").await.unwrap().is_some(),
        "a kept-alive lease lives on"
    );

    let mut deleted = None;
    while deleted.is_none() {
        let batch = tokio::time::timeout(DEADLINE, watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        deleted = batch.events.into_iter().find_map(|e| match e.kind {
            EventKind::Delete { key } => Some(key),
            _ => None,
        });
    }
    assert_eq!(deleted.as_deref(), Some("l/short"));

    assert!(matches!(
        store.keep_alive(short).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert!(matches!(
        store.put_with_lease("l/again", b"z".to_vec(), short).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    store.revoke_lease(kept).await.unwrap();
    assert!(
        store.get("l/kept").await.unwrap().is_none(),
        "revoke deletes at once"
    );
}

#[tokio::test]
async fn lock_is_exclusive_and_fencing_tokens_grow() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(open(&dir).await);
    let a = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    let b = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    let held = lock(store.as_ref(), "acme/x", a).await.unwrap();

    let contender = {
        let store = store.clone();
        tokio::spawn(async move { lock(store.as_ref(), "acme/x", b).await.unwrap() })
    };
    // The contender is queued behind `held`: its key exists, and it has not returned.
    let start = Instant::now();
    while store.list_all("locks/acme/x/").await.unwrap().0.len() < 2 {
        assert!(start.elapsed() < DEADLINE, "contender never queued");
        tokio::task::yield_now().await;
    }
    assert!(
        !contender.is_finished(),
        "second holder got the lock while the first held it"
    );
    let first_token = held.fencing_token;
    held.unlock(store.as_ref()).await.unwrap();
    let second = tokio::time::timeout(DEADLINE, contender)
        .await
        .unwrap()
        .unwrap();
    assert!(second.fencing_token > first_token);

    // A holder that dies (its lease ends) passes the lock on too.
    let c = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { lock(store.as_ref(), "acme/x", c).await.unwrap() })
    };
    let start = Instant::now();
    while store.list_all("locks/acme/x/").await.unwrap().0.len() < 2 {
        assert!(start.elapsed() < DEADLINE, "waiter never queued");
        tokio::task::yield_now().await;
    }
    assert!(!waiter.is_finished());
    store.revoke_lease(b).await.unwrap();
    let third = tokio::time::timeout(DEADLINE, waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(third.fencing_token > second.fencing_token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_caps_holders_across_leases_and_frees_a_dead_holders_slots() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(open(&dir).await);
    // Two nodes, each with its lease, share a cap of 3.
    let nodes = [
        store.grant_lease(Duration::from_secs(30)).await.unwrap(),
        store.grant_lease(Duration::from_secs(30)).await.unwrap(),
    ];
    let holding = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let (store, holding, most) = (store.clone(), holding.clone(), most.clone());
            let lease = nodes[i % 2];
            tokio::spawn(async move {
                for _ in 0..3 {
                    let slot = semaphore::acquire(store.as_ref(), "orders", 3, lease)
                        .await
                        .unwrap();
                    let now = holding.fetch_add(1, SeqCst) + 1;
                    most.fetch_max(now, SeqCst);
                    assert!(now <= 3, "{now} holders of 3 slots");
                    // Work done under the slot, long enough for holders to overlap.
                    tokio::time::sleep(Duration::from_millis(2)).await;
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
    assert!(
        store
            .list_all("semaphores/orders/")
            .await
            .unwrap()
            .0
            .is_empty()
    );

    // The cap is reached, not just respected: node 0 takes every slot. When it dies, node 1's
    // waiter gets one as node 0's lease ends.
    for _ in 0..3 {
        semaphore::acquire(store.as_ref(), "orders", 3, nodes[0])
            .await
            .unwrap();
    }
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            semaphore::acquire(store.as_ref(), "orders", 3, nodes[1])
                .await
                .unwrap()
        })
    };
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished(), "a fourth holder of 3 slots");
    store.revoke_lease(nodes[0]).await.unwrap();
    let slot = tokio::time::timeout(DEADLINE, waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(slot.key.starts_with("semaphores/orders/"));
}

#[tokio::test]
async fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let zone = DomainName::parse("app.example.test").unwrap();
    let backends = vec![Backend::parse("127.0.0.1:3000").unwrap()];
    let id = {
        let store: Arc<dyn Store> = Arc::new(open(&dir).await);
        let state = State::new(store, zone.clone());
        state
            .create_service(
                backends.clone(),
                ServiceStatus::Active,
                Default::default(),
                IssuerRef::Dev,
            )
            .await
            .unwrap()
            .0
            .id
    };
    let store: Arc<dyn Store> = Arc::new(open(&dir).await);
    let state = State::new(store, zone);
    let got = state.get_service(&id).await.unwrap().unwrap().value;
    assert_eq!(got.backends, backends);
}

const CHILD_ENV: &str = "PORTCULLIS_CRASH_CHILD_DIR";

/// Run by `crash_safety_under_sigkill` in a child process: writes services as fast as it can
/// and prints each id once its commit returned, until it is killed.
#[tokio::test]
#[ignore = "helper process of crash_safety_under_sigkill"]
async fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open(format!("{dir}/state.redb"))
            .await
            .unwrap(),
    );
    let state = State::new(store, DomainName::parse("app.example.test").unwrap());
    let backends = vec![Backend::parse("10.0.0.1:80").unwrap()];
    let mut out = std::io::stdout().lock();
    loop {
        let (service, _) = state
            .create_service(
                backends.clone(),
                ServiceStatus::Active,
                Default::default(),
                IssuerRef::Dev,
            )
            .await
            .unwrap();
        writeln!(out, "committed {}", service.id).unwrap();
        out.flush().unwrap();
    }
}

#[tokio::test]
async fn crash_safety_under_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut committed = Vec::new();
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let target = committed.len() + 150 + round * 37;
        let mut lines = BufReader::new(stdout).lines();
        let start = Instant::now();
        while committed.len() < target {
            assert!(start.elapsed() < DEADLINE * 3, "writer too slow");
            let line = lines.next().expect("writer ended early").unwrap();
            if let Some(id) = line.strip_prefix("committed ") {
                committed.push(id.parse::<ServiceId>().unwrap());
            }
        }
        child.kill().unwrap(); // SIGKILL, in the middle of a write
        child.wait().unwrap();

        // Reopen: every acknowledged service is there and the store is usable.
        let store: Arc<dyn Store> = Arc::new(open(&dir).await);
        let state = State::new(
            store.clone(),
            DomainName::parse("app.example.test").unwrap(),
        );
        for id in &committed {
            assert!(state.get_service(id).await.unwrap().is_some(), "lost {id}");
        }
        let (all, rev) = store.list_all("services/").await.unwrap();
        assert!(all.len() >= committed.len());
        assert_eq!(rev, all.len() as i64, "one revision per committed service");
        // The change log agrees with the data: replaying it yields every key.
        let mut replay = store.watch("services/", 1).await.unwrap();
        let mut replayed = 0;
        while replayed < all.len() {
            replayed += replay.next().await.unwrap().unwrap().events.len();
        }
        assert_eq!(replayed, all.len());
    }
}
