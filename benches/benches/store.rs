//! Store write throughput: creates (a service and its pending certificate in one transaction
//! that requires both absent, as `State::create_service` writes them), each durable before it is
//! answered, from 1 writer and from 16 at once. Concurrent writers share commits (group commit),
//! so the second figure is what concurrent API clients can get; both depend on how fast this
//! disk syncs, so the store's file is on the disk `TMPDIR` points at (not a tmpfs, where a sync
//! costs nothing).
//!
//! Run: `cargo bench -p portcullis-benches --bench store`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use portcullis_config::EmbeddedStore;
use portcullis_config::store::{Compare, Op, Store, Txn};

/// Creates per measured iteration, split between the writers.
const CREATES: usize = 256;

fn create(n: u64, service: &[u8], certificate: &[u8]) -> Txn {
    let service_key = format!("services/{n:032x}");
    let certificate_key = format!("certificates/{n:032x}.app.example.test");
    Txn {
        compare: vec![
            Compare::Absent(service_key.clone()),
            Compare::Absent(format!("tombstones/services/{n:032x}")),
        ],
        success: vec![
            Op::put(service_key, service),
            Op::put(certificate_key, certificate),
        ],
        failure: vec![],
    }
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let store = runtime
        .block_on(EmbeddedStore::open(dir.path().join("state.redb")))
        .unwrap_or_else(|e| panic!("{e}"));
    // About the size of a service's and a pending certificate's JSON.
    let service: Arc<[u8]> = vec![b's'; 400].into();
    let certificate: Arc<[u8]> = vec![b'c'; 250].into();
    let next = Arc::new(AtomicU64::new(0));

    let mut group = c.benchmark_group("store_creates");
    group.sample_size(10);
    group.throughput(Throughput::Elements(CREATES as u64));
    for writers in [1, 16] {
        group.bench_function(format!("{writers}_writers"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let tasks: Vec<_> = (0..writers)
                        .map(|_| {
                            let (store, next) = (store.clone(), next.clone());
                            let (service, certificate) = (service.clone(), certificate.clone());
                            tokio::spawn(async move {
                                for _ in 0..CREATES / writers {
                                    let n = next.fetch_add(1, Ordering::Relaxed);
                                    let out = store
                                        .txn(create(n, &service, &certificate))
                                        .await
                                        .unwrap_or_else(|e| panic!("{e}"));
                                    assert!(out.succeeded);
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.unwrap_or_else(|e| panic!("{e}"));
                    }
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
