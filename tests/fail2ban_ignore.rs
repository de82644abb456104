//! fail2ban's ignore list on every path (issue 14, item 1): an address the
//! receiving host's `shared` jail ignores is never banned there, through
//! the fast path (fail2ban's `banip` ignores the list) or the log path, and
//! the hub shows its status as 4; an address added at runtime is honoured
//! within seconds. Real fail2ban hosts in network namespaces, hub on MariaDB.
mod common;

use std::time::{Duration, Instant};

use common::{
    fail2ban::{F2bHost, view_latest, view_status},
    *,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// Host 2 ignores these from its start (its jail configuration).
const AT_START: &str = "ignoreip = 203.0.113.220 203.0.113.222 198.51.100.0/24 2001:db8:99::/48";

/// Reports `ip` on host 1, waits until host 2 has decided it, and checks
/// that it decided `status`.
async fn report_and_wait(db: &TestDb, h1: &F2bHost, h2: &F2bHost, ip: &str, status: i64) {
    // The newest ban of `ip` before this report: an earlier ban of the same
    // address (already decided) must not pass for this one.
    let before = view_latest(db, ip, &h2.name).await.map_or(0, |(id, _)| id);
    let (ok, err) = h1.node.report("sshd", "tcp", "22", ip);
    assert!(ok, "{err}");
    wait_for(&format!("{} to decide {ip}", h2.name), DEADLINE, || async {
        view_latest(db, ip, &h2.name)
            .await
            .is_some_and(|(id, s)| id > before && s != 0)
    })
    .await;
    let set = if ip.contains(':') {
        "f2b-shared6"
    } else {
        "f2b-shared"
    };
    assert_eq!(
        view_status(db, ip, &h2.name).await,
        Some(status),
        "{ip}: status at the hub for {} (in its {set}: {})",
        h2.name,
        h2.in_ipset(set, ip)
    );
}

/// The ignored address was decided (refused) and never reached fail2ban.
fn assert_never_banned(h2: &F2bHost, ip: &str) {
    let set = if ip.contains(':') {
        "f2b-shared6"
    } else {
        "f2b-shared"
    };
    assert!(
        !h2.in_ipset(set, ip),
        "{ip} is in {}'s {set}, though its ignore list covers it",
        h2.name
    );
    assert_eq!(h2.node.lines_for(ip), 0, "no shared.log line for {ip}");
    assert!(
        !h2.fail2ban_log().contains(&format!("Ban {ip}\n")),
        "fail2ban never banned {ip}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shared_jail_s_ignore_list_holds_on_every_path() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let h1 = F2bHost::start(root.path(), &pki, "ig-1", &hub.url).await;
    let mut h2 = F2bHost::start_with(root.path(), &pki, "ig-2", &hub.url, AT_START).await;

    // Fast path (the default). A control ban first: it reaches host 2's
    // set, so the path works and host 2 is subscribed.
    report_and_wait(&db, &h1, &h2, "203.0.113.240", 1).await;
    assert!(h2.in_ipset("f2b-shared", "203.0.113.240"));
    for ip in ["203.0.113.220", "198.51.100.7", "2001:db8:99::1"] {
        report_and_wait(&db, &h1, &h2, ip, 4).await;
    }
    // A later ban applied after them: the refused ones had their chance.
    report_and_wait(&db, &h1, &h2, "203.0.113.241", 1).await;
    wait_for("the control ban in host 2's set", DEADLINE, || async {
        h2.in_ipset("f2b-shared", "203.0.113.241")
    })
    .await;
    for ip in ["203.0.113.220", "198.51.100.7", "2001:db8:99::1"] {
        assert_never_banned(&h2, ip);
        assert_eq!(
            view_status(&db, ip, &h1.name).await,
            Some(1),
            "the reporter keeps its own ban"
        );
    }
    assert!(
        h2.node_log()
            .contains("ban refused: the shared jail's ignore list covers it")
    );

    // Status 4 in the admin listing too.
    let admin = pki.admin("ops");
    let out = banmesh()
        .args(["bans", "--ip", "198.51.100.7", "--hub", &hub.url])
        .args(tls_args(&admin))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let col = header.iter().position(|h| *h == "host_ig2");
    let row: Vec<&str> = lines
        .find(|l| l.contains("198.51.100.7"))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    // `created` is two words (date and time) in the rows, one in the header.
    assert_eq!(
        col.and_then(|c| row.get(c + 1)),
        Some(&"4"),
        "host_ig2 is 4 in `bans`: {text}"
    );

    // Log path only (`--no-fail2ban-socket-ban`): no line, so fail2ban's
    // filter never even sees it, and the status says why.
    h2.node.stop();
    h2.node.extra.push("--no-fail2ban-socket-ban".into());
    h2.node.restart().await;
    report_and_wait(&db, &h1, &h2, "203.0.113.222", 4).await;
    report_and_wait(&db, &h1, &h2, "198.51.100.8", 4).await;
    report_and_wait(&db, &h1, &h2, "203.0.113.242", 1).await;
    wait_for(
        "the control ban in host 2's set through the log",
        DEADLINE,
        || async { h2.in_ipset("f2b-shared", "203.0.113.242") },
    )
    .await;
    assert_eq!(h2.node.lines_for("203.0.113.242"), 1);
    for ip in ["203.0.113.222", "198.51.100.8"] {
        assert_never_banned(&h2, ip);
    }

    // Back to the fast path; an address added to the ignore list at
    // runtime, as an operator would (`fail2ban-client set shared
    // addignoreip`), is honoured within seconds.
    h2.node.stop();
    h2.node.extra.pop();
    h2.node.restart().await;
    let late = "203.0.113.230";
    let mut f2b = h2.fail2ban();
    f2b.request(&["set", "shared", "addignoreip", late])
        .await
        .unwrap();
    let added = Instant::now();
    wait_for(
        "host 2's node to read the new ignore list",
        Duration::from_secs(10),
        || async {
            h2.node_log()
                .lines()
                .any(|l| l.contains("never banned here") && l.contains(late))
        },
    )
    .await;
    println!(
        "addignoreip honoured by the node after {:?}",
        added.elapsed()
    );
    report_and_wait(&db, &h1, &h2, late, 4).await;
    report_and_wait(&db, &h1, &h2, "203.0.113.243", 1).await;
    wait_for("the control ban in host 2's set", DEADLINE, || async {
        h2.in_ipset("f2b-shared", "203.0.113.243")
    })
    .await;
    assert_never_banned(&h2, late);

    // And taken off again, it is banned like any other.
    f2b.request(&["set", "shared", "delignoreip", late])
        .await
        .unwrap();
    wait_for(
        "host 2's node to read the shorter list",
        Duration::from_secs(10),
        || async {
            h2.node_log()
                .lines()
                .rev()
                .find(|l| l.contains("never banned here"))
                .is_some_and(|l| !l.contains(late))
        },
    )
    .await;
    // Its first fleet ban (refused here) is still active, and a report of
    // an address with an active fleet ban is recorded against it, not sent
    // out again: lift it first, so the next report is a new fleet ban.
    let (ok, out, err) = hub_cli(&["unban", late], &hub, &pki.admin("ops"));
    assert!(ok, "{out}{err}");
    report_and_wait(&db, &h1, &h2, late, 1).await;
    wait_for(
        "the address banned once no longer ignored",
        DEADLINE,
        || async { h2.in_ipset("f2b-shared", late) },
    )
    .await;

    // What a refresh costs, on this fail2ban: its three reads, each timed.
    let n = 50;
    let mut total = Duration::ZERO;
    for what in ["ignoreip", "ignoreself", "ignorecommand"] {
        let t = Instant::now();
        for _ in 0..n {
            f2b.request(&["get", "shared", what]).await.unwrap();
        }
        let each = t.elapsed() / n;
        total += each;
        println!("get shared {what}: {each:?} (mean of {n})");
    }
    let t = Instant::now();
    for _ in 0..n {
        for what in ["ignoreip", "ignoreself", "ignorecommand"] {
            f2b.request(&["get", "shared", what]).await.unwrap();
        }
    }
    println!(
        "ignore list refresh over the control socket: {total:?} (sum of the means), {:?} (the three in turn, mean of {n})",
        t.elapsed() / n
    );
    f2b.close().await;
}
