//! IPv6 end to end (issue 14, item 4): a ban of an IPv6 address on host 1
//! ends in host 2's kernel set for IPv6 (`f2b-shared6`, which fail2ban
//! 1.0.2's `iptables-ipset` action keeps apart from the IPv4 set and binds
//! to ip6tables) through the fast path and through the log path, with
//! statuses, and `banmesh unban` lifts it. Real fail2ban hosts in network
//! namespaces, hub on MariaDB.
mod common;

use std::{process::Command, time::Duration};

use common::{
    fail2ban::{F2bHost, view_status},
    *,
};
use mysql_async::prelude::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// `host`'s status for the latest unban of `ip`.
async fn unban_status(db: &TestDb, ip: &str, host: &str) -> Option<i64> {
    let mut c = db.conn().await;
    c.exec_first(
        "SELECT s.status FROM statuses s JOIN events e ON e.id = s.event_id \
         JOIN hosts h ON h.id = s.host_id \
         WHERE e.ip = ? AND e.kind = 2 AND h.name = ? ORDER BY e.id DESC LIMIT 1",
        (ip, host),
    )
    .await
    .unwrap()
}

fn unban(hub: &Hub, pki: &Pki, ip: &str) {
    let (ok, _, err) = hub_cli(&["unban", ip], hub, &pki.admin("ops"));
    assert!(ok, "{err}");
}

/// The ip6tables rule that makes the IPv6 set drop traffic, in `ns`.
fn ip6tables_rules(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ip6tables", "-S", "INPUT"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ipv6_ban_crosses_both_paths_and_its_unban_lifts_it() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let h1 = F2bHost::start(root.path(), &pki, "v6-1", &hub.url).await;
    let mut h2 = F2bHost::start(root.path(), &pki, "v6-2", &hub.url).await;

    // Fast path: failed logins from an IPv6 address on host 1; its fail2ban
    // bans it in its own IPv6 set and reports it; host 2 bans it in its
    // shared jail's IPv6 set.
    let ip = "2001:db8:77::5";
    h1.failed_logins(ip, 3);
    wait_for("host 1 to ban it in f2b-login6", DEADLINE, || async {
        h1.in_ipset("f2b-login6", ip)
    })
    .await;
    wait_for("the IP in host 2's f2b-shared6", DEADLINE, || async {
        h2.in_ipset("f2b-shared6", ip)
    })
    .await;
    assert!(!h2.in_ipset("f2b-shared", ip), "not in the IPv4 set");
    wait_for("status 1 from host 2", DEADLINE, || async {
        view_status(&db, ip, "v6-2").await == Some(1)
    })
    .await;
    assert_eq!(view_status(&db, ip, "v6-1").await, Some(1));
    assert_eq!(h2.node.lines_for(ip), 1, "its shared.log line too");
    let rules = ip6tables_rules(&h2.ns);
    assert!(
        rules.contains("--match-set f2b-shared6 src -j REJECT"),
        "ip6tables drops what the set holds: {rules}"
    );

    unban(&hub, &pki, ip);
    wait_for("the IP out of host 2's f2b-shared6", DEADLINE, || async {
        !h2.in_ipset("f2b-shared6", ip)
    })
    .await;
    wait_for("the IP out of host 1's f2b-login6", DEADLINE, || async {
        !h1.in_ipset("f2b-login6", ip)
    })
    .await;
    wait_for("unban status 1 from host 2", DEADLINE, || async {
        unban_status(&db, ip, "v6-2").await == Some(1)
    })
    .await;

    // Log path only: the line alone gets it into host 2's IPv6 set. The
    // report spells it in capitals with a zero group; every host sees the
    // one canonical spelling.
    h2.node.stop();
    h2.node.extra.push("--no-fail2ban-socket-ban".into());
    h2.node.restart().await;
    let spelled = "2001:DB8:77:0::6";
    let ip = "2001:db8:77::6";
    let (ok, err) = h1.node.report("sshd", "tcp", "22", spelled);
    assert!(ok, "{err}");
    wait_for("status 1 from host 2", DEADLINE, || async {
        view_status(&db, ip, "v6-2").await == Some(1)
    })
    .await;
    wait_for(
        "the IP in host 2's f2b-shared6 through the log",
        DEADLINE,
        || async { h2.in_ipset("f2b-shared6", ip) },
    )
    .await;
    assert_eq!(h2.node.lines_for(ip), 1);
    assert!(
        h2.fail2ban_log().contains(&format!("[shared] Found {ip} ")),
        "fail2ban's filter read the line"
    );

    unban(&hub, &pki, ip);
    wait_for("the IP out of host 2's f2b-shared6", DEADLINE, || async {
        !h2.in_ipset("f2b-shared6", ip)
    })
    .await;
    wait_for("unban status 1 from host 2", DEADLINE, || async {
        unban_status(&db, ip, "v6-2").await == Some(1)
    })
    .await;
}
