//! A fleet node's local copy of the store: it follows the store, is filled again when its
//! place in the history was compacted, and is what the node serves from while the store is
//! away, also when it starts during the outage.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use portcullis_config::model::{Backend, IssuerRef, ServiceStatus};
use portcullis_config::store::{
    LeaseId, Page, PageRequest, Replica, ReplicatedStore, Revision, Txn, TxnOutcome, Watch,
    follow_into_replica,
};
use portcullis_config::{DomainName, EmbeddedStore, SnapshotSync, State, Store, StoreError};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(10);

/// A store that can be made unreachable, as etcd is in an outage.
struct Switchable {
    inner: Arc<dyn Store>,
    down: AtomicBool,
    /// Point reads that reached this store.
    gets: std::sync::atomic::AtomicUsize,
}

impl Switchable {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("test: the store is down".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Store for Switchable {
    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<portcullis_config::store::KeyValue>, StoreError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str, page: PageRequest) -> Result<Page, StoreError> {
        self.check()?;
        self.inner.list(prefix, page).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.check()?;
        self.inner.txn(txn).await
    }
    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        self.check()?;
        self.inner.watch(prefix, from).await
    }
    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.check()?;
        self.inner.current_revision().await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.check()?;
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.check()?;
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.check()?;
        self.inner.revoke_lease(lease).await
    }
    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.check()?;
        self.inner.compact(revision).await
    }
}

async fn wait_until_copied(replica: &Replica, revision: Revision) {
    let start = Instant::now();
    while replica.revision().await.unwrap() < revision {
        assert!(
            start.elapsed() < DEADLINE,
            "the copy never reached {revision}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn zone() -> DomainName {
    DomainName::parse("app.example.test").unwrap()
}

async fn create(state: &State, backend: &str) -> (portcullis_config::ServiceId, Revision) {
    let (service, revision) = state
        .create_service(
            vec![Backend::parse(backend).unwrap()],
            ServiceStatus::Active,
            Default::default(),
            IssuerRef::Dev,
        )
        .await
        .unwrap();
    (service.id, revision)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_serves_its_copy_while_the_store_is_away_and_catches_up_after() {
    let dir = tempfile::tempdir().unwrap();
    let embedded: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open(dir.path().join("upstream.redb"))
            .await
            .unwrap(),
    );
    let upstream = Arc::new(Switchable {
        inner: embedded,
        down: AtomicBool::new(false),
        gets: Default::default(),
    });
    let state = State::new(upstream.clone(), zone());
    let (first, _) = create(&state, "10.0.0.1:80").await;
    upstream
        .put("keys/x.example", b"key".to_vec())
        .await
        .unwrap();
    upstream.put("locks/orders/x/1", Vec::new()).await.unwrap();

    let replica = Replica::open(dir.path().join("replica.redb"))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let follower = tokio::spawn(follow_into_replica(
        replica.clone(),
        upstream.clone(),
        stop.clone(),
    ));
    let (second, revision) = create(&state, "10.0.0.2:80").await;
    wait_until_copied(&replica, revision).await;
    assert!(
        replica.get("locks/orders/x/1").await.unwrap().is_none(),
        "locks are not copied"
    );

    // The store goes away: point reads come from the copy, writes fail and change nothing.
    upstream.down.store(true, Ordering::SeqCst);
    let node_store: Arc<dyn Store> =
        Arc::new(ReplicatedStore::new(upstream.clone(), replica.clone()));
    let key = node_store.get("keys/x.example").await.unwrap().unwrap();
    assert_eq!(key.value, b"key");
    // The next reads do not wait on the store again (a handshake must not wait out a timeout
    // each time); only now and then does one try it.
    let tried = upstream.gets.load(Ordering::SeqCst);
    for _ in 0..10 {
        node_store.get("keys/x.example").await.unwrap().unwrap();
    }
    assert_eq!(upstream.gets.load(Ordering::SeqCst), tried);
    let write = node_store.put("services/nope", b"{}".to_vec()).await;
    assert!(
        matches!(write, Err(StoreError::Unavailable(_))),
        "{write:?}"
    );

    // A node starting now serves the copy, and says so.
    let sync = SnapshotSync::start_with_cache(node_store.clone(), Some(replica.clone()), zone())
        .await
        .unwrap();
    let snapshot = sync.handle.clone();
    assert!(snapshot.load().service(&first).is_some());
    assert!(snapshot.load().service(&second).is_some());
    assert!(snapshot.health().serving_cache());
    assert!(!snapshot.health().reachable());
    // Without a copy there is nothing to serve: the start fails with the store's reason.
    let empty = Replica::open(dir.path().join("empty.redb")).await.unwrap();
    let failed = SnapshotSync::start_with_cache(node_store.clone(), Some(empty), zone()).await;
    assert!(matches!(failed, Err(StoreError::Unavailable(_))));

    // Back: a change made now reaches the node that started on its copy.
    upstream.down.store(false, Ordering::SeqCst);
    let (third, revision) = create(&state, "10.0.0.3:80").await;
    assert!(snapshot.wait_for(revision, DEADLINE).await);
    assert!(snapshot.load().service(&third).is_some());
    assert!(!snapshot.health().serving_cache());
    assert!(snapshot.health().reachable());
    wait_until_copied(&replica, revision).await;
    // Point reads go back to the store (a value only it has shows once one read tried it).
    upstream
        .put("keys/y.example", b"new".to_vec())
        .await
        .unwrap();
    let start = Instant::now();
    stop.cancel();
    follower.await.unwrap();
    while node_store.get("keys/y.example").await.unwrap().is_none() {
        assert!(
            start.elapsed() < DEADLINE,
            "point reads never went back to the store"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sync.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_fell_out_of_the_history_is_filled_again() {
    let dir = tempfile::tempdir().unwrap();
    let upstream: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open_with_history(dir.path().join("upstream.redb"), 10)
            .await
            .unwrap(),
    );
    let state = State::new(upstream.clone(), zone());
    let replica = Replica::open(dir.path().join("replica.redb"))
        .await
        .unwrap();
    let (doomed, revision) = create(&state, "10.0.0.1:80").await;
    let stop = CancellationToken::new();
    let follower = tokio::spawn(follow_into_replica(
        replica.clone(),
        upstream.clone(),
        stop.clone(),
    ));
    wait_until_copied(&replica, revision).await;
    stop.cancel();
    follower.await.unwrap();

    // While the copy is not following, the store moves on by more than its history.
    state.delete_service(&doomed).await.unwrap();
    let mut last = 0;
    for i in 0..20 {
        last = create(&state, &format!("10.0.1.{i}:80")).await.1;
    }
    let stop = CancellationToken::new();
    let follower = tokio::spawn(follow_into_replica(
        replica.clone(),
        upstream.clone(),
        stop.clone(),
    ));
    wait_until_copied(&replica, last).await;
    let key = format!("services/{doomed}");
    assert!(
        replica.get(&key).await.unwrap().is_none(),
        "a deletion the copy never saw as an event is gone after the refill"
    );
    let copied = replica
        .list("services/", PageRequest::first(100))
        .await
        .unwrap();
    assert_eq!(copied.items.len(), 20);
    stop.cancel();
    follower.await.unwrap();
}
