//! The fleet signal scenarios of `banmesh bench`:
//!
//! - aggregation: signals per second the hub's aggregator takes (the
//!   windows and their thresholds alone, in this process: its ceiling);
//! - ingest: signals per second a hub accepts over gRPC (`SendSignals`
//!   with host certificates, several hosts at once, batches of
//!   [`BATCH`]), its signal rate limit off;
//! - threshold to ban: from the signal that crosses `--fleet-maxretry`
//!   being sent until the fleet ban is applied on every node of a fleet
//!   of 10 (the nodes' own code, as in propagation);
//! - memory: the hub's RSS before and after 1,000,000 distinct addresses
//!   are in its windows (one failure each), and the bytes per address.
use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::json;
use tokio::sync::mpsc;

use super::{DB, fleet, percentiles, round};
use crate::{
    hub::signals::{
        aggregator::{Aggregator, Batch, Clock, Counters, FleetSeq, Outcome},
        batch::Incoming,
        windows::{Observed, Thresholds, Windows},
    },
    proto::{self, SignalBatch, SignalKind, hub_client::HubClient},
};

/// Signals per `SendSignals` call.
pub const BATCH: usize = 5_000;

fn failure(ip: String, at_ms: i64) -> proto::Signal {
    proto::Signal {
        kind: SignalKind::Failure as i32,
        ip,
        jail: "sshd".into(),
        at_ms,
        ..Default::default()
    }
}

/// The `i`th address of a scenario: 10.x.y.z, distinct for i < 2^24.
fn addr(i: u32) -> String {
    let i = i & 0x00ff_ffff;
    format!("10.{}.{}.{}", i >> 16, (i >> 8) & 0xff, i & 0xff)
}

async fn client(
    hub: &str,
    tls: &crate::tls::TlsFiles,
) -> anyhow::Result<HubClient<tonic::transport::Channel>> {
    Ok(crate::admin::client(hub, tls).await?)
}

/// The aggregator alone: `total` failures over `addresses` addresses from
/// 10 hosts, in batches as the handler hands them over.
pub fn aggregation(total: usize, addresses: u32) -> serde_json::Value {
    let now = crate::clock::now_ms();
    let mut agg = Aggregator {
        windows: Windows::new(Thresholds::default(), 1_000_000),
        outcome: Outcome::DryRun,
        counters: std::sync::Arc::new(Counters::default()),
        clock: Clock::starting(now),
        seq: std::sync::Arc::new(FleetSeq::starting_now()),
    };
    let ips: Vec<std::net::IpAddr> = (0..addresses)
        .map(|i| addr(i).parse().expect("an address"))
        .collect();
    let mut verdicts = 0usize;
    let t0 = Instant::now();
    let mut sent = 0usize;
    let mut k = 0u64;
    while sent < total {
        let n = BATCH.min(total - sent);
        let signals = (0..n)
            .map(|_| {
                k = k
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                Incoming {
                    ip: ips[((k >> 33) % u64::from(addresses)) as usize],
                    at_ms: now,
                    what: Observed::Failure,
                }
            })
            .collect();
        let batch = Batch {
            host: format!("host-{}", (sent / BATCH) % 10),
            signals,
        };
        verdicts += agg.take(batch, now).len();
        sent += n;
    }
    let secs = t0.elapsed().as_secs_f64();
    json!({"signals": total, "addresses": addresses, "seconds": round(secs),
        "per_second": (total as f64 / secs).round(), "verdicts": verdicts})
}

/// Signals per second accepted by a hub over gRPC from `hosts` hosts at
/// once, `each` signals apiece (distinct addresses, so no verdict).
pub async fn ingest(
    root: &Path,
    pki: &fleet::Pki,
    mysql: &str,
    hosts: usize,
    each: usize,
) -> anyhow::Result<serde_json::Value> {
    let dir = root.join("signals-ingest");
    let hub = fleet::HubProc::start_with(&dir, pki, mysql, DB, &["--signal-rate", "off"]).await?;
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for h in 0..hosts {
        let mut c = client(&hub.url, &pki.host(&format!("signaller-{h}"))?).await?;
        tasks.push(tokio::spawn(async move {
            let now = crate::clock::now_ms();
            let (mut accepted, mut dropped) = (0u64, 0u64);
            let mut i = 0;
            while i < each {
                let n = BATCH.min(each - i);
                let signals = (0..n)
                    .map(|j| failure(addr((h * each + i + j) as u32), now))
                    .collect();
                let ack = c.send_signals(SignalBatch { signals }).await?.into_inner();
                accepted += u64::from(ack.accepted);
                dropped += u64::from(ack.ignored);
                i += n;
            }
            anyhow::Ok((accepted, dropped))
        }));
    }
    let (mut accepted, mut dropped) = (0, 0);
    for t in tasks {
        let (a, d) = t.await??;
        accepted += a;
        dropped += d;
    }
    let accept_secs = t0.elapsed().as_secs_f64();
    // Accepted is queued; aggregated is when the windows hold them all:
    // every signal is a new address, so tracked + dropped counts them.
    let mut c = client(&hub.url, &pki.host("signaller-0")?).await?;
    loop {
        let p = c.policy(proto::PolicyRequest {}).await?.into_inner();
        if p.tracked_addresses + p.dropped_addresses >= accepted {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "the aggregator did not take every accepted signal"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(
        json!({"hosts": hosts, "signals": hosts * each, "accepted": accepted,
        "dropped_when_busy": dropped, "accept_seconds": round(accept_secs),
        "accepted_per_second": (accepted as f64 / accept_secs).round(),
        "seconds": round(secs), "per_second": (accepted as f64 / secs).round()}),
    )
}

/// From the threshold-crossing signal to the fleet ban applied on every
/// one of `n` nodes, `samples` times (each a fresh address: 9 failures
/// from two hosts first, then the 10th from a third, timed).
pub async fn threshold_to_ban(
    root: &Path,
    pki: &fleet::Pki,
    mysql: &str,
    n: usize,
    samples: usize,
) -> anyhow::Result<serde_json::Value> {
    let dir = root.join(format!("signals-ban-{n}"));
    let hub = fleet::HubProc::start(&dir, pki, mysql, DB).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let nodes = fleet::Nodes::start(&dir, pki, &hub.url, n, tx).await?;
    let mut observers = Vec::new();
    for name in nodes.names.iter().take(3) {
        observers.push(client(&hub.url, &pki.host(name)?).await?);
    }
    let mut times = Vec::new();
    for s in 0..samples {
        let ip = format!("172.16.{}.{}", s / 250, s % 250 + 1);
        let now = crate::clock::now_ms();
        for (o, k) in [(0usize, 5usize), (1, 4)] {
            let signals = vec![failure(ip.clone(), now); k];
            observers[o].send_signals(SignalBatch { signals }).await?;
        }
        let t0 = Instant::now();
        observers[2]
            .send_signals(SignalBatch {
                signals: vec![failure(ip.clone(), now)],
            })
            .await?;
        let mut applied: HashMap<usize, ()> = HashMap::new();
        let deadline = t0 + Duration::from_secs(30);
        while applied.len() < n {
            match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                Ok(Some((node, o))) => {
                    let at = o.at;
                    if o.ips.contains(&ip) {
                        applied.insert(node, ());
                        if applied.len() == n {
                            times.push(at.duration_since(t0).as_secs_f64() * 1000.0);
                        }
                    }
                }
                _ => anyhow::bail!("the fleet ban of {ip} did not reach every node"),
            }
        }
    }
    nodes.stop().await;
    Ok(json!({"nodes": n, "latency": percentiles(times)}))
}

/// The hub's RSS with `addresses` distinct addresses in its windows.
pub async fn memory(
    root: &Path,
    pki: &fleet::Pki,
    mysql: &str,
    addresses: usize,
) -> anyhow::Result<serde_json::Value> {
    let dir = root.join("signals-memory");
    let max = addresses.to_string();
    let hub = fleet::HubProc::start_with(
        &dir,
        pki,
        mysql,
        DB,
        &["--signal-rate", "off", "--signal-max-addresses", &max],
    )
    .await?;
    let mut c = client(&hub.url, &pki.host("signaller-0")?).await?;
    // Settle: one call so the connection and the handler's buffers exist.
    let now = crate::clock::now_ms();
    c.send_signals(SignalBatch {
        signals: vec![failure(addr(0), now)],
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (before, _) = hub.rss();
    let mut i = 0;
    while i < addresses {
        let n = BATCH.min(addresses - i);
        let signals: Vec<_> = (0..n).map(|j| failure(addr((i + j) as u32), now)).collect();
        let ack = c.send_signals(SignalBatch { signals }).await?.into_inner();
        if ack.accepted == 0 {
            // The aggregator's queue was full: the same batch again.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        i += n;
    }
    let t0 = Instant::now();
    let tracked = loop {
        let p = c.policy(proto::PolicyRequest {}).await?.into_inner();
        if p.tracked_addresses >= addresses as u64 || t0.elapsed() > Duration::from_secs(60) {
            break p.tracked_addresses;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (after, peak) = hub.rss();
    let delta = after.saturating_sub(before);
    Ok(
        json!({"addresses": tracked, "hub_rss_before_mb": before / (1 << 20),
        "hub_rss_after_mb": after / (1 << 20), "hub_peak_rss_mb": peak / (1 << 20),
        "bytes_per_address": delta / tracked.max(1)}),
    )
}

/// Runs the signal scenarios into `results`.
pub async fn run(
    results: &mut serde_json::Map<String, serde_json::Value>,
    root: &Path,
    pki: &fleet::Pki,
    mysql: &str,
    quick: bool,
) -> anyhow::Result<()> {
    eprintln!("signal aggregation ...");
    let (total, addresses) = if quick {
        (200_000, 20_000)
    } else {
        (10_000_000, 1_000_000)
    };
    results.insert("signal_aggregation".into(), aggregation(total, addresses));
    eprintln!("signal ingest over gRPC ...");
    let each = if quick { 25_000 } else { 500_000 };
    results.insert(
        "signal_ingest".into(),
        ingest(root, pki, mysql, 4, each).await?,
    );
    eprintln!("threshold crossing to fleet ban on 10 nodes ...");
    let samples = if quick { 20 } else { 100 };
    results.insert(
        "signal_to_ban".into(),
        threshold_to_ban(root, pki, mysql, 10, samples).await?,
    );
    eprintln!("hub memory with addresses in the signal windows ...");
    let addresses = if quick { 20_000 } else { 1_000_000 };
    results.insert(
        "signal_memory".into(),
        memory(root, pki, mysql, addresses).await?,
    );
    Ok(())
}

/// The signal rows of the table.
pub fn print(r: &serde_json::Map<String, serde_json::Value>) {
    let Some(a) = r.get("signal_aggregation") else {
        return;
    };
    println!(
        "signal aggregation (windows alone): {} signals/s ({} signals over {} addresses)",
        a["per_second"], a["signals"], a["addresses"]
    );
    let i = &r["signal_ingest"];
    println!(
        "signal ingest over gRPC: {} signals/s aggregated, {} /s accepted ({} hosts, {} signals, {} dropped while the aggregator was busy)",
        i["per_second"], i["accepted_per_second"], i["hosts"], i["signals"], i["dropped_when_busy"]
    );
    let b = &r["signal_to_ban"]["latency"];
    println!(
        "threshold-crossing signal -> fleet ban applied on all {} nodes: p50 {} ms, p99 {} ms (n={})",
        r["signal_to_ban"]["nodes"], b["p50_ms"], b["p99_ms"], b["n"]
    );
    let m = &r["signal_memory"];
    println!(
        "hub RSS with {} addresses in the signal windows: {} MB (from {} MB; {} bytes/address)",
        m["addresses"], m["hub_rss_after_mb"], m["hub_rss_before_mb"], m["bytes_per_address"]
    );
}
