//! The node's connection to the hub(s): TLS endpoints and reconnect backoff.
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::tls::{TlsError, TlsFiles};

/// First retry delay after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between retries.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why a channel to the hub could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A `--hub` address is not `https://HOST:PORT`.
    #[error("bad hub address {0:?}: use https://HOST:PORT")]
    BadAddress(String),
    /// This host's certificate, key or the CA could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A channel to the hub over mutual TLS. With several hub addresses, tonic
/// balances over those that answer, so losing one hub moves traffic to the
/// others.
pub fn channel(hubs: &[String], tls: &TlsFiles) -> Result<Channel, LinkError> {
    // The verifier requires the hub mark as well as the fleet CA: a host
    // certificate naming the hub's address is still not the hub.
    let (config, verifier) = tls.client()?;
    let endpoints = hubs
        .iter()
        .map(|h| {
            Endpoint::from_shared(h.clone())
                .ok()
                .filter(|_| h.starts_with("https://"))
                .ok_or_else(|| LinkError::BadAddress(h.clone()))?
                .tls_config_with_verifier(config.clone(), verifier.clone())
                .map_err(|_| LinkError::BadAddress(h.clone()))
                .map(|e| {
                    e.connect_timeout(Duration::from_secs(5))
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(20))
                        .keep_alive_timeout(Duration::from_secs(10))
                        .keep_alive_while_idle(true)
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match endpoints.as_slice() {
        [one] => one.connect_lazy(),
        _ => Channel::balance_list(endpoints.into_iter()),
    })
}

/// The current channel to the hub; replaced when the node renews its
/// certificate, so every (re)connection after that presents the new one.
#[derive(Clone)]
pub struct Link(tokio::sync::watch::Receiver<Channel>);

impl Link {
    /// A link on `channel`, and the sender that replaces it (after a renewal).
    pub fn new(channel: Channel) -> (tokio::sync::watch::Sender<Channel>, Link) {
        let (tx, rx) = tokio::sync::watch::channel(channel);
        (tx, Link(rx))
    }

    /// The channel to use for the next call or stream.
    pub fn current(&self) -> Channel {
        self.0.borrow().clone()
    }
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
    }
}
