//! The embedded store against the Store contract (`portcullis_config::store::contract`), and
//! what only the embedded store promises: compaction to the exact revision, state kept across
//! reopening, and crash safety under SIGKILL.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_config::model::{Backend, IssuerRef, ServiceStatus};
use portcullis_config::store::{EmbeddedStore, Store, contract};
use portcullis_config::{DomainName, ServiceId, State, StoreError};

const DEADLINE: Duration = Duration::from_secs(10);

async fn open(dir: &tempfile::TempDir) -> EmbeddedStore {
    EmbeddedStore::open(dir.path().join("state.redb"))
        .await
        .unwrap()
}

/// A fresh store that already holds keys of its own, as a contract function must expect.
async fn seeded(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    let store = open(dir).await;
    for key in [
        "a",
        "contract",
        "contract0",
        "locks/x/1",
        "semaphores/x/00000",
    ] {
        store
            .put(key, b"not the contract's".to_vec())
            .await
            .unwrap();
    }
    Arc::new(store)
}

/// One test per contract function, each on its own store.
macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let dir = tempfile::tempdir().unwrap();
            let store = seeded(&dir).await;
            contract::$name(&store, "contract/").await;
        }
    )*};
}

contract_tests!(
    revisions_and_crud,
    paging_in_key_order,
    transactions,
    compare_and_swap_conflicts,
    watch_from_a_revision,
    watch_from_a_compacted_revision,
    leases,
    lock_is_exclusive_and_passes_on,
    semaphore_caps_holders,
);

#[test]
fn every_contract_function_runs_here() {
    let here = include_str!("store.rs");
    for name in contract::ALL {
        assert!(
            here.contains(&format!("    {name},\n")),
            "{name} is not run"
        );
    }
}

#[tokio::test]
async fn compaction_drops_exactly_what_it_names_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    for i in 0..5u8 {
        store.put("k", vec![i]).await.unwrap();
    }
    store.compact(3).await.unwrap();
    let err = store.watch("", 3).await.err().expect("revision 3 is gone");
    assert!(
        matches!(
            err,
            StoreError::Compacted {
                requested: 3,
                compacted_through: 3
            }
        ),
        "{err}"
    );
    drop(store);
    let store = open(&dir).await;
    assert!(store.watch("", 2).await.is_err(), "compaction is durable");
    let mut watch = store.watch("", 4).await.unwrap();
    assert_eq!(watch.next().await.unwrap().unwrap().revision, 4);
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
    // The parent's check of the last round may still be letting go of the file (its store's
    // writer thread ends after the last handle): open once it has, within the deadline.
    let start = Instant::now();
    let store: Arc<dyn Store> = loop {
        match EmbeddedStore::open(format!("{dir}/state.redb")).await {
            Ok(store) => break Arc::new(store),
            Err(e) => {
                assert!(start.elapsed() < DEADLINE, "cannot open the store: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    };
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
            .stderr(Stdio::inherit())
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
