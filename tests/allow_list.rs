//! The fleet allow-list, end to end: a hub on MariaDB, real node
//! processes, real fail2ban hosts in network namespaces where a kernel
//! set is the proof, the admin CLI and grpcurl.
mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use banmesh::tls::TlsFiles;
use common::{fail2ban::F2bHost, *};
use mysql_async::prelude::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// grpcurl over mTLS with `tls`: `method` on the hub, with `data` as JSON.
fn grpcurl(tls: &TlsFiles, hub: &Hub, method: &str, data: &str) -> String {
    let out = Command::new("grpcurl")
        .arg("-cacert")
        .arg(&tls.ca)
        .arg("-cert")
        .arg(&tls.cert)
        .arg("-key")
        .arg(&tls.key)
        .args(["-d", data])
        .arg(format!("127.0.0.1:{}", hub.port))
        .arg(method)
        .output()
        .expect("grpcurl is not installed: run scripts/test-deps");
    assert!(
        out.status.success(),
        "grpcurl {method}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(host, status)` rows stored for the events of `ip` of `kind`.
async fn statuses(db: &TestDb, ip: &str, kind: i64) -> Vec<(String, i64)> {
    let mut c = db.conn().await;
    c.exec(
        "SELECT h.name, s.status FROM statuses s JOIN hosts h ON h.id = s.host_id \
         JOIN events e ON e.id = s.event_id WHERE e.ip = ? AND e.kind = ? ORDER BY h.name",
        (ip, kind),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ban_inside_the_list_stays_on_its_host_and_goes_nowhere_else() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let h1 = F2bHost::start(root.path(), &pki, "allow-1", &hub.url).await;
    let h2 = F2bHost::start(root.path(), &pki, "allow-2", &hub.url).await;
    let ops = pki.admin("ops");
    let (ok, out, err) = hub_cli(
        &["allow", "add", "203.0.113.0/24", "--note", "office NAT"],
        &hub,
        &ops,
    );
    assert!(ok, "{err}");
    assert!(out.contains("allowed 203.0.113.0/24"), "{out}");

    // Three failed logins from the office on host 1: host 1's own fail2ban
    // bans it (its business), the hub refuses to share it.
    let office = "203.0.113.9";
    h1.failed_logins(office, 3);
    wait_for("host 1's own ban", DEADLINE, || async {
        h1.in_ipset("f2b-login", office)
    })
    .await;
    wait_for("the refusal at the hub", DEADLINE, || async {
        let (_, out, _) = hub_cli(&["bans", "--refused"], &hub, &ops);
        out.contains(office)
    })
    .await;
    // A built-in needs no entry: link-local is never shared.
    assert!(h1.node.report("sshd", "tcp", "22", "169.254.7.7").0);
    // A later ban from host 1 outside the list reaches host 2: by then the
    // office's would have too.
    let attacker = "198.51.100.66";
    h1.failed_logins(attacker, 3);
    wait_for("the later ban in host 2's set", DEADLINE, || async {
        h2.in_ipset("f2b-shared", attacker)
    })
    .await;
    assert!(
        !h2.in_ipset("f2b-shared", office),
        "host 2 banned the office"
    );
    assert_eq!(h2.node.lines_for(office), 0);
    assert!(h1.in_ipset("f2b-login", office), "host 1 keeps its own ban");

    // Listed as refused: who, what, which entry; no event was stored.
    let (ok, out, err) = hub_cli(&["bans", "--refused"], &hub, &ops);
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.contains(office)).unwrap();
    assert!(
        row.contains("allow-1") && row.contains("203.0.113.0/24") && row.contains("login"),
        "{out}"
    );
    let mut c = db.conn().await;
    let events: Option<i64> = c
        .exec_first("SELECT COUNT(*) FROM events WHERE ip = ?", (office,))
        .await
        .unwrap();
    assert_eq!(events, Some(0));
    // Host 1's node said so once and kept nothing in its outbox.
    let refused_lines = h1
        .node
        .proc
        .as_ref()
        .unwrap()
        .log_text()
        .lines()
        .filter(|l| l.contains("the address is on the fleet allow-list"))
        .count();
    assert_eq!(refused_lines, 2, "one line per refused report");
    let status = banmesh::report::node_status(&h1.node.socket())
        .await
        .unwrap();
    assert_eq!(status.outbox_pending, 0);

    // grpcurl sees the entry, the built-ins and the fleet's addresses.
    let listed = grpcurl(&ops, &hub, "banmesh.v1.Hub/AllowList", "{}");
    assert!(
        listed.contains("\"network\": \"203.0.113.0/24\""),
        "{listed}"
    );
    assert!(listed.contains("\"note\": \"office NAT\""), "{listed}");
    assert!(listed.contains("\"network\": \"127.0.0.0/8\""), "{listed}");
    let refused = grpcurl(&ops, &hub, "banmesh.v1.Hub/ListRefused", "{}");
    assert!(
        refused.contains(office) && refused.contains("allow-1"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn adding_a_network_lifts_its_active_bans_on_every_host() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let h1 = F2bHost::start(root.path(), &pki, "lift-1", &hub.url).await;
    let h2 = F2bHost::start(root.path(), &pki, "lift-2", &hub.url).await;
    let ops = pki.admin("ops");

    // Three bans inside 192.0.2.0/24 (one from host 1's own fail2ban, so
    // host 1 holds it too) and one outside.
    let inside = ["192.0.2.10", "192.0.2.11", "192.0.2.12"];
    let outside = "198.51.100.9";
    h1.failed_logins(inside[0], 3);
    for ip in &inside[1..] {
        assert!(h1.node.report("sshd", "tcp", "22", ip).0);
    }
    assert!(h1.node.report("sshd", "tcp", "22", outside).0);
    for ip in inside.iter().chain([&outside]) {
        wait_for(&format!("{ip} in host 2's set"), DEADLINE, || async {
            h2.in_ipset("f2b-shared", ip)
        })
        .await;
    }
    assert!(h1.in_ipset("f2b-login", inside[0]));
    let start = Instant::now();
    let (ok, out, err) = hub_cli(&["allow", "add", "192.0.2.0/24"], &hub, &ops);
    assert!(ok, "{err}");
    assert!(out.contains("3 active ban(s) inside it lifted"), "{out}");
    wait_for(
        "every ban inside lifted on every host",
        DEADLINE,
        || async {
            inside.iter().all(|ip| !h2.in_ipset("f2b-shared", ip))
                && !h1.in_ipset("f2b-login", inside[0])
        },
    )
    .await;
    let took = start.elapsed();
    println!("allow add -> lifted on both hosts' kernel sets in {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // And they stay lifted once fail2ban has read the lines the fast path
    // went ahead of (the node lifts again what it re-bans from them).
    for ip in inside {
        wait_for(
            &format!("host 2's fail2ban to read {ip}'s line"),
            DEADLINE,
            || async { h2.fail2ban_log().contains(&format!("[shared] Found {ip}")) },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let relifted = h2
        .node
        .proc
        .as_ref()
        .unwrap()
        .log_text()
        .matches("lifted again")
        .count();
    println!("host 2 lifted {relifted} address(es) again after fail2ban read their lines late");
    wait_for("every ban inside still lifted", DEADLINE, || async {
        inside.iter().all(|ip| !h2.in_ipset("f2b-shared", ip))
    })
    .await;
    assert!(h2.in_ipset("f2b-shared", outside), "the ban outside stays");

    // Statuses of the unbans: 1 where a ban was lifted.
    for ip in inside {
        wait_for(&format!("the unban status of {ip}"), DEADLINE, || async {
            statuses(&db, ip, 2).await.contains(&("lift-2".into(), 1))
        })
        .await;
    }
    wait_for("host 1 lifted its own ban", DEADLINE, || async {
        statuses(&db, inside[0], 2)
            .await
            .contains(&("lift-1".into(), 1))
    })
    .await;
    // And from now on a ban inside is not shared.
    assert!(h1.node.report("sshd", "tcp", "22", "192.0.2.99").0);
    assert!(h1.node.report("sshd", "tcp", "22", "198.51.100.10").0);
    wait_for("the marker in host 2's set", DEADLINE, || async {
        h2.in_ipset("f2b-shared", "198.51.100.10")
    })
    .await;
    assert!(!h2.in_ipset("f2b-shared", "192.0.2.99"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_filters_with_its_saved_list_while_the_hub_is_down() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let mut hub = Hub::start(root.path(), &pki, &db.url).await;
    let a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    let mut b = Node::start(root.path(), &pki, "node-b", &hub.url).await;
    let ops = pki.admin("ops");
    let (ok, _, err) = hub_cli(&["allow", "add", "2001:db8:7::/48"], &hub, &ops);
    assert!(ok, "{err}");
    let (ok, _, err) = hub_cli(&["allow", "add", "203.0.113.0/24"], &hub, &ops);
    assert!(ok, "{err}");
    let saved = b.dir.join("allow-list");
    wait_for("node b's saved list", DEADLINE, || async {
        std::fs::read_to_string(&saved).unwrap_or_default() == "203.0.113.0/24\n2001:db8:7::/48\n"
    })
    .await;
    // Node b has applied past the allow-add events.
    assert!(a.report("sshd", "tcp", "22", "198.51.100.1").0);
    wait_for("a ban at b", DEADLINE, || async {
        b.lines_for("198.51.100.1") == 1
    })
    .await;

    // The hub goes down; node b restarts with only its saved list.
    let port = hub.port;
    hub.proc.stop();
    b.stop();
    b.launch(false).await;
    // Bans inside the list reach the store without the hub's check (as
    // from an older hub, or a restored backup), with a marker outside.
    let mut c = db.conn().await;
    for (seq, ip) in [
        (901, "203.0.113.50"),
        (902, "2001:db8:7::9"),
        (903, "198.51.100.2"),
    ] {
        c.exec_drop(
            "INSERT INTO events (kind, reporter_id, node_seq, added_by, created_ms, jailname, \
             protocol, port, ip) SELECT 1, id, ?, name, ?, 'sshd', 'tcp', '22', ? FROM hosts \
             WHERE name = 'node-a'",
            (seq, banmesh::clock::now_ms(), ip),
        )
        .await
        .unwrap();
    }
    // Replay starts after the allow-add events b already applied: only its
    // saved file can refuse these.
    let _hub = Hub::start_on(root.path(), &pki, &db.url, port).await;
    wait_for("the marker at b", DEADLINE, || async {
        b.lines_for("198.51.100.2") == 1
    })
    .await;
    assert_eq!(b.lines_for("203.0.113.50"), 0);
    assert_eq!(b.lines_for("2001:db8:7::9"), 0);
    for ip in ["203.0.113.50", "2001:db8:7::9"] {
        wait_for(&format!("status 4 at b for {ip}"), DEADLINE, || async {
            statuses(&db, ip, 1).await == [("node-b".to_string(), 4)]
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_to_allow_add_is_refused_and_stores_nothing() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let ops = pki.admin("ops");
    for (given, says) in [
        ("office", "is not a network"),
        ("192.0.2.0/33", "prefix length must be 1-32"),
        ("0.0.0.0/0", "covers every address"),
        ("::/0", "covers every address"),
        ("192.0.2.5/24", "did you mean 192.0.2.0/24?"),
    ] {
        let (ok, _, err) = hub_cli(&["allow", "add", given], &hub, &ops);
        assert!(!ok, "{given} was accepted");
        assert!(err.contains(says), "{given}: {err}");
    }
    // The hub checks too, whatever the client: straight to the RPC.
    let mut client = hub_client(&hub.url, client_tls(&ops)).await;
    for given in ["0.0.0.0/0", "10.0.0.1/8", "x"] {
        let e = client
            .allow_add(banmesh::proto::AllowAddRequest {
                network: given.into(),
                note: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{given}");
    }
    let e = client
        .allow_add(banmesh::proto::AllowAddRequest {
            network: "192.0.2.0/24".into(),
            note: "a\nforged line".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // The same network twice: refused, in any spelling. Overlapping ones
    // are kept, each as given.
    assert!(hub_cli(&["allow", "add", "192.0.2.0/24"], &hub, &ops).0);
    let (ok, _, err) = hub_cli(&["allow", "add", "::ffff:192.0.2.0/120"], &hub, &ops);
    assert!(
        !ok && err.contains("192.0.2.0/24 is already on the allow-list"),
        "{err}"
    );
    assert!(hub_cli(&["allow", "add", "192.0.2.128/25"], &hub, &ops).0);
    // Hosts may read the list but not change it.
    let (ok, _, err) = hub_cli(
        &["allow", "add", "198.51.100.0/24"],
        &hub,
        &pki.host("node-a"),
    );
    assert!(!ok, "a host added an entry: {err}");
    let (ok, out, err) = hub_cli(&["allow", "list"], &hub, &pki.host("node-a"));
    assert!(ok, "{err}");
    let entries: Vec<&str> = out
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("ops"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(entries, ["192.0.2.0/24", "192.0.2.128/25"], "{out}");
    // Removing what is not listed says so; removing one keeps the other.
    let (ok, _, err) = hub_cli(&["allow", "remove", "198.51.100.0/24"], &hub, &ops);
    assert!(!ok && err.contains("is not on the allow-list"), "{err}");
    assert!(hub_cli(&["allow", "remove", "192.0.2.0/24"], &hub, &ops).0);
    let (_, out, _) = hub_cli(&["allow", "list"], &hub, &ops);
    assert!(
        out.contains("192.0.2.128/25") && !out.contains("192.0.2.0/24"),
        "{out}"
    );
}
