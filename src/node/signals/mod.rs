//! Fleet signals: the light observations a node sends the hub besides bans,
//! so the hub can see what no single host's fail2ban sees (an address
//! guessing two passwords on each of fifty servers; a scanner touching
//! closed ports, which leaves no log line anywhere).
//!
//! Contract:
//! - A signal is a hint, not a report: it is never written to disk and
//!   never retried. Sources put signals in a bounded in-memory queue with
//!   [`Signals::offer`], which never waits; a full queue drops the signal
//!   and counts it.
//! - One task ([`run`]) drains the queue in batches (up to [`MAX_BATCH`]
//!   signals, or whatever arrived within [`LINGER`] of the first) and sends
//!   each with `SendSignals` over the node's hub channel, one call in
//!   flight. It shares nothing with the publisher and the outbox but the
//!   HTTP/2 connection, so a flood of signals cannot hold a ban back: a ban
//!   never waits behind a signal in any queue of the node's.
//! - When the hub refuses (RESOURCE_EXHAUSTED: its per-host signal limit;
//!   UNIMPLEMENTED: a hub without signals) or is down, the batch is
//!   dropped and counted, and so is every signal that arrives during the
//!   pause that follows (the hub's retry-after; a minute for a hub
//!   without signals; the reconnect backoff for a hub that is down); the
//!   refusal is logged at most once per [`LOG_EVERY`].
//!
//! # Layout
//! - [`fail2ban_log`]: failures, from the `[jail] Found IP` lines of
//!   fail2ban's own log.
//! - [`probes`]: connection attempts to closed ports, from the kernel's
//!   answers to them handed over by an NFLOG rule.
//! - [`nflog`]: the netlink socket those answers arrive on.
//! - [`probe_rule`]: `banmesh node setup-probes`, the OUTPUT rules that
//!   hand those answers to the NFLOG group.
pub mod fail2ban_log;
pub mod nflog;
pub mod probe_rule;
pub mod probes;

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tonic::Code;
use tracing::{debug, info, warn};

use super::link::{Backoff, Link};
use crate::{
    proto::{self, hub_client::HubClient},
    shutdown::Shutdown,
};

/// Signals held while the sender waits for the hub; beyond it new ones are
/// dropped (a second of a 65,000-a-second flood).
pub const QUEUE: usize = 65_536;
/// Most signals in one `SendSignals` call.
pub const MAX_BATCH: usize = 1_000;
/// How long a batch waits for more signals after its first.
pub const LINGER: Duration = Duration::from_millis(25);
/// A `SendSignals` call that takes longer is abandoned (and its batch dropped).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a refusal or a drop is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(30);
/// The longest pause a hub's retry-after is taken for.
const MAX_PAUSE: Duration = Duration::from_secs(10);
/// How long the sender pauses after the hub said it has no `SendSignals`.
const UNIMPLEMENTED_PAUSE: Duration = Duration::from_secs(60);

/// One observation, in the node's terms; [`Signal::to_proto`] is the wire form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// fail2ban's filter of `jail` matched a failure of `ip` (and `ip` is
    /// not in that jail's ignore list: fail2ban logs those as `Ignore`).
    Failure {
        /// The failing address, canonical.
        ip: IpAddr,
        /// The jail whose filter matched.
        jail: String,
        /// When the node saw it, unix milliseconds.
        at_ms: i64,
    },
    /// `ip` tried to reach a closed port here.
    Probe {
        /// The probing address, canonical.
        ip: IpAddr,
        /// `tcp` or `udp`.
        protocol: Protocol,
        /// The closed port.
        port: u16,
        /// When the node saw it, unix milliseconds.
        at_ms: i64,
    },
}

/// The transport a probe used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// A SYN answered by a reset.
    Tcp,
    /// A datagram answered by an ICMP port-unreachable.
    Udp,
}

impl Protocol {
    /// The name on the wire (`Signal.protocol`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl Signal {
    /// The `Signal` message sent to the hub.
    pub fn to_proto(&self) -> proto::Signal {
        match self {
            Signal::Failure { ip, jail, at_ms } => proto::Signal {
                kind: proto::SignalKind::Failure as i32,
                ip: ip.to_string(),
                jail: jail.clone(),
                at_ms: *at_ms,
                ..Default::default()
            },
            Signal::Probe {
                ip,
                protocol,
                port,
                at_ms,
            } => proto::Signal {
                kind: proto::SignalKind::Probe as i32,
                ip: ip.to_string(),
                protocol: protocol.as_str().to_string(),
                port: u32::from(*port),
                at_ms: *at_ms,
                ..Default::default()
            },
        }
    }
}

/// Counters of the signal path, for the node's status and logs.
#[derive(Debug, Default)]
pub struct SignalStats {
    /// Signals the hub counted.
    pub accepted: AtomicU64,
    /// Signals the hub received but did not count (invalid, old, allowed).
    pub ignored: AtomicU64,
    /// Signals dropped because the queue was full.
    pub dropped_full: AtomicU64,
    /// Signals dropped because the hub refused or was unreachable.
    pub dropped_hub: AtomicU64,
    /// Whether the last `SendSignals` call succeeded.
    pub flowing: AtomicBool,
}

impl SignalStats {
    /// Signals dropped for any reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_full.load(Ordering::Relaxed) + self.dropped_hub.load(Ordering::Relaxed)
    }
}

/// The sources' end of the signal queue: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Signals {
    tx: mpsc::Sender<proto::Signal>,
    stats: Arc<SignalStats>,
}

/// The sender's end, for [`run`].
pub struct SignalQueue {
    rx: mpsc::Receiver<proto::Signal>,
    stats: Arc<SignalStats>,
}

/// A queue of `capacity` signals: its sources' end and its sender's end.
pub fn queue(capacity: usize) -> (Signals, SignalQueue) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let stats = Arc::new(SignalStats::default());
    (
        Signals {
            tx,
            stats: stats.clone(),
        },
        SignalQueue { rx, stats },
    )
}

impl Signals {
    /// Queues a signal if there is room; otherwise drops and counts it.
    /// Never waits, so a source (or a thread outside tokio) is never held.
    pub fn offer(&self, signal: &Signal) {
        if self.tx.try_send(signal.to_proto()).is_err() {
            self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counters, shared with the sender.
    pub fn stats(&self) -> &Arc<SignalStats> {
        &self.stats
    }
}

/// Logs a recurring condition at most once per [`LOG_EVERY`], with how
/// many times it happened since the last line.
#[derive(Debug, Default)]
struct Quiet {
    last: Option<Instant>,
    since: u64,
}

impl Quiet {
    /// Whether to log now; `Some(n)`: the n occurrences this line stands for.
    fn due(&mut self) -> Option<u64> {
        self.since += 1;
        match self.last {
            Some(t) if t.elapsed() < LOG_EVERY => None,
            _ => {
                self.last = Some(Instant::now());
                Some(std::mem::take(&mut self.since))
            }
        }
    }
}

/// The wait a RESOURCE_EXHAUSTED asks for (its retry-after header), at
/// most [`MAX_PAUSE`]; a second without one.
fn retry_after(status: &tonic::Status) -> Duration {
    status
        .metadata()
        .get(crate::proto::RETRY_AFTER_HEADER)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .map_or(Duration::from_secs(1), Duration::from_millis)
        .min(MAX_PAUSE)
}

/// Drops (and counts) whatever is queued for `pause`: signals are current
/// observations, and a hub that refused them should not get them late.
async fn drop_for(queue: &mut SignalQueue, pause: Duration, shutdown: &mut Shutdown) {
    let until = tokio::time::sleep(pause);
    tokio::pin!(until);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        tokio::select! {
            _ = &mut until => break,
            _ = shutdown.recv() => break,
            n = queue.rx.recv_many(&mut batch, MAX_BATCH) => {
                if n == 0 { break }
                queue.stats.dropped_hub.fetch_add(n as u64, Ordering::Relaxed);
                batch.clear();
            }
        }
    }
}

/// Sends queued signals to the hub in batches until `shutdown`; what is
/// left in the queue then is dropped (signals are hints).
pub async fn run(mut queue: SignalQueue, link: Link, mut shutdown: Shutdown) {
    let stats = queue.stats.clone();
    let mut refused = Quiet::default();
    let mut full = Quiet::default();
    let mut resumed = Quiet::default();
    let mut reported_full = 0;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut backoff = Backoff::default();
    loop {
        tokio::select! {
            _ = shutdown.recv() => break,
            n = queue.rx.recv_many(&mut batch, MAX_BATCH) => if n == 0 { break },
        }
        // Let a burst gather into one call rather than a call per signal.
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < MAX_BATCH {
            let room = MAX_BATCH - batch.len();
            let more = tokio::time::timeout_at(deadline, queue.rx.recv_many(&mut batch, room));
            match more.await {
                Ok(n) if n > 0 => continue,
                _ => break,
            }
        }
        let n = batch.len() as u64;
        let signals = std::mem::take(&mut batch);
        let route = link.current();
        let mut client = HubClient::new(route.channel.clone());
        let call = client.send_signals(proto::SignalBatch { signals });
        let result = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(r) => r.map(|r| r.into_inner()),
            Err(_) => Err(tonic::Status::deadline_exceeded("no answer in time")),
        };
        match result {
            Ok(ack) => {
                link.succeeded(&route);
                backoff.reset();
                stats
                    .accepted
                    .fetch_add(u64::from(ack.accepted), Ordering::Relaxed);
                stats
                    .ignored
                    .fetch_add(u64::from(ack.ignored), Ordering::Relaxed);
                // Logged at most once per period, like the refusals it follows.
                if !stats.flowing.swap(true, Ordering::Relaxed) && resumed.due().is_some() {
                    info!("signals flow to the hub");
                }
            }
            Err(status) => {
                stats.dropped_hub.fetch_add(n, Ordering::Relaxed);
                stats.flowing.store(false, Ordering::Relaxed);
                if let Some(times) = refused.due() {
                    let dropped = stats.dropped_hub.load(Ordering::Relaxed);
                    match status.code() {
                        Code::ResourceExhausted => {
                            warn!(dropped, refusals = times, hub = %status.message(),
                            "the hub is limiting this host's signals; dropping the excess (bans are not affected)")
                        }
                        Code::Unimplemented => warn!(
                            "the hub does not take signals (an older hub); failures and probes are not shared, retrying in {UNIMPLEMENTED_PAUSE:?}"
                        ),
                        _ => warn!(dropped, failures = times, error = %status,
                            "signals not delivered; dropped (they are hints, never queued on disk)"),
                    }
                }
                // Drop what arrives meanwhile rather than ask again per
                // batch: the hub's wait when it gave one, a minute for a hub
                // without signals, a backoff while it is unreachable.
                let pause = match status.code() {
                    Code::Unimplemented => UNIMPLEMENTED_PAUSE,
                    Code::ResourceExhausted => retry_after(&status),
                    // None when the link moved on to an untried hub.
                    _ => backoff.after(link.failed(&route, &status)),
                };
                drop_for(&mut queue, pause, &mut shutdown).await;
            }
        }
        let dropped_full = stats.dropped_full.load(Ordering::Relaxed);
        if dropped_full > reported_full && full.due().is_some() {
            warn!(
                dropped = dropped_full - reported_full,
                "signal queue full: dropped signals (more arrive than the hub takes)"
            );
            reported_full = dropped_full;
        }
    }
    debug!("signal sender stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let (signals, mut q) = queue(2);
        let s = Signal::Failure {
            ip: "192.0.2.1".parse().unwrap(),
            jail: "sshd".into(),
            at_ms: 1,
        };
        for _ in 0..5 {
            signals.offer(&s);
        }
        assert_eq!(signals.stats().dropped_full.load(Ordering::Relaxed), 3);
        let got = q.rx.try_recv().unwrap();
        assert_eq!(got.kind, proto::SignalKind::Failure as i32);
        assert_eq!((got.ip.as_str(), got.jail.as_str()), ("192.0.2.1", "sshd"));
    }

    #[test]
    fn probes_carry_protocol_and_port() {
        let p = Signal::Probe {
            ip: "2001:db8::9".parse().unwrap(),
            protocol: Protocol::Udp,
            port: 161,
            at_ms: 7,
        }
        .to_proto();
        assert_eq!(p.kind, proto::SignalKind::Probe as i32);
        assert_eq!(
            (p.ip.as_str(), p.protocol.as_str(), p.port, p.at_ms),
            ("2001:db8::9", "udp", 161, 7)
        );
    }

    #[test]
    fn a_refusal_pauses_for_the_hubs_wait_within_bounds() {
        let mut st = tonic::Status::resource_exhausted("slow down");
        assert_eq!(retry_after(&st), Duration::from_secs(1), "no header");
        st.metadata_mut()
            .insert(crate::proto::RETRY_AFTER_HEADER, "100".parse().unwrap());
        assert_eq!(retry_after(&st), Duration::from_millis(100));
        st.metadata_mut().insert(
            crate::proto::RETRY_AFTER_HEADER,
            "99999999".parse().unwrap(),
        );
        assert_eq!(retry_after(&st), MAX_PAUSE);
    }

    #[test]
    fn quiet_logs_once_per_period() {
        let mut q = Quiet::default();
        assert_eq!(q.due(), Some(1));
        assert_eq!(q.due(), None);
        assert_eq!(q.due(), None);
    }
}
