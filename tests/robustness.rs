//! Bad input changes nothing and is named; nothing accepted is lost when
//! the node is down; shutdown is clean.
mod common;

use std::{io::Write, time::Duration};

use common::*;

const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn a_report_while_the_node_is_down_is_taken_at_its_start() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let mut a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    let b = Node::start(root.path(), &pki, "node-b", &hub.url).await;

    a.stop();
    let out = banmesh()
        .args([
            "report",
            "-j",
            "sshd",
            "-pr",
            "tcp",
            "-p",
            "22",
            "-i",
            "192.0.2.200",
            "--socket",
        ])
        .arg(a.socket())
        .arg("--data-dir")
        .arg(&a.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("the node is not running"));

    a.restart().await;
    wait_for("the spooled ban at B", DEADLINE, || async {
        b.lines_for("192.0.2.200") == 1
    })
    .await;
    let spool = a.dir.join("spool");
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "the spool is emptied"
    );
    // Once: a second restart does not send it again.
    a.stop();
    a.restart().await;
    assert!(a.report("sshd", "tcp", "22", "192.0.2.201").0);
    wait_for("a later ban at B", DEADLINE, || async {
        b.lines_for("192.0.2.201") == 1
    })
    .await;
    assert_eq!(b.lines_for("192.0.2.200"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_the_sockets_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    let b = Node::start(root.path(), &pki, "node-b", &hub.url).await;

    let mut junk = Vec::new();
    let mut seed = 0x2545F4914F6CDD1Du64;
    for _ in 0..4096 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        junk.push(seed as u8);
    }
    // A garbage frame on the node's unix socket, an HTTP/2 preface followed
    // by garbage, and garbage on the hub's TLS port.
    for bytes in [
        junk.clone(),
        [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(), &junk].concat(),
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(a.socket()).unwrap();
        let _ = s.write_all(&bytes);
    }
    let mut t = std::net::TcpStream::connect(("127.0.0.1", hub.port)).unwrap();
    let _ = t.write_all(&junk);
    drop(t);

    // Both still serve, and nothing was stored from the garbage.
    assert!(a.report("sshd", "tcp", "22", "192.0.2.210").0);
    wait_for("a real ban after the garbage", DEADLINE, || async {
        b.lines_for("192.0.2.210") == 1
    })
    .await;
    let store = banmesh::hub::store::open(&db).await.unwrap();
    assert_eq!(store.counts().await.unwrap().1, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_outbox_keeps_every_intact_record_and_says_what_it_skipped() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let dead_hub = format!("https://127.0.0.1:{}", free_port());
    // A node whose hub is unreachable keeps its reports in the outbox.
    let mut a = Node {
        name: "node-a".into(),
        dir: root.path().join("node-a"),
        proc: None,
        hub_url: dead_hub,
        tls: pki.host("node-a"),
        extra: vec!["--no-fail2ban-socket".into()],
        netns: None,
    };
    a.launch(false).await;
    for i in 1..=3 {
        assert!(
            a.report("sshd", "tcp", "22", &format!("192.0.2.{}", 220 + i))
                .0
        );
    }
    a.stop();
    let log = a.dir.join("outbox.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let third = bytes.len() / 3;
    bytes[third + 20] ^= 0xff; // damage the second record
    bytes.extend_from_slice(b"BMR1\x07"); // and a torn tail
    std::fs::write(&log, &bytes).unwrap();

    let hub = Hub::start(root.path(), &pki, &db).await;
    let b = Node::start(root.path(), &pki, "node-b", &hub.url).await;
    a.hub_url = hub.url.clone();
    a.restart().await;
    wait_for("the intact reports at B", DEADLINE, || async {
        b.lines_for("192.0.2.221") == 1 && b.lines_for("192.0.2.223") == 1
    })
    .await;
    assert_eq!(
        b.lines_for("192.0.2.222"),
        0,
        "the damaged record is skipped, not invented"
    );
    let text = a.proc.as_ref().unwrap().log_text();
    assert!(text.contains("outbox had damaged records"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hub_refuses_a_store_from_a_newer_version() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let file = root.path().join("hub.db");
    drop(
        banmesh::hub::store::open(&format!("sqlite:{}", file.display()))
            .await
            .unwrap(),
    );
    let c = rusqlite::Connection::open(&file).unwrap();
    c.execute(
        "UPDATE banmesh_meta SET v = 99 WHERE k = 'schema_version'",
        [],
    )
    .unwrap();
    drop(c);
    let tls = pki.hub();
    let out = banmesh()
        .args([
            "hub",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--db",
            &format!("sqlite:{}", file.display()),
        ])
        .args(tls_args(&tls))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let this = banmesh::hub::store::SCHEMA_VERSION;
    assert!(
        err.contains(&format!(
            "schema version 99, newer than this build's {this}"
        )),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_hub_and_node_cleanly_under_load() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let mut hub = Hub::start(root.path(), &pki, &db).await;
    let a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    let mut b = Node::start(root.path(), &pki, "node-b", &hub.url).await;
    let socket = a.socket();
    let load = tokio::spawn(async move {
        for i in 0..300u32 {
            let ban = banmesh::ban::Ban::new(
                "sshd",
                "tcp",
                "22",
                &format!("10.9.{}.{}", i / 250, i % 250),
            )
            .unwrap();
            let _ = banmesh::report::report(&socket, ban).await;
        }
    });
    wait_for("some bans at B", DEADLINE, || async {
        b.shared_lines().len() > 50
    })
    .await;
    let mut proc = b.proc.take().unwrap();
    let _ = std::process::Command::new("kill")
        .arg(proc.child.id().to_string())
        .status();
    let status = tokio::task::spawn_blocking(move || proc.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "node exit on SIGTERM: {status:?}");
    // No partial line: every line is whole and names its event.
    let text = std::fs::read_to_string(b.shared_log()).unwrap();
    assert!(text.ends_with('\n'));
    assert!(
        text.lines()
            .all(|l| l.contains(" banmesh[") && l.contains(": reported by "))
    );
    load.await.unwrap();

    let pid = hub.proc.child.id();
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();
    let status = tokio::task::spawn_blocking(move || hub.proc.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "hub exit on SIGTERM: {status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_given_several_hubs_uses_one_that_answers() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let dead = format!("https://127.0.0.1:{}", free_port());
    let b = Node::start(root.path(), &pki, "node-b", &hub.url).await;
    // The first hub listed is down for good.
    let a = Node::start_with(
        root.path(),
        &pki,
        "node-a",
        &dead,
        vec![
            "--no-fail2ban-socket".into(),
            "--hub".into(),
            hub.url.clone().into(),
        ],
    )
    .await;
    for i in 0..20 {
        assert!(
            a.report("sshd", "tcp", "22", &format!("192.0.2.{}", 100 + i))
                .0
        );
    }
    wait_for("every ban through the live hub", DEADLINE, || async {
        b.shared_lines().len() == 20
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_restored_from_an_old_backup_does_not_lose_new_bans() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let mut a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    let b = Node::start(root.path(), &pki, "node-b", &hub.url).await;
    for i in 1..=3 {
        assert!(a.report("sshd", "tcp", "22", &format!("192.0.2.{i}")).0);
    }
    wait_for("three bans at B", DEADLINE, || async {
        b.shared_lines().len() == 3
    })
    .await;
    // The node's state goes back to before any report: its sequence restarts.
    a.stop();
    for f in ["outbox.log", "outbox.acked"] {
        let _ = std::fs::remove_file(a.dir.join(f));
    }
    a.restart().await;
    assert!(a.report("sshd", "tcp", "22", "192.0.2.44").0);
    wait_for("the new ban at B", DEADLINE, || async {
        b.lines_for("192.0.2.44") == 1
    })
    .await;
    let store = banmesh::hub::store::open(&db).await.unwrap();
    assert_eq!(store.counts().await.unwrap().1, 4);
}
