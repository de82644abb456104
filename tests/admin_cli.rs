//! The operator's commands, run as the real binary with an admin
//! certificate: `banmesh bans`, `banmesh hub hosts`, `banmesh unban`, and
//! their errors (what they print and how they exit).
mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_lists_bans_and_hosts_and_lifts_a_ban() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    let b = Node::start(root.path(), &pki, "node-b", &hub.url).await;
    let ops = pki.admin("ops");
    assert!(a.report("sshd", "tcp", "22", "198.51.100.40").0);
    wait_for("the ban at B", Duration::from_secs(20), || async {
        b.lines_for("198.51.100.40") == 1
    })
    .await;

    let (ok, out, err) = hub_cli(&["bans", "--ip", "198.51.100.40"], &hub, &ops);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "a header and one ban: {out}");
    // The seed's columns, the ladder's term, then one status column per host.
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "id",
            "added_by",
            "created",
            "jailname",
            "protocol",
            "port",
            "ip",
            "rung",
            "ends",
            "state",
            "reporters",
            "host_nodea",
            "host_nodeb"
        ],
        "{out}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row.len(), 14, "created is a date and a time: {out}");
    assert_eq!(row[1], "node-a", "{out}");
    assert_eq!(&row[4..8], ["sshd", "tcp", "22", "198.51.100.40"], "{out}");
    assert_eq!(row[8], "1", "the first rung: {out}");
    assert_eq!(&row[10..12], ["active", "node-a"], "{out}");
    assert_eq!(row[12], "1", "the reporter's own status is 1: {out}");

    let (ok, out, err) = hub_cli(&["hub", "hosts"], &hub, &ops);
    assert!(ok, "{err}");
    assert!(out.starts_with("HOST "), "{out}");
    for host in ["node-a", "node-b"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(host) && l.contains("  subscribed since ")),
            "{host} subscribed: {out}"
        );
    }

    let (ok, out, err) = hub_cli(&["unban", "198.51.100.40"], &hub, &ops);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("unbanned 198.51.100.40 (event ") && out.ends_with(", 1 ban(s) lifted)\n"),
        "{out}"
    );

    // Errors: the hub's message, a non-zero exit, nothing on stdout.
    let (ok, out, err) = hub_cli(&["unban", "198.51.100.40"], &hub, &ops);
    assert!(!ok && out.is_empty());
    assert!(
        err.contains("banmesh: 198.51.100.40 has no active ban"),
        "{err}"
    );
    let (ok, _, err) = hub_cli(&["bans", "--ip", "203.0.113.99"], &hub, &ops);
    assert!(!ok);
    assert!(err.contains("banmesh: no bans match"), "{err}");
    let (ok, _, err) = hub_cli(&["hub", "revoke", "node-b"], &hub, &pki.host("node-a"));
    assert!(!ok);
    assert!(err.contains("not an admin"), "{err}");
    let (ok, _, err) = hub_cli(&["unban", "not-an-ip"], &hub, &ops);
    assert!(!ok);
    assert!(err.contains("is not an IP address"), "{err}");
}
