//! The hub's accept loop: TCP accept, the TLS handshake, and the limits
//! that keep clients without a certificate from exhausting the hub.
//!
//! The handshake lets a client present no certificate (enrolment needs
//! that), so anyone who can reach the port can open connections. Against
//! that:
//! - a handshake that does not finish within [`HANDSHAKE_TIMEOUT`] is
//!   closed;
//! - a connection without a client certificate is closed
//!   [`UNAUTHENTICATED_LIFETIME`] after it was accepted, whatever it does
//!   (enrolment is one call);
//! - each source address may hold [`MAX_UNAUTHENTICATED_PER_SOURCE`]
//!   connections that finished the handshake without a certificate; more
//!   are closed at once;
//! - once a quarter of the connections the hub may hold are without a
//!   certificate (handshaking or certificate-less), a source holding
//!   [`MAX_UNAUTHENTICATED_PER_SOURCE`] of those has new connections
//!   closed at once (below that, a fleet behind one NAT address can
//!   reconnect all at once);
//! - all connections together stay [`FD_RESERVE`] below the open-file
//!   limit, which [`raise_nofile_limit`] lifts to the hard limit at start;
//!   beyond that, new connections are closed at once, so the store and the
//!   established nodes always have file descriptors;
//! - an accept error (EMFILE and the like) backs off instead of spinning.
//!
//! Connections with a certificate live on; tonic's HTTP/2 keepalive (see
//! [`KEEPALIVE_INTERVAL`]) closes them when their peer stops answering.
//! Handlers read the certificate from tonic's `TlsConnectInfo`, which
//! [`Conn`] passes through, so `request.peer_certs()` works as with
//! tonic's own TLS.
use std::{
    collections::HashMap,
    future::Future,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::{Instant, Sleep},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, info, warn};

use crate::shutdown::Shutdown;

/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection without a client certificate may stay open.
pub const UNAUTHENTICATED_LIFETIME: Duration = Duration::from_secs(15);
/// Connections without a certificate one source address may hold (see
/// the module documentation for when handshakes count).
pub const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 16;
/// File descriptors kept free of connections: the store, logs, the
/// listener and the runtime need some.
pub const FD_RESERVE: u64 = 64;
/// HTTP/2 ping interval on every connection, and how long an answer may
/// take before the connection is closed.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a keepalive ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest pause after an accept error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Raises the soft open-file limit to the hard limit; returns the limit
/// now in force.
pub fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(error = %io::Error::last_os_error(), "cannot read the open-file limit");
        return 1024;
    }
    let soft = limit.rlim_cur;
    // An unlimited hard limit is still capped by the kernel's nr_open.
    let target = if limit.rlim_max == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20)
    } else {
        limit.rlim_max
    };
    if target <= soft {
        info!(limit = soft, "open-file limit");
        return soft;
    }
    limit.rlim_cur = target;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        warn!(limit = soft, hard = target, error = %io::Error::last_os_error(),
            "cannot raise the open-file limit");
        return soft;
    }
    info!(
        from = soft,
        to = target,
        "open-file limit raised to the hard limit"
    );
    target
}

/// The accept loop's limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a client has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// How long a connection without a client certificate may stay open.
    pub unauthenticated_lifetime: Duration,
    /// Certificate-less connections one source address may hold.
    pub max_unauthenticated_per_source: usize,
    /// Open connections in all; beyond it new ones are closed at once.
    pub max_connections: usize,
}

impl Limits {
    /// The defaults, with room for connections under `nofile` open files.
    pub fn for_nofile(nofile: u64) -> Limits {
        Limits {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            unauthenticated_lifetime: UNAUTHENTICATED_LIFETIME,
            max_unauthenticated_per_source: MAX_UNAUTHENTICATED_PER_SOURCE,
            max_connections: usize::try_from(nofile.saturating_sub(FD_RESERVE).max(16))
                .unwrap_or(usize::MAX),
        }
    }
}

/// Counts of open connections: in total, and without a certificate (yet)
/// in total and per source.
#[derive(Debug)]
struct Tracker {
    limits: Limits,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    /// Handshaking or without a certificate.
    unauthenticated: usize,
    unauthenticated_by_source: HashMap<IpAddr, usize>,
    /// Handshake done, no certificate.
    certless_by_source: HashMap<IpAddr, usize>,
}

fn decrement(map: &mut HashMap<IpAddr, usize>, source: IpAddr) {
    if let Some(n) = map.get_mut(&source) {
        *n -= 1;
        if *n == 0 {
            map.remove(&source);
        }
    }
}

/// Where a connection stands in the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Handshaking,
    Certless,
    Authenticated,
}

impl Tracker {
    /// A slot for a new connection from `source`, or `None` if it must be
    /// closed at once: over the total, or, once a quarter of the total is
    /// taken by connections without a certificate, over the source's
    /// share. (Below that, a burst of handshakes from one address, a fleet
    /// behind NAT reconnecting, goes through.)
    fn admit(self: &Arc<Self>, source: IpAddr) -> Option<Slot> {
        let mut counts = self.counts.lock().unwrap();
        if counts.open >= self.limits.max_connections {
            return None;
        }
        let pressed = counts.unauthenticated >= self.limits.max_connections / 4;
        let from_source = counts.unauthenticated_by_source.entry(source).or_default();
        if pressed && *from_source >= self.limits.max_unauthenticated_per_source {
            return None;
        }
        *from_source += 1;
        counts.unauthenticated += 1;
        counts.open += 1;
        Some(Slot {
            tracker: Arc::clone(self),
            source,
            state: State::Handshaking,
        })
    }
}

/// A connection's place in the counts, given back when it closes.
#[derive(Debug)]
struct Slot {
    tracker: Arc<Tracker>,
    source: IpAddr,
    state: State,
}

impl Slot {
    /// The handshake ended with a client certificate.
    fn authenticated(&mut self) {
        debug_assert_eq!(self.state, State::Handshaking);
        let mut counts = self.tracker.counts.lock().unwrap();
        counts.unauthenticated -= 1;
        decrement(&mut counts.unauthenticated_by_source, self.source);
        self.state = State::Authenticated;
    }

    /// The handshake ended without a client certificate: false if the
    /// source already holds its share of such connections.
    fn certless(&mut self) -> bool {
        debug_assert_eq!(self.state, State::Handshaking);
        let mut counts = self.tracker.counts.lock().unwrap();
        let held = counts.certless_by_source.entry(self.source).or_default();
        if *held >= self.tracker.limits.max_unauthenticated_per_source {
            return false;
        }
        *held += 1;
        self.state = State::Certless;
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.tracker.counts.lock().unwrap();
        counts.open -= 1;
        if self.state != State::Authenticated {
            counts.unauthenticated -= 1;
            decrement(&mut counts.unauthenticated_by_source, self.source);
        }
        if self.state == State::Certless {
            decrement(&mut counts.certless_by_source, self.source);
        }
    }
}

/// An established TLS connection handed to tonic. Without a client
/// certificate it fails its reads and writes after its deadline, which
/// makes hyper close it.
pub struct Conn {
    tls: TlsStream<TcpStream>,
    deadline: Option<Pin<Box<Sleep>>>,
    _slot: Slot,
}

impl Conn {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }
}

fn expired_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "connection without a client certificate reached its lifetime",
    )
}

impl Connected for Conn {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tls.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(expired_error()));
        }
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(expired_error()));
        }
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(expired_error()));
        }
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// Accepts on `listener` until `shutdown` (or until tonic drops the
/// stream), yielding connections whose TLS handshake finished.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
    shutdown: Shutdown,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let tracker = Arc::new(Tracker {
        limits,
        counts: Mutex::default(),
    });
    tokio::spawn(accept_loop(
        listener,
        TlsAcceptor::from(tls),
        tracker,
        tx,
        shutdown,
    ));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tracker: Arc<Tracker>,
    tx: mpsc::Sender<io::Result<Conn>>,
    mut shutdown: Shutdown,
) {
    let mut backoff = ACCEPT_BACKOFF;
    let mut shed = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.recv() => break,
            _ = tx.closed() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => {
                backoff = ACCEPT_BACKOFF;
                a
            }
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors or kernel memory: the pending
                // connection stays queued; retrying at once would spin.
                if backoff == ACCEPT_BACKOFF {
                    warn!(error = %e, "accept failed; backing off");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        // Counted per IPv4 address or IPv6 /64: one host holds a whole
        // /64 and could otherwise take a slot per address.
        let Some(slot) = tracker.admit(super::throttle::key(peer.ip())) else {
            shed += 1;
            if shed.is_power_of_two() {
                warn!(%peer, shed, "connection limit reached (in total or for this address); closing new connections");
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(handshake(
            tcp,
            slot,
            acceptor.clone(),
            tracker.limits.clone(),
            tx.clone(),
        ));
    }
}

/// Errors that concern one connection, not the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn handshake(
    tcp: TcpStream,
    mut slot: Slot,
    acceptor: TlsAcceptor,
    limits: Limits,
    tx: mpsc::Sender<io::Result<Conn>>,
) {
    let accepted = Instant::now();
    let peer = tcp.peer_addr().ok();
    let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(?peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(?peer, "TLS handshake timed out");
            return;
        }
    };
    let has_certificate = tls
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|c| !c.is_empty());
    let deadline = if has_certificate {
        slot.authenticated();
        None
    } else if slot.certless() {
        Some(Box::pin(tokio::time::sleep_until(
            accepted + limits.unauthenticated_lifetime,
        )))
    } else {
        debug!(
            ?peer,
            "too many connections without a certificate from one address"
        );
        return;
    };
    let _ = tx
        .send(Ok(Conn {
            tls,
            deadline,
            _slot: slot,
        }))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(per_source: usize, total: usize) -> Arc<Tracker> {
        Arc::new(Tracker {
            limits: Limits {
                max_unauthenticated_per_source: per_source,
                max_connections: total,
                ..Limits::for_nofile(1024)
            },
            counts: Mutex::default(),
        })
    }

    #[test]
    fn handshakes_are_capped_per_source_only_under_pressure() {
        // A quarter of 40 is 10: the first 10 from one source go through.
        let t = tracker(2, 40);
        let (a, b) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let mut burst: Vec<Slot> = (0..10).map(|_| t.admit(a).unwrap()).collect();
        assert!(
            t.admit(a).is_none(),
            "over the source's share under pressure"
        );
        assert!(t.admit(b).is_some(), "another source still gets its share");
        // A certificate takes the connection out of the unauthenticated counts.
        for slot in &mut burst[..5] {
            slot.authenticated();
        }
        assert!(t.admit(a).is_some());
        drop(burst);
        let counts = t.counts.lock().unwrap();
        assert_eq!((counts.open, counts.unauthenticated), (0, 0));
        assert!(counts.unauthenticated_by_source.is_empty());
    }

    #[test]
    fn certless_connections_are_capped_per_source_and_all_in_total() {
        let t = tracker(2, 100);
        let a = "192.0.2.1".parse().unwrap();
        let mut first = t.admit(a).unwrap();
        let mut second = t.admit(a).unwrap();
        let mut third = t.admit(a).unwrap();
        assert!(first.certless() && second.certless());
        assert!(!third.certless(), "a third without a certificate");
        drop((first, second, third));
        let t = tracker(2, 3);
        let held: Vec<Slot> = (1..=3)
            .map(|i| t.admit(format!("192.0.2.{i}").parse().unwrap()).unwrap())
            .collect();
        assert!(
            t.admit("192.0.2.9".parse().unwrap()).is_none(),
            "over the total"
        );
        drop(held);
        let counts = t.counts.lock().unwrap();
        assert_eq!((counts.open, counts.unauthenticated), (0, 0));
        assert!(counts.certless_by_source.is_empty());
    }
}
