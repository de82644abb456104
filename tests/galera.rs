//! Active-active hubs on a MariaDB Galera cluster (issue 18): three hubs,
//! one beside each node of a 3-node cluster on loopback (own ports and
//! data dirs, never the server on 3306). Every node lists all three hubs
//! (in different orders: each host orders them itself, by rendezvous
//! hashing of its name) and the nodes spread over them. A ban
//! reported through any hub reaches the nodes of every hub exactly once
//! (event ids are commit-ordered across hubs: `hub::store::sql::sequence`;
//! each hub publishes other hubs' commits by `--peer-poll`); a hub killed
//! with -9 loses nothing: its nodes fail over to their next choices by
//! themselves within seconds, resuming exactly from their last applied id;
//! an unban through hub 2 of a ban committed through hub 1 reaches all;
//! a revocation through hub 1 ends the host's stream on hub 2; a Galera
//! node killed with -9 under hub 2: hub 2 stops serving, its node moves to
//! hub 1, and every ban still reaches every node once.
mod common;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use banmesh::node::link::order::preference;
use common::{Hub, Node, Pki, galera::Galera, hub_cli, wait_for};

/// The hub a node says it uses (`banmesh status`), if it is connected.
async fn hub_of(node: &Node) -> Option<String> {
    let s = banmesh::report::node_status(&node.socket()).await.ok()?;
    let in_use = s
        .hubs
        .split_whitespace()
        .find_map(|h| h.strip_prefix('*'))?;
    s.hub_connected.then(|| in_use.to_string())
}

/// Reports a new ban from `node` every 250 ms until `stop`, on its own
/// thread (the `banmesh report` CLI, as fail2ban's action runs it);
/// returns the addresses reported.
fn report_steadily(
    node: &Node,
    net: u8,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    let (socket, dir) = (node.socket(), node.dir.clone());
    std::thread::spawn(move || {
        let mut ips = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let k = ips.len();
            let ip = format!("198.{net}.{}.{}", k / 250, k % 250 + 1);
            let out = common::banmesh()
                .arg("report")
                .arg("--socket")
                .arg(&socket)
                .arg("--data-dir")
                .arg(&dir)
                .args(["-j", "sshd", "-pr", "tcp", "-p", "22", "-i", &ip])
                .output()
                .unwrap();
            assert!(out.status.success(), "report {ip}: {out:?}");
            ips.push(ip);
            std::thread::sleep(Duration::from_millis(250));
        }
        ips
    })
}

/// Waits until `node` is connected through `hub`.
async fn wait_on_hub(node: &Node, hub: &str, what: &str, deadline: Duration) {
    wait_for(
        &format!("{} {what} ({hub})", node.name),
        deadline,
        || async { hub_of(node).await.as_deref() == Some(hub) },
    )
    .await;
}

/// Every node's shared.log holds each of `bans` (ip -> reporter) once,
/// except the reporter's own; the count of lines off that (lost or twice).
fn misses<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    bans: &HashMap<String, String>,
) -> (usize, usize) {
    let (mut lost, mut twice) = (0, 0);
    for n in nodes {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for line in n.shared_lines() {
            let ip = line.split(": ").nth(1).unwrap_or_default().to_string();
            *seen.entry(ip).or_default() += 1;
        }
        for (ip, reporter) in bans {
            let want = usize::from(*reporter != n.name);
            let got = seen.get(ip).copied().unwrap_or(0);
            if got < want {
                lost += 1;
            }
            if got > want {
                twice += 1;
            }
        }
    }
    (lost, twice)
}

/// Each node reports `per_node` new addresses (`round` keeps them new).
fn report_round(nodes: &[Node], round: u8, per_node: u8, bans: &mut HashMap<String, String>) {
    for (i, n) in nodes.iter().enumerate() {
        for k in 0..per_node {
            let ip = format!("198.51.{round}.{}", i as u8 * 10 + k + 1);
            let (ok, err) = n.report("sshd", "tcp", "22", &ip);
            assert!(ok, "report {ip} through {}: {err}", n.name);
            bans.insert(ip, n.name.clone());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_hubs_on_galera_deliver_every_ban_once_through_a_hub_crash() {
    // BANMESH_KEEP_TEST_DIR=1 keeps the logs of a failed run.
    let root = tempfile::Builder::new()
        .disable_cleanup(std::env::var_os("BANMESH_KEEP_TEST_DIR").is_some())
        .tempdir()
        .unwrap();
    println!("galera: test dir {}", root.path().display());
    let pki = Pki::new(root.path());
    let t0 = Instant::now();
    let mut cluster = Galera::start(root.path(), 3).await;
    println!(
        "galera: 3-node cluster up in {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // One hub per Galera node, one after the other (the first migrates).
    let mut hubs = Vec::new();
    for i in 0..3 {
        let dir = root.path().join(format!("hub{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        hubs.push(Hub::start(&dir, &pki, &cluster.url(i, "banmesh")).await);
    }
    // Six nodes, each given all three hubs, in an order of its own on the
    // command line (one as a single comma and space separated value): the
    // order they are listed in does not matter, each host ranks them by
    // rendezvous hashing of its name. Ports are new each run, so names are
    // picked (from node-0, node-1, ...) for two first choices per hub;
    // slot i prefers hub i % 3.
    let urls: Vec<String> = hubs.iter().map(|h| h.url.clone()).collect();
    let mut names: Vec<Option<String>> = vec![None; 6];
    for k in 0.. {
        let name = format!("node-{k}");
        let first = preference(&name, &urls)[0].clone();
        let hub = urls.iter().position(|u| *u == first).unwrap();
        if let Some(slot) = (hub..6).step_by(3).find(|&s| names[s].is_none()) {
            names[slot] = Some(name);
        }
        if names.iter().all(Option::is_some) {
            break;
        }
    }
    let mut nodes: Vec<Node> = Vec::new();
    for (i, name) in names.into_iter().map(Option::unwrap).enumerate() {
        let listed: Vec<String> = (0..3).map(|j| urls[(i + j) % 3].clone()).collect();
        let mut extra: Vec<std::ffi::OsString> = vec!["--no-fail2ban-socket".into()];
        let first = if i == 4 {
            format!("{}, {} {}", listed[0], listed[1], listed[2])
        } else {
            for other in &listed[1..] {
                extra.extend(["--hub".into(), other.into()]);
            }
            listed[0].clone()
        };
        nodes.push(Node::start_with(root.path(), &pki, &name, &first, extra).await);
    }
    // The fleet spreads: each node on its first choice, each hub serving two.
    let mut served = [0usize; 3];
    for (i, n) in nodes.iter().enumerate() {
        let on = hub_of(n).await;
        assert_eq!(on.as_deref(), Some(urls[i % 3].as_str()), "{}", n.name);
        served[i % 3] += 1;
    }
    println!("galera: nodes per hub {served:?}");

    // Reports through every hub reach the nodes of every hub, once.
    let mut bans = HashMap::new();
    report_round(&nodes, 1, 3, &mut bans);
    let t = Instant::now();
    wait_for("every ban on every node", Duration::from_secs(30), || {
        let ok = misses(&nodes, &bans) == (0, 0);
        async move { ok }
    })
    .await;
    println!(
        "galera: {} bans through 3 hubs on 6 nodes in {:.2}s",
        bans.len(),
        t.elapsed().as_secs_f64()
    );

    // Cross-hub delay, an upper bound: from `banmesh report` on node-0
    // (hub 1) to the line in node-1's shared.log (hub 2), report CLI
    // start-up and the node's outbox included. Printed, not asserted.
    for (to, what, net) in [(3, "hub 1 (same hub)", 9u8), (1, "hub 2", 8)] {
        let mut delays = Vec::new();
        for k in 0..10u8 {
            let ip = format!("198.51.{net}.{}", k + 1);
            let t = Instant::now();
            let (ok, err) = nodes[0].report("sshd", "tcp", "22", &ip);
            assert!(ok, "{err}");
            bans.insert(ip.clone(), nodes[0].name.clone());
            while nodes[to].lines_for(&ip) == 0 && t.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            delays.push(t.elapsed());
        }
        delays.sort();
        println!(
            "galera: report via hub 1 -> applied via {what}: p50 {:.1} ms, max {:.1} ms (10 bans)",
            delays[5].as_secs_f64() * 1e3,
            delays[9].as_secs_f64() * 1e3
        );
    }

    // kill -9 hub 3 with reports in flight: its nodes move by themselves
    // to their second choices (spread over hubs 1 and 2 as their names
    // rank them), within seconds, and nothing is lost or applied twice.
    report_round(&nodes, 2, 2, &mut bans);
    hubs[2].proc.kill();
    let crash = Instant::now();
    report_round(&nodes, 3, 2, &mut bans);
    for n in nodes.iter().skip(2).step_by(3) {
        let second = preference(&n.name, &urls)[1].clone();
        assert_ne!(second, urls[2]);
        wait_on_hub(
            n,
            &second,
            "on its second choice after hub 3's kill -9",
            Duration::from_secs(10),
        )
        .await;
        // An upper bound: the reports above and the polling included.
        println!(
            "galera: {} on its second choice {second} {:.2}s after the kill",
            n.name,
            crash.elapsed().as_secs_f64()
        );
    }
    // The others did not move.
    for (i, n) in nodes.iter().enumerate().filter(|(i, _)| i % 3 != 2) {
        assert_eq!(hub_of(n).await.as_deref(), Some(urls[i % 3].as_str()));
    }
    wait_for(
        "every ban on every node after the crash",
        Duration::from_secs(30),
        || {
            let ok = misses(&nodes, &bans).0 == 0;
            async move { ok }
        },
    )
    .await;
    let (lost, duplicated) = misses(&nodes, &bans);
    println!(
        "galera: hub 3 killed: converged in {:.2}s, lost {lost}, duplicated {duplicated}",
        crash.elapsed().as_secs_f64()
    );
    assert_eq!((lost, duplicated), (0, 0));

    // An unban through hub 2 of a ban committed through hub 1.
    let ip = bans
        .iter()
        .find(|(_, by)| **by == nodes[0].name)
        .map(|(ip, _)| ip.clone())
        .unwrap();
    let (ok, out, err) = hub_cli(&["unban", &ip], &hubs[1], &pki.admin("ops"));
    assert!(ok, "{err}");
    let event: u64 = out
        .split("(event ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no event id in {out:?}"));
    for n in &nodes {
        let socket = n.socket();
        wait_for(
            &format!("the unban at {}", n.name),
            Duration::from_secs(30),
            || {
                let socket = socket.clone();
                async move {
                    matches!(banmesh::report::node_status(&socket).await,
                    Ok(s) if s.last_applied_event_id >= event)
                }
            },
        )
        .await;
    }
    let (ok, out, err) = hub_cli(&["bans", "--ip", &ip], &hubs[0], &pki.admin("ops"));
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .any(|l| l.contains(&format!(" {ip} ")) && l.contains(" lifted ")),
        "the ban lifted through hub 2 shows lifted through hub 1: {out}"
    );

    // Revocation through hub 1 ends nodes[1]'s stream on hub 2, and no
    // hub takes it back.
    let (ok, _, err) = hub_cli(
        &["hub", "revoke", &nodes[1].name],
        &hubs[0],
        &pki.admin("ops"),
    );
    assert!(ok, "{err}");
    let socket = nodes[1].socket();
    wait_for(
        "nodes[1] cut off on every hub",
        Duration::from_secs(10),
        || {
            let socket = socket.clone();
            async move {
                matches!(banmesh::report::node_status(&socket).await, Ok(s) if !s.hub_connected)
            }
        },
    )
    .await;

    // kill -9 the Galera node under hub 2 (its only `--db`), reports in
    // flight: hub 2 stops serving (its streams end UNAVAILABLE), its node
    // moves to hub 1 (hub 3 is gone), and the cluster's two other nodes
    // stay primary. Every ban reaches every node still in the fleet
    // (nodes[1] is revoked) once.
    let fleet: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, n)| n)
        .collect();
    let report = |round: u8, bans: &mut HashMap<String, String>| {
        for (i, n) in fleet.iter().enumerate() {
            for k in 0..2u8 {
                let ip = format!("198.51.{round}.{}", i as u8 * 10 + k + 1);
                let (ok, err) = n.report("sshd", "tcp", "22", &ip);
                assert!(ok, "report {ip} through {}: {err}", n.name);
                bans.insert(ip, n.name.clone());
            }
        }
    };
    report(4, &mut bans);
    cluster.nodes[1].kill();
    let crash = Instant::now();
    report(5, &mut bans);
    wait_on_hub(
        &nodes[4],
        &urls[0],
        "on hub 1 after the kill -9 of hub 2's Galera node",
        Duration::from_secs(30),
    )
    .await;
    println!(
        "galera: {} moved to hub 1 {:.2}s after the kill -9 of hub 2's database node",
        nodes[4].name,
        crash.elapsed().as_secs_f64()
    );
    report(6, &mut bans);
    wait_for(
        "every ban on every node after the database node's crash",
        Duration::from_secs(60),
        || {
            let ok = misses(fleet.iter().copied(), &bans).0 == 0;
            async move { ok }
        },
    )
    .await;
    let (lost, duplicated) = misses(fleet.iter().copied(), &bans);
    println!(
        "galera: Galera node 2 killed: converged in {:.2}s, lost {lost}, duplicated {duplicated}",
        crash.elapsed().as_secs_f64()
    );
    assert_eq!((lost, duplicated), (0, 0));
}

/// A node returns to its first choice once that hub serves again, and
/// keeps reporting through both moves with every ban applied once. Two
/// hubs on one database of the test server (MySQL, `--peer-poll`): the
/// return does not depend on the database, and a second Galera cluster
/// would add ~15 s. (A hub restarted on Galera beside live hubs once
/// stalled opening its store: DDL in the cluster's total order, now never
/// issued on a current store; `tests/galera_ddl.rs`.)
#[tokio::test(flavor = "multi_thread")]
async fn a_node_returns_to_its_first_choice_when_it_serves_again() {
    let root = tempfile::Builder::new()
        .disable_cleanup(std::env::var_os("BANMESH_KEEP_TEST_DIR").is_some())
        .tempdir()
        .unwrap();
    println!("return: test dir {}", root.path().display());
    let pki = Pki::new(root.path());
    let db = common::TestDb::new().await;
    let mut hubs = Vec::new();
    for i in 0..2 {
        let dir = root.path().join(format!("hub{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        hubs.push(Hub::start(&dir, &pki, &db.url).await);
    }
    let urls: Vec<String> = hubs.iter().map(|h| h.url.clone()).collect();
    // `mover` prefers hub 1, `watcher` hub 2 (names picked for that).
    let pick = |hub: usize, not: &str| {
        (0..)
            .map(|k| format!("web-{k}"))
            .find(|n| n != not && preference(n, &urls)[0] == urls[hub])
            .unwrap()
    };
    let mover_name = pick(0, "");
    let watcher_name = pick(1, &mover_name);
    let mut nodes = Vec::new();
    for name in [&mover_name, &watcher_name] {
        let extra = vec![
            "--no-fail2ban-socket".into(),
            "--hub".into(),
            urls[1].clone().into(),
        ];
        nodes.push(Node::start_with(root.path(), &pki, name, &urls[0], extra).await);
    }
    wait_on_hub(
        &nodes[0],
        &urls[0],
        "on its first choice",
        Duration::from_secs(10),
    )
    .await;
    wait_on_hub(
        &nodes[1],
        &urls[1],
        "on its first choice",
        Duration::from_secs(10),
    )
    .await;

    let mut bans = HashMap::new();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let steady = report_steadily(&nodes[0], 60, stop.clone());
    let port = hubs[0].port;
    hubs[0].proc.kill();
    let crash = Instant::now();
    wait_on_hub(
        &nodes[0],
        &urls[1],
        "on hub 2 after hub 1's kill -9",
        Duration::from_secs(10),
    )
    .await;
    println!(
        "return: {} on hub 2 {:.2}s after hub 1's kill -9",
        nodes[0].name,
        crash.elapsed().as_secs_f64()
    );
    let dir = root.path().join("hub0");
    hubs[0] = Hub::start_on(&dir, &pki, &db.url, port).await;
    let back = Instant::now();
    // Probes come every 20-40 s.
    wait_on_hub(
        &nodes[0],
        &urls[0],
        "back on hub 1",
        Duration::from_secs(60),
    )
    .await;
    println!(
        "return: back on hub 1 {:.1}s after its restart",
        back.elapsed().as_secs_f64()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ips = steady.join().unwrap();
    println!("return: {} bans reported through both moves", ips.len());
    bans.extend(ips.into_iter().map(|ip| (ip, nodes[0].name.clone())));
    // More reports through the hub it returned to.
    report_round(&nodes, 1, 3, &mut bans);
    wait_for("every ban on both nodes", Duration::from_secs(30), || {
        let ok = misses(&nodes, &bans).0 == 0;
        async move { ok }
    })
    .await;
    assert_eq!(misses(&nodes, &bans), (0, 0));
    assert_eq!(hub_of(&nodes[1]).await.as_deref(), Some(urls[1].as_str()));
}
