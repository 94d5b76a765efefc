//! The etcd store when members die: failover without errors, watches that resume exactly once,
//! writes across a leader election, and clear errors when nothing answers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

#[path = "../../tests/support/etcd.rs"]
mod etcd_cluster;

use std::time::{Duration, Instant};

use etcd_cluster::EtcdCluster;
use portcullis_config::StoreError;
use portcullis_config::store::{EventKind, PageRequest, Store, Watch};
use portcullis_etcd::{EtcdOptions, EtcdStore};

const DEADLINE: Duration = Duration::from_secs(20);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

fn options(endpoints: Vec<String>) -> EtcdOptions {
    EtcdOptions {
        dial_timeout: Duration::from_secs(1),
        request_timeout: REQUEST_TIMEOUT,
        ..EtcdOptions::new(endpoints)
    }
}

fn member_of(cluster: &EtcdCluster, store: &EtcdStore) -> usize {
    let current = store.current_endpoint();
    cluster
        .endpoints()
        .iter()
        .position(|e| e == current)
        .unwrap()
}

/// A store connected to a follower (listed first), so killing that member is not an election.
async fn on_a_follower(cluster: &EtcdCluster) -> (EtcdStore, usize) {
    let follower = (cluster.leader() + 1) % 3;
    let mut endpoints = cluster.endpoints();
    endpoints.rotate_left(follower);
    let store = EtcdStore::connect(options(endpoints)).await.unwrap();
    assert_eq!(member_of(cluster, &store), follower);
    (store, follower)
}

/// The first request after a member died: a read, which is re-sent after any failure. A
/// transaction sent on the dead member's connection before the client saw it close would get
/// "outcome unknown" (see the retry rule in `client.rs`), so the test lets a read find out first,
/// as any request flow does.
async fn notice_the_death(store: &EtcdStore) {
    store.get("anything").await.unwrap();
}

async fn next_put_key(watch: &mut Watch) -> (i64, String) {
    let batch = tokio::time::timeout(DEADLINE, watch.next())
        .await
        .expect("watch stalled")
        .expect("watch ended")
        .unwrap();
    assert_eq!(batch.events.len(), 1, "{batch:?}");
    match &batch.events[0].kind {
        EventKind::Put(kv) => (batch.revision, kv.key.clone()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_member_dead_every_request_succeeds_and_with_none_it_is_unavailable() {
    let mut cluster = EtcdCluster::start(3);
    let (store, follower) = on_a_follower(&cluster).await;
    store.put("before", b"x".to_vec()).await.unwrap();

    // The member the store talks to dies.
    cluster.kill(follower);
    notice_the_death(&store).await;
    for i in 0..20 {
        let key = format!("k/{i}");
        store.put(&key, vec![i as u8]).await.unwrap();
        assert!(store.get(&key).await.unwrap().is_some());
        let rev = store.get(&key).await.unwrap().unwrap().mod_revision;
        let swapped = store
            .compare_and_swap(&key, Some(rev), b"swapped".to_vec())
            .await
            .unwrap();
        assert!(swapped.is_some());
        let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
        store.keep_alive(lease).await.unwrap();
        store.revoke_lease(lease).await.unwrap();
    }
    let page = store.list("k/", PageRequest::first(100)).await.unwrap();
    assert_eq!(page.items.len(), 20);
    // Keys live under the prefix in etcd.
    let raw = cluster.get_prefix_raw("/portcullis/k/");
    assert!(raw.contains("/portcullis/k/19"), "{raw}");

    // Nothing answers: an error within the request timeout, naming every endpoint.
    for i in 0..3 {
        cluster.kill(i);
    }
    let started = Instant::now();
    let err = store.get("before").await.unwrap_err();
    let took = started.elapsed();
    assert!(
        took < REQUEST_TIMEOUT + Duration::from_millis(500),
        "took {took:?}"
    );
    let StoreError::Unavailable(message) = &err else {
        panic!("{err:?}")
    };
    for endpoint in cluster.endpoints() {
        assert!(message.contains(&endpoint), "{message}");
    }
    assert!(message.contains("connection refused"), "{message}");
    let started = Instant::now();
    let err = store.put("after", b"x".to_vec()).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < REQUEST_TIMEOUT + Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_across_a_kill_and_a_restart_delivering_every_change_once_in_order() {
    let mut cluster = EtcdCluster::start(3);
    let (store, victim) = on_a_follower(&cluster).await;
    let mut watch = store.watch("w/", 0).await.unwrap();
    let mut written = Vec::new();
    let mut write = async |i: usize| {
        let key = format!("w/{i:03}");
        let rev = store.put(&key, vec![]).await.unwrap();
        store.put("noise", vec![]).await.unwrap();
        written.push((rev, key));
    };
    for i in 0..20 {
        write(i).await;
    }
    // The member the watch (and every request) goes to dies, then comes back.
    cluster.kill(victim);
    notice_the_death(&store).await;
    for i in 20..40 {
        write(i).await;
    }
    cluster.restart(victim);
    for i in 40..60 {
        write(i).await;
    }
    let mut seen = Vec::new();
    while seen.len() < written.len() {
        seen.push(next_put_key(&mut watch).await);
    }
    assert_eq!(seen, written, "every change once, in order");
    assert!(watch.try_next().is_none(), "nothing more: no duplicate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_within_seconds_when_the_leader_dies() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut cluster = EtcdCluster::start(3);
    // Connected to the leader itself, so its death is also the store's connection's.
    let leader = cluster.leader();
    let mut endpoints = cluster.endpoints();
    endpoints.rotate_left(leader);
    let store = EtcdStore::connect(options(endpoints)).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            // (time of the write, its outcome), until told to stop.
            let mut log = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let result = store.put(&format!("l/{i:06}"), vec![]).await;
                log.push((Instant::now(), result.map(|_| ())));
                i += 1;
            }
            log
        })
    };
    let count = async || store.list_all("l/").await.map(|(all, _)| all.len());
    let start = Instant::now();
    while count().await.unwrap() < 20 {
        assert!(start.elapsed() < DEADLINE, "no writes");
    }
    let killed_at = Instant::now();
    cluster.kill(leader);
    // Writes land again: 50 more than when the leader died.
    let mut before = None;
    loop {
        assert!(killed_at.elapsed() < DEADLINE, "writes did not resume");
        if let Ok(n) = count().await {
            let base = *before.get_or_insert(n);
            if n >= base + 50 {
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let log = writer.await.unwrap();
    let mut last_failure = None;
    for (at, result) in &log {
        if let Err(e) = result {
            assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
            let after = at.duration_since(killed_at);
            assert!(
                after < Duration::from_secs(5),
                "a write failed {after:?} after the leader died: {e}"
            );
            last_failure = Some(after);
        }
    }
    let failures = log.iter().filter(|(_, r)| r.is_err()).count();
    let after_kill = log.iter().filter(|(at, _)| *at > killed_at).count();
    eprintln!(
        "{} writes, {after_kill} after the leader died, {failures} failed (the last {last_failure:?} after)",
        log.len(),
    );
    assert!(log.iter().rev().take(20).all(|(_, r)| r.is_ok()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_revision_gives_compacted() {
    let cluster = EtcdCluster::start(1);
    let store = EtcdStore::connect(options(cluster.endpoints()))
        .await
        .unwrap();
    let first = store.put("c/k", b"1".to_vec()).await.unwrap();
    store.put("c/k", b"2".to_vec()).await.unwrap();
    let last = store.put("c/k", b"3".to_vec()).await.unwrap();
    cluster.compact(last);
    let err = match store.watch("c/", first).await {
        Err(e) => e,
        Ok(mut watch) => tokio::time::timeout(DEADLINE, watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap_err(),
    };
    match err {
        StoreError::Compacted {
            requested,
            compacted_through,
        } => {
            assert_eq!(requested, first);
            assert_eq!(compacted_through, last - 1);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn connecting_to_a_wrong_endpoint_fails_fast_and_says_why() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let err = EtcdStore::connect(options(vec![endpoint.clone()]))
        .await
        .err()
        .expect("nothing listens there");
    assert!(started.elapsed() < Duration::from_secs(2));
    let StoreError::Unavailable(message) = &err else {
        panic!("{err:?}")
    };
    assert!(message.contains(&endpoint), "{message}");
    assert!(message.contains("connection refused"), "{message}");

    let err = EtcdStore::connect(options(vec![])).await.err().unwrap();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    let err = EtcdStore::connect(options(vec!["not a url at all".into()]))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
}
