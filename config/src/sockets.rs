//! The node's listening sockets, and the ones it inherited. A reload starts the new process with
//! the old one's listening sockets open (their numbers in [`LISTEN_FDS_ENV`]), as nginx does
//! across an exec: the new process takes a socket over instead of binding its address again, so
//! connections that arrive meanwhile wait in the socket's queue and none is refused.
//!
//! Every part binds through here ([`tcp_listener`], [`udp_socket`]), which is also how the old
//! process knows what to pass on ([`for_handover`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock, PoisonError};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// The environment variable that lists inherited sockets: `role/kind/address=fd`, separated by
/// `;`.
pub const LISTEN_FDS_ENV: &str = "PORTCULLIS_LISTEN_FDS";

/// The accept queue of a listener. The kernel caps it at `net.core.somaxconn` (4096 on current
/// kernels): connections that arrive while no process accepts (the moment of a reload) wait
/// here.
const BACKLOG: i32 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tcp,
    Udp,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Udp => "udp",
        }
    }
}

#[derive(Debug)]
struct Entry {
    role: String,
    kind: Kind,
    addr: SocketAddr,
    fd: RawFd,
}

/// Sockets this process listens on, each as a duplicate of its listener's descriptor (the same
/// socket), so it is certain to be open when it is handed over.
static OPEN: Mutex<Vec<(Entry, OwnedFd)>> = Mutex::new(Vec::new());

/// Sockets handed over by the previous process and not taken yet. The descriptors are owned
/// here until taken.
fn inherited() -> &'static Mutex<Vec<(Entry, OwnedFd)>> {
    static INHERITED: OnceLock<Mutex<Vec<(Entry, OwnedFd)>>> = OnceLock::new();
    INHERITED.get_or_init(|| Mutex::new(parse_env()))
}

fn parse_env() -> Vec<(Entry, OwnedFd)> {
    let Ok(text) = std::env::var(LISTEN_FDS_ENV) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in text.split(';').filter(|s| !s.is_empty()) {
        let Some(entry) = parse_entry(item) else {
            tracing::warn!(item, "ignoring a malformed inherited socket");
            continue;
        };
        match adopt(&entry) {
            Some(fd) => out.push((entry, fd)),
            None => tracing::warn!(
                item,
                "ignoring an inherited socket that is not what it says"
            ),
        }
    }
    out
}

/// The descriptor an entry names, once it is checked to be a socket bound where the entry says:
/// the variable could have reached this process by mistake, with numbers meaning other files.
#[allow(unsafe_code)] // taking ownership of a descriptor by number is what inheriting one is
fn adopt(entry: &Entry) -> Option<OwnedFd> {
    // SAFETY: fcntl(F_GETFD) only asks whether the number is an open descriptor.
    if unsafe { libc::fcntl(entry.fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the number is open, and the previous process passed it to this one alone; if it
    // is not the socket named, ownership is given up again without closing it.
    let fd = unsafe { OwnedFd::from_raw_fd(entry.fd) };
    if bound_addr(&fd) == Some(entry.addr) {
        Some(fd)
    } else {
        let _ = std::os::fd::IntoRawFd::into_raw_fd(fd);
        None
    }
}

fn bound_addr(fd: &impl AsFd) -> Option<SocketAddr> {
    SockRef::from(fd)
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
}

fn parse_entry(item: &str) -> Option<Entry> {
    let (name, fd) = item.rsplit_once('=')?;
    let mut parts = name.splitn(3, '/');
    let role = parts.next()?.to_string();
    let kind = match parts.next()? {
        "tcp" => Kind::Tcp,
        "udp" => Kind::Udp,
        _ => return None,
    };
    let addr = parts.next()?.parse().ok()?;
    let fd = fd.parse().ok()?;
    Some(Entry {
        role,
        kind,
        addr,
        fd,
    })
}

/// An inherited socket for `role` at `addr`: the same address, or, for port 0 (any port), the
/// same IP with the port the previous process was given.
fn take(role: &str, kind: Kind, addr: SocketAddr) -> Option<OwnedFd> {
    let mut inherited = inherited().lock().unwrap_or_else(PoisonError::into_inner);
    let index = inherited.iter().position(|(e, _)| {
        e.role == role
            && e.kind == kind
            && (e.addr == addr || (addr.port() == 0 && e.addr.ip() == addr.ip()))
    })?;
    Some(inherited.swap_remove(index).1)
}

fn remember(role: &str, kind: Kind, socket: &impl AsFd) {
    let Ok(fd) = socket.as_fd().try_clone_to_owned() else {
        return;
    };
    let Some(addr) = bound_addr(&fd) else {
        return;
    };
    let entry = Entry {
        role: role.to_string(),
        kind,
        addr,
        fd: fd.as_raw_fd(),
    };
    OPEN.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((entry, fd));
}

/// A listening TCP socket for `role` (a name the next process will ask for too, such as
/// `"https"`) at `addr`: the inherited one if there is one, else newly bound. `reuse_port`
/// lets several listeners share the address (one per worker), the kernel spreading
/// connections across them.
pub fn tcp_listener(
    role: &str,
    addr: SocketAddr,
    reuse_port: bool,
) -> io::Result<std::net::TcpListener> {
    let listener = match take(role, Kind::Tcp, addr) {
        Some(fd) => std::net::TcpListener::from(fd),
        None => {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            if reuse_port {
                socket.set_reuse_port(true)?;
            }
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.bind(&addr.into())?;
            socket.listen(BACKLOG)?;
            socket.into()
        }
    };
    listener.set_nonblocking(true)?;
    remember(role, Kind::Tcp, &listener);
    Ok(listener)
}

/// A UDP socket for `role` at `addr`: the inherited one if there is one, else newly bound.
pub fn udp_socket(role: &str, addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = match take(role, Kind::Udp, addr) {
        Some(fd) => std::net::UdpSocket::from(fd),
        None => std::net::UdpSocket::bind(addr)?,
    };
    remember(role, Kind::Udp, &socket);
    Ok(socket)
}

/// Inherited sockets no part asked for (the new configuration dropped or moved them): closed,
/// so their ports are free.
pub fn close_unclaimed() {
    let left: Vec<_> =
        std::mem::take(&mut *inherited().lock().unwrap_or_else(PoisonError::into_inner));
    for (entry, _fd) in left {
        tracing::info!(role = entry.role, address = %entry.addr, "a listener the configuration no longer has is closed");
    }
}

/// Drops this registry's copy of the UDP socket at `addr`, which its part no longer uses.
pub fn forget_udp(addr: SocketAddr) {
    OPEN.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|(e, _)| !(e.kind == Kind::Udp && e.addr == addr));
}

/// Drops every copy kept for a handover: once the node stops without one, its listeners'
/// sockets close with the parts' own descriptors, so clients are refused at once (and try
/// another node) instead of waiting in a queue no one reads.
pub fn forget_all() {
    OPEN.lock().unwrap_or_else(PoisonError::into_inner).clear();
}

/// Reads the sockets the previous process passed on, if any. Call it first thing in `main`, so
/// they are owned before anything else can open a descriptor.
pub fn adopt_inherited() {
    let _ = inherited();
}

/// What to pass to the process that replaces this one: a descriptor of each listening socket,
/// inheritable (no close-on-exec), and the text naming them for [`LISTEN_FDS_ENV`]. Keep the
/// descriptors until the new process has started; dropping them closes only these copies.
pub fn for_handover() -> io::Result<(Vec<OwnedFd>, String)> {
    let open = OPEN.lock().unwrap_or_else(PoisonError::into_inner);
    let mut fds = Vec::new();
    let mut text = String::new();
    for (entry, fd) in open.iter() {
        let copy = Socket::from(fd.try_clone()?);
        copy.set_cloexec(false)?;
        if !text.is_empty() {
            text.push(';');
        }
        text.push_str(&format!(
            "{}/{}/{}={}",
            entry.role,
            entry.kind.as_str(),
            entry.addr,
            copy.as_raw_fd()
        ));
        fds.push(OwnedFd::from(copy));
    }
    Ok((fds, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_and_refuse_garbage() {
        let e = parse_entry("https/tcp/127.0.0.1:8443=7").unwrap();
        assert_eq!(e.role, "https");
        assert_eq!(e.kind, Kind::Tcp);
        assert_eq!(e.addr, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(e.fd, 7);
        assert!(parse_entry("dns/udp/[::1]:53=9").is_some());
        assert!(parse_entry("https/sctp/127.0.0.1:1=7").is_none());
        assert!(parse_entry("https/tcp/nowhere=7").is_none());
        assert!(parse_entry("https/tcp/127.0.0.1:1=x").is_none());
    }
}
