//! The service table the router reads on every request: service id bits -> service.
//!
//! A general-purpose hash map (hashbrown's SwissTable) keeps its control bytes apart from its
//! slots, so a lookup in a table far larger than the caches (1M services is ~50 MB) costs two
//! cache misses and two TLB misses. Here each slot holds the key and the service pointer in 32
//! bytes, two to a cache line, and linear probing from a multiplicative hash of the id: a hit is
//! usually one miss. Service ids are random UUIDs we generate, so probe runs stay short at the
//! load factor kept here (at most one half).
//!
//! The table is persistent: 4,096 leaves under a two-level trie of shared pointers. A clone
//! shares everything; a change copies the root (64 pointers), one branch (64 pointers) and one
//! leaf (a 4,096th of the services), so a Snapshot with one change more costs the same at a
//! million services as at a thousand, and readers of the old one are untouched. The root and
//! branches (32 KiB together) stay in cache, so a lookup still pays about one miss.

use std::sync::Arc;

use crate::model::Service;

/// The nil UUID is never a v4 id, so it marks an empty slot.
const EMPTY: u128 = 0;
/// Fan-out of each trie level: 64 × 64 = 4,096 leaves.
const FANOUT_BITS: u32 = 6;
const FANOUT: usize = 1 << FANOUT_BITS;

#[derive(Clone, Default)]
#[repr(align(32))]
struct Slot {
    id: u128,
    service: Option<Arc<Service>>,
}

type Branch = [Option<Arc<Leaf>>; FANOUT];

#[derive(Clone)]
pub struct ServiceIndex {
    root: Arc<[Arc<Branch>; FANOUT]>,
    len: usize,
}

impl Default for ServiceIndex {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

#[inline]
fn folded_hash(id: u128) -> u64 {
    // Fibonacci hashing of both halves: ids are random, but this keeps any non-random ones
    // (imported, or chosen) from piling up in one run.
    let folded = (id as u64) ^ ((id >> 64) as u64);
    folded.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Which branch and which leaf: the hash's top 12 bits. Slots within a leaf use lower bits.
#[inline]
fn path(hash: u64) -> (usize, usize) {
    let top = (hash >> (64 - 2 * FANOUT_BITS)) as usize;
    (top >> FANOUT_BITS, top & (FANOUT - 1))
}

impl ServiceIndex {
    /// An empty index; `services` sizes each leaf for its share up front, so a load of that many
    /// does not rehash on the way.
    pub fn with_capacity(services: usize) -> Self {
        let per_leaf = services / (FANOUT * FANOUT);
        let leaf =
            || (per_leaf > 0).then(|| Arc::new(Leaf::with_capacity(per_leaf + per_leaf / 4)));
        ServiceIndex {
            root: Arc::new(std::array::from_fn(|_| {
                Arc::new(std::array::from_fn(|_| leaf()))
            })),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn get(&self, id: u128) -> Option<&Arc<Service>> {
        if id == EMPTY {
            return None;
        }
        let hash = folded_hash(id);
        let (b, l) = path(hash);
        self.root[b][l].as_ref()?.get(id, hash)
    }

    fn leaf_mut(&mut self, hash: u64) -> &mut Leaf {
        let (b, l) = path(hash);
        let branch = Arc::make_mut(&mut Arc::make_mut(&mut self.root)[b]);
        Arc::make_mut(branch[l].get_or_insert_with(|| Arc::new(Leaf::with_capacity(0))))
    }

    pub fn insert(&mut self, id: u128, service: Arc<Service>) {
        if id == EMPTY {
            return;
        }
        let hash = folded_hash(id);
        if self.leaf_mut(hash).insert(id, hash, service) {
            self.len += 1;
        }
    }

    pub fn remove(&mut self, id: u128) -> Option<Arc<Service>> {
        if id == EMPTY {
            return None;
        }
        let hash = folded_hash(id);
        let (b, l) = path(hash);
        // Look first: a miss must not copy the path.
        self.root[b][l].as_ref()?.get(id, hash)?;
        let removed = self.leaf_mut(hash).remove(id, hash);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.root
            .iter()
            .flat_map(|branch| branch.iter())
            .flatten()
            .flat_map(|leaf| leaf.slots.iter().filter_map(|s| s.service.as_ref()))
    }
}

/// One open-addressing table, a 4,096th of the services.
struct Leaf {
    slots: Vec<Slot>,
    /// `slots.len() - 1`; the length is a power of two.
    mask: usize,
    len: usize,
}

impl Leaf {
    fn with_capacity(services: usize) -> Self {
        let count = (services.max(2) * 2).next_power_of_two();
        let slots = vec![Slot::default(); count];
        Leaf {
            slots,
            mask: count - 1,
            len: 0,
        }
    }

    #[inline]
    fn home(&self, hash: u64) -> usize {
        (hash >> 16) as usize & self.mask
    }

    #[inline]
    fn get(&self, id: u128, hash: u64) -> Option<&Arc<Service>> {
        let mut i = self.home(hash);
        loop {
            let slot = &self.slots[i];
            if slot.id == id {
                return slot.service.as_ref();
            }
            if slot.id == EMPTY {
                return None;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// True when `id` was not there before.
    fn insert(&mut self, id: u128, hash: u64, service: Arc<Service>) -> bool {
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mut i = self.home(hash);
        loop {
            let slot = &mut self.slots[i];
            if slot.id == id {
                slot.service = Some(service);
                return false;
            }
            if slot.id == EMPTY {
                *slot = Slot {
                    id,
                    service: Some(service),
                };
                self.len += 1;
                return true;
            }
            i = (i + 1) & self.mask;
        }
    }

    fn remove(&mut self, id: u128, hash: u64) -> Option<Arc<Service>> {
        let mut i = self.home(hash);
        loop {
            if self.slots[i].id == EMPTY {
                return None;
            }
            if self.slots[i].id == id {
                break;
            }
            i = (i + 1) & self.mask;
        }
        let removed = std::mem::take(&mut self.slots[i]).service;
        self.len -= 1;
        // Backward-shift deletion: move later members of the run into the hole when the hole
        // lies between their home and where they sit, so lookups never stop early.
        let mut hole = i;
        let mut j = (i + 1) & self.mask;
        while self.slots[j].id != EMPTY {
            let home = self.home(folded_hash(self.slots[j].id));
            let distance_to_hole = hole.wrapping_sub(home) & self.mask;
            let distance_to_j = j.wrapping_sub(home) & self.mask;
            if distance_to_hole < distance_to_j {
                self.slots[hole] = std::mem::take(&mut self.slots[j]);
                hole = j;
            }
            j = (j + 1) & self.mask;
        }
        removed
    }

    fn grow(&mut self) {
        let old = std::mem::replace(self, Leaf::with_capacity(self.len * 2 + 1));
        for slot in old.slots {
            if let Some(service) = slot.service {
                self.insert(slot.id, folded_hash(slot.id), service);
            }
        }
    }
}

impl Clone for Leaf {
    fn clone(&self) -> Self {
        Leaf {
            slots: self.slots.clone(),
            mask: self.mask,
            len: self.len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ServiceId, ServiceStatus};
    use std::collections::HashMap;

    fn service(id: u128) -> Arc<Service> {
        Arc::new(Service {
            id: ServiceId(uuid::Uuid::from_u128(id)),
            backends: vec![],
            status: ServiceStatus::Active,
            options: Default::default(),
            domains: Vec::new(),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            updated_at: time::OffsetDateTime::UNIX_EPOCH,
        })
    }

    /// Random inserts and removes, checked against std's map; small ids collide on purpose.
    #[test]
    fn behaves_like_a_map() {
        let mut index = ServiceIndex::default();
        let mut model: HashMap<u128, Arc<Service>> = HashMap::new();
        let mut seed = 7u64;
        for _ in 0..50_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let id = u128::from(seed % 3000) + 1;
            if seed.is_multiple_of(3) {
                assert_eq!(
                    index.remove(id).map(|s| s.id),
                    model.remove(&id).map(|s| s.id)
                );
            } else {
                let s = service(id);
                index.insert(id, s.clone());
                model.insert(id, s);
            }
            assert_eq!(index.len(), model.len());
        }
        for id in 0..3100u128 {
            assert_eq!(
                index.get(id).map(|s| s.id),
                model.get(&id).map(|s| s.id),
                "{id}"
            );
        }
        assert_eq!(index.values().count(), model.len());
        assert!(index.get(EMPTY).is_none());
    }

    /// A clone is a Snapshot readers may still hold: changes to the copy never show in it.
    #[test]
    fn a_clone_keeps_its_contents() {
        let mut index = ServiceIndex::with_capacity(20_000);
        for id in 1..=10_000u128 {
            index.insert(id * 7919, service(id * 7919));
        }
        let before = index.clone();
        for id in 1..=5_000u128 {
            index.remove(id * 7919);
            index.insert(id * 104_729, service(id * 104_729));
        }
        assert_eq!(before.len(), 10_000);
        assert_eq!(index.len(), 10_000);
        for id in 1..=10_000u128 {
            assert!(before.get(id * 7919).is_some(), "{id}");
            assert_eq!(index.get(id * 7919).is_some(), id > 5_000, "{id}");
        }
        assert!(before.get(104_729).is_none());
        assert!(index.get(104_729).is_some());
        assert_eq!(before.values().count(), 10_000);
    }
}
