//! Active-active hubs on a MariaDB Galera cluster (issue 18): three hubs,
//! one beside each node of a 3-node cluster on loopback (own ports and
//! data dirs, never the server on 3306), nodes spread over them. A ban
//! reported through any hub reaches the nodes of every hub exactly once
//! (event ids are commit-ordered across hubs: `hub::store::sql::sequence`;
//! each hub publishes other hubs' commits by `--peer-poll`); a hub killed
//! with -9 loses nothing (its nodes move to another hub, resuming exactly
//! from their last applied id);
//! an unban through hub 2 of a ban committed through hub 1 reaches all;
//! a revocation through hub 1 ends the host's stream on hub 2.
mod common;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use common::{Hub, Node, Pki, galera::Galera, hub_cli, wait_for};

/// Every node's shared.log holds each of `bans` (ip -> reporter) once,
/// except the reporter's own; the count of lines off that (lost or twice).
fn misses(nodes: &[Node], bans: &HashMap<String, String>) -> (usize, usize) {
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
    let cluster = Galera::start(root.path(), 3).await;
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
    // Six nodes, two per hub. Each lists only its own hub: a node given
    // several `--hub` balances over them with tonic's balance_list, which
    // here sometimes never connected within 30 s (see the issue 18 report).
    let mut nodes = Vec::new();
    for i in 0..6 {
        nodes.push(Node::start(root.path(), &pki, &format!("node-{i}"), &hubs[i % 3].url).await);
    }

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

    // kill -9 hub 3 with reports in flight: its nodes move, nothing lost.
    report_round(&nodes, 2, 2, &mut bans);
    hubs[2].proc.kill();
    let crash = Instant::now();
    report_round(&nodes, 3, 2, &mut bans);
    // Hub 3's nodes move to hub 1 (their outboxes hold what hub 3 never
    // took) and resume from their last applied id there.
    for n in nodes.iter_mut().skip(2).step_by(3) {
        n.hub_url = hubs[0].url.clone();
        n.restart().await;
    }
    wait_for(
        "every ban on every node after the crash",
        Duration::from_secs(60),
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
        .find(|(_, by)| *by == "node-0")
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

    // Revocation through hub 1 ends node-1's stream on hub 2, and no hub
    // takes it back.
    let (ok, _, err) = hub_cli(&["hub", "revoke", "node-1"], &hubs[0], &pki.admin("ops"));
    assert!(ok, "{err}");
    let socket = nodes[1].socket();
    wait_for(
        "node-1 cut off on every hub",
        Duration::from_secs(10),
        || {
            let socket = socket.clone();
            async move {
                matches!(banmesh::report::node_status(&socket).await, Ok(s) if !s.hub_connected)
            }
        },
    )
    .await;
}
