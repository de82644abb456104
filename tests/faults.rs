//! Fault injection: a hub on MariaDB and three node processes under a
//! steady stream of reports while the hub is SIGKILLed, MariaDB restarts, a
//! node is SIGKILLed, and a node is cut off the network. At the end every
//! accepted report is stored once and applied once by every other node.
mod common;

use std::{
    collections::HashMap,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use banmesh::{ban::Ban, report};
use common::{mariadb::PrivateMariaDb, *};
use mysql_async::prelude::*;

/// A network namespace joined to the host by a veth pair:
/// host side 10.201.0.1, namespace side 10.201.0.2.
struct Netns {
    name: String,
    host_if: String,
}

impl Netns {
    fn create() -> Netns {
        let id = std::process::id();
        let n = Netns {
            name: format!("bmfault{id}"),
            host_if: format!("bmf{}h", id % 100_000),
        };
        let ns_if = format!("bmf{}n", id % 100_000);
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("ip").args(["netns", "del", &n.name]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &n.host_if])
            .output();
        run(&["netns", "add", &n.name]);
        run(&[
            "link", "add", &n.host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        run(&["link", "set", &ns_if, "netns", &n.name]);
        run(&["addr", "add", "10.201.0.1/30", "dev", &n.host_if]);
        run(&["link", "set", &n.host_if, "up"]);
        run(&["-n", &n.name, "addr", "add", "10.201.0.2/30", "dev", &ns_if]);
        run(&["-n", &n.name, "link", "set", &ns_if, "up"]);
        run(&["-n", &n.name, "link", "set", "lo", "up"]);
        n
    }

    fn link(&self, up: bool) {
        let out = Command::new("ip")
            .args(["link", "set", &self.host_if, if up { "up" } else { "down" }])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Reports by IP -> reporting node: accepted (exit 0) ones, and refused
/// ones (the node died mid-call: maybe stored, never promised).
type Accepted = Arc<Mutex<HashMap<String, String>>>;

/// Reports a new IP every few milliseconds through `report`'s own path
/// (socket, or spool when the node is down) until `stop`.
fn drive(
    node: &Node,
    index: u8,
    accepted: Accepted,
    refused: Accepted,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let (socket, dir, name) = (node.socket(), node.dir.clone(), node.name.clone());
    tokio::spawn(async move {
        let mut i: u32 = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let ip = format!("10.{index}.{}.{}", i / 250, i % 250);
            i += 1;
            let ban = Ban::new("sshd", "tcp", "22", &ip).unwrap();
            match report::report_or_spool(&socket, &dir, ban).await {
                Ok(_) => {
                    accepted.lock().unwrap().insert(ip, name.clone());
                }
                Err(_) => {
                    refused.lock().unwrap().insert(ip, name.clone());
                }
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    })
}

/// Whether every one of these IPs is stored.
async fn stored_all(db_url: &str, ips: &[String]) -> bool {
    let Ok(mut c) = mysql_async::Conn::from_url(db_url).await else {
        return false;
    };
    let Ok(stored) = c
        .query::<String, _>("SELECT ip FROM events WHERE kind = 1")
        .await
    else {
        return false;
    };
    let _ = c.disconnect().await;
    let stored: std::collections::HashSet<String> = stored.into_iter().collect();
    ips.iter().all(|ip| stored.contains(ip))
}

async fn converged(
    db_url: &str,
    accepted: &HashMap<String, String>,
    refused: &HashMap<String, String>,
    nodes: &[&Node],
) -> bool {
    let ips: Vec<String> = accepted.keys().cloned().collect();
    if !stored_all(db_url, &ips).await {
        return false;
    }
    let Ok(mut c) = mysql_async::Conn::from_url(db_url).await else {
        return false;
    };
    let rows: Vec<(String, String)> = c
        .query("SELECT ip, added_by FROM events WHERE kind = 1")
        .await
        .unwrap_or_default();
    let incomplete: Option<i64> = c
        .query_first(
            "SELECT COUNT(*) FROM ip_table WHERE host_n1 <> 1 OR host_n2 <> 1 OR host_n3 <> 1",
        )
        .await
        .unwrap_or(None);
    let _ = c.disconnect().await;
    let _ = refused;
    let lines: Vec<(usize, usize)> = nodes
        .iter()
        .map(|n| {
            (
                n.shared_lines().len(),
                rows.iter().filter(|(_, by)| *by != n.name).count(),
            )
        })
        .collect();
    // Shown only when the wait times out (test output is captured).
    println!(
        "converging: stored {}, incomplete statuses {incomplete:?}, lines/expected {lines:?}",
        rows.len()
    );
    incomplete == Some(0) && lines.iter().all(|(have, want)| have >= want)
}

/// The status a new subscription gets (None if it is served).
async fn subscribe_status(pki: &Pki, url: &str) -> Option<tonic::Code> {
    let mut client = hub_client(url, client_tls(&pki.host("late-joiner"))).await;
    match client
        .subscribe(banmesh::proto::SubscribeRequest { after_event_id: 0 })
        .await
    {
        Err(status) => Some(status.code()),
        Ok(stream) => match stream.into_inner().message().await {
            Err(status) => Some(status.code()),
            Ok(_) => None,
        },
    }
}

/// Lets the stream of reports run on for a while between faults.
async fn settle(accepted: &Accepted) {
    let target = accepted.lock().unwrap().len() + 150;
    wait_for(
        "reports to keep flowing",
        Duration::from_secs(30),
        || async { accepted.lock().unwrap().len() >= target },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_lost_or_duplicated_through_faults() {
    common::fail2ban::require_tools();
    let root = tempfile::tempdir().unwrap();
    let mut db = PrivateMariaDb::start(root.path()).await;
    let db_url = db.url("banmesh");
    let pki = Pki::new(root.path());
    let mut hub = Hub::start_listening(root.path(), &pki, &db_url, "0.0.0.0", 0).await;
    let port = hub.port;
    let net = Netns::create();

    let mut n1 = Node::start(root.path(), &pki, "n1", &hub.url).await;
    let n2 = Node::start(root.path(), &pki, "n2", &hub.url).await;
    let mut n3 = Node {
        name: "n3".into(),
        dir: root.path().join("n3"),
        proc: None,
        hub_url: format!("https://10.201.0.1:{port}"),
        tls: pki.host("n3"),
        extra: vec!["--no-fail2ban-socket".into()],
        netns: Some(net.name.clone()),
    };
    n3.restart().await;
    let accepted: Accepted = Arc::default();
    let refused: Accepted = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drivers: Vec<_> = [&n1, &n2, &n3]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            drive(
                n,
                i as u8 + 1,
                accepted.clone(),
                refused.clone(),
                stop.clone(),
            )
        })
        .collect();
    let started = Instant::now();
    // (fault, injected at, time from repair until everything accepted
    // before the repair was stored)
    let mut faults: Vec<(&str, Duration, Duration)> = Vec::new();
    let recovered = async |accepted: &Accepted| {
        let repaired = Instant::now();
        let want: Vec<String> = accepted.lock().unwrap().keys().cloned().collect();
        wait_for("the backlog stored", Duration::from_secs(60), || {
            stored_all(&db_url, &want)
        })
        .await;
        repaired.elapsed()
    };

    settle(&accepted).await;
    hub.proc.kill();
    let at = started.elapsed();
    settle(&accepted).await; // reports keep being accepted into outboxes
    let _hub = Hub::start_listening(root.path(), &pki, &db_url, "0.0.0.0", port).await;
    faults.push(("hub SIGKILL, restarted", at, recovered(&accepted).await));
    settle(&accepted).await;

    db.stop();
    let at = started.elapsed();
    settle(&accepted).await;
    // With its database down the hub refuses a new subscription, and says
    // why, instead of serving a stream it cannot fill.
    let late = subscribe_status(&pki, &format!("https://127.0.0.1:{port}")).await;
    assert_eq!(
        late,
        Some(tonic::Code::Unavailable),
        "a subscription while MariaDB is down"
    );
    db.restart().await;
    faults.push(("MariaDB stopped, restarted", at, recovered(&accepted).await));
    settle(&accepted).await;

    n1.kill();
    let at = started.elapsed();
    settle(&accepted).await; // its reports are spooled meanwhile
    n1.restart().await;
    faults.push(("node n1 SIGKILL, restarted", at, recovered(&accepted).await));
    settle(&accepted).await;

    net.link(false);
    let at = started.elapsed();
    settle(&accepted).await;
    settle(&accepted).await;
    net.link(true);
    let last_fault = Instant::now();
    faults.push((
        "node n3 cut off the network, restored",
        at,
        recovered(&accepted).await,
    ));
    settle(&accepted).await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for d in drivers {
        d.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    let total = accepted.len();

    // Converge: every accepted report stored, applied by every other node,
    // with its status back at the hub.
    let nodes = [&n1, &n2, &n3];
    wait_for(
        "every report stored and applied everywhere",
        Duration::from_secs(90),
        || converged(&db_url, &accepted, &refused, &nodes),
    )
    .await;
    let converge = last_fault.elapsed();

    // Exactly once, everywhere.
    let mut c = mysql_async::Conn::from_url(&db_url).await.unwrap();
    let rows: Vec<(String, String, i64)> = c
        .query("SELECT ip, added_by, COUNT(*) FROM events WHERE kind = 1 GROUP BY ip, added_by")
        .await
        .unwrap();
    let stored: HashMap<String, (String, i64)> =
        rows.into_iter().map(|(ip, by, n)| (ip, (by, n))).collect();
    let lost = accepted
        .keys()
        .filter(|ip| !stored.contains_key(*ip))
        .count();
    let mut duplicated = stored.values().filter(|(_, n)| *n > 1).count();
    for n in &nodes {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for line in n.shared_lines() {
            let ip = line.split(": ").nth(1).unwrap().to_string();
            *seen.entry(ip).or_default() += 1;
        }
        duplicated += seen.values().filter(|c| **c > 1).count();
        for (ip, (reporter, _)) in &stored {
            let want = usize::from(*reporter != n.name);
            assert_eq!(
                seen.get(ip).copied().unwrap_or(0),
                want,
                "{ip} from {reporter} in {}'s shared.log",
                n.name
            );
        }
    }
    for (ip, (by, _)) in &stored {
        let from = accepted.get(ip).or(refused.get(ip));
        assert_eq!(from, Some(by), "{ip} stored as reported by {by}");
    }
    let refused_stored = refused.keys().filter(|ip| stored.contains_key(*ip)).count();

    println!(
        "fault suite: {total} reports accepted in {:.1}s; {} refused while a node died mid-call ({refused_stored} of them stored anyway, none promised)",
        started.elapsed().as_secs_f64(),
        refused.len()
    );
    for (what, at, recovery) in &faults {
        println!(
            "  fault at {:>5.1}s: {what:<40} backlog stored {:>6.2}s after the repair",
            at.as_secs_f64(),
            recovery.as_secs_f64()
        );
    }
    let longest = faults.iter().map(|f| f.2).max().unwrap_or_default();
    println!("  longest recovery: {:.2}s", longest.as_secs_f64());
    println!("  faults injected: {}", faults.len());
    println!("  lost: {lost}, duplicated: {duplicated}");
    println!(
        "  converged {:.2}s after the last fault",
        converge.as_secs_f64()
    );
    assert_eq!(lost, 0);
    assert_eq!(duplicated, 0);
    drop(n3);
}
