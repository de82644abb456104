//! Prometheus metrics of both daemons (`--metrics ADDR`), on the official
//! Rust client (`prometheus-client`), served as plain HTTP `GET /metrics`.
//!
//! Conventions: names start `banmesh_hub_` or `banmesh_node_`, carry their
//! unit (`_seconds`), counters end `_total`; labels are bounded sets (an
//! outcome, a reason, a status, a host *name* of the fleet), never an IP.
//! The metrics are process-wide statics so a call site is one line; a
//! process running several nodes (the demo, the benchmark) sums them.
//!
//! # Layout
//! - [`hub`]: what the hub counts (reports, refusals, deliveries,
//!   subscribers, per-host lag).
//! - [`node`]: what a node counts (outbox, applied bans, latencies, the
//!   fast path, the hub link, `shared.log` errors).
//! - [`serve`] (here): the HTTP endpoint.
pub mod hub;
pub mod node;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::{debug, info, warn};

use crate::shutdown::Shutdown;

/// Largest request head read (a scrape's is a few hundred bytes).
const MAX_REQUEST: usize = 8 * 1024;
/// A client that sends no request head in this long is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoint serves: the registry, and a refresh run before each
/// scrape to read values that live elsewhere (outbox depth, lag).
pub struct Exposition {
    /// The metric families.
    pub registry: Registry,
    /// Sets gauges from their sources, at scrape time.
    pub refresh: Box<dyn Fn() + Send + Sync>,
}

impl Exposition {
    /// The Prometheus text format (0.0.4), refreshed now.
    pub fn render(&self) -> String {
        (self.refresh)();
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(error = %e, "cannot encode metrics");
        }
        to_prometheus_text(&out)
    }
}

/// The client writes OpenMetrics, where a counter family `x` has samples
/// `x_total`; the Prometheus text format (what every scraper and
/// `promtool check metrics` read) names the family `x_total` too, and has
/// no `# UNIT` or `# EOF` lines.
fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: Vec<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Binds `addr` now (so a taken port fails the start) and serves
/// `GET /metrics` on it until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    exposition: Exposition,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "metrics on http://{}/metrics", listener.local_addr()?);
    let exposition = Arc::new(exposition);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "metrics: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.recv() => return,
            };
            let exposition = exposition.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &exposition).await {
                    debug!(%peer, error = %e, "metrics request failed");
                }
            });
        }
    });
    Ok(())
}

/// One HTTP/1.0-style exchange: read the head, answer, close.
async fn answer(mut stream: tokio::net::TcpStream, exposition: &Exposition) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let line = String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or_default())
        .into_owned();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            exposition.render(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    #[test]
    fn counter_families_take_their_total_name() {
        let om = "# HELP x_events Events.\n# TYPE x_events counter\nx_events_total 3\n\
                  # HELP x_lat Latency.\n# TYPE x_lat histogram\n# UNIT x_lat seconds\nx_lat_count 1\n# EOF\n";
        assert_eq!(
            super::to_prometheus_text(om),
            "# HELP x_events_total Events.\n# TYPE x_events_total counter\nx_events_total 3\n\
             # HELP x_lat Latency.\n# TYPE x_lat histogram\nx_lat_count 1\n"
        );
    }
}
