//! Connections to the cluster's members, and the retry rule every request goes through.
//!
//! One connection per endpoint, and every request goes to the current one; when it fails with
//! a connection-level error the next endpoint becomes current and the request is tried there,
//! until the request's deadline. `etcd-client`'s own balanced channel spreads requests over all
//! endpoints and fails those that meet a dead one, so it is not used.
//!
//! What may be re-sent:
//! - A request that surely never reached etcd (the connection could not be made: refused,
//!   timed out, TLS handshake failed) is re-sent anywhere.
//! - A request etcd refused before applying it (`no leader`, `not leader`, `not capable`) is
//!   re-sent after a short backoff, on the next endpoint.
//! - Reads, lease renewals, revokes and compactions are re-sent after any failure: doing them
//!   twice changes nothing (a grant done twice leaves an unused lease that expires alone).
//! - A transaction whose request was sent and then lost (connection broken mid-call, etcd's
//!   `request timed out` or `leader changed`, our deadline) may have been applied; re-sending
//!   it could apply it twice (a create-if-absent would then report a conflict against itself),
//!   so it is not re-sent: the caller gets `Unavailable` saying the outcome is unknown, and
//!   re-reads before deciding.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, Identity, KvClient, LeaseClient, MaintenanceClient,
    TlsOptions, WatchClient,
};
use portcullis_config::StoreError;
use tokio::time::Instant;
use tonic::Code;

use crate::EtcdOptions;

/// Pages of a few thousand records of a few KiB each stay well below this; etcd-client's
/// default of 4 MiB does not.
const MAX_DECODING: usize = 64 * 1024 * 1024;
/// etcd's own request limit is 1.5 MiB; this only keeps the client from refusing first.
const MAX_ENCODING: usize = 16 * 1024 * 1024;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

pub(crate) const FAILED_TOTAL: &str = "portcullis_store_requests_failed_total";

/// The clients of one member's connection.
#[derive(Clone)]
pub(crate) struct Conn {
    pub(crate) kv: KvClient,
    pub(crate) watch: WatchClient,
    pub(crate) lease: LeaseClient,
    pub(crate) maintenance: MaintenanceClient,
}

struct Member {
    name: String,
    endpoint: tonic::transport::Endpoint,
    /// Made on first use and kept: its channel reconnects by itself.
    conn: Mutex<Option<Conn>>,
}

pub(crate) struct Cluster {
    members: Vec<Member>,
    current: AtomicUsize,
    connect_options: ConnectOptions,
    dial_timeout: Duration,
    pub(crate) request_timeout: Duration,
}

/// Why one attempt failed, and so what may be done next.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The request never reached etcd.
    NotSent(String),
    /// etcd refused it without applying it; it may work shortly, or on another member.
    Refused(String),
    /// It may or may not have been applied.
    Unknown(String),
    /// etcd's answer: retrying would give the same.
    Final(StoreError, &'static str),
}

/// The metric label of a failure.
pub(crate) fn count_failure(kind: &'static str) {
    metrics::counter!(FAILED_TOTAL, "kind" => kind).increment(1);
}

impl Cluster {
    pub(crate) async fn connect(options: EtcdOptions) -> Result<Cluster, StoreError> {
        let cluster = Self::new(options).await?;
        cluster.probe().await?;
        Ok(cluster)
    }

    /// The cluster's members, not contacted yet: the first request connects.
    pub(crate) async fn new(options: EtcdOptions) -> Result<Cluster, StoreError> {
        if options.endpoints.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoint is configured".into()));
        }
        let tls = tls_options(&options).await?;
        let mut members = Vec::new();
        for name in &options.endpoints {
            let url = match (name.contains("://"), tls.is_some()) {
                (true, _) => name.clone(),
                (false, true) => format!("https://{name}"),
                (false, false) => format!("http://{name}"),
            };
            let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())
                .map_err(|e| StoreError::Invalid(format!("etcd endpoint `{name}`: {e}")))?
                .connect_timeout(options.dial_timeout)
                .tcp_nodelay(true)
                // A member that stops answering on an open connection (frozen, partitioned) is
                // noticed within about two dial timeouts, which also ends its watches.
                .http2_keep_alive_interval(options.dial_timeout)
                .keep_alive_timeout(options.dial_timeout)
                .keep_alive_while_idle(true);
            if let Some(tls) = &tls {
                if !url.starts_with("https://") {
                    return Err(StoreError::Invalid(format!(
                        "etcd endpoint `{name}` is http:// but TLS files are configured"
                    )));
                }
                endpoint = endpoint.tls_config(tls.clone()).map_err(|e| {
                    StoreError::Invalid(format!("etcd endpoint `{name}`: TLS: {}", chain(&e)))
                })?;
            }
            members.push(Member {
                name: name.clone(),
                endpoint,
                conn: Mutex::new(None),
            });
        }
        let mut connect_options = ConnectOptions::new()
            // A member cut off from the others answers nothing rather than stale data, and
            // cancels its watches, so both move to a member that has a leader.
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        match (&options.user, &options.password) {
            (Some(user), Some(password)) => {
                connect_options = connect_options.with_user(user, password);
            }
            (None, None) => {}
            _ => {
                return Err(StoreError::Invalid(
                    "etcd user and password go together: set both or neither".into(),
                ));
            }
        }
        let cluster = Cluster {
            members,
            current: AtomicUsize::new(0),
            connect_options,
            dial_timeout: options.dial_timeout,
            request_timeout: options.request_timeout,
        };
        Ok(cluster)
    }

    /// Makes the first member that answers current.
    async fn probe(&self) -> Result<(), StoreError> {
        let mut reasons = BTreeMap::new();
        for i in 0..self.members.len() {
            let attempt = async {
                let mut conn = self.conn(i).await?;
                conn.maintenance
                    .status()
                    .await
                    .map_err(|e| classify(&self.members[i].name, e))
            };
            match tokio::time::timeout(self.dial_timeout, attempt).await {
                Ok(Ok(_)) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(());
                }
                Ok(Err(Failure::Final(e, kind))) => {
                    count_failure(kind);
                    return Err(e);
                }
                Ok(Err(
                    Failure::NotSent(reason) | Failure::Refused(reason) | Failure::Unknown(reason),
                )) => {
                    reasons.insert(i, reason);
                }
                Err(_) => {
                    reasons.insert(i, format!("no answer within {:?}", self.dial_timeout));
                }
            }
        }
        count_failure("unavailable");
        Err(StoreError::Unavailable(self.summary(&reasons)))
    }

    pub(crate) fn current_endpoint(&self) -> &str {
        &self.members[self.current.load(Ordering::Relaxed) % self.members.len()].name
    }

    pub(crate) fn endpoint_name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    /// "etcd at a, b, c: a: why; b: why".
    fn summary(&self, reasons: &BTreeMap<usize, String>) -> String {
        let all: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
        let why: Vec<String> = reasons
            .iter()
            .map(|(i, reason)| format!("{}: {reason}", self.members[*i].name))
            .collect();
        format!("etcd at {}: {}", all.join(", "), why.join("; "))
    }

    /// The current member's index.
    pub(crate) fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.members.len()
    }

    /// Moves on from member `failed`, unless another request already did.
    pub(crate) fn fail_over(&self, failed: usize) -> usize {
        let next = (failed + 1) % self.members.len();
        match self
            .current
            .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => {
                tracing::info!(
                    from = %self.members[failed].name,
                    to = %self.members[next].name,
                    "etcd endpoint failed; moving to the next"
                );
                next
            }
            Err(now) => now % self.members.len(),
        }
    }

    pub(crate) async fn conn(&self, i: usize) -> Result<Conn, Failure> {
        let member = &self.members[i];
        if let Ok(guard) = member.conn.lock()
            && let Some(conn) = guard.as_ref()
        {
            return Ok(conn.clone());
        }
        let channel = etcd_client::Channel::Tonic(member.endpoint.connect_lazy());
        // With a user this authenticates, which is the first contact with the member.
        let client = Client::from_channel(channel, Some(self.connect_options.clone()))
            .await
            .map_err(|e| classify(&member.name, e))?;
        let conn = Conn {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_DECODING)
                .max_encoding_message_size(MAX_ENCODING),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_DECODING),
            lease: client.lease_client(),
            maintenance: client.maintenance_client(),
        };
        if let Ok(mut guard) = member.conn.lock() {
            *guard = Some(conn.clone());
        }
        Ok(conn)
    }

    /// A request that may be sent again after any failure.
    pub(crate) async fn read<T, F, Fut>(&self, what: &str, f: F) -> Result<T, StoreError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call(what, true, f).await
    }

    /// A request that must not be applied twice: re-sent only when it surely was not applied.
    pub(crate) async fn write<T, F, Fut>(&self, what: &str, f: F) -> Result<T, StoreError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call(what, false, f).await
    }

    async fn call<T, F, Fut>(&self, what: &str, idempotent: bool, mut f: F) -> Result<T, StoreError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.request_timeout;
        let mut reasons = BTreeMap::new();
        let mut backoff = FIRST_BACKOFF;
        let mut failed_in_round = 0;
        loop {
            let i = self.current();
            let name = &self.members[i].name;
            let attempt = async {
                let conn = self.conn(i).await?;
                f(conn).await.map_err(|e| classify(name, e))
            };
            let failure = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(failure)) => failure,
                Err(_) if idempotent => {
                    reasons.insert(i, format!("no answer within {:?}", self.request_timeout));
                    count_failure("timeout");
                    return Err(StoreError::Unavailable(self.summary(&reasons)));
                }
                Err(_) => {
                    count_failure("timeout");
                    return Err(StoreError::Unavailable(format!(
                        "etcd at {name}: no answer to {what} within {:?}; the outcome is unknown \
                         (it may have been applied): re-read before retrying",
                        self.request_timeout
                    )));
                }
            };
            let pause = match failure {
                Failure::Final(e, kind) => {
                    count_failure(kind);
                    return Err(e);
                }
                Failure::Unknown(reason) if !idempotent => {
                    count_failure("unavailable");
                    return Err(StoreError::Unavailable(format!(
                        "etcd at {name}: {what} failed after it was sent: {reason}; the outcome \
                         is unknown (it may have been applied): re-read before retrying"
                    )));
                }
                Failure::NotSent(reason) | Failure::Unknown(reason) => {
                    tracing::debug!(endpoint = %name, %reason, what, "etcd request failed; retrying");
                    reasons.insert(i, reason);
                    failed_in_round += 1;
                    // Straight to the next member, unless every one has just failed.
                    failed_in_round >= self.members.len()
                }
                Failure::Refused(reason) => {
                    tracing::debug!(endpoint = %name, %reason, what, "etcd refused a request; retrying");
                    reasons.insert(i, reason);
                    true
                }
            };
            self.fail_over(i);
            if pause {
                failed_in_round = 0;
                let wake = (Instant::now() + backoff).min(deadline);
                tokio::time::sleep_until(wake).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            if Instant::now() >= deadline {
                count_failure("unavailable");
                return Err(StoreError::Unavailable(self.summary(&reasons)));
            }
        }
    }
}

async fn tls_options(options: &EtcdOptions) -> Result<Option<TlsOptions>, StoreError> {
    let read = |path: &std::path::PathBuf, what: &'static str| {
        let path = path.clone();
        async move {
            tokio::fs::read(&path)
                .await
                .map_err(|e| StoreError::Invalid(format!("etcd {what} `{}`: {e}", path.display())))
        }
    };
    let mut tls = None::<TlsOptions>;
    if let Some(ca) = &options.ca {
        let pem = read(ca, "CA file").await?;
        tls = Some(TlsOptions::new().ca_certificate(Certificate::from_pem(pem)));
    }
    match (&options.cert, &options.key) {
        (Some(cert), Some(key)) => {
            let identity = Identity::from_pem(
                read(cert, "client certificate").await?,
                read(key, "client key").await?,
            );
            tls = Some(tls.unwrap_or_default().identity(identity));
        }
        (None, None) => {}
        _ => {
            return Err(StoreError::Invalid(
                "an etcd client certificate and its key go together: set both or neither".into(),
            ));
        }
    }
    Ok(tls)
}

/// An error with its sources, deduplicated: tonic repeats a cause in the message above it.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

fn is_connect_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        source = s.source();
    }
    false
}

/// The short reason a connection could not be made.
fn connect_reason(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    if lower.contains("connection refused") {
        "connection refused".into()
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake")
    {
        format!("TLS handshake failed: {text}")
    } else if lower.contains("timed out") || lower.contains("elapsed") {
        format!("connecting timed out: {text}")
    } else {
        format!("cannot connect: {text}")
    }
}

/// What an error from member `name` means for the request.
pub(crate) fn classify(name: &str, e: etcd_client::Error) -> Failure {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => classify_status(name, &status),
        E::TransportError(t) => Failure::NotSent(connect_reason(&chain(&t))),
        E::LeaseKeepAliveError(reason) if reason.contains("not found") => {
            Failure::Final(StoreError::LeaseNotFound(0), "other")
        }
        E::InvalidArgs(reason) => Failure::Final(StoreError::Invalid(reason), "other"),
        other => Failure::Unknown(chain(&other)),
    }
}

fn classify_status(name: &str, status: &tonic::Status) -> Failure {
    let message = status.message();
    let auth = |what: &str| {
        Failure::Final(
            StoreError::Unavailable(format!("etcd at {name}: {what}: {message}")),
            "auth",
        )
    };
    match status.code() {
        _ if is_connect_error(status) => Failure::NotSent(connect_reason(&chain(status))),
        Code::Unavailable => {
            if ["no leader", "not leader", "not capable"]
                .iter()
                .any(|m| message.contains(m))
            {
                Failure::Refused(message.to_string())
            } else {
                // "request timed out", "leader changed", "server stopped", a connection that
                // broke mid-call: any of these may follow the request being applied.
                Failure::Unknown(chain(status))
            }
        }
        Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::Internal => {
            Failure::Unknown(chain(status))
        }
        Code::NotFound if message.contains("lease not found") => {
            Failure::Final(StoreError::LeaseNotFound(0), "other")
        }
        Code::OutOfRange if message.contains("compacted") => Failure::Final(
            StoreError::Compacted {
                requested: 0,
                compacted_through: 0,
            },
            "compacted",
        ),
        Code::OutOfRange if message.contains("future revision") => {
            Failure::Final(StoreError::Invalid(format!("etcd: {message}")), "other")
        }
        Code::InvalidArgument if message.contains("authentication failed") => {
            auth("authentication failed (check the user and password)")
        }
        Code::Unauthenticated => auth("authentication failed"),
        Code::PermissionDenied => auth("permission denied"),
        Code::InvalidArgument | Code::FailedPrecondition => {
            Failure::Final(StoreError::Invalid(format!("etcd: {message}")), "other")
        }
        _ => Failure::Final(
            StoreError::Backend(format!("etcd at {name}: {}", chain(status))),
            "other",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_refusals_are_retried_and_timeouts_are_unknown() {
        let refused = tonic::Status::unavailable("etcdserver: no leader");
        assert!(matches!(
            classify_status("a", &refused),
            Failure::Refused(_)
        ));
        let timed_out = tonic::Status::unavailable("etcdserver: request timed out");
        assert!(matches!(
            classify_status("a", &timed_out),
            Failure::Unknown(_)
        ));
        let changed = tonic::Status::unavailable("etcdserver: leader changed");
        assert!(matches!(
            classify_status("a", &changed),
            Failure::Unknown(_)
        ));
        let auth = tonic::Status::invalid_argument(
            "etcdserver: authentication failed, invalid user ID or password",
        );
        match classify_status("127.0.0.1:1", &auth) {
            Failure::Final(StoreError::Unavailable(m), "auth") => {
                assert!(
                    m.contains("127.0.0.1:1") && m.contains("authentication failed"),
                    "{m}"
                );
            }
            other => panic!("{other:?}"),
        }
        let dup = tonic::Status::invalid_argument("etcdserver: duplicate key given in txn request");
        assert!(matches!(
            classify_status("a", &dup),
            Failure::Final(StoreError::Invalid(_), _)
        ));
    }
}
