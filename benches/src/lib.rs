//! Helpers shared by the benchmarks: realistic platform state, generated without a store.

use portcullis_config::model::{Backend, Service, ServiceId, ServiceStatus};
use portcullis_config::store::KeyValue;
use portcullis_config::{DomainName, keys};
use time::OffsetDateTime;

pub const ZONE: &str = "app.example.test";

pub fn zone() -> DomainName {
    DomainName::parse(ZONE).unwrap_or_else(|e| panic!("{e}"))
}

/// `n` services as the store returns them: two backends each, JSON values, with ids from a
/// fixed-seed generator so runs compare.
pub fn service_kvs(n: usize) -> Vec<KeyValue> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        // splitmix64: fast, fixed-seed, good enough to spread ids like UUID v4s.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let now = OffsetDateTime::now_utc();
    (0..n)
        .map(|i| {
            let bits = (u128::from(next()) << 64) | u128::from(next());
            let id = ServiceId(uuid::Builder::from_random_bytes(bits.to_be_bytes()).into_uuid());
            let service = Service {
                id,
                backends: vec![
                    Backend::parse(&format!("10.{}.{}.1:8080", (i >> 8) & 255, i & 255))
                        .unwrap_or_else(|e| panic!("{e}")),
                    Backend::parse(&format!("10.{}.{}.2:8080", (i >> 8) & 255, i & 255))
                        .unwrap_or_else(|e| panic!("{e}")),
                ],
                status: ServiceStatus::Active,
                options: Default::default(),
                domains: Vec::new(),
                created_at: now,
                updated_at: now,
            };
            KeyValue {
                key: keys::service(&id),
                value: serde_json::to_vec(&service).unwrap_or_else(|e| panic!("{e}")),
                create_revision: i as i64 + 1,
                mod_revision: i as i64 + 1,
                version: 1,
                lease: None,
            }
        })
        .collect()
}

/// The canonical Host of each service in `kvs`.
pub fn hosts(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter()
        .filter_map(|kv| kv.key.strip_prefix(keys::SERVICES))
        .map(|id| format!("{id}.{ZONE}"))
        .collect()
}
