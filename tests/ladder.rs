//! The escalation ladder and one fleet ban per address, against a real hub
//! on MariaDB: hosts' reports over gRPC (the hub's own Publish RPC, as a
//! node sends them) and real nodes writing `shared.log`.
mod common;

use std::time::Duration;

use banmesh::proto::{self, hub_client::HubClient};
use common::*;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(30);

/// A hub whose ladder is seconds long, so a test can watch bans end.
async fn short_ladder_hub(root: &std::path::Path, pki: &Pki, db: &str) -> Hub {
    Hub::start_with(root, pki, db, "127.0.0.1", 0, |cmd| {
        cmd.args(["--ladder", "2s,4s,8s", "--ladder-window", "1m"]);
    })
    .await
}

fn report(seq: u64, ip: &str) -> proto::Report {
    proto::Report {
        seq,
        ban: Some(proto::Ban {
            jail: "sshd".into(),
            protocol: "tcp".into(),
            port: "22".into(),
            ip: ip.into(),
        }),
        ..Default::default()
    }
}

/// Publishes one report as `c`'s host and returns the hub's ack.
async fn publish(c: &mut HubClient<Channel>, seq: u64, ip: &str) -> proto::Ack {
    let mut acks = c
        .publish(tokio_stream::iter(vec![report(seq, ip)]))
        .await
        .unwrap()
        .into_inner();
    let ack = acks.message().await.unwrap().expect("an ack");
    assert!(ack.rejected.is_empty(), "{ack:?}");
    ack
}

async fn get_ban(c: &mut HubClient<Channel>, id: u64) -> proto::BanRecord {
    c.get_ban(proto::GetBanRequest { event_id: id })
        .await
        .unwrap()
        .into_inner()
}

fn event(b: &proto::BanRecord) -> proto::Event {
    b.event.clone().expect("an event")
}

/// Publishes a report that must make a new ban, and reads the ban back.
async fn new_ban(
    c: &mut HubClient<Channel>,
    admin: &mut HubClient<Channel>,
    seq: u64,
    ip: &str,
) -> proto::Event {
    let ack = publish(c, seq, ip).await;
    assert!(!ack.coalesced && !ack.duplicate, "a new ban: {ack:?}");
    event(&get_ban(admin, ack.event_id).await)
}

/// Waits until `ms` (Unix) has passed: a ban's fleet end.
async fn wait_until(what: &str, ms: i64) {
    wait_for(
        what,
        DEADLINE,
        || async move { banmesh::clock::now_ms() > ms },
    )
    .await;
}

/// The same address reported again after each ban ended or was lifted
/// climbs 1, 2, 3 and holds at the top; each ban ends its rung's duration
/// after it was created. A plain unban keeps the history; `unban --forget`
/// starts it again on the first rung.
#[tokio::test(flavor = "multi_thread")]
async fn repeat_offences_climb_the_ladder_and_forget_resets_it() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = short_ladder_hub(root.path(), &pki, &db.url).await;
    let ops = pki.admin("ops");
    let mut web1 = hub_client(&hub.url, client_tls(&pki.host("web-1"))).await;
    let mut admin = hub_client(&hub.url, client_tls(&ops)).await;
    let ip = "198.51.100.23";

    // First offence: rung 1, 2 s. Ended, reported again: rung 2, 4 s.
    let first = new_ban(&mut web1, &mut admin, 1, ip).await;
    assert_eq!((first.rung, first.ends_ms), (1, first.created_ms + 2_000));
    wait_until("the first ban to end", first.ends_ms).await;
    let second = new_ban(&mut web1, &mut admin, 2, ip).await;
    assert_eq!(
        (second.rung, second.ends_ms),
        (2, second.created_ms + 4_000)
    );

    // Lifted by a plain unban: the history stays, the next is rung 3.
    let (ok, out, err) = hub_cli(&["unban", ip], &hub, &ops);
    assert!(ok && out.contains("unbanned"), "{out}{err}");
    let third = new_ban(&mut web1, &mut admin, 3, ip).await;
    assert_eq!((third.rung, third.ends_ms), (3, third.created_ms + 8_000));
    // The top rung holds.
    hub_cli(&["unban", ip], &hub, &ops);
    let fourth = new_ban(&mut web1, &mut admin, 4, ip).await;
    assert_eq!(
        (fourth.rung, fourth.ends_ms),
        (3, fourth.created_ms + 8_000)
    );

    // --forget: lifted and forgotten, the next ban is a first offence.
    let (ok, out, err) = hub_cli(&["unban", ip, "--forget"], &hub, &ops);
    assert!(ok && out.contains("forgot the history"), "{out}{err}");
    let fifth = new_ban(&mut web1, &mut admin, 5, ip).await;
    assert_eq!((fifth.rung, fifth.ends_ms), (1, fifth.created_ms + 2_000));

    // The history, as `bans --ip` shows it: every ban, with its rung and state.
    let (ok, out, err) = hub_cli(&["bans", "--ip", ip], &hub, &ops);
    assert!(ok, "{err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    // id, added_by, created (2 words), jail, protocol, port, ip, rung, ends, state.
    let summary: Vec<(&str, &str)> = rows.iter().map(|r| (r[8], r[10])).collect();
    assert_eq!(
        summary,
        [
            ("1", "lifted,forgotten"),
            ("2", "lifted,forgotten"),
            ("3", "lifted,forgotten"),
            ("3", "lifted,forgotten"),
            ("1", "active"),
        ],
        "{out}"
    );

    // The reporter receives its own bans too: they carry the fleet's end.
    let mut stream = web1
        .subscribe(proto::SubscribeRequest { after_event_id: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut bans = Vec::new();
    loop {
        let e = stream.message().await.unwrap().expect("an event");
        if e.kind == proto::EventKind::Ban as i32 {
            bans.push((e.id, e.ends_ms));
        }
        if e.id >= fifth.id {
            break;
        }
    }
    assert_eq!(
        bans,
        [(fifth.id, fifth.ends_ms)],
        "only the active ban is replayed"
    );

    // The policy in force, for operators.
    let (ok, out, err) = hub_cli(&["hub", "policy"], &hub, &ops);
    assert!(ok, "{err}");
    assert!(out.contains("ladder         2s, 4s, 8s"), "{out}");
    assert!(out.contains("ladder window  1m"), "{out}");
}

/// A report of an address with an active fleet ban is recorded against it
/// (acked with its id, `coalesced`); its re-send is a duplicate with the
/// same id; nothing new is fanned out.
#[tokio::test(flavor = "multi_thread")]
async fn a_coalesced_report_and_its_resend() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let mut web1 = hub_client(&hub.url, client_tls(&pki.host("web-1"))).await;
    let mut web2 = hub_client(&hub.url, client_tls(&pki.host("web-2"))).await;
    let ip = "203.0.113.41";

    let ban = publish(&mut web1, 1, ip).await;
    let coalesced = publish(&mut web2, 1, ip).await;
    assert!(coalesced.coalesced && !coalesced.duplicate, "{coalesced:?}");
    assert_eq!(coalesced.event_id, ban.event_id);
    let again = publish(&mut web2, 1, ip).await;
    assert!(again.duplicate, "a re-send: {again:?}");
    assert_eq!(again.event_id, ban.event_id);
    // A second report from web-2 counts as a second report.
    publish(&mut web2, 2, ip).await;

    let record = get_ban(&mut web1, ban.event_id).await;
    let who: Vec<(String, u32)> = record
        .reporters
        .iter()
        .map(|r| (r.host.clone(), r.count))
        .collect();
    assert_eq!(who, [("web-1".into(), 1), ("web-2".into(), 2)]);
    let mut conn = db.conn().await;
    use mysql_async::prelude::*;
    let bans: Option<i64> = conn
        .query_first(format!(
            "SELECT COUNT(*) FROM events WHERE kind = 1 AND ip = '{ip}'"
        ))
        .await
        .unwrap();
    assert_eq!(bans, Some(1), "one fleet ban");
    // The seed's view still shows one row, in its columns.
    let rows: Vec<(String, String)> = conn
        .query(format!(
            "SELECT added_by, ip FROM ip_table WHERE ip = '{ip}'"
        ))
        .await
        .unwrap();
    assert_eq!(rows, [("web-1".to_string(), ip.to_string())]);
}

/// Five hosts report one scanner at once: one fleet ban, one event to
/// every host (one `shared.log` line on a host that did not report it),
/// five reporters on the ban.
#[tokio::test(flavor = "multi_thread")]
async fn five_hosts_reporting_one_address_make_one_fleet_ban() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let mut nodes = Vec::new();
    for i in 1..=5 {
        nodes.push(Node::start(root.path(), &pki, &format!("web-{i}"), &hub.url).await);
    }
    let watcher = Node::start(root.path(), &pki, "watcher", &hub.url).await;
    let ip = "192.0.2.200";

    // All five at once (each `banmesh report` is its own process).
    std::thread::scope(|s| {
        for n in &nodes {
            s.spawn(move || {
                let (ok, err) = n.report("sshd", "tcp", "22", ip);
                assert!(ok, "{err}");
            });
        }
    });
    let ops = pki.admin("ops");
    let mut admin = hub_client(&hub.url, client_tls(&ops)).await;
    let listed = |admin: &HubClient<Channel>| {
        let mut admin = admin.clone();
        async move {
            admin
                .list_bans(proto::ListBansRequest {
                    ip: ip.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .bans
        }
    };
    wait_for("five reporters on the ban", DEADLINE, || async {
        listed(&admin)
            .await
            .first()
            .is_some_and(|b| b.reporters.len() == 5)
    })
    .await;
    let bans = listed(&admin).await;
    assert_eq!(bans.len(), 1, "one fleet ban: {bans:?}");
    let record = get_ban(&mut admin, event(&bans[0]).id).await;
    let mut who: Vec<String> = record.reporters.iter().map(|r| r.host.clone()).collect();
    who.sort();
    assert_eq!(who, ["web-1", "web-2", "web-3", "web-4", "web-5"]);

    // Events arrive in id order: once a later ban is on the watcher, every
    // event for the scanner has been delivered.
    let (ok, err) = nodes[0].report("sshd", "tcp", "22", "192.0.2.201");
    assert!(ok, "{err}");
    wait_for("the marker ban on the watcher", DEADLINE, || async {
        watcher.lines_for("192.0.2.201") == 1
    })
    .await;
    assert_eq!(watcher.lines_for(ip), 1, "{:?}", watcher.shared_lines());
    for n in &nodes {
        assert!(n.lines_for(ip) <= 1, "{}: {:?}", n.name, n.shared_lines());
    }
}
