//! The Snapshot: an immutable picture of all platform state at one store revision, which every
//! hot path reads (DNS answers, routing, certificate selection) without a lock.
//!
//! [`SnapshotSync`] follows the store with a watch, applies each burst of changes to a copy of
//! the current Snapshot and swaps it in atomically; readers keep whichever one they loaded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use foldhash::fast::FixedState;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::error::StoreError;
use crate::keys;
use crate::model::{Certificate, DnsChallenge, Domain, EchKeys, Node, Record, Service, ServiceId};
use crate::names::{DomainName, MAX_NAME_LEN, host_name, normalize_host, uuid_bits};
use crate::service_index::ServiceIndex;
use crate::state::decode;
use crate::store::{EventKind, KeyValue, PageRequest, Replica, Revision, Store};

/// A persistent hash map: a clone shares its nodes, and a change copies one path of them, so a
/// Snapshot with a change more costs the same whatever its size.
type SharedMap<V> =
    imbl::GenericHashMap<Arc<str>, V, FixedState, imbl::shared_ptr::DefaultSharedPtr>;
type SharedOrdMap<V> = imbl::OrdMap<Arc<str>, V>;

/// Bursts of changes a Snapshot remembers, for parts that fell behind by a few Snapshots.
const CHANGE_HISTORY: usize = 64;

/// Length of a hyphenated UUID, the first label of a canonical name.
const UUID_LEN: usize = 36;

/// The public half of the ACME account: enough to answer http-01 challenges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountKey {
    pub thumbprint: Arc<str>,
    pub account_url: Arc<str>,
}

#[derive(Clone)]
pub struct Snapshot {
    revision: Revision,
    zone: DomainName,
    /// Keyed by the id's 128 bits: a canonical Host is parsed, never hashed as a string.
    services: ServiceIndex,
    /// Alias domain name -> its entry.
    domains: SharedMap<Arc<Domain>>,
    records: SharedOrdMap<Arc<Record>>,
    /// Primary name -> certificate: what it covers, its state and validity. The chain and the
    /// private key stay in the store, read by the TLS path on demand.
    certificates: SharedMap<Arc<Certificate>>,
    nodes: SharedOrdMap<Arc<Node>>,
    /// DNS-01 label -> the values answered at `<label>.acme.<zone>`.
    dns_challenges: SharedMap<Arc<DnsChallenge>>,
    account: Option<AccountKey>,
    ech_keys: Arc<EchKeys>,
    /// The last bursts of changes, oldest first, each continuing the one before; empty after a
    /// full (re)load.
    history: Arc<[Arc<Changes>]>,
    /// The revision of the last change to platform state, leaving out nodes' status reports:
    /// a node that has applied it is up to date, however many reports came after.
    data_revision: Revision,
}

/// The store keys changed between two consecutive Snapshots. A cache built from the Snapshot at
/// `since` drops just what these keys touch; a cache at any other revision must drop everything.
#[derive(Debug, Default)]
pub struct Changes {
    pub since: Revision,
    /// The revision these changes bring the Snapshot to.
    pub until: Revision,
    pub keys: Vec<Box<str>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("revision", &self.revision)
            .field("zone", &self.zone)
            .field("services", &self.services.len())
            .field("domains", &self.domains.len())
            .field("records", &self.records.len())
            .field("certificates", &self.certificates.len())
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    pub fn empty(zone: DomainName) -> Self {
        Snapshot {
            revision: 0,
            zone,
            services: ServiceIndex::default(),
            domains: SharedMap::default(),
            records: SharedOrdMap::default(),
            certificates: SharedMap::default(),
            nodes: SharedOrdMap::default(),
            dns_challenges: SharedMap::default(),
            account: None,
            ech_keys: Arc::new(EchKeys::default()),
            history: Arc::new([]),
            data_revision: 0,
        }
    }

    /// Builds a Snapshot from key-values read from the store (any order).
    pub fn from_kvs(zone: DomainName, revision: Revision, kvs: &[KeyValue]) -> Self {
        let mut snapshot = Snapshot::empty(zone);
        // Size the largest map once instead of rehashing it ~20 times on the way to 1M.
        let services = kvs
            .iter()
            .filter(|kv| kv.key.starts_with(keys::SERVICES))
            .count();
        snapshot.services = ServiceIndex::with_capacity(services);
        for kv in kvs {
            snapshot.apply_put(kv);
        }
        snapshot.revision = revision;
        snapshot.data_revision = revision;
        snapshot
    }

    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The revision of the last change other than a node's status report.
    pub fn data_revision(&self) -> Revision {
        self.data_revision
    }

    pub fn zone(&self) -> &DomainName {
        &self.zone
    }

    pub fn service(&self, id: &ServiceId) -> Option<&Arc<Service>> {
        self.services.get(id.0.as_u128())
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The service a Host header (or SNI, or `:authority`) names: its canonical domain
    /// `<id>.<zone>` or an alias domain routed to it. Case, a port and a trailing dot are ignored.
    pub fn service_for_host(&self, host: &str) -> Option<&Arc<Service>> {
        let name = host_name(host)?;
        let zone = self.zone.as_str();
        let bytes = name.as_bytes();
        // The canonical form `<uuid>.<zone>`: decoded in place, no copy, no lowercasing.
        if bytes.len() == UUID_LEN + 1 + zone.len()
            && bytes[UUID_LEN] == b'.'
            && (&bytes[UUID_LEN + 1..] == zone.as_bytes()
                || bytes[UUID_LEN + 1..].eq_ignore_ascii_case(zone.as_bytes()))
            && let Some(bits) = uuid_bits(&bytes[..UUID_LEN])
        {
            return self.services.get(bits);
        }
        if self.domains.is_empty() {
            return None;
        }
        let mut buf = [0u8; MAX_NAME_LEN];
        let domain = self.live_alias(normalize_host(name, &mut buf)?)?;
        self.services.get(domain.service.0.as_u128())
    }

    /// An alias domain by its stored name (lowercase A-labels, no trailing dot, `*.` for a
    /// wildcard), whatever its status.
    pub fn domain(&self, name: &str) -> Option<&Arc<Domain>> {
        self.domains.get(name)
    }

    /// The alias domain that serves `name` (normalized: lowercase, no trailing dot), if any:
    /// the one rule DNS answers, routing, SNI and challenges share. The name's own entry
    /// decides when it has one (a claimed but unverified name is not served through a
    /// wildcard); otherwise a wildcard alias one label up (`*.example.com` serves
    /// `a.example.com`, as a wildcard certificate covers it). Live means verified, with its
    /// service still there.
    pub fn live_alias(&self, name: &str) -> Option<&Arc<Domain>> {
        let domain = match self.domains.get(name) {
            Some(exact) => exact,
            None => {
                let (_, parent) = name.split_once('.')?;
                let mut buf = [0u8; MAX_NAME_LEN + 2];
                let wildcard = buf.get_mut(..parent.len() + 2)?;
                wildcard[..2].copy_from_slice(b"*.");
                wildcard[2..].copy_from_slice(parent.as_bytes());
                // Only ASCII went in: `parent` is a str, and so is "*.".
                self.domains.get(std::str::from_utf8(wildcard).ok()?)?
            }
        };
        (domain.is_live() && self.services.get(domain.service.0.as_u128()).is_some())
            .then_some(domain)
    }

    pub fn domains(&self) -> impl Iterator<Item = &Arc<Domain>> {
        self.domains.values()
    }

    pub fn records(&self) -> impl Iterator<Item = &Arc<Record>> {
        self.records.values()
    }

    pub fn certificate(&self, primary_name: &str) -> Option<&Arc<Certificate>> {
        self.certificates.get(primary_name)
    }

    pub fn certificates(&self) -> impl Iterator<Item = &Arc<Certificate>> {
        self.certificates.values()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.nodes.values()
    }

    /// The DNS-01 values to answer at `<label>.acme.<zone>`.
    pub fn dns_challenge(&self, label: &str) -> Option<&Arc<DnsChallenge>> {
        self.dns_challenges.get(label)
    }

    pub fn account(&self) -> Option<&AccountKey> {
        self.account.as_ref()
    }

    pub fn ech_keys(&self) -> &Arc<EchKeys> {
        &self.ech_keys
    }

    /// The keys changed after `revision` up to this Snapshot, for a part that last looked at the
    /// Snapshot of that revision: it redoes just these instead of walking everything. `None`
    /// when this Snapshot does not know (too far back, or a full reload since): start over.
    pub fn changes_since(&self, revision: Revision) -> Option<impl Iterator<Item = &str>> {
        if revision == self.revision {
            return Some(self.history[self.history.len()..].iter().flat_map(keys_of));
        }
        let first = self.history.iter().position(|c| c.until > revision)?;
        (self.history[first].since <= revision)
            .then(|| self.history[first..].iter().flat_map(keys_of))
    }

    /// Applies one change. A value that does not decode is logged and skipped: one bad entry
    /// must not stop a node from serving everything else.
    pub fn apply(&mut self, revision: Revision, event: &EventKind) {
        match event {
            EventKind::Put(kv) => self.apply_put(kv),
            EventKind::Delete { key } => self.apply_delete(key),
        }
        self.revision = self.revision.max(revision);
        let key = match event {
            EventKind::Put(kv) => kv.key.as_str(),
            EventKind::Delete { key } => key.as_str(),
        };
        if !key.starts_with(keys::STATUS) {
            self.data_revision = self.data_revision.max(revision);
        }
    }

    fn apply_put(&mut self, kv: &KeyValue) {
        if let Some(entry) = Entry::decode(kv) {
            self.insert(entry);
        }
    }

    fn insert(&mut self, entry: Entry) {
        match entry {
            Entry::Service(s) => self.services.insert(s.id.0.as_u128(), s),
            Entry::Domain(name, d) => {
                self.domains.insert(name, d);
            }
            Entry::Record(key, r) => {
                self.records.insert(key, r);
            }
            Entry::Certificate(name, c) => {
                self.certificates.insert(name, c);
            }
            Entry::Node(id, n) => {
                self.nodes.insert(id, n);
            }
            Entry::DnsChallenge(label, c) => {
                self.dns_challenges.insert(label, c);
            }
            Entry::Account(a) => self.account = Some(a),
            Entry::Ech(k) => self.ech_keys = k,
        }
    }

    fn apply_delete(&mut self, key: &str) {
        if let Some(id) = key.strip_prefix(keys::SERVICES) {
            if let Ok(id) = Uuid::try_parse(id) {
                self.services.remove(id.as_u128());
            }
        } else if let Some(name) = key.strip_prefix(keys::DOMAINS) {
            self.domains.remove(name);
        } else if let Some(rest) = key.strip_prefix(keys::RECORDS) {
            self.records.remove(rest);
        } else if let Some(name) = key.strip_prefix(keys::CERTIFICATES) {
            self.certificates.remove(name);
        } else if let Some(id) = key.strip_prefix(keys::NODES) {
            self.nodes.remove(id);
        } else if let Some(label) = key.strip_prefix(keys::DNS_CHALLENGES) {
            self.dns_challenges.remove(label);
        } else if key == keys::ACME_ACCOUNT {
            self.account = None;
        } else if key == keys::ECH_KEYS {
            self.ech_keys = Arc::new(EchKeys::default());
        }
    }
}

/// A stored value decoded into its place in the Snapshot. Decoding needs no Snapshot, so a load
/// decodes one page on another thread while it reads the next.
enum Entry {
    Service(Arc<Service>),
    Domain(Arc<str>, Arc<Domain>),
    Record(Arc<str>, Arc<Record>),
    Certificate(Arc<str>, Arc<Certificate>),
    Node(Arc<str>, Arc<Node>),
    DnsChallenge(Arc<str>, Arc<DnsChallenge>),
    Account(AccountKey),
    Ech(Arc<EchKeys>),
}

impl Entry {
    /// `None` for keys that are not part of the picture, and for a value that does not decode,
    /// which is logged and skipped: one bad entry must not stop a node from serving the rest.
    fn decode(kv: &KeyValue) -> Option<Entry> {
        let key = kv.key.as_str();
        let entry = if key.starts_with(keys::SERVICES) {
            decode::<Service>(kv).map(|s| Entry::Service(Arc::new(s)))
        } else if let Some(name) = key.strip_prefix(keys::DOMAINS) {
            decode::<Domain>(kv).map(|d| Entry::Domain(name.into(), Arc::new(d)))
        } else if let Some(label) = key.strip_prefix(keys::DNS_CHALLENGES) {
            decode::<DnsChallenge>(kv).map(|c| Entry::DnsChallenge(label.into(), Arc::new(c)))
        } else if let Some(rest) = key.strip_prefix(keys::RECORDS) {
            decode::<Record>(kv).map(|r| Entry::Record(rest.into(), Arc::new(r)))
        } else if let Some(name) = key.strip_prefix(keys::CERTIFICATES) {
            decode::<Certificate>(kv).map(|mut c| {
                // Written before chains moved out of this record: the TLS path reads it from the
                // store when it needs it, like any other chain.
                c.chain_pem = String::new();
                Entry::Certificate(name.into(), Arc::new(c))
            })
        } else if let Some(id) = key.strip_prefix(keys::NODES) {
            decode::<Node>(kv).map(|n| Entry::Node(id.into(), Arc::new(n)))
        } else if key == keys::ACME_ACCOUNT {
            decode::<crate::model::AcmeAccount>(kv).map(|a| {
                Entry::Account(AccountKey {
                    thumbprint: a.thumbprint.into(),
                    account_url: a.account_url.into(),
                })
            })
        } else if key == keys::ECH_KEYS {
            decode::<EchKeys>(kv).map(|k| Entry::Ech(Arc::new(k)))
        } else {
            // Tombstones, locks and anything newer than this build.
            return None;
        };
        entry
            .inspect_err(|e| {
                tracing::warn!(key, error = %e, "skipping a stored value that does not decode");
                metrics::counter!("portcullis_store_undecodable_values_total").increment(1);
            })
            .ok()
    }
}

fn keys_of(changes: &Arc<Changes>) -> impl Iterator<Item = &str> {
    changes.keys.iter().map(|k| &**k)
}

impl Snapshot {
    fn push_changes(&mut self, changes: Changes) {
        let keep = self.history.len().min(CHANGE_HISTORY - 1);
        let mut history = Vec::with_capacity(keep + 1);
        history.extend_from_slice(&self.history[self.history.len() - keep..]);
        history.push(Arc::new(changes));
        self.history = history.into();
    }
}

/// How the parts reach the current Snapshot. Clone freely.
#[derive(Clone)]
pub struct SnapshotHandle {
    current: Arc<ArcSwap<Snapshot>>,
    published: watch::Receiver<Revision>,
    health: Arc<StoreHealth>,
}

impl SnapshotHandle {
    /// The Snapshot now; cheap, lock-free, for hot paths.
    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.current.load()
    }

    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Whether the store is reachable, and whether this Snapshot came from the local copy.
    pub fn health(&self) -> &Arc<StoreHealth> {
        &self.health
    }

    /// Wakes on every published Snapshot (background work that reacts to changes).
    pub fn subscribe(&self) -> watch::Receiver<Revision> {
        self.published.clone()
    }

    /// Waits until a Snapshot at `revision` or later is published, at most `timeout`. Lets a
    /// writer answer only once its change is live on this node. False on timeout.
    pub async fn wait_for(&self, revision: Revision, timeout: Duration) -> bool {
        let mut rx = self.published.clone();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Keeps a [`SnapshotHandle`] in step with the store.
pub struct SnapshotSync {
    pub handle: SnapshotHandle,
    pub task: JoinHandle<()>,
}

/// How long to wait before reading the store again after it failed.
const RETRY_AFTER_ERROR: Duration = Duration::from_millis(500);

impl SnapshotSync {
    /// Loads the whole state, publishes the first Snapshot, then follows the store.
    pub async fn start(store: Arc<dyn Store>, zone: DomainName) -> Result<Self, StoreError> {
        Self::start_with_cache(store, None, zone).await
    }

    /// As [`SnapshotSync::start`]; when the store cannot be reached and `cache` (the node's
    /// local copy of a fleet store) has been filled before, starts from the copy instead and
    /// catches up once the store is back.
    pub async fn start_with_cache(
        store: Arc<dyn Store>,
        cache: Option<Replica>,
        zone: DomainName,
    ) -> Result<Self, StoreError> {
        Self::start_inner(store, cache, zone, None).await
    }

    /// Starts from `cache` at once: the store is known to be unreachable (`reason`), so the
    /// node does not wait out a request to it first. Catches up once the store is back.
    pub async fn start_from_copy(
        store: Arc<dyn Store>,
        cache: Replica,
        zone: DomainName,
        reason: String,
    ) -> Result<Self, StoreError> {
        Self::start_inner(store, Some(cache), zone, Some(reason)).await
    }

    async fn start_inner(
        store: Arc<dyn Store>,
        cache: Option<Replica>,
        zone: DomainName,
        unreachable: Option<String>,
    ) -> Result<Self, StoreError> {
        let health = Arc::new(StoreHealth::default());
        let first = match unreachable {
            Some(reason) => Err(StoreError::Unavailable(reason)),
            None => load(store.as_ref(), zone.clone()).await,
        };
        let (snapshot, revision) = match (first, cache) {
            (Ok(loaded), _) => loaded,
            (Err(StoreError::Unavailable(reason)), Some(cache)) if cache.revision().await? > 0 => {
                let loaded = load(cache.reader().as_ref(), zone.clone()).await?;
                tracing::warn!(
                    %reason,
                    revision = loaded.1,
                    copy = %cache.path().display(),
                    "store unreachable at start: serving this node's last copy until it is back"
                );
                health.set_unreachable(&reason);
                health.serving_cache.store(true, Ordering::Relaxed);
                loaded
            }
            (Err(e), _) => return Err(e),
        };
        let current = Arc::new(ArcSwap::from_pointee(snapshot));
        let (tx, published) = watch::channel(revision);
        let handle = SnapshotHandle {
            current: current.clone(),
            published,
            health: health.clone(),
        };
        let task = tokio::spawn(follow(store, zone, current, tx, revision, health));
        Ok(SnapshotSync { handle, task })
    }
}

/// Whether this node reaches its store, as its parts last saw it: the Snapshot's watch, and
/// the node's lease keep-alive, which notices an outage within a third of the lease.
#[derive(Debug, Default)]
pub struct StoreHealth {
    unreachable: AtomicBool,
    /// The Snapshot was loaded from the local copy and has not caught up with the store yet.
    serving_cache: AtomicBool,
    reason: std::sync::Mutex<Option<(String, time::OffsetDateTime)>>,
}

impl StoreHealth {
    pub fn set_unreachable(&self, reason: &str) {
        if !self.unreachable.swap(true, Ordering::Relaxed)
            && let Ok(mut r) = self.reason.lock()
        {
            *r = Some((reason.to_string(), time::OffsetDateTime::now_utc()));
        }
    }

    pub fn set_reachable(&self) {
        if self.unreachable.swap(false, Ordering::Relaxed)
            && let Ok(mut r) = self.reason.lock()
        {
            *r = None;
        }
    }

    pub fn reachable(&self) -> bool {
        !self.unreachable.load(Ordering::Relaxed)
    }

    /// Serving state loaded from the node's copy, not yet caught up with the store.
    pub fn serving_cache(&self) -> bool {
        self.serving_cache.load(Ordering::Relaxed)
    }

    /// Why and since when the store is unreachable.
    pub fn outage(&self) -> Option<(String, time::OffsetDateTime)> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }
}

/// What a Snapshot is made of. Chains and private keys (`keys/`), tombstones and locks are not.
const LOADED_PREFIXES: [&str; 7] = [
    keys::SERVICES,
    keys::DOMAINS,
    keys::RECORDS,
    keys::CERTIFICATES,
    keys::NODES,
    keys::ACME_ACCOUNT,
    keys::ECH_KEYS,
];
/// Keys read per page at load: large enough to amortize a read, small enough that a million
/// services never sit in memory twice (as stored bytes and as the Snapshot).
const LOAD_PAGE: usize = 10_000;

async fn load(store: &dyn Store, zone: DomainName) -> Result<(Snapshot, Revision), StoreError> {
    // Read the revision first and watch from just after it: changes made while the pages are
    // read are replayed in order on top, which ends in the same state.
    let start = store.current_revision().await?;
    let mut snapshot = Snapshot::empty(zone);
    // Each page is decoded on a blocking thread while the next is read, and put in place
    // meanwhile: at a million services, restart time is reading plus decoding, overlapped.
    let mut decoding: Option<tokio::task::JoinHandle<Vec<Entry>>> = None;
    for prefix in LOADED_PREFIXES {
        let mut page = PageRequest::first(LOAD_PAGE);
        loop {
            let got = store.list(prefix, page.clone()).await?;
            let more = got.more;
            page.after = got.items.last().map(|kv| kv.key.clone());
            let next = tokio::task::spawn_blocking(move || {
                got.items.iter().filter_map(Entry::decode).collect()
            });
            if let Some(done) = decoding.replace(next) {
                insert_all(&mut snapshot, done).await?;
            }
            if !more {
                break;
            }
        }
    }
    if let Some(done) = decoding {
        insert_all(&mut snapshot, done).await?;
    }
    snapshot.revision = start;
    snapshot.data_revision = start;
    Ok((snapshot, start))
}

async fn insert_all(
    snapshot: &mut Snapshot,
    decoded: tokio::task::JoinHandle<Vec<Entry>>,
) -> Result<(), StoreError> {
    let entries = decoded
        .await
        .map_err(|e| StoreError::Backend(format!("decoding the state failed: {e}")))?;
    for entry in entries {
        snapshot.insert(entry);
    }
    Ok(())
}

async fn follow(
    store: Arc<dyn Store>,
    zone: DomainName,
    current: Arc<ArcSwap<Snapshot>>,
    published: watch::Sender<Revision>,
    mut revision: Revision,
    health: Arc<StoreHealth>,
) {
    loop {
        let failure = match store.watch("", revision + 1).await {
            Ok(mut watch) => {
                health.set_reachable();
                health.serving_cache.store(false, Ordering::Relaxed);
                loop {
                    let Some(first) = watch.next().await else {
                        // The store itself is gone: the node is shutting down.
                        return;
                    };
                    let failed =
                        apply_burst(&current, &published, &mut revision, first, &mut watch);
                    if let Some(e) = failed {
                        break e;
                    }
                }
            }
            Err(e) => e,
        };
        match failure {
            // The watch fell out of the store's history and may have missed changes: start
            // over from a full read, serving the last Snapshot meanwhile.
            StoreError::Compacted { .. } => {
                tracing::warn!(error = %failure, "store history moved past this node; reloading state");
                reload(store.as_ref(), &zone, &current, &published, &mut revision).await;
            }
            e => {
                // Nothing was missed: watch again from the same revision once the store answers.
                if let StoreError::Unavailable(reason) = &e {
                    health.set_unreachable(reason);
                }
                tracing::debug!(error = %e, revision, "store watch interrupted; resuming");
                tokio::time::sleep(RETRY_AFTER_ERROR).await;
            }
        }
    }
}

/// Applies `first` and every batch already waiting to a copy of the current Snapshot, then
/// publishes it once. Returns the error that ended the watch, if one came.
fn apply_burst(
    current: &ArcSwap<Snapshot>,
    published: &watch::Sender<Revision>,
    revision: &mut Revision,
    first: Result<crate::store::WatchBatch, StoreError>,
    watch: &mut crate::store::Watch,
) -> Option<StoreError> {
    let mut next: Option<Snapshot> = None;
    let mut changes = Changes {
        since: *revision,
        until: *revision,
        keys: Vec::new(),
    };
    let mut pending = Some(first);
    let mut failed = None;
    while let Some(batch) = pending.take() {
        match batch {
            Ok(batch) => {
                let snapshot = next.get_or_insert_with(|| (**current.load()).clone());
                for event in &batch.events {
                    snapshot.apply(batch.revision, &event.kind);
                    changes.keys.push(event.key().into());
                }
                *revision = batch.revision;
                pending = watch.try_next();
            }
            Err(e) => failed = Some(e),
        }
    }
    if let Some(mut snapshot) = next {
        snapshot.revision = *revision;
        changes.until = *revision;
        snapshot.push_changes(changes);
        current.store(Arc::new(snapshot));
        published.send_replace(*revision);
    }
    failed
}

async fn reload(
    store: &dyn Store,
    zone: &DomainName,
    current: &ArcSwap<Snapshot>,
    published: &watch::Sender<Revision>,
    revision: &mut Revision,
) {
    loop {
        match load(store, zone.clone()).await {
            Ok((snapshot, rev)) => {
                current.store(Arc::new(snapshot));
                *revision = rev;
                published.send_replace(rev);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "reloading state failed; serving the last Snapshot");
                tokio::time::sleep(RETRY_AFTER_ERROR).await;
            }
        }
    }
}
