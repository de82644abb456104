//! The node's connection to its hubs: one TLS channel per hub, the hub in
//! use, failover to the next on failure, return to the preferred one, and
//! reconnect backoff.
//!
//! Contract:
//! - A node lists every hub; its order of preference is its own, from its
//!   name ([`order`]), so a fleet spreads over the hubs with no
//!   coordination and losing a hub moves only that hub's nodes.
//! - Every RPC of the node (publisher, subscriber, status reporter,
//!   signals, renewal) goes to the hub in use ([`Link::current`]), and says
//!   how it went ([`Link::succeeded`], [`Link::failed`]). A failure that
//!   means the hub is gone (UNAVAILABLE, a transport error, no answer)
//!   moves the link to the next hub at once; only after a whole round of
//!   hubs failed do callers back off.
//! - Long-lived streams end when the link moves ([`Link::moved`]) and open
//!   again on the new hub: the subscriber resubscribes from its position,
//!   the publisher re-sends what was not acknowledged (the hubs share one
//!   store, which takes each `(host, seq)` once), so a move changes
//!   nothing a user sees.
//! - While not on its first choice, the node asks the hubs it prefers
//!   whether they serve ([`probe`]) and moves back to the first that
//!   does, so after a hub restarts the fleet spreads again.
//!
//! # Layout
//! - [`order`]: the hub list and each host's order of preference.
//! - [`probe`]: the return to a preferred hub.
pub mod order;
pub mod probe;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint},
};
use tracing::{debug, info, warn};

use crate::tls::{TlsError, TlsFiles};

/// First retry delay after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between retries.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// TCP connect timeout: a blackholed hub must not hold the node for long,
/// there is another hub to try.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 ping interval and how long its answer may take: an established
/// connection to a hub that vanished (no FIN, no RST) is given up after
/// about their sum.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 receive window of each stream to the hub (hyper's default is 2
/// MiB). h2 closes its own connection (GOAWAY ENHANCE_YOUR_CALM) when the
/// small DATA frames it holds unread cost more than half the connection
/// window (5 MiB: a budget of 2.5 MiB, charged `256 - size` per frame under
/// 256 bytes). A subscriber that stops reading while live events arrive one
/// per frame (~55 bytes) fills a 2 MiB window with ~38,000 of them, over
/// that budget; 512 KiB holds at most ~9,500, under it whatever the hub
/// sends (docs/perf/fanout-frames.txt). Catch-up is not window-bound at
/// this size on a LAN (512 KiB per round trip).
const STREAM_WINDOW: u32 = 512 * 1024;

/// Why a channel to the hub could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A `--hub` address is not `https://HOST:PORT`.
    #[error("bad hub address {0:?}: use https://HOST:PORT")]
    BadAddress(String),
    /// No hub address at all.
    #[error(transparent)]
    NoHub(#[from] order::HubListError),
    /// This host's certificate, key or the CA could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A lazy channel to each of `hubs` over mutual TLS, in the same order.
fn channels(hubs: &[String], tls: &TlsFiles) -> Result<Vec<Channel>, LinkError> {
    // The verifier requires the hub mark as well as the fleet CA: a host
    // certificate naming the hub's address is still not the hub.
    let (config, verifier) = tls.client()?;
    hubs.iter()
        .map(|h| {
            Endpoint::from_shared(h.clone())
                .ok()
                .filter(|_| h.starts_with("https://"))
                .ok_or_else(|| LinkError::BadAddress(h.clone()))?
                .tls_config_with_verifier(config.clone(), verifier.clone())
                .map_err(|_| LinkError::BadAddress(h.clone()))
                .map(|e| {
                    e.connect_timeout(CONNECT_TIMEOUT)
                        .tcp_nodelay(true)
                        .initial_stream_window_size(STREAM_WINDOW)
                        .http2_keep_alive_interval(KEEP_ALIVE)
                        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
                        .keep_alive_while_idle(true)
                        .connect_lazy()
                })
        })
        .collect()
}

/// A channel to the first of `hubs` over mutual TLS, for one-off calls
/// (the admin commands name one hub); the node's own calls go through a
/// [`Link`], which fails over across all of them.
pub fn channel(hubs: &[String], tls: &TlsFiles) -> Result<Channel, LinkError> {
    let first = order::parse(hubs)?.swap_remove(0);
    Ok(channels(&[first], tls)?.swap_remove(0))
}

/// Why the link moved to another hub (a metric label and a log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// A call or stream to the hub in use failed.
    Failure,
    /// A hub this host prefers serves again.
    Preferred,
}

impl Why {
    /// Its metric label.
    pub fn label(self) -> &'static str {
        match self {
            Why::Failure => "failure",
            Why::Preferred => "preferred",
        }
    }
}

/// What a caller does after a failed call: try again now (on the next hub)
/// or wait its backoff (every hub failed in this round, or the hub
/// answered with a refusal that another hub would give too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Another hub is untried in this round: retry at once.
    Now,
    /// Wait the caller's backoff first.
    Backoff,
}

/// The hub a call goes to: its place in the node's order and its channel.
#[derive(Clone)]
pub struct Route {
    /// Index in the node's order of preference (0: first choice).
    pub hub: usize,
    /// The channel to that hub.
    pub channel: Channel,
}

/// What the link's users share.
struct Shared {
    /// Hub addresses, this host's first choice first.
    hubs: Vec<String>,
    state: Mutex<State>,
    /// The hub in use (index into `hubs`); long-lived streams watch it.
    moves: watch::Sender<usize>,
}

struct State {
    /// One channel per hub, as `hubs`; all replaced after a renewal.
    channels: Vec<Channel>,
    /// Hubs that failed since the last success; a whole round when it
    /// reaches the number of hubs.
    failed_in_row: usize,
}

/// The node's link to its hubs; cheap to clone, one per node.
#[derive(Clone)]
pub struct Link(Arc<Shared>);

impl Link {
    /// The link of host `name` to `hubs` (any order: the host's own order
    /// is computed here), starting on its first choice.
    pub fn new(name: &str, hubs: &[String], tls: &TlsFiles) -> Result<Link, LinkError> {
        let hubs = order::preference(name, &order::parse(hubs)?);
        let channels = channels(&hubs, tls)?;
        let link = Link(Arc::new(Shared {
            state: Mutex::new(State {
                channels,
                failed_in_row: 0,
            }),
            moves: watch::Sender::new(0),
            hubs,
        }));
        crate::metrics::node::hub_in_use(None, link.hub());
        Ok(link)
    }

    /// A link to one hub (the benchmark's simulated nodes).
    pub fn single(hub: &str, tls: &TlsFiles) -> Result<Link, LinkError> {
        Link::new("", &[hub.to_string()], tls)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves a valid state.
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The hubs, this host's first choice first.
    pub fn hubs(&self) -> &[String] {
        &self.0.hubs
    }

    /// Index of the hub in use in [`Link::hubs`].
    pub fn in_use(&self) -> usize {
        *self.0.moves.borrow()
    }

    /// Address of the hub in use.
    pub fn hub(&self) -> &str {
        &self.0.hubs[self.in_use()]
    }

    /// Where the next call or stream goes.
    pub fn current(&self) -> Route {
        let state = self.state();
        let hub = self.in_use();
        Route {
            hub,
            channel: state.channels[hub].clone(),
        }
    }

    /// The channel to hub `i` of [`Link::hubs`] (probes).
    fn channel_to(&self, i: usize) -> Channel {
        self.state().channels[i].clone()
    }

    /// Resolves once the link has left `route`'s hub: a stream on it ends
    /// and opens again on the new one.
    pub async fn moved(&self, route: &Route) {
        let mut moves = self.0.moves.subscribe();
        // The sender lives as long as `self`.
        let _ = moves.wait_for(|h| *h != route.hub).await;
    }

    /// A call or stream on `route` worked: the round of failures is over.
    pub fn succeeded(&self, route: &Route) {
        if route.hub == self.in_use() {
            self.state().failed_in_row = 0;
        }
    }

    /// A call or stream on `route` failed with `status`. When it says the
    /// hub is gone, the link moves on to the next hub (once, however many
    /// callers saw that hub fail); the answer says whether to retry now.
    pub fn failed(&self, route: &Route, status: &Status) -> Retry {
        if !hub_gone(status) {
            return Retry::Backoff;
        }
        let n = self.0.hubs.len();
        let mut state = self.state();
        if route.hub == self.in_use() {
            state.failed_in_row += 1;
            let to = (route.hub + 1) % n;
            let detail = format!("{:?}: {}", status.code(), status.message());
            // Each move of the first round is news; once every hub failed,
            // the moves that follow (one per retry) are not.
            if n > 1 && state.failed_in_row == n {
                warn!(hubs = n, last = %detail, "every hub failed in turn; trying them again in order, with backoff");
            }
            if to != route.hub {
                self.move_to(to, Why::Failure, &detail, state.failed_in_row > n);
            }
        }
        if state.failed_in_row >= n {
            Retry::Backoff
        } else {
            Retry::Now
        }
    }

    /// Moves to hub `to` (an index into [`Link::hubs`]); logs and counts it.
    /// `quiet`: logged at debug level (every hub is failing).
    fn move_to(&self, to: usize, why: Why, detail: &str, quiet: bool) {
        let from = self.in_use();
        if from == to {
            return;
        }
        let (from_hub, to_hub) = (&self.0.hubs[from], &self.0.hubs[to]);
        if quiet {
            debug!(from = %from_hub, to = %to_hub, why = why.label(), %detail, "moved to another hub");
        } else {
            info!(from = %from_hub, to = %to_hub, why = why.label(), %detail, "moved to another hub");
        }
        crate::metrics::node::hub_moved(&self.0.hubs[from], &self.0.hubs[to], why.label());
        self.0.moves.send_replace(to);
    }

    /// Back to hub `to`, which this host prefers to the one in use and
    /// which answered a probe.
    fn prefer(&self, to: usize) {
        let mut state = self.state();
        if to < self.in_use() {
            state.failed_in_row = 0;
            self.move_to(to, Why::Preferred, "it serves again", false);
        }
    }

    /// New channels to every hub, presenting the certificate now in
    /// `tls`'s files (after a renewal); streams already open keep theirs.
    pub fn reload(&self, tls: &TlsFiles) -> Result<(), LinkError> {
        let channels = channels(&self.0.hubs, tls)?;
        self.state().channels = channels;
        Ok(())
    }

    /// The hubs for `banmesh status`: this host's order, the one in use
    /// marked with a leading `*`, space-separated.
    pub fn status_text(&self) -> String {
        let in_use = self.in_use();
        self.0
            .hubs
            .iter()
            .enumerate()
            .map(|(i, h)| {
                if i == in_use {
                    format!("*{h}")
                } else {
                    h.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Whether `status` says the hub cannot serve (gone, unreachable, no
/// answer, its store down) rather than that it answered and refused: the
/// former is worth another hub, the latter (revoked, throttled, a bad
/// request) every hub would say too.
pub fn hub_gone(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::DataLoss
    )
}

/// Capped exponential backoff with jitter, so a fleet that lost its hub
/// does not reconnect in lockstep.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = BACKOFF_MIN
            .saturating_mul(1 << self.failures.min(6))
            .min(BACKOFF_MAX);
        self.failures += 1;
        // Between half and all of the base delay.
        let jitter = rand::random_range(0.5..=1.0);
        base.mul_f64(jitter)
    }

    /// The delay before the next attempt after `retry`: none when the link
    /// moved on to an untried hub.
    pub fn after(&mut self, retry: Retry) -> Duration {
        match retry {
            Retry::Now => Duration::ZERO,
            Retry::Backoff => self.next_delay(),
        }
    }

    /// Back to the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN);
        for _ in 0..20 {
            assert!(b.next_delay() <= BACKOFF_MAX);
        }
        b.reset();
        assert!(b.next_delay() <= BACKOFF_MIN);
        assert_eq!(b.after(Retry::Now), Duration::ZERO);
    }

    fn link(hubs: &[&str]) -> Link {
        let dir = tempfile::tempdir().unwrap();
        let tls = crate::ca::init(dir.path())
            .and_then(|_| {
                crate::ca::issue_once(
                    dir.path(),
                    &crate::ca::HostCert {
                        name: "web-1",
                        sans: &[],
                        valid_for: crate::ca::HOST_VALIDITY,
                        role: crate::ca::Role::Host,
                    },
                )
            })
            .unwrap();
        let hubs: Vec<String> = hubs.iter().map(|h| h.to_string()).collect();
        Link::new("web-1", &hubs, &tls).unwrap()
    }

    #[tokio::test]
    async fn a_failure_moves_once_to_the_next_hub_and_a_round_backs_off() {
        let l = link(&["https://a:1", "https://b:2", "https://c:3"]);
        let order = l.hubs().to_vec();
        let gone = Status::unavailable("connection refused");
        let r0 = l.current();
        assert_eq!(r0.hub, 0);
        assert_eq!(l.failed(&r0, &gone), Retry::Now);
        assert_eq!(l.hub(), order[1]);
        // Another caller saw the same hub fail: no second move.
        assert_eq!(l.failed(&r0, &gone), Retry::Now);
        assert_eq!(l.in_use(), 1);
        assert_eq!(l.failed(&l.current(), &gone), Retry::Now);
        // The whole round failed: back off, still moving on.
        assert_eq!(l.failed(&l.current(), &gone), Retry::Backoff);
        assert_eq!(l.in_use(), 0);
        l.succeeded(&l.current());
        // A refusal is not the hub's absence.
        let r = l.current();
        assert_eq!(
            l.failed(&r, &Status::permission_denied("revoked")),
            Retry::Backoff
        );
        assert_eq!(l.in_use(), 0);
        assert_eq!(l.failed(&r, &gone), Retry::Now);
        assert!(l.status_text().contains(&format!("*{}", order[1])));
        // A stream on hub 0 sees the move; a probe brings it back.
        let moved = l.moved(&r);
        tokio::time::timeout(Duration::from_secs(1), moved)
            .await
            .unwrap();
        l.prefer(0);
        assert_eq!(l.in_use(), 0);
        assert_eq!(l.failed(&l.current(), &gone), Retry::Now);
    }
}
