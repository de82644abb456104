//! `banmesh bench --galera URL,URL,URL`: one hub against three live hubs
//! on a MariaDB Galera cluster (one hub beside each cluster node).
//!
//! - propagation: `report` on a node of hub 1 -> applied on every other
//!   node, split into nodes of the same hub and nodes of the other hubs
//!   (what crossing hubs adds: the cluster's replication and the other
//!   hub's `--peer-poll`), with the hop table to the last node;
//! - ingest: reports per second durably committed through 1 hub and
//!   through 3 hubs at once (publishers spread over them), with the hubs'
//!   and the cluster's CPU per report;
//! - the ordering scheme's cost: event ids come from one counter row
//!   (`hub::store::sql::sequence`), so hubs committing at once conflict on
//!   it and one retries. The rows give the commit hop with one hub and
//!   with three, and the conflicts retried per commit, counted from the
//!   hubs' logs.
//!
//! The cluster is the caller's (`scripts/galera-lab up` starts one on
//! loopback); a database `banmesh_bench_galera` is dropped and made on it.
use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::json;
use tokio::sync::mpsc;

use super::{cpu, fleet, hops, percentiles, round};
use crate::{ban::Ban, shutdown};

/// The benchmark's database on the cluster.
const DB: &str = "banmesh_bench_galera";

/// What the hubs log besides the hop lines: each commit conflict retried.
const RUST_LOG: &str =
    "warn,banmesh::hub=info,banmesh::hops=debug,banmesh::hub::store::sql::sequence=debug";

/// The line [`crate::hub::store::sql::sequence::retrying`] logs per retry.
const RETRY_LINE: &str = "lost a commit conflict";

/// Runs the Galera rows into `results["galera"]`.
pub async fn run(
    results: &mut serde_json::Map<String, serde_json::Value>,
    root: &Path,
    pki: &fleet::Pki,
    servers: &[String],
    quick: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        servers.len() >= 3,
        "--galera takes the three nodes' URLs, comma-separated (scripts/galera-lab up prints them)"
    );
    let nodes = if quick { 12 } else { 30 };
    let mut rows = serde_json::Map::new();
    for hubs in [1, 3] {
        eprintln!("galera: propagation, {hubs} hub(s), {nodes} nodes ...");
        let p = propagation(root, pki, &servers[..hubs], nodes, quick).await?;
        rows.insert(format!("propagation_{hubs}_hubs"), p);
    }
    for hubs in [1, 3] {
        eprintln!("galera: ingest through {hubs} hub(s) ...");
        let i = ingest(root, pki, servers, hubs, quick).await?;
        rows.insert(format!("ingest_{hubs}_hubs"), i);
    }
    results.insert("galera".into(), serde_json::Value::Object(rows));
    Ok(())
}

/// Drops and makes the benchmark's database, then starts one hub per
/// server in `servers` (the first creates the schema; the others join it).
async fn hubs(
    dir: &Path,
    pki: &fleet::Pki,
    servers: &[String],
) -> anyhow::Result<Vec<fleet::HubProc>> {
    use mysql_async::prelude::Queryable;
    let mut c = mysql_async::Conn::from_url(servers[0].as_str()).await?;
    c.query_drop(format!("DROP DATABASE IF EXISTS {DB}"))
        .await?;
    c.disconnect().await?;
    let mut out = Vec::new();
    for (k, server) in servers.iter().enumerate() {
        let url = format!("{server}/{DB}");
        out.push(
            fleet::HubProc::spawn(&dir.join(format!("hub{k}")), pki, &url, &[], RUST_LOG).await?,
        );
    }
    Ok(out)
}

/// Conflicts retried, over every hub's log.
fn retries(hubs: &[fleet::HubProc]) -> usize {
    hubs.iter()
        .map(|h| {
            std::fs::read_to_string(&h.log)
                .unwrap_or_default()
                .matches(RETRY_LINE)
                .count()
        })
        .sum()
}

/// Steady reports from the nodes of hub 1; each other node's apply time,
/// split by whether it is on hub 1 or another hub.
async fn propagation(
    root: &Path,
    pki: &fleet::Pki,
    servers: &[String],
    n: usize,
    quick: bool,
) -> anyhow::Result<serde_json::Value> {
    let k = servers.len();
    let dir = root.join(format!("galera-prop-{k}"));
    let hubs = hubs(&dir, pki, servers).await?;
    let urls: Vec<String> = hubs.iter().map(|h| h.url.clone()).collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let nodes = fleet::Nodes::start_spread(&dir, pki, &urls, n, tx).await?;
    let count = if quick { 60 } else { 200 };
    // Node i is on hub i % k: the reporters are the nodes of hub 1.
    let reporters: Vec<usize> = (0..n).filter(|i| i % k == 0).collect();
    let mut pending: HashMap<String, (usize, Instant, usize)> = HashMap::new();
    let mut inflight: HashMap<String, hops::InFlight> = HashMap::new();
    let (mut same, mut other, mut done) = (Vec::new(), Vec::new(), Vec::new());
    let mut absorb = |m: (usize, crate::node::apply::Observed),
                      pending: &mut HashMap<String, (usize, Instant, usize)>,
                      inflight: &mut HashMap<String, hops::InFlight>,
                      done: &mut Vec<hops::Done>| {
        let (node, ref o) = m;
        for ip in &o.ips {
            let Some((from, t0, left)) = pending.get_mut(ip) else {
                continue;
            };
            if *from == node {
                continue;
            }
            let ms = o.at.duration_since(*t0).as_secs_f64() * 1000.0;
            if node % k == 0 { &mut same } else { &mut other }.push(ms);
            *left -= 1;
            if *left == 0 {
                pending.remove(ip);
            }
        }
        hops::absorb(inflight, done, m);
    };
    let commits_before = retries(&hubs);
    for i in 0..count {
        let from = reporters[(i * 7) % reporters.len()];
        let addr = format!("100.{}.{}.{}", 64 + k, i / 250, i % 250 + 1);
        let t0 = Instant::now();
        crate::report::report(&nodes.sockets[from], Ban::new("sshd", "tcp", "22", &addr)?).await?;
        pending.insert(addr.clone(), (from, t0, n - 1));
        inflight.insert(addr, hops::InFlight::new(from, t0, Instant::now(), n - 1));
        let until = t0 + Duration::from_millis(20);
        while let Ok(Some(m)) = tokio::time::timeout_at(until.into(), rx.recv()).await {
            absorb(m, &mut pending, &mut inflight, &mut done);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pending.is_empty() {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(m)) => absorb(m, &mut pending, &mut inflight, &mut done),
            _ => anyhow::bail!("{} bans never reached every node", pending.len()),
        }
    }
    nodes.stop().await;
    let logs: Vec<&Path> = hubs.iter().map(|h| h.log.as_path()).collect();
    let table = hops::HubLog::read_all(&logs)?.table(&done);
    Ok(json!({
        "hubs": k, "nodes": n, "bans": count,
        "same_hub": percentiles(same),
        "other_hubs": percentiles(other),
        "hops_to_last_node": table,
        "conflicts_retried": retries(&hubs) - commits_before,
    }))
}

/// Reports per second durably committed through `k` hubs at once.
async fn ingest(
    root: &Path,
    pki: &fleet::Pki,
    servers: &[String],
    k: usize,
    quick: bool,
) -> anyhow::Result<serde_json::Value> {
    let dir = root.join(format!("galera-ingest-{k}"));
    let hubs = hubs(&dir, pki, &servers[..k]).await?;
    let (publishers, each) = if quick { (6, 5_000) } else { (12, 20_000) };
    let cluster: Vec<u32> = servers
        .iter()
        .filter_map(|s| cpu::listener_pid(cpu::mysql_port(s)))
        .collect();
    let cpu_of = |pids: &[u32]| pids.iter().map(|&p| cpu::of_pid(p)).sum::<Option<u64>>();
    let hub_pids: Vec<u32> = hubs.iter().map(|h| h.pid()).collect();
    let (trigger, stop) = shutdown::channel();
    // Publisher j goes to hub j % k; its outbox is filled before any starts.
    let mut started = Vec::new();
    for (h, hub) in hubs.iter().enumerate() {
        let names: Vec<String> = (0..publishers)
            .filter(|j| j % k == h)
            .map(|j| format!("gpub-{j}"))
            .collect();
        let first = |name: &str| name[5..].parse::<usize>().unwrap_or(0);
        let names_for = names.clone();
        started.extend(
            fleet::publishers_of(&dir, pki, &hub.url, &names, stop.clone(), move |i| {
                let j = first(&names_for[i]);
                (0..each)
                    .map(|r| {
                        let n = (j * each + r) as u32;
                        Ban::new(
                            "sshd",
                            "tcp",
                            "22",
                            &std::net::Ipv4Addr::from(0x0B00_0000 + n).to_string(),
                        )
                    })
                    .collect::<Result<_, _>>()
                    .map_err(Into::into)
            })
            .await?,
        );
    }
    let before = (cpu_of(&hub_pids), cpu_of(&cluster), retries(&hubs));
    let t0 = Instant::now();
    loop {
        let left: usize = started.iter().map(|(o, _)| o.pending()).sum();
        if left == 0 {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "ingest through {k} hubs did not finish: {left} reports left"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let total = (publishers * each) as u64;
    let hub_cpu = cpu::per_event(before.0, cpu_of(&hub_pids), total);
    let db_cpu = cpu::per_event(before.1, cpu_of(&cluster), total);
    let conflicts = retries(&hubs) - before.2;
    trigger.trigger();
    Ok(json!({
        "hubs": k, "reports": total, "publishers": publishers,
        "seconds": round(secs), "per_second": (total as f64 / secs).round(),
        "hubs_cpu_us_per_report": hub_cpu,
        "cluster_cpu_us_per_report": db_cpu,
        "conflicts_retried": conflicts,
    }))
}

/// Prints the Galera rows of `results`, if any.
pub fn print(results: &serde_json::Map<String, serde_json::Value>) {
    let Some(g) = results.get("galera") else {
        return;
    };
    let f = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x}"));
    println!("Galera (3-node cluster), 1 hub vs 3 hubs:");
    for k in [1, 3] {
        let p = &g[format!("propagation_{k}_hubs")];
        if p.is_null() {
            continue;
        }
        println!(
            "  propagation, {k} hub(s), {} nodes: same hub p50 {} ms p99 {} ms; other hubs p50 {} ms p99 {} ms; conflicts retried {}",
            p["nodes"],
            f(&p["same_hub"]["p50_ms"]),
            f(&p["same_hub"]["p99_ms"]),
            f(&p["other_hubs"]["p50_ms"]),
            f(&p["other_hubs"]["p99_ms"]),
            p["conflicts_retried"],
        );
        hops::print(&format!("{k} hub(s)"), &p["hops_to_last_node"]);
    }
    for k in [1, 3] {
        let i = &g[format!("ingest_{k}_hubs")];
        if i.is_null() {
            continue;
        }
        println!(
            "  ingest through {k} hub(s): {} reports/s ({} reports, {} s); hubs {} CPU-us/report, cluster {} CPU-us/report; conflicts retried {}",
            i["per_second"],
            i["reports"],
            i["seconds"],
            f(&i["hubs_cpu_us_per_report"]),
            f(&i["cluster_cpu_us_per_report"]),
            i["conflicts_retried"],
        );
    }
}
