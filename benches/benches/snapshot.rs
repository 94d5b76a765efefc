//! Snapshot benchmarks: building it from the store's key-values, and finding a service by Host,
//! at 1k, 100k and 1M services. Also prints the Snapshot's memory per service, measured with a
//! counting allocator.
//!
//! Run: `cargo bench -p portcullis-benches --bench snapshot`

#![allow(unsafe_code)] // the counting allocator below only forwards to the system allocator

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use portcullis_benches::{hosts, service_kvs, zone};
use portcullis_config::Snapshot;
use portcullis_config::store::EventKind;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to `System` unchanged; only a byte count is kept on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const SIZES: [(usize, &str); 3] = [(1_000, "1k"), (100_000, "100k"), (1_000_000, "1M")];

fn memory_report() {
    for (n, label) in SIZES {
        let kvs = service_kvs(n);
        let before = LIVE.load(Ordering::Relaxed);
        let snapshot = Snapshot::from_kvs(zone(), 1, &kvs);
        let after = LIVE.load(Ordering::Relaxed);
        drop(kvs);
        assert_eq!(snapshot.service_count(), n);

        println!(
            "snapshot memory, {label} services: {} bytes per service",
            (after - before) / n
        );
        drop(snapshot);
    }
}

fn bench(c: &mut Criterion) {
    memory_report();
    let mut build = c.benchmark_group("snapshot_build");
    build.sample_size(10);
    for (n, label) in SIZES {
        let kvs = service_kvs(n);
        build.throughput(Throughput::Elements(n as u64));
        build.bench_function(label, |b| {
            b.iter_batched(
                || (),
                |()| Snapshot::from_kvs(zone(), 1, black_box(&kvs)),
                BatchSize::PerIteration,
            )
        });
    }
    build.finish();

    // What one change costs every node: a copy of the Snapshot with the change applied.
    let mut update = c.benchmark_group("snapshot_update");
    update.sample_size(10);
    for (n, label) in SIZES {
        let kvs = service_kvs(n);
        let snapshot = Snapshot::from_kvs(zone(), 1, &kvs);
        let change = EventKind::Put(service_kvs(1).remove(0));
        update.bench_function(label, |b| {
            b.iter_batched(
                || (),
                |()| {
                    let mut next = snapshot.clone();
                    next.apply(2, black_box(&change));
                    next
                },
                BatchSize::PerIteration,
            )
        });
    }
    update.finish();

    let mut lookup = c.benchmark_group("service_for_host");
    for (n, label) in SIZES {
        let kvs = service_kvs(n);
        let snapshot = Snapshot::from_kvs(zone(), 1, &kvs);
        // Hosts in store order (random ids), so consecutive lookups hit unrelated buckets as
        // traffic across many tenants does; mixed case and a port as in Host headers. They sit
        // in one buffer, read in order, so the figure is the lookup's and not the bench's.
        let mut all = String::new();
        let mut spans = Vec::with_capacity(n);
        for (i, host) in hosts(&kvs).iter().enumerate() {
            let start = all.len();
            if i % 4 == 0 {
                all.push_str(&host.to_ascii_uppercase());
            } else {
                all.push_str(host);
            }
            if i % 2 == 0 {
                all.push_str(":443");
            }
            spans.push(start..all.len());
        }
        drop(kvs);
        lookup.throughput(Throughput::Elements(1));
        let mut i = 0;
        lookup.bench_function(label, |b| {
            b.iter(|| {
                i += 1;
                if i == spans.len() {
                    i = 0;
                }
                let found = snapshot.service_for_host(black_box(&all[spans[i].clone()]));
                debug_assert!(found.is_some());
                found.is_some()
            })
        });
        if n == 1_000_000 {
            // Real traffic is skewed: the same table, with requests spread over 10k services.
            let hot = 10_000;
            let mut j = 0;
            lookup.bench_function(format!("{label}_hot10k"), |b| {
                b.iter(|| {
                    j += 97; // a stride, so the hot set is spread over the whole table
                    if j >= hot * 97 {
                        j = 0;
                    }
                    let span = spans[j % spans.len()].clone();
                    snapshot.service_for_host(black_box(&all[span])).is_some()
                })
            });
        }
        let miss = "00000000-0000-4000-8000-000000000000.app.example.test";
        lookup.bench_function(format!("{label}_miss"), |b| {
            b.iter(|| snapshot.service_for_host(black_box(miss)).is_none())
        });
        lookup.bench_function(format!("{label}_unknown_alias"), |b| {
            b.iter(|| {
                snapshot
                    .service_for_host(black_box("www.shop.example"))
                    .is_none()
            })
        });
    }
    lookup.finish();

    // The floor for one lookup in a table far larger than the caches: one read from main
    // memory that cannot overlap with the next (as a request's single lookup cannot), measured
    // by chasing a random cycle through a 64 MiB array, the size of the 1M-service table.
    let mut floor = c.benchmark_group("memory");
    let len = (64usize << 20) / 8;
    let mut next: Vec<u64> = (0..len as u64).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..len).rev() {
        // Sattolo's shuffle: one cycle through every element.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        next.swap(i, (x as usize) % i);
    }
    let mut at = 0u64;
    floor.bench_function("dependent_read_64MiB", |b| {
        b.iter(|| {
            at = next[at as usize];
            at
        })
    });
    floor.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
