//! Adding a server is one command on that server: `banmesh enroll` with a
//! one-time token and the pinned CA hash.
mod common;

use std::{os::unix::fs::PermissionsExt, time::Duration};

use common::*;

const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn a_new_server_enrols_with_a_token_and_exchanges_bans() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let admin = pki.admin("ops");
    let b = Node::start(root.path(), &pki, "node-b", &hub.url).await;

    let (token, hash) = create_token(&hub, &admin, &["--name", "fresh-1"]);
    let dir = root.path().join("fresh-1-etc");

    // A wrong CA hash stops enroll in the TLS handshake: nothing is sent.
    let wrong = hash.chars().rev().collect::<String>();
    let (ok, err) = enroll(&hub, &token, &wrong, "fresh-1", &dir);
    assert!(!ok);
    assert!(err.contains("does not match --ca-sha256"), "{err}");
    let log = hub.proc.log_text();
    assert!(
        !log.contains("host enrolled") && !log.contains("enrolment refused"),
        "the hub saw a request"
    );
    assert!(!dir.join("host.key").exists());

    let (ok, err) = enroll(&hub, &token, &hash, "fresh-1", &dir);
    assert!(ok, "{err}");
    let mode = std::fs::metadata(dir.join("host.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the private key is written 0600");

    // The token worked once.
    let (ok, err) = enroll(&hub, &token, &hash, "fresh-1", &root.path().join("again"));
    assert!(!ok);
    assert!(err.contains("already used"), "{err}");

    // The enrolled node's identity is the name in its new certificate.
    let mut fresh = Node {
        name: "fresh-1".into(),
        dir: root.path().join("fresh-1"),
        proc: None,
        hub_url: hub.url.clone(),
        tls: enrolled_files(&dir),
        extra: vec!["--no-fail2ban-socket".into()],
        netns: None,
    };
    fresh.restart().await;
    assert!(fresh.report("sshd", "tcp", "22", "192.0.2.61").0);
    assert!(b.report("sshd", "tcp", "22", "192.0.2.62").0);
    wait_for("fresh -> b", DEADLINE, || async {
        b.lines_for("192.0.2.61") == 1
    })
    .await;
    wait_for("b -> fresh", DEADLINE, || async {
        fresh.lines_for("192.0.2.62") == 1
    })
    .await;
    assert!(b.shared_lines()[0].contains("reported by fresh-1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_tokens_and_taken_names_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let admin = pki.admin("ops");
    let _a = Node::start(root.path(), &pki, "node-a", &hub.url).await;

    let (token, hash) = create_token(&hub, &admin, &["--ttl", "1s", "--name", "late"]);
    let expired_at = std::time::Instant::now() + Duration::from_millis(1100);
    wait_for(
        "the token to expire",
        Duration::from_secs(5),
        || async move { std::time::Instant::now() > expired_at },
    )
    .await;
    let (ok, err) = enroll(&hub, &token, &hash, "late", &root.path().join("late"));
    assert!(!ok);
    assert!(err.contains("expired"), "{err}");

    // A name held by a live host cannot be taken over.
    let (token, hash) = create_token(&hub, &admin, &["--any-name"]);
    let (ok, err) = enroll(&hub, &token, &hash, "node-a", &root.path().join("imposter"));
    assert!(!ok);
    assert!(err.contains("held by another host"), "{err}");
    // The token was not spent on the refusal.
    let (ok, err) = enroll(&hub, &token, &hash, "node-new", &root.path().join("new"));
    assert!(ok, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_renews_its_certificate_before_it_expires() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let mut hub = Hub::start(root.path(), &pki, &db).await;
    let admin = pki.admin("ops");
    let b = Node::start(root.path(), &pki, "node-b", &hub.url).await;
    // A one-hour certificate on a node told to renew with two hours left.
    let (token, hash) = create_token(&hub, &admin, &["--cert-ttl", "1h", "--name", "short"]);
    let dir = root.path().join("short-etc");
    assert!(enroll(&hub, &token, &hash, "short", &dir).0);
    let expiry = |path: &std::path::Path| {
        use rustls_pki_types::{CertificateDer, pem::PemObject};
        let pem = std::fs::read(path).unwrap();
        let der = CertificateDer::pem_slice_iter(&pem)
            .next()
            .unwrap()
            .unwrap();
        banmesh::tls::expiry_ms(&der).unwrap()
    };
    let first = expiry(&dir.join("host.crt"));
    let mut node = Node {
        name: "short".into(),
        dir: root.path().join("short"),
        proc: None,
        hub_url: hub.url.clone(),
        tls: enrolled_files(&dir),
        extra: vec![
            "--no-fail2ban-socket".into(),
            "--renew-before".into(),
            "2h".into(),
        ],
        netns: None,
    };
    let enrolled_pem = std::fs::read(dir.join("host.crt")).unwrap();
    node.restart().await;
    let cert = dir.join("host.crt");
    wait_for("the certificate renewed", DEADLINE, || async {
        std::fs::read(&cert).is_ok_and(|pem| pem != enrolled_pem)
    })
    .await;
    // For the lifetime the host enrolled with (1 h), not the default 90 days.
    let renewed = expiry(&cert);
    assert!(renewed >= first, "renewed {renewed} < enrolled {first}");
    assert!(
        renewed <= banmesh::clock::now_ms() + 3_600_000 + 1_000,
        "a 1 h enrolment renewed until {renewed}"
    );
    let mode = std::fs::metadata(dir.join("host.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // After a hub restart the node reconnects with the renewed pair.
    let port = hub.port;
    hub.proc.stop();
    let _hub = Hub::start_on(root.path(), &pki, &db, port).await;
    wait_for("the node reconnected", DEADLINE, || async {
        matches!(banmesh::report::node_status(&node.socket()).await, Ok(s) if s.hub_connected)
    })
    .await;
    assert!(node.report("sshd", "tcp", "22", "192.0.2.77").0);
    wait_for("a ban from the renewed node", DEADLINE, || async {
        b.lines_for("192.0.2.77") == 1
    })
    .await;
}
