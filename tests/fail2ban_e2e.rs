//! Two test hosts with real fail2ban (each in its own network namespace),
//! configured by `banmesh node setup-fail2ban`, and a hub on MariaDB.
mod common;

use std::time::Duration;

use common::{fail2ban::F2bHost, *};
use mysql_async::prelude::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// `(host, status)` of the ban of an IP, by host name, from the seed-shaped view.
async fn statuses(db: &TestDb, ip: &str) -> Vec<(String, i64)> {
    let mut c = db.conn().await;
    let row: Option<(i64, i64)> = c
        .exec_first(
            "SELECT host_host1, host_host2 FROM ip_table WHERE ip = ?",
            (ip,),
        )
        .await
        .unwrap();
    row.map(|(a, b)| vec![("host-1".to_string(), a), ("host-2".to_string(), b)])
        .unwrap_or_default()
}

async fn reports_of(db: &TestDb, ip: &str) -> i64 {
    let mut c = db.conn().await;
    let n: Option<i64> = c
        .exec_first(
            "SELECT COUNT(*) FROM events WHERE ip = ? AND kind = 1",
            (ip,),
        )
        .await
        .unwrap();
    n.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn bans_unbans_and_restarts_with_real_fail2ban() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let h1 = F2bHost::start(root.path(), &pki, "host-1", &hub.url).await;
    let mut h2 = F2bHost::start(root.path(), &pki, "host-2", &hub.url).await;

    // Failed logins on host 1 -> host 1's fail2ban bans -> its action runs
    // `banmesh report` -> host 2's shared jail bans it.
    let ip = "203.0.113.10";
    h1.failed_logins(ip, 3);
    wait_for("host 1 to ban", DEADLINE, || async {
        h1.in_ipset("f2b-login", ip)
    })
    .await;
    wait_for("the IP in host 2's ipset", DEADLINE, || async {
        h2.in_ipset("f2b-shared", ip)
    })
    .await;
    wait_for("statuses 1 on both hosts", DEADLINE, || async {
        statuses(&db, ip).await == [("host-1".to_string(), 1), ("host-2".to_string(), 1)]
    })
    .await;
    assert_eq!(h2.node.lines_for(ip), 1);
    assert_eq!(
        h1.node.lines_for(ip),
        0,
        "the reporter does not get its own ban back"
    );

    // Already banned on host 2 with its time ahead: status 2, no line.
    let fresh = "203.0.113.11";
    let banned = h2.fail2ban().ban("shared", &[fresh]).await.unwrap();
    assert_eq!(banned, 1);
    let (ok, err) = h1.node.report("login", "tcp", "22", fresh);
    assert!(ok, "{err}");
    wait_for("status 2 on host 2", DEADLINE, || async {
        statuses(&db, fresh)
            .await
            .contains(&("host-2".to_string(), 2))
    })
    .await;
    assert_eq!(
        h2.node.lines_for(fresh),
        0,
        "no second line for a ban fail2ban already holds"
    );

    // An admin unban lifts it on every host, in every jail.
    let (ok, _, err) = hub_cli(&["unban", ip], &hub, &pki.admin("ops"));
    assert!(ok, "{err}");
    wait_for("the IP out of host 2's ipset", DEADLINE, || async {
        !h2.in_ipset("f2b-shared", ip)
    })
    .await;
    wait_for("the IP out of host 1's ipset", DEADLINE, || async {
        !h1.in_ipset("f2b-login", ip)
    })
    .await;

    // Restarting host 2's fail2ban restores its own bans without reporting
    // them again.
    let own = "203.0.113.12";
    h2.failed_logins(own, 3);
    wait_for("host 2's own ban stored", DEADLINE, || async {
        reports_of(&db, own).await == 1
    })
    .await;
    h2.stop_fail2ban().await;
    h2.start_fail2ban().await;
    wait_for(
        "the restored ban back in host 2's ipset",
        DEADLINE,
        || async { h2.in_ipset("f2b-login", own) },
    )
    .await;
    // fail2ban runs one jail's actions in order: once a later ban is
    // reported, the restored one's action has run too.
    let later = "203.0.113.13";
    h2.failed_logins(later, 3);
    wait_for("a later ban stored", DEADLINE, || async {
        reports_of(&db, later).await == 1
    })
    .await;
    assert!(h2.fail2ban_log().contains(&format!("Restore Ban {own}")));
    assert_eq!(
        reports_of(&db, own).await,
        1,
        "a restored ban is not reported again"
    );
}
