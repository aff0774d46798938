//! The per-capsule DNS forwarder: UDP and TCP port 53 on the host side of the capsule's tap,
//! forwarding to the configured upstream resolvers.
//!
//! - `internet`: forwards every standard query.
//! - `none`: answers every query REFUSED itself and forwards nothing (no DNS channel out).
//! - `allow`: forwards every standard query; for a question that is a listed domain (exact name or a
//!   subdomain of it), the IPv4 addresses of the answer (the name and the CNAME chain from it, outside
//!   the blocked ranges) are added to the capsule's nftables set with the record's TTL as timeout
//!   (clamped to `[dns_min_ttl, dns_max_ttl]`) **before** the answer is returned to the guest.
//!
//! Bounded: at most [`MAX_UDP_INFLIGHT`] UDP queries and [`MAX_TCP_CONNS`] TCP connections per
//! capsule (more are dropped), fixed buffers, deadlines on every upstream exchange and TCP read.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use capsules_core::types::Cidr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::NetError;
use super::dns;
use super::nft::{self, Nft};

/// Queries over UDP being forwarded at once per capsule; more are dropped (the guest retries).
pub const MAX_UDP_INFLIGHT: usize = 128;
/// TCP connections at once per capsule.
pub const MAX_TCP_CONNS: usize = 16;
/// Queries served on one TCP connection.
const MAX_TCP_QUERIES: usize = 64;
/// Largest DNS message accepted from the guest over UDP.
const MAX_QUERY: usize = 4096;
/// Deadline of one exchange with one upstream.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of one guest TCP read (idle connection).
const TCP_IDLE: Duration = Duration::from_secs(10);

/// What the forwarder does with queries (changes with the capsule's policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mode {
    Refuse,
    Forward { domains: Vec<String> },
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub table: String,
    pub slot: u32,
    pub nft: Nft,
    pub upstreams: Vec<SocketAddr>,
    pub min_ttl: u32,
    pub max_ttl: u32,
    pub blocked: Vec<Cidr>,
}

/// The state every task of one forwarder shares.
#[derive(Debug)]
struct State {
    shared: Shared,
    mode: RwLock<Arc<Mode>>,
    /// Addresses this forwarder put into the set, with when their element expires: an answer whose
    /// addresses are still in the set for at least half their new TTL does not cost an nft call.
    added: Mutex<HashMap<Ipv4Addr, Instant>>,
}

/// Entries of [`State::added`] kept at most.
const MAX_CACHE: usize = 4096;

impl State {
    fn mode(&self) -> Arc<Mode> {
        self.mode
            .read()
            .map(|m| m.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// A running forwarder; dropping it stops its tasks and closes its sockets.
#[derive(Debug)]
pub(crate) struct Forwarder {
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn bind_error(what: &str, addr: SocketAddr, e: std::io::Error) -> NetError {
    NetError::io(
        format!(
            "binding the DNS forwarder's {what} socket on {addr} (is another DNS server bound to port 53 on all addresses?)"
        ),
        e,
    )
}

/// A socket bound with IP_FREEBIND (the tap's address may not be usable yet while no VM holds it).
fn freebind_socket(addr: SocketAddr, ty: nix::sys::socket::SockType) -> Result<std::os::fd::OwnedFd, std::io::Error> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockaddrIn, bind, setsockopt, socket, sockopt};
    let SocketAddr::V4(v4) = addr else {
        return Err(std::io::Error::other("the forwarder binds IPv4 only"));
    };
    let fd = socket(
        AddressFamily::Inet,
        ty,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::IpFreebind, &true)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(v4))?;
    Ok(fd)
}

impl Forwarder {
    /// Binds UDP and TCP port 53 on `host_ip` and starts serving. Must run inside a tokio runtime.
    pub async fn start(host_ip: Ipv4Addr, shared: Shared, mode: Mode) -> Result<Self, NetError> {
        let addr = SocketAddr::new(IpAddr::V4(host_ip), 53);
        let udp_fd =
            freebind_socket(addr, nix::sys::socket::SockType::Datagram).map_err(|e| bind_error("UDP", addr, e))?;
        // SAFETY: the fd was just created by us and is owned by nothing else.
        let udp = unsafe { std::net::UdpSocket::from_raw_fd(udp_fd.into_raw_fd()) };
        let udp = UdpSocket::from_std(udp).map_err(|e| bind_error("UDP", addr, e))?;
        let tcp_fd =
            freebind_socket(addr, nix::sys::socket::SockType::Stream).map_err(|e| bind_error("TCP", addr, e))?;
        nix::sys::socket::listen(
            &tcp_fd,
            nix::sys::socket::Backlog::new(64).unwrap_or(nix::sys::socket::Backlog::MAXCONN),
        )
        .map_err(|e| bind_error("TCP", addr, e.into()))?;
        // SAFETY: as above.
        let tcp = unsafe { std::net::TcpListener::from_raw_fd(tcp_fd.into_raw_fd()) };
        let tcp = TcpListener::from_std(tcp).map_err(|e| bind_error("TCP", addr, e))?;

        let state = Arc::new(State {
            shared,
            mode: RwLock::new(Arc::new(mode)),
            added: Mutex::new(HashMap::new()),
        });
        let udp_task = tokio::spawn(udp_loop(Arc::new(udp), state.clone()));
        let tcp_task = tokio::spawn(tcp_loop(tcp, state.clone()));
        Ok(Forwarder {
            state,
            tasks: vec![udp_task, tcp_task],
        })
    }

    /// Changes what the forwarder does with the next queries; `set_flushed` says the capsule's set
    /// was emptied (forget what was added).
    pub fn set_mode(&self, mode: Mode, set_flushed: bool) {
        match self.state.mode.write() {
            Ok(mut m) => *m = Arc::new(mode),
            Err(p) => *p.into_inner() = Arc::new(mode),
        }
        if set_flushed && let Ok(mut a) = self.state.added.lock() {
            a.clear();
        }
    }
}

async fn udp_loop(sock: Arc<UdpSocket>, state: Arc<State>) {
    let sem = Arc::new(Semaphore::new(MAX_UDP_INFLIGHT));
    let mut buf = vec![0u8; MAX_QUERY];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "dns forwarder: recv failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            tracing::debug!("dns forwarder: too many queries in flight, dropping one");
            continue;
        };
        let query = buf[..n].to_vec();
        let (sock, state) = (sock.clone(), state.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(resp) = handle(&state, &query, false).await {
                let _ = sock.send_to(&resp, peer).await;
            }
        });
    }
}

async fn tcp_loop(listener: TcpListener, state: Arc<State>) {
    let sem = Arc::new(Semaphore::new(MAX_TCP_CONNS));
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "dns forwarder: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = serve_tcp(conn, &state).await;
        });
    }
}

async fn read_framed(conn: &mut TcpStream, deadline: Duration) -> Option<Vec<u8>> {
    tokio::time::timeout(deadline, async {
        let len = conn.read_u16().await.ok()? as usize;
        let mut msg = vec![0u8; len];
        conn.read_exact(&mut msg).await.ok()?;
        Some(msg)
    })
    .await
    .ok()
    .flatten()
}

async fn write_framed(conn: &mut TcpStream, msg: &[u8]) -> Option<()> {
    let len = u16::try_from(msg.len()).ok()?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    tokio::time::timeout(UPSTREAM_TIMEOUT, conn.write_all(&out))
        .await
        .ok()?
        .ok()
}

async fn serve_tcp(mut conn: TcpStream, state: &State) -> Option<()> {
    for _ in 0..MAX_TCP_QUERIES {
        let query = read_framed(&mut conn, TCP_IDLE).await?;
        let resp = handle(state, &query, true).await?;
        write_framed(&mut conn, &resp).await?;
    }
    Some(())
}

/// One query: the answer to send back, or `None` to drop it.
async fn handle(state: &State, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let shared = &state.shared;
    let (_, question) = dns::parse_query(query).ok()?;
    let mode = state.mode();
    let domains = match &*mode {
        Mode::Refuse => return dns::refused(query),
        Mode::Forward { domains } => domains,
    };
    let Some(resp) = exchange_any(shared, query, &question, tcp).await else {
        return dns::error_reply(query, dns::RCODE_SERVFAIL);
    };
    if !domains.is_empty()
        && let Ok(parsed) = dns::parse_response(&resp)
    {
        let elems: Vec<(Ipv4Addr, u32)> = dns::allowed_addresses(&parsed, domains)
            .into_iter()
            .filter_map(|(ip, ttl)| match ip {
                // No IPv6 egress from capsules: AAAA answers open nothing.
                IpAddr::V4(v4) => Some((v4, ttl)),
                IpAddr::V6(_) => None,
            })
            .filter(|(ip, _)| {
                let c = Cidr::parse(&ip.to_string()).ok();
                !c.is_some_and(|c| shared.blocked.iter().any(|b| b.overlaps(&c)))
            })
            .map(|(ip, ttl)| (ip, ttl.clamp(shared.min_ttl, shared.max_ttl)))
            .collect();
        let now = Instant::now();
        let fresh: Vec<(Ipv4Addr, u32)> = match state.added.lock() {
            Ok(added) => elems
                .into_iter()
                .filter(|(ip, secs)| {
                    added
                        .get(ip)
                        .is_none_or(|exp| *exp < now + Duration::from_secs(u64::from(*secs) / 2))
                })
                .collect(),
            Err(_) => elems,
        };
        if !fresh.is_empty() {
            let script = nft::dom_elements_script(&shared.table, shared.slot, &fresh);
            match shared
                .nft
                .run("adding resolved addresses to the allow set", &script)
                .await
            {
                Ok(()) => {
                    if let Ok(mut a) = state.added.lock() {
                        if a.len() + fresh.len() > MAX_CACHE {
                            a.retain(|_, exp| *exp > now);
                            if a.len() + fresh.len() > MAX_CACHE {
                                a.clear();
                            }
                        }
                        for (ip, secs) in fresh {
                            a.insert(ip, now + Duration::from_secs(u64::from(secs)));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, slot = shared.slot, "dns forwarder: could not add resolved addresses")
                }
            }
        }
    }
    Some(resp)
}

async fn exchange_any(shared: &Shared, query: &[u8], question: &dns::Question, tcp: bool) -> Option<Vec<u8>> {
    for up in &shared.upstreams {
        let r = if tcp {
            tokio::time::timeout(UPSTREAM_TIMEOUT, exchange_tcp(*up, query)).await
        } else {
            tokio::time::timeout(UPSTREAM_TIMEOUT, exchange_udp(*up, query)).await
        };
        if let Ok(Some(resp)) = r
            && matches_query(&resp, query, question)
        {
            return Some(resp);
        }
    }
    None
}

/// The upstream's answer must carry the query's id and question.
fn matches_query(resp: &[u8], query: &[u8], question: &dns::Question) -> bool {
    let (Ok(rh), Ok(qh)) = (dns::Header::parse(resp), dns::Header::parse(query)) else {
        return false;
    };
    if rh.id != qh.id || !rh.is_response() {
        return false;
    }
    match dns::parse_response(resp) {
        Ok(r) => r
            .question
            .as_ref()
            .is_none_or(|q| q.name == question.name && q.qtype == question.qtype),
        // A truncated (TC) answer may still be relayed as is; anything else unreadable is not.
        Err(_) => rh.flags & 0x0200 != 0,
    }
}

async fn exchange_udp(up: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let local: SocketAddr = if up.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await.ok()?;
    sock.connect(up).await.ok()?;
    sock.send(query).await.ok()?;
    let want = dns::Header::parse(query).ok()?.id;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await.ok()?;
        if dns::Header::parse(&buf[..n]).is_ok_and(|h| h.id == want) {
            buf.truncate(n);
            return Some(buf);
        }
    }
}

async fn exchange_tcp(up: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let mut conn = TcpStream::connect(up).await.ok()?;
    write_framed(&mut conn, query).await?;
    read_framed(&mut conn, UPSTREAM_TIMEOUT).await
}
