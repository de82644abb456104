//! `banmesh bench`: the numbers behind "milliseconds, not minutes".
//!
//! A hub runs as a child process on MariaDB (a fresh database per
//! scenario); simulated nodes run in this process with the node's own code
//! over real mTLS on loopback. It prints a table and one JSON line:
//!
//! - propagation: `report` accepted on one node -> the ban applied (line
//!   written) on every other node, at a steady rate and in a burst, for
//!   each fleet size;
//! - ingest: reports per second durably committed, from pre-filled outboxes;
//! - fan-out: event deliveries per second to subscribers;
//! - subscribers held, and the hub's peak RSS;
//! - catch-up: a node that missed N stored bans, until it applied them all;
//! - a real node process's RSS, idle, with 100,000 active bans known;
//! - `banmesh report`'s own wall time (what fail2ban's action waits);
//! - with `--allow-entries N`, propagation again for each fleet size with
//!   an allow-list of N networks (none covering the bench's addresses, so
//!   every ban is checked against all of them and passes): the cost of the
//!   hub's and every node's check, next to the same run without a list.
//! - fleet signals ([`signals`]): signals aggregated per second, alone and
//!   over gRPC; a threshold-crossing signal to the fleet ban applied on 10
//!   nodes; the hub's RSS with 1,000,000 addresses in the signal windows.
//! - a scanning wave: the same addresses reported by many hosts at once;
//!   ban deliveries per host (one per address when reports coalesce into
//!   one fleet ban) and the time until the fleet is quiet;
//! - with `--ladder-compare`, propagation, ingest and the wave again with
//!   the hub's `--ladder off` (no fleet terms, no coalescing): the ladder's
//!   cost (one read per commit) next to the same runs without it.
//!
//! `--quick` keeps it under a minute for CI; the full run is the README's.
//!
//! # Layout
//! - `mod.rs`: the flags, the scenarios and the report.
//! - [`fleet`]: the PKI, the hub child process and the in-process nodes.
//! - [`signals`]: the fleet signal scenarios (aggregation, gRPC ingest,
//!   threshold to ban, memory with 1,000,000 addresses).
//! - [`node_rss`]: a real node process's idle memory with many active bans.
//!
//! `--only propagation,fanout,...` runs some scenarios alone.
pub mod cpu;
pub mod fleet;
pub mod galera;
pub mod hops;
pub mod node_rss;
pub mod signals;

use std::{
    collections::HashMap,
    path::Path,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use serde_json::json;
use tokio::sync::mpsc;

use crate::{ban::Ban, shutdown};

/// Flags of `banmesh bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Small sizes, under a minute (CI smoke).
    #[arg(long)]
    pub quick: bool,
    /// MariaDB server for the hub (a database `banmesh_bench` is dropped and made there).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306")]
    pub mysql: String,
    /// Fleet sizes for propagation (default 10,100,1000; quick 10,100).
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<usize>,
    /// Subscribers for fan-out and memory (default 10,000; quick 1,000).
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// Bans stored before the catch-up node starts (default 1,000,000; quick 100,000).
    #[arg(long)]
    pub catch_up: Option<usize>,
    /// Reports per publisher in the ingest run (20 publishers; quick 10), default 100,000; quick 20,000.
    #[arg(long)]
    pub ingest: Option<usize>,
    /// Also run propagation with an allow-list of this many networks (e.g. 10000); 0: no such rows.
    #[arg(long, default_value_t = 0)]
    pub allow_entries: usize,
    /// Run only the propagation scenarios (with and without the allow-list).
    #[arg(long)]
    pub propagation_only: bool,
    /// Run only the fleet signal scenarios.
    #[arg(long, conflicts_with = "propagation_only")]
    pub signals_only: bool,
    /// Also run propagation, ingest and the scanning wave with the hub's
    /// `--ladder off`, next to the default ladder.
    #[arg(long)]
    pub ladder_compare: bool,
    /// Hosts reporting in the scanning wave (default 100; quick 20).
    #[arg(long)]
    pub wave_hosts: Option<usize>,
    /// Addresses every host of the wave reports (default 1,000; quick 200).
    #[arg(long)]
    pub wave_addresses: Option<usize>,
    /// Active bans the hub holds when a real node process starts, for the
    /// node's idle memory (default 100,000; quick 10,000).
    #[arg(long)]
    pub node_rss_bans: Option<usize>,
    /// Run only these scenarios (comma-separated): propagation, ingest,
    /// wave, fanout, catch-up, node-rss, report, signals. Default: all.
    #[arg(long, value_delimiter = ',', value_parser = SCENARIOS,
        conflicts_with_all = ["propagation_only", "signals_only"])]
    pub only: Vec<String>,
    /// Run only the Galera rows, on the cluster whose three nodes these
    /// `mysql://` URLs name (comma-separated; `scripts/galera-lab up`
    /// starts one on loopback and prints them): 1 hub vs 3 live hubs.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["propagation_only", "signals_only", "only"])]
    pub galera: Vec<String>,
}

/// The scenarios `--only` can name, in the order a run makes them.
const SCENARIOS: [&str; 8] = [
    "propagation",
    "ingest",
    "wave",
    "fanout",
    "catch-up",
    "node-rss",
    "report",
    "signals",
];

/// The hub's flags with the ladder off (the comparison runs).
const LADDER_OFF: &[&str] = &["--ladder", "off"];

/// Percentiles of a sample, in milliseconds.
fn percentiles(mut v: Vec<f64>) -> serde_json::Value {
    if v.is_empty() {
        return json!(null);
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    json!({"n": v.len(), "p50_ms": round(at(0.5)), "p99_ms": round(at(0.99)), "max_ms": round(v[v.len() - 1])})
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

const DB: &str = "banmesh_bench";

/// Runs every scenario and prints the table and the JSON line.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    raise_fd_limit();
    let temp = tempfile::Builder::new()
        .prefix("banmesh-bench-")
        .tempdir()?;
    let root = temp.path();
    let pki = fleet::Pki::new(root)?;
    let sizes = if !args.nodes.is_empty() {
        args.nodes.clone()
    } else if args.quick {
        vec![10, 100]
    } else {
        vec![10, 100, 1000]
    };
    let mut results = serde_json::Map::new();
    results.insert("machine".into(), json!(machine()));
    results.insert("quick".into(), json!(args.quick));

    if !args.galera.is_empty() {
        galera::run(&mut results, root, &pki, &args.galera, args.quick).await?;
        println!(
            "banmesh bench ({})",
            results["machine"].as_str().unwrap_or("")
        );
        galera::print(&results);
        println!("{}", serde_json::Value::Object(results));
        return Ok(());
    }
    let only = if args.propagation_only {
        vec!["propagation".to_string()]
    } else if args.signals_only {
        vec!["signals".to_string()]
    } else {
        args.only.clone()
    };
    let wants = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let rss_bans = args
        .node_rss_bans
        .unwrap_or(if args.quick { 10_000 } else { 100_000 });
    let mut prop = Vec::new();
    let mut prop_allow = Vec::new();
    let mut prop_off = Vec::new();
    for &n in sizes.iter().filter(|_| wants("propagation")) {
        eprintln!("propagation with {n} nodes ...");
        prop.push(propagation(root, &pki, &args.mysql, n, args.quick, 0, &[]).await?);
        if args.allow_entries > 0 {
            let k = args.allow_entries;
            eprintln!("propagation with {n} nodes and {k} allow-list networks ...");
            prop_allow.push(propagation(root, &pki, &args.mysql, n, args.quick, k, &[]).await?);
        }
        if args.ladder_compare {
            eprintln!("propagation with {n} nodes, ladder off ...");
            let p = propagation(root, &pki, &args.mysql, n, args.quick, 0, LADDER_OFF).await?;
            prop_off.push(p);
        }
    }
    if wants("propagation") {
        results.insert("propagation".into(), json!(prop));
        if args.allow_entries > 0 {
            results.insert("propagation_allow_list".into(), json!(prop_allow));
        }
        if args.ladder_compare {
            results.insert("propagation_ladder_off".into(), json!(prop_off));
        }
    }
    if wants("ingest") {
        eprintln!("ingest ...");
        let (publishers, each) = if args.quick {
            (10, 20_000)
        } else {
            (20, 100_000)
        };
        let each = args.ingest.unwrap_or(each);
        let ingested = ingest(root, &pki, &args.mysql, publishers, each, &[]).await?;
        results.insert("ingest".into(), ingested);
        if args.ladder_compare {
            eprintln!("ingest, ladder off ...");
            let off = ingest(root, &pki, &args.mysql, publishers, each, LADDER_OFF).await?;
            results.insert("ingest_ladder_off".into(), off);
        }
    }
    if wants("wave") {
        let hosts = args.wave_hosts.unwrap_or(if args.quick { 20 } else { 100 });
        let addrs = args
            .wave_addresses
            .unwrap_or(if args.quick { 200 } else { 1000 });
        eprintln!("scanning wave: {addrs} addresses from {hosts} hosts ...");
        let w = wave(root, &pki, &args.mysql, hosts, addrs, &[]).await?;
        results.insert("wave".into(), w);
        if args.ladder_compare {
            eprintln!("scanning wave, ladder off ...");
            let w = wave(root, &pki, &args.mysql, hosts, addrs, LADDER_OFF).await?;
            results.insert("wave_ladder_off".into(), w);
        }
    }
    if wants("fanout") {
        eprintln!("fan-out and subscribers held ...");
        let subs = args
            .subscribers
            .unwrap_or(if args.quick { 1000 } else { 10_000 });
        let fanned = fanout(root, &pki, &args.mysql, subs).await?;
        results.insert("fanout".into(), fanned);
    }
    if wants("catch-up") {
        eprintln!("catch-up ...");
        let bans = args
            .catch_up
            .unwrap_or(if args.quick { 100_000 } else { 1_000_000 });
        let caught = catch_up(root, &pki, &args.mysql, bans).await?;
        results.insert("catch_up".into(), caught);
    }
    if wants("node-rss") {
        eprintln!("node memory with {rss_bans} active bans ...");
        let r = node_rss::run(root, &pki, &args.mysql, rss_bans).await?;
        results.insert("node_rss".into(), r);
    }
    if wants("report") {
        eprintln!("report wall time ...");
        results.insert(
            "report".into(),
            report_wall_time(root, &pki, &args.mysql).await?,
        );
    }
    if wants("signals") {
        signals::run(&mut results, root, &pki, &args.mysql, args.quick).await?;
    }

    print_table(&results);
    println!("{}", serde_json::Value::Object(results));
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_string))
        })
        .unwrap_or_default();
    format!("{cpus} cores, {model}")
}

/// Many simulated nodes hold many sockets and files.
fn raise_fd_limit() {
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn ip(scenario: u32, i: u32) -> String {
    std::net::Ipv4Addr::from((100 + scenario) << 24 | i).to_string()
}

/// `count` distinct networks that cover none of the bench's addresses
/// (those are in 100.0.0.0-163.255.255.255, see [`ip`]): IPv4 /16-/32 in
/// 1.0.0.0-99.255.255.255 and IPv6 /48-/64 in 2001:db8::/32, a quarter of
/// them IPv6, so lookups walk many prefix lengths of both families.
fn allow_networks(count: usize) -> Vec<crate::allow::Network> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = std::collections::BTreeSet::new();
    while out.len() < count {
        let r = next();
        let text = if out.len() % 4 == 3 {
            let p = 48 + (r % 17) as u8;
            let low = (u128::from(next()) << 64 | u128::from(next())) >> 32;
            let a = 0x2001_0db8_u128 << 96 | low;
            let net = a & (u128::MAX << (128 - u32::from(p)));
            format!("{}/{p}", std::net::Ipv6Addr::from(net))
        } else {
            let p = 16 + (r % 17) as u8;
            let a = (1 + (next() % 99) as u32) << 24 | (next() as u32 & 0x00ff_ffff);
            let net = a & (u32::MAX << (32 - u32::from(p)));
            format!("{}/{p}", std::net::Ipv4Addr::from(net))
        };
        out.insert(text.parse().expect("a canonical network"));
    }
    out.into_iter().collect()
}

/// Adds `count` allow-list networks through the hub's admin RPC (so its
/// committer holds them and they reach nodes as events); the last event id.
async fn fill_allow_list(pki: &fleet::Pki, hub: &str, count: usize) -> anyhow::Result<u64> {
    let admin = pki.admin("bench-admin")?;
    let client = crate::admin::client(hub, &admin).await?;
    let mut last = 0;
    for chunk in allow_networks(count).chunks(64) {
        let calls = chunk.iter().map(|n| {
            let mut c = client.clone();
            let network = n.to_string();
            async move {
                c.allow_add(crate::proto::AllowAddRequest {
                    network,
                    note: "bench".into(),
                })
                .await
            }
        });
        for r in futures_util::future::join_all(calls).await {
            last = last.max(r?.into_inner().event_id);
        }
    }
    Ok(last)
}

/// Reports from random nodes; each latency is from the `report` call until
/// the last other node applied it. With `allow` > 0, the hub first gets
/// that many allow-list networks and every node has applied them before
/// the first report.
async fn propagation(
    root: &Path,
    pki: &fleet::Pki,
    mysql: &str,
    n: usize,
    quick: bool,
    allow: usize,
    hub_args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let ladder = hub_args != LADDER_OFF;
    let dir = root.join(format!("prop-{n}-{allow}-{ladder}"));
    let hub = fleet::HubProc::start_logging(&dir, pki, mysql, DB, hub_args, true).await?;
    let last_allow = if allow > 0 {
        fill_allow_list(pki, &hub.url, allow).await?
    } else {
        0
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let nodes = fleet::Nodes::start(&dir, pki, &hub.url, n, tx).await?;
    let t_list = Instant::now();
    for s in &nodes.sockets {
        while crate::report::node_status(s).await?.last_applied_event_id < last_allow {
            anyhow::ensure!(
                t_list.elapsed() < Duration::from_secs(300),
                "nodes did not apply the allow-list"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut pending: HashMap<String, hops::InFlight> = HashMap::new();
    let mut steady = Vec::new();
    let mut burst = Vec::new();
    let count = if quick { 50 } else { 200 };
    let mut seq = 0u32;
    let cpu_nodes = cpu::own();

    // Steady: one report every 20 ms.
    for i in 0..count {
        let from = (i * 7919) % n;
        let addr = ip(n as u32 % 50, seq);
        seq += 1;
        let t0 = Instant::now();
        crate::report::report(&nodes.sockets[from], Ban::new("sshd", "tcp", "22", &addr)?).await?;
        pending.insert(
            addr.clone(),
            hops::InFlight::new(from, t0, Instant::now(), n - 1),
        );
        let until = t0 + Duration::from_millis(20);
        while let Ok(Some(m)) = tokio::time::timeout_at(until.into(), rx.recv()).await {
            hops::absorb(&mut pending, &mut steady, m);
        }
    }
    drain(&mut rx, &mut pending, &mut steady).await?;

    // Burst: all at once, from many nodes concurrently.
    let t0 = Instant::now();
    let mut calls = Vec::new();
    for i in 0..count {
        let from = (i * 104_729) % n;
        let addr = ip(n as u32 % 50, seq);
        seq += 1;
        let socket = nodes.sockets[from].clone();
        calls.push(tokio::spawn(async move {
            crate::report::report(&socket, Ban::new("sshd", "tcp", "22", &addr).unwrap())
                .await
                .map(|_| (from, addr, Instant::now()))
        }));
    }
    for c in calls {
        let (from, addr, returned) = c.await??;
        pending.insert(addr, hops::InFlight::new(from, t0, returned, n - 1));
    }
    drain(&mut rx, &mut pending, &mut burst).await?;

    // A burst on one node: `count` bans at once from node 0 (the issue's
    // 200 at once on one host; 50 in --quick).
    let mut burst_one = Vec::new();
    let t0 = Instant::now();
    let mut calls = Vec::new();
    for _ in 0..count {
        let addr = ip(n as u32 % 50, seq);
        seq += 1;
        let socket = nodes.sockets[0].clone();
        calls.push(tokio::spawn(async move {
            crate::report::report(&socket, Ban::new("sshd", "tcp", "22", &addr).unwrap())
                .await
                .map(|_| (addr, Instant::now()))
        }));
    }
    for c in calls {
        let (addr, returned) = c.await??;
        pending.insert(addr, hops::InFlight::new(0, t0, returned, n - 1));
    }
    drain(&mut rx, &mut pending, &mut burst_one).await?;
    let applied = (3 * count * (n - 1)) as u64;
    let node_cpu = cpu::per_event(Some(cpu_nodes), Some(cpu::own()), applied);
    let (_, peak) = hub.rss();
    nodes.stop().await;
    let hub_log = hops::HubLog::read(&hub.log)?;
    let e2e = |v: &[hops::Done]| percentiles(v.iter().map(|d| d.end_to_end_ms()).collect());
    Ok(json!({
        "nodes": n, "allow_entries": allow, "ladder": ladder,
        "steady": e2e(&steady), "burst": e2e(&burst), "burst_one_node": e2e(&burst_one),
        "steady_hops": hub_log.table(&steady),
        "burst_hops": hub_log.table(&burst),
        "burst_one_node_hops": hub_log.table(&burst_one),
        "node_cpu_us_per_applied_ban": node_cpu,
        "hub_peak_rss_mb": peak / (1 << 20),
    }))
}

async fn drain(
    rx: &mut mpsc::UnboundedReceiver<(usize, crate::node::apply::Observed)>,
    pending: &mut HashMap<String, hops::InFlight>,
    out: &mut Vec<hops::Done>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pending.is_empty() {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(m)) => hops::absorb(pending, out, m),
            _ => anyhow::bail!("{} bans never reached every node", pending.len()),
        }
    }
    Ok(())
}

/// Reports per second durably committed, from publishers with full outboxes.
async fn ingest(
    root: &Path,
    pki: &fleet::Pki,
    mysql: &str,
    publishers: usize,
    each: usize,
    hub_args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let ladder = hub_args != LADDER_OFF;
    let dir = root.join(format!("ingest-{ladder}"));
    let hub = fleet::HubProc::start_with(&dir, pki, mysql, DB, hub_args).await?;
    let (trigger, stop) = shutdown::channel();
    let t0 = Instant::now();
    let mariadb = cpu::listener_pid(cpu::mysql_port(mysql));
    let cpu_before = (cpu::of_pid(hub.pid()), mariadb.and_then(cpu::of_pid));
    let started = fleet::publishers(&dir, pki, &hub.url, publishers, each, stop).await?;
    let t_start = Instant::now();
    let load_secs = t_start.duration_since(t0).as_secs_f64();
    loop {
        let left: usize = started.iter().map(|(o, _)| o.pending()).sum();
        if left == 0 {
            break;
        }
        if t_start.elapsed() > Duration::from_secs(300) {
            anyhow::bail!("ingest did not finish: {left} reports left");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = t_start.elapsed().as_secs_f64();
    let total = publishers * each;
    let hub_cpu = cpu::per_event(cpu_before.0, cpu::of_pid(hub.pid()), total as u64);
    let db_cpu = cpu::per_event(cpu_before.1, mariadb.and_then(cpu::of_pid), total as u64);
    trigger.trigger();
    let (_, peak) = hub.rss();
    Ok(
        json!({"reports": total, "publishers": publishers, "ladder": ladder, "seconds": round(secs), "per_second": (total as f64 / secs).round(), "outbox_fill_seconds": round(load_secs), "hub_cpu_us_per_report": hub_cpu, "mariadb_cpu_us_per_report": db_cpu, "hub_peak_rss_mb": peak / (1 << 20)}),
    )
}

/// Deliveries per second to many subscribers, and subscribers held.
async fn fanout(
    root: &Path,
    pki: &fleet::Pki,
    mysql: &str,
    subs: usize,
) -> anyhow::Result<serde_json::Value> {
    let dir = root.join("fanout");
    let hub = fleet::HubProc::start(&dir, pki, mysql, DB).await?;
    let events = 2000;
    let (trigger, stop) = shutdown::channel();
    let (rss_empty, _) = hub.rss();
    // Half the subscribers, then the rest: the hub's RSS after each step
    // gives the cost of one more subscriber, apart from what the first
    // ones bring once (the store's connection pool filled by their
    // replays, the runtime's buffers).
    let half = subs / 2;
    let (received_a, _tasks_a) = fleet::subscribers(pki, &hub.url, 0..half, stop.clone()).await?;
    let admin = pki.host("sub-0")?;
    let mut client = crate::admin::client(&hub.url, &admin).await?;
    let t_sub = Instant::now();
    held_by(&mut client, half).await?;
    let (rss_half, _) = hub.rss();
    let (received_b, _tasks_b) =
        fleet::subscribers(pki, &hub.url, half..subs, stop.clone()).await?;
    held_by(&mut client, subs).await?;
    let (rss_idle, _) = hub.rss();
    let received = || received_a.load(Ordering::Relaxed) + received_b.load(Ordering::Relaxed);
    let cpu_before = cpu::of_pid(hub.pid());
    let t0 = Instant::now();
    let pubs = fleet::publishers(&dir, pki, &hub.url, 1, events, stop.clone()).await?;
    let want = (subs * events) as u64;
    while received() < want {
        if t0.elapsed() > Duration::from_secs(300) {
            anyhow::bail!("fan-out incomplete: {} of {want}", received());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    // Includes committing the 2,000 events: one report each, against
    // `subscribers` deliveries each.
    let hub_cpu = cpu::per_event(cpu_before, cpu::of_pid(hub.pid()), want);
    let (_, peak) = hub.rss();
    trigger.trigger();
    drop(pubs);
    Ok(
        json!({"subscribers": subs, "events": events, "deliveries": want, "seconds": round(secs), "deliveries_per_second": (want as f64 / secs).round(), "connect_seconds": round(t_sub.elapsed().as_secs_f64() - secs), "hub_cpu_us_per_delivery": hub_cpu, "hub_rss_idle_mb": rss_idle / (1 << 20), "hub_rss_per_subscriber_kib": rss_idle.saturating_sub(rss_empty) / 1024 / subs.max(1) as u64, "hub_rss_per_added_subscriber_kib": rss_idle.saturating_sub(rss_half) / 1024 / (subs - half).max(1) as u64, "hub_peak_rss_mb": peak / (1 << 20)}),
    )
}

/// Waits until the hub counts `want` subscribed hosts.
async fn held_by(
    client: &mut crate::proto::hub_client::HubClient<tonic::transport::Channel>,
    want: usize,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let hosts = client
            .hosts(crate::proto::HostsRequest {})
            .await?
            .into_inner()
            .hosts;
        let held = hosts.iter().filter(|h| h.subscribed).count();
        if held >= want {
            return Ok(());
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "only {held} of {want} subscribers connected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A node that was away while many bans were stored, until it applied all.
async fn catch_up(
    root: &Path,
    pki: &fleet::Pki,
    mysql: &str,
    bans: usize,
) -> anyhow::Result<serde_json::Value> {
    let dir = root.join("catchup");
    let hub = fleet::HubProc::start(&dir, pki, mysql, DB).await?;
    // Store them straight through the store interface, in big batches.
    let store = crate::hub::store::open(&format!("{mysql}/{DB}")).await?;
    let mut i = 0u32;
    while (i as usize) < bans {
        let batch: Vec<_> = (0..1000u32)
            .map(|j| crate::hub::store::NewReport {
                host: "elsewhere".into(),
                seq: (i + j) as u64 + 1,
                ban: Ban::new("sshd", "tcp", "22", &ip(60, i + j)).unwrap(),
                plan: Default::default(),
            })
            .collect();
        store.commit(&batch).await?;
        i += 1000;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    let nodes = fleet::Nodes::start(&dir, pki, &hub.url, 1, tx).await?;
    let mut applied = 0usize;
    while applied < bans {
        match tokio::time::timeout(Duration::from_secs(120), rx.recv()).await {
            Ok(Some((_, o))) => applied += o.ips.len(),
            _ => anyhow::bail!("catch-up stalled at {applied} of {bans}"),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    nodes.stop().await;
    drop(hub);
    Ok(json!({"bans": bans, "seconds": round(secs), "per_second": (bans as f64 / secs).round()}))
}

/// A scanning wave: `hosts` hosts report the same `addrs` addresses at
/// once (pre-filled outboxes, published concurrently). Every host also
/// subscribes and counts the ban events it receives: with the ladder, one
/// per address (the reports coalesce into one fleet ban each, which every
/// host receives, its reporters included); without, one per other host's
/// report. Quiet: every report acknowledged and no delivery for a second;
/// its time is the last delivery's (or acknowledgement's), from the start.
async fn wave(
    root: &Path,
    pki: &fleet::Pki,
    mysql: &str,
    hosts: usize,
    addrs: usize,
    hub_args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let ladder = hub_args != LADDER_OFF;
    let dir = root.join(format!("wave-{ladder}"));
    let hub = fleet::HubProc::start_with(&dir, pki, mysql, DB, hub_args).await?;
    let names: Vec<String> = (0..hosts).map(|i| format!("wave-{i}")).collect();
    let (trigger, stop) = shutdown::channel();
    let (counts, _subs) = fleet::counting_subscribers(pki, &hub.url, &names, stop.clone()).await?;
    let mut client = crate::admin::client(&hub.url, &pki.host(&names[0])?).await?;
    let t_sub = Instant::now();
    loop {
        let held = client
            .hosts(crate::proto::HostsRequest {})
            .await?
            .into_inner()
            .hosts
            .iter()
            .filter(|h| h.subscribed)
            .count();
        if held >= hosts {
            break;
        }
        anyhow::ensure!(
            t_sub.elapsed() < Duration::from_secs(120),
            "only {held} of {hosts} wave subscribers connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t0 = Instant::now();
    let pubs = fleet::publishers_of(&dir, pki, &hub.url, &names, stop.clone(), |_| {
        (0..addrs as u32)
            .map(|j| Ban::new("sshd", "tcp", "22", &ip(80, j)).map_err(Into::into))
            .collect()
    })
    .await?;
    let total = |counts: &[std::sync::Arc<std::sync::atomic::AtomicU64>]| -> u64 {
        counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    };
    let (mut seen, mut last_change, mut acked_at) = (0, t0, None);
    loop {
        let now = Instant::now();
        let delivered = total(&counts);
        if delivered != seen {
            (seen, last_change) = (delivered, now);
        }
        let left: usize = pubs.iter().map(|(o, _)| o.pending()).sum();
        if left == 0 && acked_at.is_none() {
            acked_at = Some(now);
        }
        if left == 0 && now.duration_since(last_change) > Duration::from_secs(1) {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(600),
            "the wave did not settle: {left} reports unacknowledged"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let acked = acked_at.unwrap_or(last_change);
    let quiet = last_change.max(acked).duration_since(t0).as_secs_f64();
    let per_host: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    trigger.trigger();
    let mut c = mysql_async::Conn::from_url(format!("{mysql}/{DB}")).await?;
    use mysql_async::prelude::Queryable;
    let fleet_bans: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM events WHERE kind = 1")
        .await?;
    c.disconnect().await?;
    let (_, peak) = hub.rss();
    Ok(json!({
        "hosts": hosts,
        "addresses": addrs,
        "ladder": ladder,
        "reports": hosts * addrs,
        "fleet_bans": fleet_bans.unwrap_or(0),
        "deliveries_per_host_min": per_host.iter().min().copied().unwrap_or(0),
        "deliveries_per_host_max": per_host.iter().max().copied().unwrap_or(0),
        "deliveries": per_host.iter().sum::<u64>(),
        "seconds_to_ack": round(acked.duration_since(t0).as_secs_f64()),
        "seconds_to_quiet": round(quiet),
        "hub_peak_rss_mb": peak / (1 << 20),
    }))
}

/// The wall time of the command fail2ban's action runs, 200 times each,
/// one node: `banmesh report` (this binary) and the small `banmesh-report`
/// beside it, taking turns so that both see the same machine.
async fn report_wall_time(
    root: &Path,
    pki: &fleet::Pki,
    mysql: &str,
) -> anyhow::Result<serde_json::Value> {
    let dir = root.join("report");
    let hub = fleet::HubProc::start(&dir, pki, mysql, DB).await?;
    let (tx, _rx) = mpsc::unbounded_channel();
    let nodes = fleet::Nodes::start(&dir, pki, &hub.url, 1, tx).await?;
    let exe = std::env::current_exe()?;
    let small = exe.with_file_name("banmesh-report");
    let small = small.is_file().then_some(small);
    let (mut big_times, mut small_times) = (Vec::new(), Vec::new());
    for i in 0..200u32 {
        let runs = [(&exe, &mut big_times)]
            .into_iter()
            .chain(small.as_ref().map(|s| (s, &mut small_times)));
        for (k, (program, times)) in runs.enumerate() {
            let t0 = Instant::now();
            let status = tokio::process::Command::new(program)
                .args(["report", "-j", "sshd", "-pr", "tcp", "-p", "22", "-i"])
                .arg(ip(70 + k as u32, i))
                .arg("--socket")
                .arg(&nodes.sockets[0])
                .status()
                .await?;
            times.push(t0.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(status.success(), "{} report failed", program.display());
        }
    }
    nodes.stop().await;
    let mut out = percentiles(big_times);
    if small.is_some() {
        out["banmesh_report_binary"] = percentiles(small_times);
    }
    Ok(out)
}

fn print_table(r: &serde_json::Map<String, serde_json::Value>) {
    let ms =
        |v: &serde_json::Value, k: &str| v[k].as_f64().map_or("-".into(), |x| format!("{x:.2}"));
    println!(
        "banmesh bench ({}){}",
        r["machine"].as_str().unwrap_or(""),
        if r["quick"] == true { ", quick" } else { "" }
    );
    if r.contains_key("propagation") {
        println!(
            "{:<34} {:>10} {:>10} {:>10}",
            "propagation (report -> all applied)", "p50 ms", "p99 ms", "max ms"
        );
    }
    let more = |k: &str| r.get(k).and_then(|v| v.as_array()).into_iter().flatten();
    for p in more("propagation")
        .chain(more("propagation_allow_list"))
        .chain(more("propagation_ladder_off"))
    {
        let mut list = match p["allow_entries"].as_u64() {
            Some(k) if k > 0 => format!(", {k} allowed"),
            _ => String::new(),
        };
        if p["ladder"] == false {
            list.push_str(", no ladder");
        }
        for mode in ["steady", "burst", "burst_one_node"] {
            let v = &p[mode];
            if v.is_null() {
                continue;
            }
            println!(
                "  {:>5} nodes, {:<22} {:>10} {:>10} {:>10}",
                p["nodes"],
                format!("{mode}{list}"),
                ms(v, "p50_ms"),
                ms(v, "p99_ms"),
                ms(v, "max_ms")
            );
        }
    }
    for p in more("propagation") {
        println!(
            "propagation, {} nodes: node CPU {} us per applied ban (this process: nodes, report calls, bench)",
            p["nodes"], p["node_cpu_us_per_applied_ban"]
        );
        hops::print("steady", &p["steady_hops"]);
        hops::print("burst", &p["burst_hops"]);
        hops::print("burst on one node", &p["burst_one_node_hops"]);
    }
    signals::print(r);
    if let Some(m) = r.get("node_rss") {
        println!(
            "node process, idle with {} active bans known: RSS {} MiB (anon {} MiB, file {} MiB), peak {} MiB while catching up ({} s), {} threads",
            m["bans"],
            m["rss_mib"],
            m["rss_anon_mib"],
            m["rss_file_mib"],
            m["peak_rss_mib"],
            m["catch_up_seconds"],
            m["threads"]
        );
    }
    if let Some(i) = r.get("ingest") {
        println!(
            "ingest: {} reports/s committed ({} reports in {} s from {} publishers); CPU per report: hub {} us, MariaDB {} us",
            i["per_second"],
            i["reports"],
            i["seconds"],
            i["publishers"],
            i["hub_cpu_us_per_report"],
            i["mariadb_cpu_us_per_report"]
        );
    }
    if let Some(i) = r.get("ingest_ladder_off") {
        println!(
            "ingest, no ladder: {} reports/s committed ({} reports in {} s)",
            i["per_second"], i["reports"], i["seconds"]
        );
    }
    for (key, label) in [
        ("wave", "scanning wave"),
        ("wave_ladder_off", "scanning wave, no ladder"),
    ] {
        if let Some(w) = r.get(key) {
            println!(
                "{label}: {} addresses x {} hosts: {} fleet bans, {}-{} deliveries per host, acked in {} s, quiet after {} s",
                w["addresses"],
                w["hosts"],
                w["fleet_bans"],
                w["deliveries_per_host_min"],
                w["deliveries_per_host_max"],
                w["seconds_to_ack"],
                w["seconds_to_quiet"]
            );
        }
    }
    if let Some(f) = r.get("fanout") {
        println!(
            "fan-out: {} deliveries/s ({} subscribers x {} events), hub CPU {} us per delivery; hub RSS {} MB holding them ({} KiB per subscriber; {} KiB per subscriber added past half of them), peak {} MB",
            f["deliveries_per_second"],
            f["subscribers"],
            f["events"],
            f["hub_cpu_us_per_delivery"],
            f["hub_rss_idle_mb"],
            f["hub_rss_per_subscriber_kib"],
            f["hub_rss_per_added_subscriber_kib"],
            f["hub_peak_rss_mb"]
        );
    }
    if let Some(c) = r.get("catch_up") {
        println!(
            "catch-up: {} bans applied in {} s ({} /s)",
            c["bans"], c["seconds"], c["per_second"]
        );
    }
    if let Some(rep) = r.get("report") {
        println!(
            "banmesh report wall time: p50 {} ms, p99 {} ms (n={})",
            ms(rep, "p50_ms"),
            ms(rep, "p99_ms"),
            rep["n"]
        );
        if let Some(small) = rep.get("banmesh_report_binary") {
            println!(
                "banmesh-report wall time: p50 {} ms, p99 {} ms (n={})",
                ms(small, "p50_ms"),
                ms(small, "p99_ms"),
                small["n"]
            );
        }
    }
}
