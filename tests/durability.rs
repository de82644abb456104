//! An acknowledged report survives a SIGKILL of the hub, on both stores.
mod common;

use std::time::Duration;

use banmesh::hub::store;
use common::*;

async fn acknowledged_reports_survive_sigkill(db_url: String) {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let mut hub = Hub::start(root.path(), &pki, &db_url).await;
    let a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    for i in 0..50 {
        let (ok, err) = a.report("sshd", "tcp", "22", &format!("192.0.2.{i}"));
        assert!(ok, "{err}");
    }
    // The outbox empties only as the hub acknowledges durable commits.
    wait_for("every report acknowledged", Duration::from_secs(20), || async {
        matches!(banmesh::report::node_status(&a.socket()).await, Ok(s) if s.outbox_pending == 0)
    })
    .await;
    hub.proc.kill();
    let s = store::open(&db_url).await.unwrap();
    let (_, events, _) = s.counts().await.unwrap();
    assert_eq!(
        events, 50,
        "every acknowledged report is in the store after SIGKILL"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    acknowledged_reports_survive_sigkill(format!("sqlite:{}", dir.path().join("hub.db").display()))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_store() {
    let db = TestDb::new().await;
    acknowledged_reports_survive_sigkill(db.url.clone()).await;
}
