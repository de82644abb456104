//! Moving data: embedded store -> MariaDB, and the seed's own table -> banmesh.
mod common;

use banmesh::{
    ban::{Ban, Status},
    hub::store::{self, BanFilter, NewReport},
};
use common::*;
use mysql_async::prelude::*;

fn report(host: &str, seq: u64, ip: &str) -> NewReport {
    NewReport {
        host: host.into(),
        seq,
        ban: Ban::new("sshd", "tcp", "22", ip).unwrap(),
        plan: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_to_mariadb_keeps_every_row_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let from_url = format!("sqlite:{}", dir.path().join("hub.db").display());
    let db = TestDb::new().await;
    {
        let s = store::open(&from_url).await.unwrap();
        for h in ["web-1", "web.2", "mail"] {
            s.touch_host(h, None).await.unwrap();
        }
        let batch: Vec<NewReport> = (0..1200)
            .map(|i| {
                report(
                    ["web-1", "web.2", "mail"][i % 3],
                    i as u64 + 1,
                    &format!("10.0.{}.{}", i / 250, i % 250),
                )
            })
            .collect();
        let ids: Vec<u64> = s
            .commit(&batch)
            .await
            .unwrap()
            .iter()
            .map(|c| c.event_id())
            .collect();
        let updates: Vec<(String, u64, Status)> = ids
            .iter()
            .map(|id| ("mail".to_string(), *id, Status::AlreadyBanned))
            .collect();
        s.set_statuses(&updates).await.unwrap();
        s.unban("10.0.0.7", "ops", false)
            .await
            .unwrap()
            .expect("active ban");
    }

    let migrate = |force: bool| {
        let mut cmd = banmesh();
        cmd.args(["hub", "migrate", "--from", &from_url, "--to", &db.url]);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let out = migrate(false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1201 events"));

    let (a, b) = (
        store::open(&from_url).await.unwrap(),
        store::open(&db.url).await.unwrap(),
    );
    assert_eq!(a.counts().await.unwrap(), b.counts().await.unwrap());
    assert_eq!(a.dump_hosts().await.unwrap(), b.dump_hosts().await.unwrap());
    assert_eq!(
        a.dump_events(0, 10_000).await.unwrap(),
        b.dump_events(0, 10_000).await.unwrap()
    );
    assert_eq!(
        a.dump_statuses(0, 100_000).await.unwrap(),
        b.dump_statuses(0, 100_000).await.unwrap()
    );
    // Lifted stays lifted; statuses read back per host.
    let rows = b
        .list_bans(&BanFilter {
            ip: Some("10.0.0.7".into()),
            limit: 5,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(rows[0].lifted);
    assert!(
        rows[0]
            .statuses
            .contains(&("mail".to_string(), Status::AlreadyBanned))
    );
    // The seed-shaped view on MariaDB has a column per migrated host.
    let mut c = db.conn().await;
    let n: Option<i64> = c
        .query_first("SELECT COUNT(*) FROM ip_table WHERE host_mail = 2 AND host_web2 = 1")
        .await
        .unwrap();
    assert_eq!(n, Some(400));

    // A second run refuses to write into the non-empty target.
    let out = migrate(false);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --force"));
    assert_eq!(a.counts().await.unwrap(), b.counts().await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seed_table_imports_with_its_statuses() {
    let seed = TestDb::new().await;
    let mut c = mysql_async::Conn::from_url(mysql_server()).await.unwrap();
    c.query_drop(format!("CREATE DATABASE {}", seed.name))
        .await
        .unwrap();
    let mut c = seed.conn().await;
    // The seed README's own table, plus the columns its scripts add per host.
    c.query_drop(
        "CREATE TABLE IF NOT EXISTS ip_table (
            id bigint(20) unsigned NOT NULL AUTO_INCREMENT,
            added_by varchar(255) COLLATE utf8_unicode_ci DEFAULT NULL,
            created datetime NOT NULL default CURRENT_TIMESTAMP,
            jailname text COLLATE utf8_unicode_ci NOT NULL,
            protocol varchar(16) COLLATE utf8_unicode_ci NOT NULL,
            port varchar(32) COLLATE utf8_unicode_ci NOT NULL,
            ip varchar(64) COLLATE utf8_unicode_ci NOT NULL,
            PRIMARY KEY (id),
            KEY added_by (added_by,ip)
        ) ENGINE=MyISAM DEFAULT CHARSET=utf8 COLLATE=utf8_unicode_ci",
    )
    .await
    .unwrap();
    for host in ["host_host1", "host_host2", "host_host3"] {
        c.query_drop(format!(
            "ALTER TABLE ip_table ADD COLUMN {host} INT DEFAULT 0"
        ))
        .await
        .unwrap();
    }
    c.query_drop(
        "INSERT INTO ip_table (added_by, created, jailname, protocol, port, ip, host_host1, host_host2, host_host3) VALUES
         ('host.1', '2024-03-01 10:00:00', 'postfix', 'tcp', '587', '198.51.100.1', 1, 0, 1),
         ('host.2', '2024-03-01 11:00:00', 'sshd', 'tcp', '21', '198.51.100.2', 1, 1, 1),
         ('host.2', '2024-03-02 09:30:00', 'sshd', 'tcp', '21', '198.51.100.2', 0, 1, 2),
         ('host.3', '2024-03-03 08:00:00', 'sshd', 'tcp', '22', 'x.x.x.x', 0, 0, 1)",
    )
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let to = format!("sqlite:{}", dir.path().join("hub.db").display());
    let out = banmesh()
        .args(["hub", "import-seed", "--from", &seed.url, "--to", &to])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("skipped 1 seed rows"), "{stdout}");

    let s = store::open(&to).await.unwrap();
    let rows = s
        .list_bans(&BanFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "the invalid row is not imported");
    type Row<'a> = (u64, &'a str, &'a str, Vec<(String, Status)>);
    let view: Vec<Row> = rows
        .iter()
        .map(|r| {
            let st = r
                .statuses
                .iter()
                .filter(|(h, _)| h.starts_with("host."))
                .cloned()
                .collect();
            (
                r.event.id,
                r.event.added_by.as_str(),
                r.event.ban.ip.as_str(),
                st,
            )
        })
        .collect();
    let s3 = |a, b, c| {
        vec![
            ("host.1".to_string(), a),
            ("host.2".to_string(), b),
            ("host.3".to_string(), c),
        ]
    };
    use Status::*;
    assert_eq!(
        view,
        vec![
            (1, "host.1", "198.51.100.1", s3(Added, NotAdded, Added)),
            (2, "host.2", "198.51.100.2", s3(Added, Added, Added)),
            (
                3,
                "host.2",
                "198.51.100.2",
                s3(NotAdded, Added, AlreadyBanned)
            ),
        ]
    );
    // `created` survives (as local time in the seed's server).
    let created: Option<i64> = c
        .query_first(
            "SELECT CAST(UNIX_TIMESTAMP(created) * 1000 AS SIGNED) FROM ip_table WHERE id = 1",
        )
        .await
        .unwrap();
    assert_eq!(rows[0].event.created_ms, created.unwrap());
}

/// A revoked certificate stays revoked when the hub moves to MariaDB: a
/// stolen host key or a lost admin laptop must not come back to life.
#[tokio::test(flavor = "multi_thread")]
async fn a_migration_keeps_every_revocation() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let from_url = format!("sqlite:{}", root.path().join("hub.db").display());
    let db = TestDb::new().await;
    let (host, admin) = (pki.host("node-x"), pki.admin("laptop-admin"));
    let hub = Hub::start(root.path(), &pki, &from_url).await;
    let mut c = hub_client(&hub.url, client_tls(&host)).await;
    c.subscribe(banmesh::proto::SubscribeRequest { after_event_id: 0 })
        .await
        .expect("node-x connects once");
    let ops = pki.admin("ops");
    for name in ["node-x", "laptop-admin"] {
        let out = banmesh()
            .args(["hub", "revoke", name, "--hub", &hub.url])
            .args(tls_args(&ops))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    drop(c);
    drop(hub);

    let out = banmesh()
        .args(["hub", "migrate", "--from", &from_url, "--to", &db.url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    for (name, tls) in [("node-x", &host), ("laptop-admin", &admin)] {
        let mut c = hub_client(&hub.url, client_tls(tls)).await;
        let status = c
            .hosts(banmesh::proto::HostsRequest {})
            .await
            .expect_err(name);
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{name}");
    }
}

/// A store from the build before hubs recorded their hosts (schema 2: no
/// `hosts.hub` columns, no `hubs` table) gains them when a hub of this build starts on it,
/// keeps its hosts, and `hub hosts` then names the hub each host is on.
#[tokio::test(flavor = "multi_thread")]
async fn a_schema_2_store_gains_the_hub_columns_at_start() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = TestDb::new().await;
    {
        let s = store::open(&db.url).await.unwrap();
        s.touch_host("old-host", None).await.unwrap();
        s.commit(&[report("old-host", 1, "192.0.2.9")])
            .await
            .unwrap();
    }
    let mut c = db.conn().await;
    for stmt in [
        "ALTER TABLE hosts DROP COLUMN hub",
        "ALTER TABLE hosts DROP COLUMN hub_since_ms",
        "DROP TABLE hubs",
        "UPDATE banmesh_meta SET v = 2 WHERE k = 'schema_version'",
    ] {
        c.query_drop(stmt).await.unwrap();
    }

    let hub = Hub::start_with(root.path(), &pki, &db.url, "127.0.0.1", 0, |c| {
        c.args(["--name", "hub-a"]);
    })
    .await;
    let version: Option<i64> = c
        .query_first("SELECT v FROM banmesh_meta WHERE k = 'schema_version'")
        .await
        .unwrap();
    assert_eq!(version, Some(store::SCHEMA_VERSION));
    let _node = Node::start(root.path(), &pki, "node-1", &hub.url).await;
    let admin = pki.admin("ops");
    wait_for(
        "node-1 listed on hub-a",
        std::time::Duration::from_secs(10),
        || {
            let (ok, out, _) = hub_cli(&["hub", "hosts"], &hub, &admin);
            let on = ok
                && out.lines().any(|l| {
                    l.starts_with("node-1 ")
                        && l.contains(" hub-a ")
                        && l.contains("  subscribed since ")
                });
            async move { on }
        },
    )
    .await;
    let (_, out, _) = hub_cli(&["hub", "hosts"], &hub, &admin);
    let old = out
        .lines()
        .find(|l| l.starts_with("old-host "))
        .unwrap_or_default();
    assert!(
        old.ends_with(" -                offline"),
        "kept, on no hub: {out}"
    );
}
