//! The responder's view, rebuilt from each new Snapshot and swapped atomically, with what the
//! answer caches must drop to stay true to it.

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use portcullis_config::file::AnswerPolicy;
use portcullis_config::store::Revision;
use portcullis_config::{Snapshot, SnapshotHandle, keys};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::wire;
use crate::zone::{AddressBook, CustomRecords, ZoneSettings, ZoneView};

/// What changed since the view one generation earlier.
#[derive(Debug)]
pub enum Invalidation {
    /// The node's own records changed at these names (services and alias domains; lowercase
    /// wire form): answers for them, for names below them, and answers that carry their
    /// records (see [`crate::answer::Provenance`]) are stale. So is every answer holding the
    /// SOA, whose serial moved. Every other answer still holds.
    Names(HashSet<Vec<u8>>),
    All,
}

/// The invalidation that made one generation.
#[derive(Debug)]
pub struct Change {
    pub generation: u64,
    pub invalidation: Invalidation,
}

/// Generations of changes a view carries, so that a cache that slept through a few catches up
/// instead of starting over.
const HISTORY: usize = 64;

#[derive(Debug)]
pub struct PublishedView {
    pub zone: ZoneView,
    pub generation: u64,
    /// The latest changes, oldest first, ending with this generation's.
    pub changes: Arc<[Arc<Change>]>,
}

impl PublishedView {
    /// The changes after generation `since` up to this view's, oldest first; `None` when they
    /// are no longer all known (then a cache must start over).
    pub fn changes_since(&self, since: u64) -> Option<&[Arc<Change>]> {
        if since == self.generation {
            return Some(&[]);
        }
        let first = self
            .changes
            .iter()
            .position(|c| c.generation == since.wrapping_add(1))?;
        Some(&self.changes[first..])
    }
}

#[derive(Clone)]
pub struct ViewHandle(Arc<ArcSwap<PublishedView>>, watch::Receiver<Revision>);

impl ViewHandle {
    /// Waits until answers reflect the store at `revision` or later, at most `timeout`.
    /// False on timeout.
    pub async fn wait_for(&self, revision: Revision, timeout: std::time::Duration) -> bool {
        let mut rx = self.1.clone();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn load(&self) -> Guard<Arc<PublishedView>> {
        self.0.load()
    }

    pub fn load_full(&self) -> Arc<PublishedView> {
        self.0.load_full()
    }
}

/// Builds views from Snapshots, reusing what a change did not touch.
struct Builder {
    settings: Arc<ZoneSettings>,
    apexes: Vec<hickory_proto::rr::Name>,
    custom: Arc<CustomRecords>,
    addresses: Arc<AddressBook>,
    /// Revision of the last change to zone data: the SOA serial.
    serial: u32,
    revision: Revision,
    generation: u64,
    history: std::collections::VecDeque<Arc<Change>>,
}

impl Builder {
    fn new(settings: Arc<ZoneSettings>, snapshot: &Snapshot) -> Self {
        let apexes = ZoneView::apex_names(&settings);
        Builder {
            custom: Arc::new(CustomRecords::build(snapshot, &apexes)),
            addresses: Arc::new(AddressBook::for_policy(&settings, snapshot)),
            apexes,
            settings,
            serial: serial_of(snapshot.revision()),
            revision: snapshot.revision(),
            generation: 0,
            history: std::collections::VecDeque::with_capacity(HISTORY),
        }
    }

    fn view(&mut self, snapshot: Arc<Snapshot>, invalidation: Invalidation) -> PublishedView {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(Arc::new(Change {
            generation: self.generation,
            invalidation,
        }));
        PublishedView {
            zone: ZoneView::new(
                snapshot,
                self.settings.clone(),
                self.custom.clone(),
                self.addresses.clone(),
                self.serial,
            ),
            generation: self.generation,
            changes: self.history.iter().cloned().collect(),
        }
    }

    fn next(&mut self, snapshot: Arc<Snapshot>) -> PublishedView {
        self.generation += 1;
        // Views are made for every Snapshot this task sees, but it may not see every one: the
        // changes since the last it saw, however many Snapshots ago, are what to invalidate.
        let since = std::mem::replace(&mut self.revision, snapshot.revision());
        let changed: Option<Vec<&str>> = snapshot.changes_since(since).map(Iterator::collect);
        let Some(changes) = changed else {
            self.custom = Arc::new(CustomRecords::build(&snapshot, &self.apexes));
            self.addresses = Arc::new(AddressBook::for_policy(&self.settings, &snapshot));
            self.serial = serial_of(snapshot.revision());
            return self.view(snapshot, Invalidation::All);
        };
        let mut names = HashSet::new();
        let mut all = false;
        let mut zone_changed = false;
        let platform = self.settings.platform.to_ascii();
        for key in changes {
            if let Some(id) = key.strip_prefix(keys::SERVICES) {
                names.insert(wire::name_key(&format!("{id}.{platform}")));
                zone_changed = true;
            } else if let Some(name) = key.strip_prefix(keys::DOMAINS) {
                names.insert(wire::name_key(name));
                zone_changed = true;
            } else if let Some(label) = key.strip_prefix(keys::DNS_CHALLENGES) {
                names.insert(wire::name_key(&format!("{label}.acme.{platform}")));
            } else if key.starts_with(keys::RECORDS) {
                all = true;
                zone_changed = true;
            } else if key.starts_with(keys::NODES) {
                if matches!(
                    self.settings.dns.policy,
                    AnswerPolicy::Fleet | AnswerPolicy::ByClient
                ) {
                    all = true;
                    zone_changed = true;
                }
            } else if key == keys::ECH_KEYS {
                all = true;
                zone_changed = true;
            }
        }
        if all {
            self.custom = Arc::new(CustomRecords::build(&snapshot, &self.apexes));
            self.addresses = Arc::new(AddressBook::for_policy(&self.settings, &snapshot));
        }
        if zone_changed {
            self.serial = serial_of(snapshot.revision());
        }
        let invalidation = if all {
            Invalidation::All
        } else {
            Invalidation::Names(names)
        };
        self.view(snapshot, invalidation)
    }
}

fn serial_of(revision: Revision) -> u32 {
    // RFC 1982 serial arithmetic wraps; the low 32 bits of a rising revision rise with it.
    (revision as u64 & u64::from(u32::MAX)) as u32
}

/// Publishes a view for the current Snapshot and follows every new one.
pub fn follow(
    snapshots: SnapshotHandle,
    settings: Arc<ZoneSettings>,
) -> (ViewHandle, JoinHandle<()>) {
    let first = snapshots.load_full();
    let mut builder = Builder::new(settings, &first);
    let (tx, revisions) = watch::channel(first.revision());
    let handle = ViewHandle(
        Arc::new(ArcSwap::from_pointee(
            builder.view(first, Invalidation::All),
        )),
        revisions,
    );
    let published = handle.clone();
    let mut rx = snapshots.subscribe();
    let task = tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let snapshot = snapshots.load_full();
            if snapshot.revision() == builder.revision {
                continue;
            }
            let revision = snapshot.revision();
            published.0.store(Arc::new(builder.next(snapshot)));
            tx.send_replace(revision);
        }
    });
    (handle, task)
}

/// A view of one Snapshot, for tests, benchmarks and the fuzz target.
pub fn fixed(snapshot: Arc<Snapshot>, settings: Arc<ZoneSettings>) -> ViewHandle {
    let mut builder = Builder::new(settings, &snapshot);
    let (_, revisions) = watch::channel(snapshot.revision());
    ViewHandle(
        Arc::new(ArcSwap::from_pointee(
            builder.view(snapshot, Invalidation::All),
        )),
        revisions,
    )
}
