//! `banmesh-report`, the small binary for fail2ban's action (issue 19),
//! answers as `banmesh report` does: a ban the node took reaches the
//! fleet; a bad or oversized field exits 2, named, with nothing queued;
//! with the node down the ban is spooled (by `banmesh report`) and taken
//! at the node's start.
mod common;

use std::{process::Command, time::Duration};

use banmesh::ban::Ban;
use common::*;

const DEADLINE: Duration = Duration::from_secs(20);

fn small_report(socket: &std::path::Path, data_dir: &std::path::Path, ip: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_banmesh-report"));
    cmd.args(["report", "-j", "sshd", "-pr", "tcp", "-p", "22", "-i", ip])
        .arg("--socket")
        .arg(socket)
        .arg("--data-dir")
        .arg(data_dir);
    cmd
}

/// The outbox sequence the node gives its next report: a report between
/// two of these that took nothing leaves them one apart.
fn next_seq(node: &Node, ip: &str) -> u64 {
    let ban = Ban::new("sshd", "tcp", "22", ip).unwrap();
    banmesh::report::report_blocking(&node.socket(), &ban).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_small_report_binary_answers_as_banmesh_report_does() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let mut a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    let b = Node::start(root.path(), &pki, "node-b", &hub.url).await;

    let out = small_report(&a.socket(), &a.dir, "192.0.2.70")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_for("the ban at B", DEADLINE, || async {
        b.lines_for("192.0.2.70") == 1
    })
    .await;

    // Refused by the node's own checks: exit 2, the reason, nothing queued.
    let before = next_seq(&a, "192.0.2.71");
    for (ip, port, says) in [
        ("300.1.2.3", "22", "not an IPv4 or IPv6 address"),
        ("192.0.2.72", "22;rm -rf /", "port"),
        ("192.0.2.73", &"1".repeat(20_000), "too long"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_banmesh-report"))
            .args(["-j", "sshd", "-pr", "tcp", "-p", port, "-i", ip, "--socket"])
            .arg(a.socket())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{ip}: {stderr}");
        assert!(stderr.contains(says), "{ip}: {stderr}");
    }
    assert_eq!(next_seq(&a, "192.0.2.74"), before + 1, "nothing was queued");

    // Node down: spooled through `banmesh report`, taken at the start.
    a.stop();
    let out = small_report(&a.socket(), &a.dir, "192.0.2.75")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("the node is not running"), "{stderr}");
    a.restart().await;
    wait_for("the spooled ban at B", DEADLINE, || async {
        b.lines_for("192.0.2.75") == 1
    })
    .await;
}
