//! The service table the router reads on every request: service id bits -> service.
//!
//! A general-purpose hash map (hashbrown's SwissTable) keeps its control bytes apart from its
//! slots, so a lookup in a table far larger than the caches (1M services is ~50 MB) costs two
//! cache misses and two TLB misses. Here each slot holds the key and the service pointer in 32
//! bytes, two to a cache line, and linear probing from a multiplicative hash of the id: a hit is
//! usually one miss. Service ids are random UUIDs we generate, so probe runs stay short at the
//! load factor kept here (at most one half).

use std::sync::Arc;

use crate::model::Service;

/// The nil UUID is never a v4 id, so it marks an empty slot.
const EMPTY: u128 = 0;

#[derive(Clone, Default)]
#[repr(align(32))]
struct Slot {
    id: u128,
    service: Option<Arc<Service>>,
}

pub struct ServiceIndex {
    slots: Vec<Slot>,
    /// `slots.len() - 1`; the length is a power of two.
    mask: usize,
    len: usize,
}

impl Default for ServiceIndex {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl ServiceIndex {
    pub fn with_capacity(services: usize) -> Self {
        let count = (services.max(4) * 2).next_power_of_two();
        let mut slots = allocate(count);
        slots.resize(count, Slot::default());
        ServiceIndex {
            slots,
            mask: count - 1,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn home(&self, id: u128) -> usize {
        // Fibonacci hashing of both halves: ids are random, but this keeps any non-random ones
        // (imported, or chosen) from piling up in one run.
        let folded = (id as u64) ^ ((id >> 64) as u64);
        (folded.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & self.mask
    }

    #[inline]
    pub fn get(&self, id: u128) -> Option<&Arc<Service>> {
        if id == EMPTY {
            return None;
        }
        let mut i = self.home(id);
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

    pub fn insert(&mut self, id: u128, service: Arc<Service>) {
        if id == EMPTY {
            return;
        }
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mut i = self.home(id);
        loop {
            let slot = &mut self.slots[i];
            if slot.id == id {
                slot.service = Some(service);
                return;
            }
            if slot.id == EMPTY {
                *slot = Slot {
                    id,
                    service: Some(service),
                };
                self.len += 1;
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    pub fn remove(&mut self, id: u128) -> Option<Arc<Service>> {
        if id == EMPTY {
            return None;
        }
        let mut i = self.home(id);
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
            let home = self.home(self.slots[j].id);
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
        let old = std::mem::replace(self, ServiceIndex::with_capacity(self.len * 2 + 1));
        for slot in old.slots {
            if let Some(service) = slot.service {
                self.insert(slot.id, service);
            }
        }
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.slots.iter().filter_map(|s| s.service.as_ref())
    }
}

impl Clone for ServiceIndex {
    fn clone(&self) -> Self {
        let mut slots = allocate(self.slots.len());
        slots.extend(self.slots.iter().cloned());
        ServiceIndex {
            slots,
            mask: self.mask,
            len: self.len,
        }
    }
}

/// Tables at least this large ask for huge pages.
const HUGE_PAGE: usize = 2 << 20;

/// An empty vector with room for `count` slots whose memory, when large, is backed by huge
/// pages. A random lookup in a table of many 4 KiB pages misses the TLB nearly every time, and
/// under virtualization each such miss is a two-level page walk: at 1M services that doubled
/// the lookup time. The kernel here grants huge pages only where asked (`madvise` mode), and
/// only to pages first touched after asking, hence before the vector is filled.
fn allocate(count: usize) -> Vec<Slot> {
    let slots: Vec<Slot> = Vec::with_capacity(count);
    let bytes = count * std::mem::size_of::<Slot>();
    if bytes >= 2 * HUGE_PAGE {
        let start = slots.as_ptr() as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let end = (start + bytes) / HUGE_PAGE * HUGE_PAGE;
        if end > aligned {
            advise_huge_pages(aligned, end - aligned);
        }
    }
    slots
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn advise_huge_pages(addr: usize, len: usize) {
    // SAFETY: the range lies inside the allocation `allocate` owns, and MADV_HUGEPAGE is advice
    // only: it changes how pages are backed, never their contents. Failure (no THP in this
    // kernel) just leaves normal pages.
    unsafe {
        libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_addr: usize, _len: usize) {}

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
}
