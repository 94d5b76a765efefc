//! The node's place in the fleet: its entry `nodes/<id>` under a lease (what puts its addresses
//! in DNS answers), the keep-alive that holds it, the status report of the revision it has
//! applied, and leaving first on shutdown so that answers stop naming it before it stops
//! serving.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use portcullis_config::model::{Node, NodeStatus};
use portcullis_config::store::{Compare, EventKind, LeaseId, Op, Txn};
use portcullis_config::{NodeConfig, SnapshotHandle, State, StoreError, keys, state::encode};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The least time between two status reports driven by changes.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// The lease of a node that could not announce itself yet.
const UNANNOUNCED: LeaseId = LeaseId(0);

fn is_unavailable(e: &anyhow::Error) -> bool {
    matches!(
        e.chain().find_map(|c| c.downcast_ref::<StoreError>()),
        Some(StoreError::Unavailable(_))
    )
}

/// How long a leaving node keeps serving once it is out of the answers.
const LEAVE_DRAIN: Duration = Duration::from_millis(500);

/// Another live process holds this node's id.
#[derive(Debug, thiserror::Error)]
#[error(
    "another node with id `{id}` is live: its entry {key} stayed alive for {waited_s} s (longer than its lease). Give this node its own node.id, or stop the other node first"
)]
pub struct DuplicateNode {
    pub id: String,
    pub key: String,
    pub waited_s: u64,
}

pub struct Membership {
    state: State,
    snapshot: SnapshotHandle,
    node: Node,
    ttl: Duration,
    /// Other processes share the store (the fleet): refuse to replace a live entry of another
    /// process, and report the revision applied. Alone on an embedded store no other process
    /// can reach the store, so an entry is always a past life's.
    exclusive: bool,
    lease: watch::Sender<LeaseId>,
    reported: i64,
}

/// The node's instance id, made once and kept in its state directory.
pub fn instance_id(state_dir: &Path) -> Result<String> {
    let path = state_dir.join("node-instance");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_string()),
        _ => {
            let mut bytes = [0u8; 16];
            getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            std::fs::write(&path, format!("{id}\n"))
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(id)
        }
    }
}

impl Membership {
    /// Joins: puts `nodes/<id>` under a new lease. A previous life of this node (same instance)
    /// is replaced at once; another process's live entry is waited out for one lease, then
    /// refused with [`DuplicateNode`].
    pub async fn join(
        state: State,
        snapshot: SnapshotHandle,
        config: &NodeConfig,
        exclusive: bool,
    ) -> Result<Membership> {
        let node = Node {
            id: config.node.id.to_string(),
            ipv4: config.node.public_ipv4.clone(),
            ipv6: config.node.public_ipv6.clone(),
            last_seen: OffsetDateTime::now_utc(),
            instance: Some(instance_id(&config.store.path)?),
        };
        let ttl = config.node.lease_ttl.0;
        // A node that starts while the store is away serves its last state, and joins once the
        // store answers (its keep-alive finds no lease and announces it).
        let lease = match announce(&state, &node, ttl, exclusive).await {
            Ok(lease) => lease,
            Err(e) if is_unavailable(&e) => {
                tracing::warn!(error = %format!("{e:#}"), "store unreachable: this node joins the fleet once it is back");
                UNANNOUNCED
            }
            Err(e) => return Err(e),
        };
        let (lease, _) = watch::channel(lease);
        Ok(Membership {
            state,
            snapshot,
            node,
            ttl,
            exclusive,
            lease,
            reported: 0,
        })
    }

    /// Follows the node's current lease (it changes when the node had to announce itself
    /// again), for work that holds locks and slots with it.
    pub fn lease(&self) -> watch::Receiver<LeaseId> {
        self.lease.subscribe()
    }

    /// Keeps the entry alive until `shutdown`, every third of the lease; announces the node
    /// again if its lease ended (an outage longer than the lease), reports the revision it
    /// applied when the platform's state moved, and tells the Snapshot's health whether the
    /// store answers.
    pub async fn keep(mut self, shutdown: CancellationToken) -> Membership {
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut changes = self.snapshot.subscribe();
        // Platform state moved: report the new revision soon, at most once a REPORT_EVERY, so
        // `node list` shows a lag that is real rather than a stale report. The keep-alive never
        // waits for it.
        let mut report_at: Option<tokio::time::Instant> = None;
        // While a reload hands the node over, the new process announces it under its own lease
        // and ends this one's; a beat then would take the entry back. If the reload fails, the
        // next beat finds the lease gone and announces the node again, as it should.
        let handing_over = portcullis_proxy::conn::accepting_paused();
        loop {
            let report = async {
                match report_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return self,
                _ = tick.tick() => if !*handing_over.borrow() {
                    self.beat().await;
                },
                () = report => {
                    report_at = None;
                    if !*handing_over.borrow() {
                        self.report().await;
                    }
                }
                changed = changes.changed(), if report_at.is_none() => {
                    if changed.is_err() {
                        return self;
                    }
                    changes.mark_unchanged();
                    report_at = Some(tokio::time::Instant::now() + REPORT_EVERY);
                }
            }
        }
    }

    async fn beat(&mut self) {
        let health = self.snapshot.health().clone();
        let lease = *self.lease.borrow();
        match self.state.store().keep_alive(lease).await {
            Ok(()) => health.set_reachable(),
            Err(StoreError::LeaseNotFound(_)) => {
                tracing::warn!(
                    "this node's lease ended (the store was away longer than node.lease_ttl); announcing it again"
                );
                match announce(&self.state, &self.node, self.ttl, self.exclusive).await {
                    Ok(new) => {
                        self.lease.send_replace(new);
                        self.reported = 0;
                        health.set_reachable();
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "announcing this node failed; retrying")
                    }
                }
            }
            Err(StoreError::Unavailable(reason)) => {
                if health.reachable() {
                    tracing::warn!(%reason, "store unreachable: serving the last state; writes answer 503 until it is back");
                }
                health.set_unreachable(&reason);
            }
            Err(e) => tracing::warn!(error = %e, "keeping this node's lease alive failed"),
        }
        let snapshot = self.snapshot.load_full();
        metrics::gauge!("portcullis_store_serving_from_cache").set(f64::from(u8::from(
            !health.reachable() || health.serving_cache(),
        )));
        if !health.reachable() {
            return;
        }
        if let Ok(current) = self.state.store().current_revision().await {
            metrics::gauge!("portcullis_store_revision_lag")
                .set((current - snapshot.revision()).max(0) as f64);
        }
        self.report().await;
    }

    /// Writes this node's status when platform state moved since its last report.
    async fn report(&mut self) {
        // Alone, the node's own figures in `/v1/nodes` are live: nobody needs a report, and
        // the store is spared a write a second under churn.
        if !self.exclusive {
            return;
        }
        let snapshot = self.snapshot.load_full();
        if *self.lease.borrow() == UNANNOUNCED || !self.snapshot.health().reachable() {
            return;
        }
        if snapshot.data_revision() > self.reported || self.reported == 0 {
            let status = NodeStatus {
                applied_revision: snapshot.revision(),
                reported_at: OffsetDateTime::now_utc(),
            };
            let key = keys::status(&self.node.id);
            let lease = *self.lease.borrow();
            let written = match encode(&key, &status) {
                Ok(value) => self
                    .state
                    .store()
                    .put_with_lease(&key, value, lease)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match written {
                Ok(_) => self.reported = snapshot.data_revision().max(1),
                Err(e) => tracing::debug!(error = %e, "cannot report this node's status"),
            }
        }
    }

    /// Leaves the fleet: ends the lease (deleting the entry and the status), then waits, at
    /// most `wait`, until this node's own Snapshot no longer lists it, which is when the other
    /// nodes' DNS stops naming it too (they see the same change).
    pub async fn leave(&self, wait: Duration) {
        let lease = *self.lease.borrow();
        if lease == UNANNOUNCED {
            return;
        }
        if let Err(e) = self.state.store().revoke_lease(lease).await {
            tracing::warn!(error = %e, "could not withdraw this node's entry; it leaves when its lease ends");
            return;
        }
        let mut published = self.snapshot.subscribe();
        let gone = |s: &SnapshotHandle| !s.load().nodes().any(|n| n.id == self.node.id);
        let _ = tokio::time::timeout(wait, async {
            while !gone(&self.snapshot) {
                if published.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        // The other nodes apply the same change within moments of this one; clients that
        // asked just before get a node that still answers.
        tokio::time::sleep(LEAVE_DRAIN).await;
    }
}

impl Membership {
    /// Steps aside for the process a reload started, which announced this node under a lease
    /// of its own: ending this process's lease frees the locks it held and leaves the entry,
    /// now the new lease's, in place. On the embedded store (handed over, and holding no
    /// locks) there is nothing to do.
    pub async fn hand_over(&self) {
        let lease = *self.lease.borrow();
        if !self.exclusive || lease == UNANNOUNCED {
            return;
        }
        if let Err(e) = self.state.store().revoke_lease(lease).await {
            tracing::debug!(error = %e, "the old lease ends by itself");
        }
    }
}

/// Puts the node's entry under a new lease; see [`Membership::join`].
async fn announce(state: &State, node: &Node, ttl: Duration, exclusive: bool) -> Result<LeaseId> {
    let store = state.store();
    let key = keys::node(&node.id);
    let value = encode(&key, node)?;
    let lease = store
        .grant_lease(ttl)
        .await
        .context("granting this node's lease")?;
    let put = Op::Put {
        key: key.clone(),
        value: value.clone(),
        lease: Some(lease),
    };
    // Waiting out one lease is enough for an entry a dead process left; a second lease's worth
    // covers a keep-alive sent just before its holder died.
    let deadline = tokio::time::Instant::now() + ttl * 2 + Duration::from_secs(1);
    loop {
        let existing = store.get(&key).await.context("reading this node's entry")?;
        let mine = existing.as_ref().is_none_or(|kv| {
            !exclusive
                || portcullis_config::state::decode::<Node>(kv)
                    .is_ok_and(|n| n.instance.is_some() && n.instance == node.instance)
        });
        if mine {
            let compare = match &existing {
                Some(kv) => Compare::ModRevision(key.clone(), kv.mod_revision),
                None => Compare::Absent(key.clone()),
            };
            let out = store
                .txn(Txn {
                    compare: vec![compare],
                    success: vec![put.clone()],
                    failure: vec![],
                })
                .await
                .context("announcing this node")?;
            if out.succeeded {
                if let Some(old) = existing.and_then(|kv| kv.lease).filter(|l| *l != lease) {
                    // A past life's lease: end it now rather than when it runs out.
                    let _ = store.revoke_lease(old).await;
                }
                return Ok(lease);
            }
            continue;
        }
        let Some(existing) = existing else { continue };
        if tokio::time::Instant::now() >= deadline {
            let _ = store.revoke_lease(lease).await;
            return Err(DuplicateNode {
                id: node.id.clone(),
                key,
                waited_s: (ttl * 2).as_secs() + 1,
            }
            .into());
        }
        tracing::info!(id = %node.id, "another process holds this node id; waiting for its lease to end");
        let mut watch = store
            .watch(&key, existing.mod_revision + 1)
            .await
            .context("watching this node's entry")?;
        let _ = tokio::time::timeout_at(deadline, async {
            while let Some(Ok(batch)) = watch.next().await {
                if batch
                    .events
                    .iter()
                    .any(|e| matches!(e.kind, EventKind::Delete { .. }) && e.key() == key)
                {
                    return;
                }
            }
        })
        .await;
    }
}
