//! Host names never stop a MySQL hub: the `ip_table` view's columns stay
//! within MySQL's 64 characters and unique case-insensitively, and a view
//! that cannot be rebuilt is logged, never fatal (real hub, real MariaDB).
mod common;

use banmesh::proto;
use common::*;
use mysql_async::prelude::*;

/// A 70-character FQDN, as `enroll` takes it from a long host name.
const LONG: &str = "build-runner-0042.ci-cluster-west.eu-central-1.compute.internal.example";

async fn view_columns(db: &TestDb) -> Vec<String> {
    let mut c = db.conn().await;
    let cols = c
        .query(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'ip_table' \
             ORDER BY ORDINAL_POSITION",
        )
        .await
        .unwrap();
    c.disconnect().await.unwrap();
    cols
}

async fn subscribe(hub: &Hub, tls: &banmesh::tls::TlsFiles) -> Result<(), tonic::Status> {
    let mut c = hub_client(&hub.url, client_tls(tls)).await;
    c.subscribe(proto::SubscribeRequest { after_event_id: 0 })
        .await
        .map(drop)
}

#[tokio::test(flavor = "multi_thread")]
async fn long_and_case_colliding_host_names_keep_a_mysql_hub_running() {
    assert!(LONG.len() >= 64);
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let mut hub = Hub::start(root.path(), &pki, &db.url).await;
    let ops = pki.admin("ops");

    // A long name enrols (the token is not spent on a view error) ...
    let (token, hash) = create_token(&hub, &ops, &["--name", LONG]);
    let dir = root.path().join("long-etc");
    let (ok, err) = enroll(&hub, &token, &hash, LONG, &dir);
    assert!(ok, "{err}");
    subscribe(&hub, &enrolled_files(&dir))
        .await
        .expect("the long name's first call");
    // ... and names whose columns differ only in case both connect.
    for name in ["web-1", "WEB1"] {
        subscribe(&hub, &pki.host(name))
            .await
            .unwrap_or_else(|s| panic!("{name}: {s:?}"));
    }
    let cols = view_columns(&db).await;
    assert_eq!(cols.len(), 7 + 3, "{cols:?}");
    let mut lower: Vec<String> = cols.iter().map(|c| c.to_lowercase()).collect();
    lower.sort();
    lower.dedup();
    assert_eq!(
        lower.len(),
        cols.len(),
        "unique case-insensitively: {cols:?}"
    );
    assert!(cols.iter().all(|c| c.len() <= 64), "{cols:?}");

    // The hub starts again over these hosts.
    hub.proc.stop();
    hub = Hub::start(root.path(), &pki, &db.url).await;
    subscribe(&hub, &pki.host("web-1")).await.expect("serving");

    // Whatever else breaks the view (here a table took its name), the hub
    // starts, enrols and serves, and says why the view is stale.
    hub.proc.stop();
    let mut c = db.conn().await;
    c.query_drop("DROP VIEW ip_table").await.unwrap();
    c.query_drop("CREATE TABLE ip_table (id INT)")
        .await
        .unwrap();
    c.disconnect().await.unwrap();
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    subscribe(&hub, &pki.host("db-2"))
        .await
        .expect("a new host's first call");
    let (token, hash) = create_token(&hub, &ops, &["--any-name"]);
    let (ok, err) = enroll(&hub, &token, &hash, "new-3", &root.path().join("n3"));
    assert!(ok, "{err}");
    assert!(
        hub.proc.log_text().contains("ip_table"),
        "{}",
        hub.proc.log_text()
    );
}
