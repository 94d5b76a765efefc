//! Reloads and upgrades without a failed request. `portcullis reload` (or SIGHUP) starts the
//! binary found at the path this process was started from (a new version, if one was installed
//! there) with the same arguments, and hands it the listening sockets, as nginx does across an
//! exec: connections arriving meanwhile wait in the sockets' queues, none is refused.
//!
//! The two processes talk over a socket pair, one line per step:
//! 1. the new process has read its configuration and asks for the store (`store`);
//! 2. the old one stops accepting, closes the store file (redb allows one process), and says
//!    so (`free`);
//! 3. the new process opens the store, loads its Snapshot, serves, and says `ready` (or
//!    `error <why>` and exits);
//! 4. the old one finishes its in-flight requests from its last Snapshot within
//!    `proxy.shutdown_grace` and exits. If step 3 fails, it takes the store back and goes on
//!    accepting: a bad new binary or configuration costs nothing.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use portcullis_config::{NodeConfig, Store, sockets};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

/// The environment variable naming the new process's end of the handover channel.
const HANDOVER_FD_ENV: &str = "PORTCULLIS_HANDOVER_FD";
/// How long the new process may take to read its configuration and ask for the store.
const STARTING: Duration = Duration::from_secs(30);
/// How long handshakes under way may take to finish before the store is handed over.
const HANDSHAKES_SETTLE: Duration = Duration::from_secs(2);
/// How long it may take, with the store, to serve (loading a large Snapshot takes a while).
const TAKING_OVER: Duration = Duration::from_secs(120);

/// The new process's end: asks for the store, reports when it serves.
pub struct Successor {
    channel: BufReader<UnixStream>,
}

impl Successor {
    /// The channel to the process that started this one, when a reload did.
    #[allow(unsafe_code)] // taking ownership of an inherited descriptor by its number
    pub fn from_env() -> Option<Successor> {
        let fd: i32 = std::env::var(HANDOVER_FD_ENV).ok()?.parse().ok()?;
        // SAFETY: fcntl(F_GETFD) only asks whether the number is an open descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return None;
        }
        // SAFETY: the previous process passed this descriptor to this process alone.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let socket = socket2::Socket::from(owned);
        // Not for the process a later reload starts.
        let _ = socket.set_cloexec(true);
        let _ = socket.set_nonblocking(true);
        let stream = std::os::unix::net::UnixStream::from(OwnedFd::from(socket));
        let stream = UnixStream::from_std(stream).ok()?;
        Some(Successor {
            channel: BufReader::new(stream),
        })
    }

    /// Asks the previous process to let go of the store, and waits until it has.
    pub async fn take_store(&mut self) -> Result<()> {
        self.send("store").await?;
        let mut line = String::new();
        self.channel
            .read_line(&mut line)
            .await
            .context("waiting for the previous process to hand over the store")?;
        anyhow::ensure!(
            line.trim() == "free",
            "the previous process did not hand over the store (it said {:?})",
            line.trim()
        );
        Ok(())
    }

    pub async fn ready(&mut self) {
        if let Err(e) = self.send("ready").await {
            tracing::warn!(error = %e, "cannot tell the previous process this one serves");
        }
    }

    pub async fn failed(&mut self, why: &str) {
        let _ = self
            .send(&format!("error {}", why.replace('\n', " ")))
            .await;
    }

    async fn send(&mut self, line: &str) -> std::io::Result<()> {
        let stream = self.channel.get_mut();
        stream.write_all(format!("{line}\n").as_bytes()).await?;
        stream.flush().await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "the configuration file {path} cannot be used: {reason}. This process goes on serving with the configuration it has; fix the file and reload again"
    )]
    Config { path: String, reason: String },
    #[error("a reload is already under way; wait for it to finish")]
    Busy,
    #[error(
        "the new process did not take over: {0}. This process goes on serving; see the node's log"
    )]
    Failed(String),
}

impl ReloadError {
    pub fn code(&self) -> &'static str {
        match self {
            ReloadError::Config { .. } => "invalid_config",
            ReloadError::Busy => "reload_in_progress",
            ReloadError::Failed(_) => "reload_failed",
        }
    }
}

/// The old process's end.
pub struct Reloader {
    exe: PathBuf,
    args: Vec<OsString>,
    config_path: Option<PathBuf>,
    store: Arc<dyn Store>,
    busy: tokio::sync::Mutex<()>,
    /// Cancelled once the new process serves: this one then finishes and exits.
    pub handed_over: CancellationToken,
}

impl Reloader {
    /// Remembers the binary's path now: a new version installed there later is what a reload
    /// starts.
    pub fn new(config_path: Option<PathBuf>, store: Arc<dyn Store>) -> Result<Self> {
        let exe = std::env::current_exe().context("finding this program's path")?;
        Ok(Reloader {
            exe,
            args: std::env::args_os().skip(1).collect(),
            config_path,
            store,
            busy: tokio::sync::Mutex::new(()),
            handed_over: CancellationToken::new(),
        })
    }

    /// Starts the new process and hands over to it; the new process's id once it serves.
    pub async fn reload(&self) -> Result<u32, ReloadError> {
        let _one = self.busy.try_lock().map_err(|_| ReloadError::Busy)?;
        if self.handed_over.is_cancelled() {
            return Err(ReloadError::Busy);
        }
        if let Some(path) = &self.config_path {
            NodeConfig::load(path).map_err(|e| ReloadError::Config {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        let failed =
            |what: &str, e: &dyn std::fmt::Display| ReloadError::Failed(format!("{what}: {e}"));
        let (fds, listeners) =
            sockets::for_handover().map_err(|e| failed("passing the listeners", &e))?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| failed("making the handover channel", &e))?;
        let theirs = socket2::Socket::from(OwnedFd::from(theirs));
        theirs
            .set_cloexec(false)
            .map_err(|e| failed("making the handover channel", &e))?;
        let mut child = tokio::process::Command::new(&self.exe)
            .args(&self.args)
            .env(sockets::LISTEN_FDS_ENV, listeners)
            .env(HANDOVER_FD_ENV, theirs.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| failed(&format!("starting {}", self.exe.display()), &e))?;
        // The child has its own copies now.
        drop(fds);
        drop(theirs);
        let pid = child.id().unwrap_or(0);
        tracing::info!(pid, exe = %self.exe.display(), "reload: a new process is starting");
        let _ = ours.set_nonblocking(true);
        let stream = UnixStream::from_std(ours).map_err(|e| failed("handover channel", &e))?;
        let mut channel = BufReader::new(stream);

        let asked = tokio::time::timeout(STARTING, next_line(&mut channel, &mut child)).await;
        match asked {
            Ok(Ok(line)) if line == "store" => {}
            outcome => return Err(give_up(&mut child, outcome, "while starting").await),
        }
        // From here until it answers, new connections wait in the listeners' queues.
        portcullis_proxy::conn::pause_accepting(true);
        // A handshake under way may still read a certificate's key from the store.
        portcullis_proxy::conn::handshakes_settled(HANDSHAKES_SETTLE).await;
        if let Err(e) = self.store.release().await {
            portcullis_proxy::conn::pause_accepting(false);
            let _ = child.start_kill();
            return Err(failed("closing the store", &e));
        }
        let said = async {
            channel.get_mut().write_all(b"free\n").await?;
            channel.get_mut().flush().await
        };
        let taken = match said.await {
            Ok(()) => tokio::time::timeout(TAKING_OVER, next_line(&mut channel, &mut child)).await,
            Err(e) => Ok(Err(format!("the handover channel broke: {e}"))),
        };
        match taken {
            Ok(Ok(line)) if line == "ready" => {
                tracing::info!(
                    pid,
                    "reload: the new process serves; this one finishes its requests and exits"
                );
                self.handed_over.cancel();
                Ok(pid)
            }
            outcome => {
                let error = give_up(&mut child, outcome, "while taking over").await;
                if let Err(e) = self.store.reopen().await {
                    // Nothing to serve certificates from or write to: better to say so loudly.
                    tracing::error!(error = %e, "reload failed and the store cannot be opened again");
                }
                portcullis_proxy::conn::pause_accepting(false);
                Err(error)
            }
        }
    }
}

/// The child's next line, or why there is none (it exited, or the channel closed).
async fn next_line(
    channel: &mut BufReader<UnixStream>,
    child: &mut tokio::process::Child,
) -> Result<String, String> {
    let mut line = String::new();
    tokio::select! {
        read = channel.read_line(&mut line) => match read {
            Ok(0) => Err("it closed the handover channel".into()),
            Ok(_) => match line.trim().strip_prefix("error ") {
                Some(why) => Err(why.to_string()),
                None => Ok(line.trim().to_string()),
            },
            Err(e) => Err(format!("the handover channel broke: {e}")),
        },
        status = child.wait() => Err(match status {
            Ok(status) => format!("it exited ({status})"),
            Err(e) => format!("cannot wait for it: {e}"),
        }),
    }
}

async fn give_up(
    child: &mut tokio::process::Child,
    outcome: Result<Result<String, String>, tokio::time::error::Elapsed>,
    when: &str,
) -> ReloadError {
    let why = match outcome {
        Ok(Ok(line)) => format!("it said {line:?} {when}"),
        Ok(Err(why)) => format!("{why} {when}"),
        Err(_) => format!("no answer in time {when}"),
    };
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    tracing::error!(reason = why, "reload failed; this process goes on serving");
    ReloadError::Failed(why)
}
