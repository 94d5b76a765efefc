//! Watches that outlive the stream they run on. Each delivered batch moves the watch's next
//! revision on; when the stream breaks (its member died or restarted, or lost its leader) the
//! watch is opened again, on the next member, from exactly that revision, so the consumer sees
//! neither a gap nor a repeat. Only etcd saying the revision is compacted (or refusing the
//! watch for good) ends it with an error.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchResponse, WatchStream};
use portcullis_config::StoreError;
use portcullis_config::store::{Event, EventKind, Revision, Watch, WatchBatch};
use tokio::sync::mpsc;

use crate::client::{Cluster, chain, count_failure};
use crate::convert::{Prefix, key_value, range_end};

const BUFFER: usize = 256;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
pub(crate) const RESTARTS_TOTAL: &str = "portcullis_store_watch_restarts_total";

type Sender = mpsc::Sender<Result<WatchBatch, StoreError>>;

struct Target {
    cluster: Arc<Cluster>,
    prefix: Prefix,
    key: Vec<u8>,
    end: Vec<u8>,
}

pub(crate) async fn start(
    cluster: Arc<Cluster>,
    prefix: Prefix,
    watched: &str,
    next: Revision,
) -> Result<Watch, StoreError> {
    let key = prefix.full(watched);
    let end = range_end(&key);
    let target = Target {
        cluster,
        prefix,
        key,
        end,
    };
    let (stream, member) = target.open(next).await?;
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(run(target, next, stream, member, tx));
    Ok(Watch::new(rx))
}

impl Target {
    /// A watch stream from `next` on whichever member answers, and that member's index.
    async fn open(&self, next: Revision) -> Result<(WatchStream, usize), StoreError> {
        let stream = self
            .cluster
            .read("watch", |mut conn| {
                let (key, end) = (self.key.clone(), self.end.clone());
                async move {
                    let options = WatchOptions::new()
                        .with_range(end)
                        .with_start_revision(next);
                    conn.watch.watch(key, Some(options)).await
                }
            })
            .await?;
        Ok((stream, self.cluster.current()))
    }
}

/// How a stream ended.
enum Pumped {
    /// The consumer dropped the watch.
    Gone,
    /// The stream broke; open it again.
    Broken(String),
    /// etcd ended the watch for good.
    End(StoreError),
}

async fn run(
    target: Target,
    mut next: Revision,
    mut stream: WatchStream,
    mut member: usize,
    tx: Sender,
) {
    loop {
        let reason = match pump(&target.prefix, &mut stream, &mut next, &tx).await {
            Pumped::Gone => return,
            Pumped::End(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Pumped::Broken(reason) => reason,
        };
        metrics::counter!(RESTARTS_TOTAL).increment(1);
        tracing::warn!(
            endpoint = %target.cluster.endpoint_name(member),
            %reason,
            from = next,
            "etcd watch broke; resuming"
        );
        target.cluster.fail_over(member);
        let mut backoff = FIRST_BACKOFF;
        loop {
            let opened = tokio::select! {
                () = tx.closed() => return,
                opened = target.open(next) => opened,
            };
            match opened {
                Ok((s, m)) => {
                    (stream, member) = (s, m);
                    break;
                }
                Err(e @ StoreError::Unavailable(_)) => {
                    // The whole cluster may be down for a while: keep trying, as the node
                    // serves what it has meanwhile.
                    tracing::debug!(error = %e, "etcd watch cannot resume yet");
                    tokio::select! {
                        () = tx.closed() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    }
}

/// Delivers what `stream` carries, one batch per revision, until it ends.
async fn pump(
    prefix: &Prefix,
    stream: &mut WatchStream,
    next: &mut Revision,
    tx: &Sender,
) -> Pumped {
    loop {
        let message = tokio::select! {
            () = tx.closed() => return Pumped::Gone,
            message = stream.message() => message,
        };
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => return Pumped::Broken("the watch stream ended".into()),
            Err(e) => return Pumped::Broken(chain(&e)),
        };
        if response.compact_revision() > 0 {
            count_failure("compacted");
            return Pumped::End(StoreError::Compacted {
                requested: *next,
                // etcd keeps the compaction revision itself; what is gone is below it.
                compacted_through: response.compact_revision() - 1,
            });
        }
        if response.canceled() {
            let reason = response.cancel_reason();
            if reason.contains("no leader") {
                return Pumped::Broken(format!("etcd cancelled the watch: {reason}"));
            }
            let kind = if reason.contains("permission denied") || reason.contains("auth") {
                "auth"
            } else {
                "other"
            };
            count_failure(kind);
            return Pumped::End(StoreError::Backend(format!(
                "etcd cancelled the watch: {}",
                if reason.is_empty() {
                    "no reason given"
                } else {
                    reason
                }
            )));
        }
        let batches = match batches(prefix, &response, *next) {
            Ok(batches) => batches,
            Err(e) => return Pumped::End(e),
        };
        for batch in batches {
            let revision = batch.revision;
            if tx.send(Ok(batch)).await.is_err() {
                return Pumped::Gone;
            }
            *next = revision + 1;
        }
    }
}

/// The response's events grouped by revision, leaving out any below `next` (already sent).
fn batches(
    prefix: &Prefix,
    response: &WatchResponse,
    next: Revision,
) -> Result<Vec<WatchBatch>, StoreError> {
    let mut out: Vec<WatchBatch> = Vec::new();
    for event in response.events() {
        let Some(kv) = event.kv() else {
            return Err(StoreError::Backend(
                "etcd sent a watch event without a key".into(),
            ));
        };
        let revision = kv.mod_revision();
        if revision < next {
            continue;
        }
        let kind = match event.event_type() {
            EventType::Put => EventKind::Put(key_value(prefix, kv.clone())?),
            EventType::Delete => EventKind::Delete {
                key: prefix.strip(kv.key())?,
            },
        };
        let event = Event { revision, kind };
        match out.last_mut() {
            Some(batch) if batch.revision == revision => batch.events.push(event),
            Some(batch) if batch.revision > revision => {
                return Err(StoreError::Backend(format!(
                    "etcd sent revision {revision} after {}",
                    batch.revision
                )));
            }
            _ => out.push(WatchBatch {
                revision,
                events: vec![event],
            }),
        }
    }
    Ok(out)
}
