//! Admin from any hub (issue 18, item 4 and 5): three hubs named `hub1`..
//! `hub3`, one beside each node of a 3-node Galera cluster on loopback
//! (own ports and data dirs, never the server on 3306), nodes each given
//! one hub. `banmesh hub hosts` through any hub lists every host with the
//! hub it is subscribed through and since when; a token created through
//! one hub enrols through another, once; a clean stream end clears its
//! claim; a hub killed with -9 leaves its claims, which other hubs show
//! stale once it has missed its heartbeats, and which it clears when it
//! starts again (its nodes then come back to it).
mod common;

use std::time::{Duration, Instant};

use banmesh::tls::TlsFiles;
use common::{
    Hub, Node, Pki, create_token, enroll, enrolled_files, galera::Galera, hub_cli, wait_for,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// Starts hub `name` on Galera node `i`, on `port` (0: any).
async fn hub(root: &std::path::Path, pki: &Pki, cluster: &Galera, i: usize, port: u16) -> Hub {
    let dir = root.join(format!("hub{}", i + 1));
    std::fs::create_dir_all(&dir).unwrap();
    let name = format!("hub{}", i + 1);
    Hub::start_with(
        &dir,
        pki,
        &cluster.url(i, "banmesh"),
        "127.0.0.1",
        port,
        |c| {
            c.args(["--name", &name]);
        },
    )
    .await
}

/// `banmesh hub hosts` through `hub`: the line of each host, by name.
fn hosts(hub: &Hub, admin: &TlsFiles) -> Vec<(String, String)> {
    let (ok, out, err) = hub_cli(&["hub", "hosts"], hub, admin);
    assert!(ok, "hub hosts: {err}");
    out.lines()
        .skip(1)
        .filter_map(|l| Some((l.split_whitespace().next()?.to_string(), l.to_string())))
        .collect()
}

/// The line of `host` in `banmesh hub hosts` through `hub`.
fn line(hub: &Hub, admin: &TlsFiles, host: &str) -> String {
    hosts(hub, admin)
        .into_iter()
        .find(|(name, _)| name == host)
        .map(|(_, l)| l)
        .unwrap_or_default()
}

/// Waits until `host`'s line through `hub` satisfies `check`.
/// (The claim is written beside the stream's replay: it may trail the
/// node's "connected" by a moment.) Returns the line.
async fn wait_line(
    hub: &Hub,
    admin: &TlsFiles,
    host: &str,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    wait_for(what, DEADLINE, || {
        let ok = check(&line(hub, admin, host));
        async move { ok }
    })
    .await;
    line(hub, admin, host)
}

#[tokio::test(flavor = "multi_thread")]
async fn any_hub_lists_every_host_with_its_hub_and_enrols_with_any_hubs_token() {
    // BANMESH_KEEP_TEST_DIR=1 keeps the logs of a failed run.
    let root = tempfile::Builder::new()
        .disable_cleanup(std::env::var_os("BANMESH_KEEP_TEST_DIR").is_some())
        .tempdir()
        .unwrap();
    let pki = Pki::new(root.path());
    let t0 = Instant::now();
    let cluster = Galera::start(root.path(), 3).await;
    println!(
        "galera_admin: 3-node cluster up in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let mut hubs = Vec::new();
    for i in 0..3 {
        hubs.push(hub(root.path(), &pki, &cluster, i, 0).await);
    }
    let admin = pki.admin("ops");
    let mut node_a = Node::start(root.path(), &pki, "node-a", &hubs[0].url).await;
    let _node_b = Node::start(root.path(), &pki, "node-b", &hubs[1].url).await;

    // Every hub lists both hosts, each with its own hub: the answering
    // hub's own stream, or another hub's claim.
    for (i, h) in hubs.iter().enumerate() {
        for (host, via) in [("node-a", 0), ("node-b", 1)] {
            let hub_col = format!(" hub{}  ", via + 1);
            let state = if i == via {
                "  subscribed since "
            } else {
                "  subscribed to another hub since "
            };
            let what = format!("{host} on hub{} through hub{}", via + 1, i + 1);
            wait_line(h, &admin, host, &what, |l| {
                l.contains(&hub_col) && l.contains(state)
            })
            .await;
        }
    }

    // A token made through hub 1 enrols through hub 2, once; the new host
    // connects to hub 3, and hub 1 lists it there.
    let (token, hash) = create_token(&hubs[0], &admin, &["--name", "fresh-1"]);
    let dir = root.path().join("fresh-1-etc");
    let (ok, err) = enroll(&hubs[1], &token, &hash, "fresh-1", &dir);
    assert!(ok, "a token of hub 1 enrols through hub 2: {err}");
    let again = root.path().join("again");
    let (ok, err) = enroll(&hubs[2], &token, &hash, "fresh-1", &again);
    assert!(!ok, "a token works once, whichever hub it is shown to");
    assert!(err.contains("already used"), "{err}");
    let mut fresh = Node {
        name: "fresh-1".into(),
        dir: root.path().join("fresh-1"),
        proc: None,
        hub_url: hubs[2].url.clone(),
        tls: enrolled_files(&dir),
        extra: vec!["--no-fail2ban-socket".into()],
        netns: None,
    };
    fresh.restart().await;
    let l = wait_line(&hubs[0], &admin, "fresh-1", "fresh-1 on hub3", |l| {
        l.contains(" hub3  ") && l.contains("subscribed to another hub since")
    })
    .await;
    let enrolled = l.split_whitespace().nth(1).unwrap_or_default();
    assert_ne!(enrolled, "-", "enrolled, with a date: {l}");

    // A clean stop of node-a clears hub 1's claim: offline everywhere.
    node_a.stop();
    for h in &hubs {
        wait_line(h, &admin, "node-a", "node-a offline", |l| {
            l.ends_with(" -                offline")
        })
        .await;
    }

    // kill -9 hub 2: its claim on node-b stays (nothing cleared it), and
    // another hub shows it with its age; node-b, which lists only hub 2,
    // is offline meanwhile. Hub 2 back on its port clears what its killed
    // run left and claims node-b again when it reconnects.
    let port = hubs[1].port;
    hubs[1].proc.kill();
    let killed = Instant::now();
    wait_line(
        &hubs[0],
        &admin,
        "node-b",
        "hub 2's claim shown stale",
        |l| {
            l.contains(" hub2  ")
                && l.contains("offline (stale: claimed since ")
                && l.contains("; hub2 silent for ")
        },
    )
    .await;
    println!(
        "galera_admin: hub 2's claim shown stale through hub 1 {:.1}s after its kill -9",
        killed.elapsed().as_secs_f64()
    );
    let (_, table, _) = hub_cli(&["hub", "hosts"], &hubs[0], &admin);
    println!("galera_admin: hub hosts through hub1 after kill -9 of hub2:\n{table}");
    hubs[1] = hub(root.path(), &pki, &cluster, 1, port).await;
    assert!(
        hubs[1].proc.log_text().contains("released=1"),
        "hub 2's start cleared the claim its killed run left:\n{}",
        hubs[1].proc.log_text()
    );
    wait_line(&hubs[1], &admin, "node-b", "node-b back on hub 2", |l| {
        l.contains(" hub2  ") && l.contains("  subscribed since ")
    })
    .await;
    let l = line(&hubs[0], &admin, "node-b");
    assert!(
        l.contains(" hub2  ") && l.contains("subscribed to another hub since"),
        "{l}"
    );
}
