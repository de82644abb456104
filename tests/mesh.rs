//! A hub on MariaDB and three node processes over real mTLS: a ban on one
//! host reaches the others, once, with statuses in the store.
mod common;

use std::time::Duration;

use common::*;
use mysql_async::prelude::*;

const DEADLINE: Duration = Duration::from_secs(20);

/// Each host's status for the ban of `ip`, as the store reports it.
async fn status_of(db: &TestDb, ip: &str) -> Vec<(String, String, i64)> {
    let store = banmesh::hub::store::open(&db.url).await.unwrap();
    let filter = banmesh::hub::store::BanFilter {
        ip: Some(ip.into()),
        limit: 10,
        ..Default::default()
    };
    store
        .list_bans(&filter)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|b| {
            let by = b.event.added_by.clone();
            b.statuses
                .into_iter()
                .map(move |(h, s)| (by.clone(), h, s as i64))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ban_on_one_host_reaches_the_others_once() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    let b = Node::start(root.path(), &pki, "node-b", &hub.url).await;
    let c = Node::start(root.path(), &pki, "node.c", &hub.url).await;

    let (ok, err) = a.report("sshd", "tcp", "22", "198.51.100.7");
    assert!(ok, "report failed: {err}");

    for n in [&b, &c] {
        wait_for(
            &format!("the ban in {}'s shared.log", n.name),
            DEADLINE,
            || async { n.lines_for("198.51.100.7") == 1 },
        )
        .await;
    }
    wait_for("statuses 1/1/1", DEADLINE, || async {
        status_of(&db, "198.51.100.7")
            .await
            .iter()
            .all(|(_, _, s)| *s == 1)
    })
    .await;

    // Not written back on the reporter; the line names the reporter.
    assert_eq!(a.lines_for("198.51.100.7"), 0);
    assert!(b.shared_lines()[0].contains(": 198.51.100.7: reported by node-a (jail sshd, tcp/22)"));

    let mut conn = db.conn().await;
    let stored: Vec<(String, String, String, String, String)> = conn
        .query("SELECT added_by, jailname, protocol, port, ip FROM events WHERE kind = 1")
        .await
        .unwrap();
    assert_eq!(
        stored,
        vec![(
            "node-a".into(),
            "sshd".into(),
            "tcp".into(),
            "22".into(),
            "198.51.100.7".into()
        )]
    );
    let statuses = status_of(&db, "198.51.100.7").await;
    let expect: Vec<(String, String, i64)> = ["node-a", "node-b", "node.c"]
        .iter()
        .map(|h| ("node-a".to_string(), h.to_string(), 1))
        .collect();
    assert_eq!(statuses, expect);

    // The seed-shaped view, one host column per host, dots and hyphens removed.
    type SeedRow = (String, String, String, i64, i64, i64);
    let row: Option<SeedRow> = conn
        .query_first(
            "SELECT added_by, jailname, ip, host_nodea, host_nodeb, host_nodec FROM ip_table",
        )
        .await
        .unwrap();
    assert_eq!(
        row.expect("ip_table has the ban"),
        (
            "node-a".into(),
            "sshd".into(),
            "198.51.100.7".into(),
            1,
            1,
            1
        )
    );
    let created: Option<String> = conn
        .query_first("SELECT CAST(created AS CHAR) FROM ip_table")
        .await
        .unwrap();
    assert!(created.unwrap().starts_with("20"), "created is a datetime");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_node_applies_what_it_missed_exactly_once() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    let mut b = Node::start(root.path(), &pki, "node-b", &hub.url).await;

    assert!(a.report("sshd", "tcp", "22", "203.0.113.1").0);
    wait_for("first ban on B", DEADLINE, || async {
        b.lines_for("203.0.113.1") == 1
    })
    .await;

    b.stop();
    assert!(a.report("sshd", "tcp", "22", "203.0.113.2").0);
    assert!(a.report("postfix", "tcp", "smtp,465", "2001:db8::2").0);
    // Both are committed before B comes back.
    wait_for("two more bans stored", DEADLINE, || async {
        let mut c = db.conn().await;
        let n: Option<i64> = c.query_first("SELECT COUNT(*) FROM events").await.unwrap();
        n == Some(3)
    })
    .await;

    b.restart().await;
    wait_for("B to catch up", DEADLINE, || async {
        b.shared_lines().len() == 3
    })
    .await;
    // A later live ban proves B is past replay, and nothing came twice.
    assert!(a.report("sshd", "tcp", "22", "203.0.113.3").0);
    wait_for("live ban after resume", DEADLINE, || async {
        b.lines_for("203.0.113.3") == 1
    })
    .await;
    for ip in ["203.0.113.1", "203.0.113.2", "2001:db8::2", "203.0.113.3"] {
        assert_eq!(b.lines_for(ip), 1, "{ip} in B's shared.log once");
    }
    assert_eq!(b.shared_lines().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_reports_exit_non_zero_and_store_nothing() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let a = Node::start(root.path(), &pki, "node-a", &hub.url).await;

    for (jail, port, ip, says) in [
        (
            "sshd",
            "22",
            "203.0.113.300",
            "is not an IPv4 or IPv6 address",
        ),
        ("sshd", "22", "not-an-ip", "is not an IPv4 or IPv6 address"),
        ("", "22", "203.0.113.9", "jail \"\""),
        ("sshd", "70000", "203.0.113.9", "is not a port"),
        ("sshd", "2000:1000", "203.0.113.9", "is not a port"),
        ("sshd", "22;reboot", "203.0.113.9", "is not a port"),
    ] {
        let (ok, err) = a.report(jail, "tcp", port, ip);
        assert!(!ok, "{jail} {port} {ip} was accepted");
        assert!(err.contains(says), "message {err:?} should say {says:?}");
        assert_eq!(err.trim().lines().count(), 1, "one-line reason: {err:?}");
    }
    // A good report after the bad ones is the only thing stored.
    assert!(a.report("sshd", "tcp", "22", "203.0.113.9").0);
    wait_for("the good report stored", DEADLINE, || async {
        let mut c = db.conn().await;
        let n: Option<i64> = c
            .query_first("SELECT COUNT(*) FROM events")
            .await
            .unwrap_or(None);
        n == Some(1)
    })
    .await;
    let mut c = db.conn().await;
    let ips: Vec<String> = c.query("SELECT ip FROM events").await.unwrap();
    assert_eq!(ips, ["203.0.113.9"]);
}

/// A subscriber that stops reading while more events than the hub's ring
/// holds go by is moved back to replay from the store: when it reads
/// again it gets every event, in order, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_subscriber_gets_everything_in_order_once() {
    use banmesh::proto;

    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    // 50,000 reports from one host: far past the default report limit,
    // which is `containment`'s subject, not this test's.
    let hub = Hub::start_with(root.path(), &pki, &db, "127.0.0.1", 0, |c| {
        c.args(["--report-rate", "off"]);
    })
    .await;
    let client = |name: &str| hub_client(&hub.url, client_tls(&pki.host(name)));
    let mut slow = client("slow").await;
    let mut stream = slow
        .subscribe(proto::SubscribeRequest { after_event_id: 0 })
        .await
        .unwrap()
        .into_inner();

    // Far more events than the live ring (8,192) and the transport's
    // buffers hold, while `slow` reads nothing.
    let total = 50_000u32;
    let reports: Vec<proto::Report> = (0..total)
        .map(|i| proto::Report {
            seq: u64::from(i) + 1,
            ban: Some(proto::Ban {
                jail: "sshd".into(),
                protocol: "tcp".into(),
                port: "22".into(),
                ip: std::net::Ipv4Addr::from(0x0A40_0000 + i).to_string(),
            }),
            ..Default::default()
        })
        .collect();
    let mut publisher = client("busy").await;
    let mut acks = publisher
        .publish(tokio_stream::iter(reports))
        .await
        .unwrap()
        .into_inner();
    let mut acked = 0u32;
    while acked < total {
        let ack = acks
            .message()
            .await
            .unwrap()
            .expect("acks until all are stored");
        acked += ack.count.max(1);
    }

    let mut last = 0u64;
    for _ in 0..total {
        let e = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("events keep coming")
            .unwrap()
            .expect("an event");
        assert!(e.id > last, "in order, no duplicate: {} after {last}", e.id);
        last = e.id;
    }
    let store = banmesh::hub::store::open(&db).await.unwrap();
    assert_eq!(
        last,
        store.last_event_id().await.unwrap(),
        "nothing skipped"
    );
    assert!(
        hub.proc.log_text().contains("fell behind"),
        "the subscriber went back to replay"
    );
}
