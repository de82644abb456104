//! Revocation covers every certificate the CA issued: admins as well as
//! hosts, names that never connected, any letter case, and it survives a
//! hub restart. Names are one namespace: a host cannot enrol an admin's
//! name, and a renewal keeps the lifetime the host enrolled with.
mod common;

use std::time::Duration;

use banmesh::proto::{self, hub_client::HubClient};
use common::*;
use tonic::{Code, transport::Channel};

const DEADLINE: Duration = Duration::from_secs(20);

/// Runs `banmesh hub revoke NAME` as `admin`; returns (success, stdout, stderr).
fn revoke(hub: &Hub, admin: &banmesh::tls::TlsFiles, name: &str) -> (bool, String, String) {
    let out = banmesh()
        .args(["hub", "revoke", name, "--hub", &hub.url])
        .args(tls_args(admin))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn hosts(c: &mut HubClient<Channel>) -> Result<(), tonic::Status> {
    c.hosts(proto::HostsRequest {}).await.map(drop)
}

fn refused(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_certificate_can_be_revoked_and_stays_revoked_after_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let mut hub = Hub::start(root.path(), &pki, &db).await;
    let ops = pki.admin("ops");
    let lost = pki.admin("laptop-admin");
    let mut c = hub_client(&hub.url, client_tls(&lost)).await;
    hosts(&mut c).await.expect("the admin works before");

    // An admin cannot lock itself out by a slip.
    let (ok, _, err) = revoke(&hub, &ops, "OPS");
    assert!(!ok && err.contains("another admin"), "{err}");

    let (ok, out, err) = revoke(&hub, &ops, "laptop-admin");
    assert!(ok, "{out}{err}");
    assert!(out.contains("revoked admin laptop-admin"), "{out}");
    let status = hosts(&mut c).await.unwrap_err();
    assert!(refused(&status), "{status:?}");
    // Another letter case is the same name.
    let status = c
        .revoke(proto::RevokeRequest { name: "ops".into() })
        .await
        .unwrap_err();
    assert!(refused(&status), "{status:?}");

    hub.proc.stop();
    let hub = Hub::start(root.path(), &pki, &db).await;
    let mut c = hub_client(&hub.url, client_tls(&lost)).await;
    let status = hosts(&mut c).await.unwrap_err();
    assert!(
        refused(&status),
        "still refused after a restart: {status:?}"
    );
    let mut o = hub_client(&hub.url, client_tls(&ops)).await;
    hosts(&mut o).await.expect("the other admin still works");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hand_issued_host_revoked_before_its_first_connection_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let mut hub = Hub::start(root.path(), &pki, &db).await;
    let ops = pki.admin("ops");
    let stolen = pki.host("spare-7");

    let (ok, out, err) = revoke(&hub, &ops, "Spare-7");
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("no host had connected under that name"),
        "{out}"
    );

    for round in ["before", "after"] {
        let mut c = hub_client(&hub.url, client_tls(&stolen)).await;
        let status = c
            .subscribe(proto::SubscribeRequest { after_event_id: 0 })
            .await
            .map(drop)
            .unwrap_err();
        assert!(refused(&status), "{round} a restart: {status:?}");
        let status = c
            .report_status(proto::StatusBatch { updates: vec![] })
            .await
            .unwrap_err();
        assert!(refused(&status), "{round} a restart: {status:?}");
        if round == "before" {
            hub.proc.stop();
            hub = Hub::start(root.path(), &pki, &db).await;
        }
    }
    // A real node under that name never gets through.
    let mut node = Node {
        name: "spare-7".into(),
        dir: root.path().join("spare-7"),
        proc: None,
        hub_url: hub.url.clone(),
        tls: stolen,
        extra: vec!["--no-fail2ban-socket".into()],
        netns: None,
    };
    node.launch(false).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = banmesh::report::node_status(&node.socket()).await.unwrap();
    assert!(!status.hub_connected, "a revoked node connected");
    let mut o = hub_client(&hub.url, client_tls(&ops)).await;
    let listed = o
        .hosts(proto::HostsRequest {})
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert!(
        listed.iter().all(|h| h.name != "spare-7"),
        "the refused node became a host: {listed:?}"
    );
}

/// On MySQL the database matches names case-insensitively; the hub's own
/// set must as well, or the host keeps publishing until a restart.
#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_name_in_another_case_ends_the_hosts_streams_at_once() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let ops = pki.admin("ops");
    let b = pki.host("node-b");
    let mut c = hub_client(&hub.url, client_tls(&b)).await;
    let mut stream = c
        .subscribe(proto::SubscribeRequest { after_event_id: 0 })
        .await
        .unwrap()
        .into_inner();

    let (ok, out, err) = revoke(&hub, &ops, "NODE-B");
    assert!(ok, "{out}{err}");
    let end = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("the stream ends at once");
    assert!(refused(&end.unwrap_err()));
    let status = c
        .report_status(proto::StatusBatch { updates: vec![] })
        .await
        .unwrap_err();
    assert!(refused(&status), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_cannot_enrol_under_an_admins_name() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let mut hub = Hub::start(root.path(), &pki, &db).await;
    let ops = pki.admin("ops");
    // The admin's first call makes its name known to the hub.
    let (token, hash) = create_token(&hub, &ops, &["--any-name"]);
    for name in ["ops", "OPS"] {
        let (ok, err) = enroll(&hub, &token, &hash, name, &root.path().join(name));
        assert!(!ok, "{name} enrolled");
        assert!(err.contains("admin"), "{err}");
    }
    // Known across a restart; the refusals spent nothing.
    hub.proc.stop();
    hub = Hub::start(root.path(), &pki, &db).await;
    let (ok, err) = enroll(&hub, &token, &hash, "Ops", &root.path().join("Ops"));
    assert!(!ok && err.contains("admin"), "{err}");
    let (ok, err) = enroll(&hub, &token, &hash, "web-9", &root.path().join("w"));
    assert!(ok, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn renew_keeps_the_lifetime_the_host_enrolled_with() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let ops = pki.admin("ops");
    let (token, hash) = create_token(&hub, &ops, &["--any-name", "--cert-ttl", "1h"]);
    let dir = root.path().join("short-etc");
    let (ok, err) = enroll(&hub, &token, &hash, "short", &dir);
    assert!(ok, "{err}");
    let mut c = hub_client(&hub.url, client_tls(&enrolled_files(&dir))).await;
    let (_key, csr) = banmesh::ca::key_and_csr("short").unwrap();
    let issued = c
        .renew(proto::RenewRequest { csr_pem: csr })
        .await
        .unwrap()
        .into_inner();
    let left = issued.expires_ms - banmesh::clock::now_ms();
    assert!(
        (3_500_000..=3_700_000).contains(&left),
        "a 1 h enrolment renewed for {} s",
        left / 1000
    );
}
