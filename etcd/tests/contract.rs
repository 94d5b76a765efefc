//! The Store contract (`portcullis_config::store::contract`) against a real single-member etcd,
//! one cluster per contract function.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

#[path = "../../tests/support/etcd.rs"]
mod etcd_cluster;

use std::sync::Arc;
use std::time::Duration;

use etcd_cluster::EtcdCluster;
use portcullis_config::store::{Store, contract};
use portcullis_etcd::{EtcdOptions, EtcdStore};

async fn store(cluster: &EtcdCluster, prefix: &str) -> EtcdStore {
    EtcdStore::connect(EtcdOptions {
        prefix: prefix.into(),
        dial_timeout: Duration::from_secs(1),
        ..EtcdOptions::new(cluster.endpoints())
    })
    .await
    .unwrap()
}

/// A store under its own prefix on a cluster that also holds keys of another deployment and
/// keys of its own the contract does not write, as a contract function must expect.
async fn seeded(cluster: &EtcdCluster) -> Arc<dyn Store> {
    let other = store(cluster, "/elsewhere/").await;
    let store = store(cluster, "/portcullis/").await;
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
        other
            .put(&format!("contract/{key}"), b"another deployment".to_vec())
            .await
            .unwrap();
    }
    Arc::new(store)
}

macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let cluster = EtcdCluster::start(1);
            let store = seeded(&cluster).await;
            contract::$name(&store, "contract/").await;
            // Nothing the contract wrote leaked out of the prefix.
            let elsewhere = cluster.get_prefix_raw("/elsewhere/");
            assert_eq!(elsewhere.lines().count(), 10, "{elsewhere}");
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
    let here = include_str!("contract.rs");
    for name in contract::ALL {
        assert!(
            here.contains(&format!("    {name},\n")),
            "{name} is not run"
        );
    }
}
