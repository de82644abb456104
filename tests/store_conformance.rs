//! One suite, run unchanged against every store backend: MariaDB (the
//! production store), the embedded SQLite file (the default), and a node
//! of a MariaDB Galera cluster (hubs sharing one replicated store; one
//! 3-node cluster on loopback serves every case, each its own database,
//! the cases spread over its nodes), plus a Galera-only case of two stores
//! on two nodes sharing one database, as two hubs do.
mod common;

use std::sync::Arc;

use banmesh::{
    ban::{Ban, BanTerm, EventKind, Status},
    hub::{
        ladder::{Decision, Ladder},
        store::{
            self, AllowRow, BanFilter, Committed, EnrollRefused, Enrolled, NewReport, NewToken,
            Plan, Revocation, Store,
        },
    },
};

/// A store plus whatever keeps it alive (temp dir or test database).
struct Backend {
    url: String,
    _keep: Box<dyn std::any::Any + Send>,
}

impl Backend {
    async fn sqlite() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        Backend {
            url: format!("sqlite:{}", dir.path().join("hub.db").display()),
            _keep: Box::new(dir),
        }
    }

    async fn mysql() -> Backend {
        let db = common::TestDb::new().await;
        Backend {
            url: db.url.clone(),
            _keep: Box::new(db),
        }
    }

    /// A fresh database on a node of the suite's Galera cluster (nodes in
    /// turn, so every node serves some cases).
    async fn galera() -> Backend {
        let (cluster, db) = galera_cluster::shared().await;
        Backend {
            url: cluster.url(db.1 % 3, &db.0),
            _keep: Box::new(()),
        }
    }

    async fn open(&self) -> Arc<dyn Store> {
        store::open(&self.url).await.expect("open store")
    }

    /// Runs one statement with the backend's own driver.
    async fn sql(&self, stmt: &str) {
        if let Some(path) = self.url.strip_prefix("sqlite:") {
            rusqlite::Connection::open(path)
                .unwrap()
                .execute_batch(stmt)
                .unwrap();
        } else {
            use mysql_async::prelude::*;
            let mut c = mysql_async::Conn::from_url(&self.url).await.unwrap();
            c.query_drop(stmt).await.unwrap();
            c.disconnect().await.unwrap();
        }
    }

    /// The `ip_table` view's column names and its rows (as text), read
    /// with the backend's own driver, as an operator's SQL client would.
    async fn ip_table(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let sql = "SELECT * FROM ip_table ORDER BY id";
        if let Some(path) = self.url.strip_prefix("sqlite:") {
            let c = rusqlite::Connection::open(path).unwrap();
            let mut st = c.prepare(sql).unwrap();
            let cols: Vec<String> = st.column_names().map(|c| c.to_string()).collect();
            let n = cols.len();
            let rows = st
                .query_map([], |r| {
                    (0..n)
                        .map(|i| {
                            Ok(match r.get_ref(i)? {
                                rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                                rusqlite::types::ValueRef::Text(t) => {
                                    String::from_utf8_lossy(t).into_owned()
                                }
                                other => format!("{other:?}"),
                            })
                        })
                        .collect::<rusqlite::Result<Vec<String>>>()
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            (cols, rows)
        } else {
            use mysql_async::prelude::*;
            let mut c = mysql_async::Conn::from_url(&self.url).await.unwrap();
            let rows: Vec<mysql_async::Row> = c.query(sql).await.unwrap();
            let cols: Vec<String> = c
                .query::<String, _>(
                    "SELECT COLUMN_NAME FROM information_schema.COLUMNS \
                     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'ip_table' \
                     ORDER BY ORDINAL_POSITION",
                )
                .await
                .unwrap();
            let rows = rows
                .into_iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| match r.as_ref(i).unwrap() {
                            mysql_async::Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
                            mysql_async::Value::Int(v) => v.to_string(),
                            mysql_async::Value::UInt(v) => v.to_string(),
                            other => format!("{other:?}"),
                        })
                        .collect()
                })
                .collect();
            (cols, rows)
        }
    }
}

fn report(host: &str, seq: u64, ip: &str) -> NewReport {
    NewReport {
        host: host.into(),
        seq,
        ban: Ban::new("sshd", "tcp", "22", ip).unwrap(),
        plan: Default::default(),
    }
}

fn ids(c: &[Committed]) -> Vec<u64> {
    c.iter().map(Committed::event_id).collect()
}

async fn commits_in_order_and_recognises_resends(b: Backend) {
    let s = b.open().await;
    let first = s
        .commit(&[
            report("a", 1, "192.0.2.1"),
            report("a", 2, "192.0.2.2"),
            report("b", 1, "192.0.2.3"),
        ])
        .await
        .unwrap();
    assert!(first.iter().all(|c| matches!(c, Committed::New(_))));
    let first_ids = ids(&first);
    assert!(
        first_ids.windows(2).all(|w| w[0] < w[1]),
        "ids increase: {first_ids:?}"
    );

    // A re-send (same host and seq), also repeated within one batch, and
    // across a reopen of the store, is the same event.
    drop(s);
    let s = b.open().await;
    let again = s
        .commit(&[
            report("a", 2, "192.0.2.2"),
            report("a", 3, "192.0.2.4"),
            report("a", 3, "192.0.2.4"),
        ])
        .await
        .unwrap();
    assert_eq!(again[0], Committed::Duplicate(first_ids[1]));
    assert!(matches!(again[1], Committed::New(_)));
    assert_eq!(again[2], Committed::Duplicate(again[1].event_id()));
    assert_eq!(s.last_event_id().await.unwrap(), again[1].event_id());
    // The same seq from another host is another report.
    let other = s.commit(&[report("c", 2, "192.0.2.2")]).await.unwrap();
    assert!(matches!(other[0], Committed::New(_)));
}

async fn replay_skips_own_and_lifted_bans(b: Backend) {
    let s = b.open().await;
    let c = s
        .commit(&[
            report("a", 1, "192.0.2.1"),
            report("b", 1, "192.0.2.2"),
            report("a", 2, "192.0.2.3"),
        ])
        .await
        .unwrap();
    let ids = ids(&c);
    let for_b = s.events_after(0, "b", 100).await.unwrap();
    assert_eq!(
        for_b.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![ids[0], ids[2]]
    );
    assert_eq!(for_b[0].added_by, "a");
    assert_eq!(for_b[0].ban.ip, "192.0.2.1");
    // Paging: after the first, with a limit.
    let page = s.events_after(ids[0], "b", 1).await.unwrap();
    assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), vec![ids[2]]);

    let (unban, lifted) = s
        .unban("192.0.2.1", "admin", false)
        .await
        .unwrap()
        .expect("an active ban");
    assert_eq!(lifted, 1);
    assert_eq!(unban.kind, EventKind::Unban);
    assert_eq!(unban.lifts, ids[0]);
    // The lifted ban never comes back; the unban itself is replayed, also
    // to the host that reported the ban.
    let for_b = s.events_after(0, "b", 100).await.unwrap();
    assert_eq!(
        for_b.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![ids[2], unban.id]
    );
    let for_a = s.events_after(0, "a", 100).await.unwrap();
    assert_eq!(
        for_a.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![ids[1], unban.id]
    );
    // Nothing left to lift.
    assert!(
        s.unban("192.0.2.1", "admin", false)
            .await
            .unwrap()
            .is_none()
    );
}

async fn statuses_are_rows_with_zero_by_default(b: Backend) {
    let s = b.open().await;
    for h in ["a", "b", "c"] {
        s.touch_host(h, None).await.unwrap();
    }
    let c = s.commit(&[report("a", 1, "192.0.2.9")]).await.unwrap();
    let id = c[0].event_id();
    let status_of = |rows: &[store::BanRow], host: &str| {
        rows[0]
            .statuses
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, s)| *s)
    };
    let rows = s
        .list_bans(&BanFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(status_of(&rows, "a"), Some(Status::Added));
    assert_eq!(status_of(&rows, "b"), Some(Status::NotAdded));
    s.set_statuses(&[
        ("b".into(), id, Status::AlreadyBanned),
        ("c".into(), id, Status::Error),
    ])
    .await
    .unwrap();
    s.set_statuses(&[("c".into(), id, Status::Added)])
        .await
        .unwrap();
    let rows = s
        .list_bans(&BanFilter {
            ip: Some("192.0.2.9".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert!(!rows[0].lifted);
    assert_eq!(status_of(&rows, "b"), Some(Status::AlreadyBanned));
    assert_eq!(status_of(&rows, "c"), Some(Status::Added));
    // Filters that match nothing.
    for f in [
        BanFilter {
            ip: Some("192.0.2.10".into()),
            limit: 10,
            ..Default::default()
        },
        BanFilter {
            added_by: Some("b".into()),
            limit: 10,
            ..Default::default()
        },
        BanFilter {
            jail: Some("postfix".into()),
            limit: 10,
            ..Default::default()
        },
        BanFilter {
            after_id: id,
            limit: 10,
            ..Default::default()
        },
    ] {
        assert!(s.list_bans(&f).await.unwrap().is_empty(), "{f:?}");
    }
    let hosts: Vec<String> = s
        .hosts()
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.name)
        .collect();
    assert_eq!(hosts, ["a", "b", "c"]);
}

async fn a_reused_sequence_for_another_ban_is_stored_not_dropped(b: Backend) {
    let s = b.open().await;
    let first = s.commit(&[report("a", 1, "192.0.2.1")]).await.unwrap();
    // The node's outbox was reset: seq 1 again, for another ban.
    let reused = s
        .commit(&[report("a", 1, "192.0.2.2"), report("a", 2, "192.0.2.3")])
        .await
        .unwrap();
    assert!(
        matches!(reused[0], Committed::New(ref e) if e.ban.ip == "192.0.2.2"),
        "{reused:?}"
    );
    assert!(matches!(reused[1], Committed::New(_)));
    assert_ne!(reused[0].event_id(), first[0].event_id());
    // A true re-send of the first is still recognised.
    let again = s.commit(&[report("a", 1, "192.0.2.1")]).await.unwrap();
    assert_eq!(again[0], Committed::Duplicate(first[0].event_id()));
    assert_eq!(s.last_seq("a").await.unwrap(), 2);
    assert_eq!(s.last_seq("nobody").await.unwrap(), 0);
}

fn token(hash: &str, name: Option<&str>, expires_ms: i64, cert_ttl_s: i64) -> NewToken {
    NewToken {
        hash: format!("{hash:0>64}"),
        name: name.map(Into::into),
        expires_ms,
        cert_ttl_s,
    }
}

async fn enrolment_refuses_what_it_must_and_revocation_sticks(b: Backend) {
    let s = b.open().await;
    let now = store::now_ms();
    let later = now + 3_600_000;
    for t in [
        token("1", None, later, 86_400),
        token("2", Some("web-1"), later, 3_600),
        token("3", None, now - 1, 60),
        token("4", None, later, 60),
        token("5", None, later, 60),
    ] {
        s.create_token(&t).await.unwrap();
    }
    let hash = |h: &str| format!("{h:0>64}");
    // A duplicate token hash is an error, not a silent overwrite.
    assert!(
        s.create_token(&token("1", None, later, 1)).await.is_err(),
        "a token hash is stored once"
    );
    assert_eq!(
        s.enroll(&hash("9"), "mail").await.unwrap(),
        Err(EnrollRefused::UnknownToken)
    );
    assert_eq!(
        s.enroll(&hash("3"), "mail").await.unwrap(),
        Err(EnrollRefused::ExpiredToken)
    );
    assert_eq!(
        s.enroll(&hash("2"), "mail").await.unwrap(),
        Err(EnrollRefused::OtherName("web-1".into()))
    );
    // A refusal spends nothing: the bound token still enrols its host.
    assert_eq!(
        s.enroll(&hash("2"), "web-1").await.unwrap(),
        Ok(Enrolled { cert_ttl_s: 3_600 })
    );
    assert_eq!(
        s.enroll(&hash("1"), "mail").await.unwrap(),
        Ok(Enrolled { cert_ttl_s: 86_400 })
    );
    assert_eq!(
        s.enroll(&hash("1"), "db").await.unwrap(),
        Err(EnrollRefused::UsedToken)
    );
    assert_eq!(
        s.enroll(&hash("4"), "mail").await.unwrap(),
        Err(EnrollRefused::NameTaken("mail".into()))
    );
    // A host that only connected (no enrolment) also holds its name.
    s.touch_host("db", Some(later)).await.unwrap();
    assert_eq!(
        s.enroll(&hash("4"), "db").await.unwrap(),
        Err(EnrollRefused::NameTaken("db".into()))
    );

    assert!(s.revoked().await.unwrap().is_empty());
    let mail = Revocation {
        host: Some("mail".into()),
        admin: false,
    };
    assert_eq!(s.revoke("mail", "ops").await.unwrap(), mail);
    assert_eq!(
        s.revoke("MAIL", "ops").await.unwrap(),
        mail,
        "revoking twice, in another case, still finds it"
    );
    assert_eq!(
        s.revoke("nobody", "ops").await.unwrap(),
        Revocation::default()
    );
    assert_eq!(s.revoked().await.unwrap(), ["mail", "nobody"]);
    assert_eq!(
        s.enroll(&hash("5"), "mail").await.unwrap(),
        Err(EnrollRefused::NameRevoked("mail".into()))
    );
    // Token 5 was not spent by that refusal.
    assert_eq!(
        s.enroll(&hash("5"), "cache").await.unwrap(),
        Ok(Enrolled { cert_ttl_s: 60 })
    );

    // A name revoked before anything connected under it cannot enrol.
    s.create_token(&token("6", None, later, 60)).await.unwrap();
    assert_eq!(
        s.enroll(&hash("6"), "Nobody").await.unwrap(),
        Err(EnrollRefused::NameRevoked("Nobody".into()))
    );

    // Revocation and enrolment survive a reopen.
    drop(s);
    let s = b.open().await;
    assert_eq!(s.revoked().await.unwrap(), ["mail", "nobody"]);
    let hosts = s.hosts().await.unwrap();
    let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["cache", "db", "mail", "web-1"], "sorted by name");
    let host = |n: &str| hosts.iter().find(|h| h.name == n).unwrap();
    assert!(host("mail").revoked && !host("web-1").revoked);
    assert!(host("mail").enrolled_ms.is_some_and(|t| t >= now));
    assert_eq!(host("db").enrolled_ms, None, "touched, never enrolled");
    assert_eq!(host("db").cert_expires_ms, Some(later));
    assert_eq!(host("mail").cert_expires_ms, None);
    assert!(host("db").first_seen_ms >= now && host("db").last_seen_ms >= host("db").first_seen_ms);

    // touch_host keeps a known expiry when told none, and moves last_seen.
    let before = host("db").last_seen_ms;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    s.touch_host("db", None).await.unwrap();
    let db = s
        .hosts()
        .await
        .unwrap()
        .into_iter()
        .find(|h| h.name == "db")
        .unwrap();
    assert_eq!(db.cert_expires_ms, Some(later));
    assert!(db.last_seen_ms > before);
    s.touch_host("db", Some(later + 1)).await.unwrap();
    let db = s
        .hosts()
        .await
        .unwrap()
        .into_iter()
        .find(|h| h.name == "db")
        .unwrap();
    assert_eq!(db.cert_expires_ms, Some(later + 1));
    assert_eq!(s.counts().await.unwrap().0, 4);

    // The lifetime each host enrolled with, for `Renew`; none for a host
    // that only connected.
    assert_eq!(s.cert_ttl("web-1").await.unwrap(), Some(3_600));
    assert_eq!(s.cert_ttl("CACHE").await.unwrap(), Some(60));
    assert_eq!(s.cert_ttl("db").await.unwrap(), None);
}

/// Hosts and admins are one namespace, compared case-insensitively on
/// both backends (MySQL's collation and SQLite's alike).
async fn names_are_one_case_insensitive_namespace(b: Backend) {
    let s = b.open().await;
    let later = store::now_ms() + 3_600_000;
    for t in ["1", "2", "3", "4"] {
        s.create_token(&token(t, None, later, 600)).await.unwrap();
    }
    let hash = |h: &str| format!("{h:0>64}");
    // An admin's name, once it has called, is refused to hosts in any case.
    s.record_admin("Ops").await.unwrap();
    s.record_admin("ops").await.unwrap();
    for name in ["ops", "OPS"] {
        assert_eq!(
            s.enroll(&hash("1"), name).await.unwrap(),
            Err(EnrollRefused::AdminName(name.into()))
        );
    }
    // A host is the same host in any case: one row, one id.
    s.touch_host("web-1", None).await.unwrap();
    s.touch_host("WEB-1", None).await.unwrap();
    let c = s
        .commit(&[
            report("web-1", 1, "192.0.2.1"),
            report("Web-1", 1, "192.0.2.1"),
        ])
        .await
        .unwrap();
    assert_eq!(c[1], Committed::Duplicate(c[0].event_id()), "one reporter");
    assert_eq!(s.last_seq("WEB-1").await.unwrap(), 1);
    assert_eq!(
        s.enroll(&hash("1"), "Web-1").await.unwrap(),
        Err(EnrollRefused::NameTaken("Web-1".into()))
    );
    let hosts = s.hosts().await.unwrap();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].name, "web-1", "stored as it first connected");
    // Revoking in another case finds the host, and says whose name it was.
    assert_eq!(
        s.revoke("WEB-1", "ops").await.unwrap(),
        Revocation {
            host: Some("web-1".into()),
            admin: false
        }
    );
    assert!(s.hosts().await.unwrap()[0].revoked);
    assert_eq!(
        s.revoke("OPS", "root").await.unwrap(),
        Revocation {
            host: None,
            admin: true
        }
    );
    assert_eq!(s.revoked().await.unwrap(), ["ops", "web-1"]);
    // The tokens were spent on none of the refusals.
    assert_eq!(
        s.enroll(&hash("1"), "mail").await.unwrap(),
        Ok(Enrolled { cert_ttl_s: 600 })
    );
    // A token bound to a name takes it in any case.
    s.create_token(&token("5", Some("db-1"), later, 60))
        .await
        .unwrap();
    assert_eq!(
        s.enroll(&hash("5"), "DB-1").await.unwrap(),
        Ok(Enrolled { cert_ttl_s: 60 })
    );
}

/// MySQL limits a column name to 64 characters and compares column names
/// case-insensitively: the view's columns obey both, and a view that
/// cannot be rebuilt fails nothing.
async fn the_view_takes_any_host_names(b: Backend) {
    let s = b.open().await;
    let long = format!("{}.example", "x".repeat(70));
    for h in ["web-1", "WEB1", long.as_str(), "db"] {
        s.touch_host(h, None).await.unwrap();
    }
    let (cols, _) = b.ip_table().await;
    assert_eq!(cols.len(), 7 + 4, "{cols:?}");
    assert_eq!(cols[7], "host_web1");
    assert_eq!(cols[10], "host_db");
    assert!(cols.iter().all(|c| c.len() <= 64), "{cols:?}");
    let mut lower: Vec<String> = cols.iter().map(|c| c.to_lowercase()).collect();
    lower.sort();
    lower.dedup();
    assert_eq!(lower.len(), cols.len(), "{cols:?}");
    drop(s);
    let s = b.open().await;
    assert_eq!(
        b.ip_table().await.0,
        cols,
        "the same columns after a reopen"
    );
    drop(s);

    // A table squatting on the view's name: open, enrol and first calls
    // all still work; the view is simply not rebuilt.
    b.sql("DROP VIEW ip_table").await;
    b.sql("CREATE TABLE ip_table (id INTEGER)").await;
    let s = b.open().await;
    s.touch_host("new-1", None).await.unwrap();
    s.create_token(&token("1", None, store::now_ms() + 60_000, 60))
        .await
        .unwrap();
    assert_eq!(
        s.enroll(&format!("{:0>64}", "1"), "new-2").await.unwrap(),
        Ok(Enrolled { cert_ttl_s: 60 })
    );
    assert_eq!(s.hosts().await.unwrap().len(), 6);
}

async fn list_bans_filters_and_the_ip_table_view(b: Backend) {
    let s = b.open().await;
    assert_eq!(s.last_event_id().await.unwrap(), 0, "empty store");
    assert_eq!(s.counts().await.unwrap(), (0, 0, 0));
    for h in ["web-1", "mail.example", "db"] {
        s.touch_host(h, None).await.unwrap();
    }
    let t0 = store::now_ms();
    let mut postfix = report("mail.example", 1, "198.51.100.7");
    postfix.ban = Ban::new("postfix", "tcp", "25", "198.51.100.7").unwrap();
    let c = s
        .commit(&[
            report("web-1", 1, "192.0.2.1"),
            postfix,
            report("web-1", 2, "192.0.2.2"),
        ])
        .await
        .unwrap();
    let ids = ids(&c);
    s.set_statuses(&[("db".into(), ids[0], Status::Error)])
        .await
        .unwrap();
    let all = |f: BanFilter| {
        let s = s.clone();
        async move {
            s.list_bans(&BanFilter { limit: 100, ..f })
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.event.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(all(BanFilter::default()).await, ids);
    assert_eq!(
        all(BanFilter {
            added_by: Some("web-1".into()),
            ..Default::default()
        })
        .await,
        [ids[0], ids[2]]
    );
    assert_eq!(
        all(BanFilter {
            jail: Some("postfix".into()),
            ..Default::default()
        })
        .await,
        [ids[1]]
    );
    assert_eq!(
        all(BanFilter {
            since_ms: Some(t0),
            after_id: ids[0],
            ..Default::default()
        })
        .await,
        [ids[1], ids[2]]
    );
    assert!(
        all(BanFilter {
            since_ms: Some(store::now_ms() + 60_000),
            ..Default::default()
        })
        .await
        .is_empty()
    );
    let page = s
        .list_bans(&BanFilter {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 2);
    let row = &page[1];
    assert_eq!(row.event.ban.jail, "postfix");
    assert_eq!(row.event.ban.port, "25");
    assert_eq!(row.event.added_by, "mail.example");
    assert_eq!(row.event.kind, EventKind::Ban);
    assert!(row.event.created_ms >= t0);
    assert_eq!(
        row.statuses,
        [
            ("db".to_string(), Status::NotAdded),
            ("mail.example".to_string(), Status::Added),
            ("web-1".to_string(), Status::NotAdded),
        ],
        "every host, sorted, the reporter's implied 1"
    );

    // An unban shows as lifted, is not a ban row itself, and counts.
    let (unban, n) = s.unban("192.0.2.1", "admin", false).await.unwrap().unwrap();
    assert_eq!(n, 1);
    assert_eq!(unban.added_by, "admin");
    assert_eq!(unban.ban.jail, "sshd");
    assert_eq!(s.last_event_id().await.unwrap(), unban.id);
    let rows = s
        .list_bans(&BanFilter {
            ip: Some("192.0.2.1".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].lifted);
    assert_eq!(s.counts().await.unwrap(), (3, 4, 1));

    // The seed's shape: one host_<name> column per host (dots and
    // hyphens removed), bans only, statuses with the implied defaults.
    let (cols, rows) = b.ip_table().await;
    assert_eq!(
        cols,
        [
            "id",
            "added_by",
            "created",
            "jailname",
            "protocol",
            "port",
            "ip",
            "host_web1",
            "host_mailexample",
            "host_db"
        ]
    );
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[0][0], ids[0].to_string());
    assert_eq!(&rows[0][1..2], ["web-1"]);
    assert_eq!(
        &rows[0][3..],
        ["sshd", "tcp", "22", "192.0.2.1", "1", "0", "3"]
    );
    assert_eq!(&rows[1][7..], ["0", "1", "0"]);
    // A host that appears later gets its column at once.
    s.touch_host("new-host", None).await.unwrap();
    let (cols, _) = b.ip_table().await;
    assert_eq!(cols.last().map(String::as_str), Some("host_newhost"));
}

async fn a_newer_schema_is_refused_and_the_same_one_reopens(b: Backend) {
    let s = b.open().await;
    s.commit(&[report("a", 1, "192.0.2.1")]).await.unwrap();
    drop(s);
    // Reopening at the same version keeps the data.
    let s = b.open().await;
    assert_eq!(s.counts().await.unwrap(), (1, 1, 0));
    drop(s);
    b.sql(&format!(
        "UPDATE banmesh_meta SET v = {} WHERE k = 'schema_version'",
        store::SCHEMA_VERSION + 1
    ))
    .await;
    match store::open(&b.url).await {
        Err(e @ store::StoreError::NewerSchema { found }) => {
            assert_eq!(found, store::SCHEMA_VERSION + 1);
            assert!(e.to_string().contains("upgrade banmesh"), "{e}");
        }
        Err(e) => panic!("wrong refusal: {e}"),
        Ok(_) => panic!("a newer schema was opened"),
    }
}

/// The seed's shape stops at `MAX_VIEW_HOSTS` columns (the first hosts by
/// id); later hosts are stored and listed, just not given a column.
async fn the_view_stops_at_its_host_limit(b: Backend) {
    let s = b.open().await;
    let n = store::MAX_VIEW_HOSTS as u64 + 1;
    let hosts: Vec<store::RawHost> = (1..=n)
        .map(|id| store::RawHost {
            id,
            name: format!("h{id}"),
            first_seen_ms: 1,
            last_seen_ms: 1,
        })
        .collect();
    s.load(&hosts, &[], &[]).await.unwrap();
    s.touch_host("late", None).await.unwrap();
    let (cols, _) = b.ip_table().await;
    assert_eq!(cols.len(), 7 + store::MAX_VIEW_HOSTS);
    assert_eq!(cols[7], "host_h1");
    assert_eq!(cols.last().unwrap(), &format!("host_h{}", n - 1));
    assert_eq!(s.hosts().await.unwrap().len() as u64, n + 1);
}

/// Which hub each host is subscribed through: written when a stream
/// opens, cleared when it ends unless a newer subscription (through this
/// hub or another) claimed the host since, and cleared wholesale for a hub
/// that starts again.
async fn hosts_record_the_hub_they_are_on(b: Backend) {
    let s = b.open().await;
    s.touch_host("web-1", None).await.unwrap();
    let hub_of = |rows: Vec<store::HostRow>, name: &str| {
        let h = rows.into_iter().find(|h| h.name == name).unwrap();
        (h.hub, h.hub_since_ms)
    };
    assert_eq!(hub_of(s.hosts().await.unwrap(), "web-1"), (None, None));
    s.subscribed_via("web-1", "hub1", 1_000).await.unwrap();
    // A host's first call may be its subscription: its row is made.
    s.subscribed_via("WEB-2", "hub2", 2_000).await.unwrap();
    let rows = s.hosts().await.unwrap();
    assert_eq!(
        hub_of(rows.clone(), "web-1"),
        (Some("hub1".into()), Some(1_000))
    );
    assert_eq!(hub_of(rows, "WEB-2"), (Some("hub2".into()), Some(2_000)));
    // Each claim comes with when its hub last said it is alive.
    let seen_of = |rows: Vec<store::HostRow>, name: &str| {
        rows.into_iter()
            .find(|h| h.name == name)
            .unwrap()
            .hub_seen_ms
    };
    assert_eq!(seen_of(s.hosts().await.unwrap(), "web-1"), None, "never");
    s.hub_seen("hub1", 5_000).await.unwrap();
    s.hub_seen("hub1", 7_000).await.unwrap();
    let rows = s.hosts().await.unwrap();
    assert_eq!(seen_of(rows.clone(), "web-1"), Some(7_000), "the latest");
    assert_eq!(seen_of(rows, "WEB-2"), None, "hub2 never did");

    // web-1 moves to hub2 before hub1 sees its old stream end: hub1's
    // clearing leaves hub2's claim.
    s.subscribed_via("web-1", "hub2", 3_000).await.unwrap();
    assert!(!s.unsubscribed_via("web-1", "hub1", 1_000).await.unwrap());
    // An older stream of the same hub ending leaves the newer one's claim.
    assert!(!s.unsubscribed_via("web-1", "hub2", 2_500).await.unwrap());
    assert_eq!(
        hub_of(s.hosts().await.unwrap(), "web-1"),
        (Some("hub2".into()), Some(3_000))
    );
    // A clean end clears its own claim (the name in any letter case).
    assert!(s.unsubscribed_via("web-2", "hub2", 2_000).await.unwrap());
    assert_eq!(hub_of(s.hosts().await.unwrap(), "WEB-2"), (None, None));
    // hub1 restarting clears nothing of hub2's; hub2 restarting clears
    // what its killed run left.
    assert_eq!(s.release_hub("hub1").await.unwrap(), 0);
    assert_eq!(s.release_hub("hub2").await.unwrap(), 1);
    assert_eq!(hub_of(s.hosts().await.unwrap(), "web-1"), (None, None));
}

/// Every row moves between backends as it is, ids and statuses included,
/// and a second load changes nothing.
async fn dump_and_load_round_trip(from: Backend, to: Backend) {
    let src = from.open().await;
    for h in ["a", "b"] {
        src.touch_host(h, None).await.unwrap();
    }
    let c = src
        .commit(&[report("a", 1, "192.0.2.1"), report("b", 7, "192.0.2.2")])
        .await
        .unwrap();
    src.set_statuses(&[("b".into(), c[0].event_id(), Status::AlreadyBanned)])
        .await
        .unwrap();
    src.unban("192.0.2.2", "admin", false)
        .await
        .unwrap()
        .unwrap();
    src.revoke("B", "ops").await.unwrap();
    src.revoke("never-seen", "ops").await.unwrap();
    src.record_admin("ops").await.unwrap();
    src.create_token(&token("1", None, store::now_ms() + 60_000, 3_600))
        .await
        .unwrap();
    src.enroll(&format!("{:0>64}", "1"), "c")
        .await
        .unwrap()
        .unwrap();
    // A host revoked by an earlier build: only its row is flagged.
    src.touch_host("old", None).await.unwrap();
    from.sql("UPDATE hosts SET revoked_ms = 5 WHERE name = 'old'")
        .await;
    let names = src.dump_names().await.unwrap();
    assert_eq!(names.revoked.len(), 4, "{names:?}");
    assert_eq!(names.admins, [("ops".to_string(), names.admins[0].1)]);
    assert_eq!(names.lifetimes, [("c".to_string(), 3_600)]);

    let hosts = src.dump_hosts().await.unwrap();
    let events = src.dump_events(0, 100).await.unwrap();
    let statuses = src.dump_statuses(0, 100).await.unwrap();
    assert_eq!(hosts.len(), 4);
    assert_eq!(events.len(), 3);
    assert_eq!(statuses.len(), 1);
    assert_eq!(events[1].node_seq, Some(7));
    assert_eq!(events[2].kind, 2);
    assert_eq!(events[2].lifts, Some(events[1].id));
    assert_eq!(events[1].lifted_by, Some(events[2].id));
    assert_eq!(events[2].node_seq, None);
    // Paging.
    assert_eq!(
        src.dump_events(events[0].id, 1).await.unwrap(),
        events[1..2]
    );
    assert!(
        src.dump_statuses(statuses[0].event_id, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let dst = to.open().await;
    dst.load(&hosts, &events, &statuses).await.unwrap();
    dst.load(&hosts, &events, &statuses).await.unwrap();
    dst.load_names(&names).await.unwrap();
    dst.load_names(&names).await.unwrap();
    assert_eq!(
        dst.revoked().await.unwrap(),
        ["b", "never-seen", "old"],
        "no revocation is lost"
    );
    let carried = dst.dump_names().await.unwrap();
    assert_eq!(
        (carried.admins, carried.lifetimes),
        (names.admins, names.lifetimes)
    );
    assert_eq!(dst.cert_ttl("C").await.unwrap(), Some(3_600));
    assert_eq!(dst.dump_hosts().await.unwrap(), hosts);
    assert_eq!(dst.dump_events(0, 100).await.unwrap(), events);
    assert_eq!(dst.dump_statuses(0, 100).await.unwrap(), statuses);
    assert_eq!(dst.counts().await.unwrap(), (4, 3, 1));
    assert_eq!(dst.last_event_id().await.unwrap(), events[2].id);
    assert_eq!(dst.last_seq("b").await.unwrap(), 7);
    assert_eq!(
        dst.events_after(0, "b", 10).await.unwrap(),
        src.events_after(0, "b", 10).await.unwrap()
    );
    // The loaded hosts are known: a re-send is recognised, and new ids
    // continue after the loaded ones.
    let again = dst
        .commit(&[report("a", 1, "192.0.2.1"), report("a", 2, "192.0.2.3")])
        .await
        .unwrap();
    assert_eq!(again[0], Committed::Duplicate(events[0].id));
    assert!(again[1].event_id() > events[2].id);
    let (cols, rows) = to.ip_table().await;
    assert_eq!(&cols[7..], ["host_a", "host_b", "host_c", "host_old"]);
    assert_eq!(&rows[0][7..], ["1", "2", "0", "0"]);

    // The ladder's rows move too: terms, coalesced reports, forget markers.
    let src_last = src.last_event_id().await.unwrap();
    let ends = store::now_ms() + 60_000;
    let c = src
        .commit(&[
            planned("a", 9, "192.0.2.50", term(3, ends)),
            planned("b", 9, "192.0.2.50", Plan::CoalesceWith(0)),
        ])
        .await
        .unwrap();
    src.unban("192.0.2.51", "admin", true).await.unwrap();
    let more = src.dump_events(src_last, 100).await.unwrap();
    assert_eq!(more.len(), 2);
    assert_eq!((more[0].rung, more[0].ends_ms), (Some(3), Some(ends)));
    assert_eq!((more[1].kind, more[1].extends), (5, Some(c[0].event_id())));
    // Load into a fresh store, as `hub migrate` does.
    let fresh = Backend::sqlite().await;
    let f = fresh.open().await;
    f.load(
        &src.dump_hosts().await.unwrap(),
        &src.dump_events(0, 100).await.unwrap(),
        &[],
    )
    .await
    .unwrap();
    f.load_names(&src.dump_names().await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        f.dump_events(0, 100).await.unwrap(),
        src.dump_events(0, 100).await.unwrap()
    );
    assert_eq!(f.dump_names().await.unwrap().forgotten.len(), 1);
    let resend = f.commit(&[report("b", 9, "192.0.2.50")]).await.unwrap();
    assert_eq!(resend[0], Committed::Duplicate(c[0].event_id()));
}

#[tokio::test(flavor = "multi_thread")]
async fn dump_and_load_sqlite_to_mariadb() {
    dump_and_load_round_trip(Backend::sqlite().await, Backend::mysql().await).await
}

#[tokio::test(flavor = "multi_thread")]
async fn dump_and_load_mariadb_to_sqlite() {
    dump_and_load_round_trip(Backend::mysql().await, Backend::sqlite().await).await
}

/// `hub migrate` onto Galera, and off it.
#[tokio::test(flavor = "multi_thread")]
async fn dump_and_load_sqlite_to_galera_and_back() {
    dump_and_load_round_trip(Backend::sqlite().await, Backend::galera().await).await;
    dump_and_load_round_trip(Backend::galera().await, Backend::sqlite().await).await
}

fn allow(net: &str) -> AllowRow {
    AllowRow {
        network: net.parse().unwrap(),
        note: "office NAT".into(),
        added_by: "admin".into(),
        added_ms: 1_700_000_000_000,
    }
}

async fn the_allow_list_lifts_what_it_covers_and_travels_as_events(b: Backend) {
    let s = b.open().await;
    let c = s
        .commit(&[
            report("a", 1, "198.51.100.7"),
            report("b", 1, "198.51.100.7"),
            report("a", 2, "198.51.100.200"),
            report("a", 3, "198.51.101.1"),
            report("a", 4, "2001:db8:1::5"),
        ])
        .await
        .unwrap();
    let ids = ids(&c);
    let added = s
        .allow_add(&allow("198.51.100.0/24"))
        .await
        .unwrap()
        .expect("a new entry");
    assert_eq!(added.event.kind, EventKind::AllowAdd);
    assert_eq!(
        added.event.network(),
        Some("198.51.100.0/24".parse().unwrap())
    );
    // One unban per address inside, after the allow-add; three bans lifted.
    assert_eq!(added.lifted, 3);
    let lifted: Vec<(&str, u64)> = added
        .unbans
        .iter()
        .map(|e| (e.ban.ip.as_str(), e.lifts))
        .collect();
    assert_eq!(
        lifted,
        vec![("198.51.100.200", ids[2]), ("198.51.100.7", ids[1])]
    );
    assert!(
        added
            .unbans
            .iter()
            .all(|e| e.id > added.event.id && e.kind == EventKind::Unban)
    );
    // The same network again writes nothing.
    assert!(
        s.allow_add(&allow("198.51.100.0/24"))
            .await
            .unwrap()
            .is_none()
    );
    let v6 = s.allow_add(&allow("2001:db8::/32")).await.unwrap().unwrap();
    assert_eq!(v6.lifted, 1);
    // Every host, the reporter of nothing and of everything, replays the
    // allow-list events; lifted bans are gone, the one outside stays.
    for host in ["a", "b", "admin"] {
        let replay = s.events_after(0, host, 100).await.unwrap();
        let kinds: Vec<EventKind> = replay.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == EventKind::AllowAdd).count(),
            2,
            "{host}"
        );
        assert!(
            replay
                .iter()
                .all(|e| e.kind != EventKind::Ban || e.ban.ip == "198.51.101.1")
        );
    }
    let entries = s.allow_entries().await.unwrap();
    assert_eq!(
        entries,
        vec![allow("198.51.100.0/24"), allow("2001:db8::/32")]
    );
    // Remove: an event, and the entry is gone; twice is `None`.
    let removed = s
        .allow_remove(&"2001:db8::/32".parse().unwrap(), "admin")
        .await
        .unwrap()
        .expect("listed");
    assert_eq!(removed.kind, EventKind::AllowRemove);
    assert!(removed.id > v6.unbans[0].id);
    assert!(
        s.allow_remove(&"2001:db8::/32".parse().unwrap(), "admin")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(s.allow_entries().await.unwrap().len(), 1);
    // Listing bans shows bans only, never allow-list events.
    let bans = s
        .list_bans(&BanFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(bans.iter().all(|b| b.event.kind == EventKind::Ban));
    assert_eq!(bans.iter().filter(|b| !b.lifted).count(), 1);
}

async fn the_allow_list_loads_into_another_store(b: Backend) {
    let src = b.open().await;
    src.allow_add(&allow("198.51.100.0/24"))
        .await
        .unwrap()
        .unwrap();
    src.allow_add(&allow("2001:db8::/32"))
        .await
        .unwrap()
        .unwrap();
    let rows = src.allow_entries().await.unwrap();
    let to = Backend::sqlite().await;
    let dst = to.open().await;
    dst.load_allow(&rows).await.unwrap();
    dst.load_allow(&rows).await.unwrap();
    assert_eq!(dst.allow_entries().await.unwrap(), rows);
}

async fn refused_reports_are_stored_once(b: Backend) {
    let s = b.open().await;
    let r = report("web-1", 9, "198.51.100.7");
    s.refuse(&[(r.clone(), "198.51.100.0/24".into())])
        .await
        .unwrap();
    // A re-send of the same (host, seq) is not stored twice.
    s.refuse(&[(r.clone(), "198.51.100.0/24".into())])
        .await
        .unwrap();
    s.refuse(&[(
        report("web-2", 1, "127.0.0.1"),
        "127.0.0.0/8 (built-in: loopback)".into(),
    )])
    .await
    .unwrap();
    let rows = s.refused(0, 100).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0].host.as_str(), rows[0].seq), ("web-1", 9));
    assert_eq!(rows[0].ban, r.ban);
    assert_eq!(rows[0].allowed_by, "198.51.100.0/24");
    assert!(rows[0].created_ms > 0);
    assert_eq!(s.refused(rows[0].id, 100).await.unwrap().len(), 1);
    // Nothing refused became an event.
    assert_eq!(s.last_event_id().await.unwrap(), 0);
}

/// The fleet's own addresses outlive the hub: a restarted hub reads them
/// back before it takes a report, and the first owner of an address stays.
async fn fleet_addresses_are_kept(b: Backend) {
    let s = b.open().await;
    assert!(s.fleet_addresses().await.unwrap().is_empty());
    s.note_fleet_address("198.51.100.7", "web-1").await.unwrap();
    s.note_fleet_address("2001:db8::7", "hub").await.unwrap();
    // Noted again (the same host reconnecting, or another claiming it).
    s.note_fleet_address("198.51.100.7", "web-2").await.unwrap();
    drop(s);
    let s = b.open().await;
    assert_eq!(
        s.fleet_addresses().await.unwrap(),
        [
            ("198.51.100.7".to_string(), "web-1".to_string()),
            ("2001:db8::7".to_string(), "hub".to_string()),
        ]
    );
}

fn planned(host: &str, seq: u64, ip: &str, plan: Plan) -> NewReport {
    NewReport {
        plan,
        ..report(host, seq, ip)
    }
}

fn term(rung: u32, ends_ms: i64) -> Plan {
    Plan::New(BanTerm {
        ends_ms,
        rung,
        ..Default::default()
    })
}

fn ban_of(s: &[store::BanRow], ip: &str) -> Vec<store::BanRow> {
    s.iter().filter(|b| b.event.ban.ip == ip).cloned().collect()
}

/// A ban's term is stored and read back; reports coalesced into it are
/// recorded (not events), listed as its reporters, and recognised when
/// re-sent, whichever way their first copy was stored.
async fn terms_and_coalesced_reports(b: Backend) {
    let s = b.open().await;
    let now = store::now_ms();
    let ends = now + 3_600_000;
    let x = "198.51.100.7";
    let out = s
        .commit(&[
            planned("a", 1, x, term(2, ends)),
            planned("b", 1, x, Plan::CoalesceWith(0)),
            report("a", 2, "198.51.100.8"),
        ])
        .await
        .unwrap();
    let Committed::New(ban) = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!((ban.term.rung, ban.term.ends_ms), (2, ends));
    assert!(
        matches!(out[1], Committed::Coalesced { event_id, .. } if event_id == ban.id),
        "{out:?}"
    );
    assert!(matches!(out[2], Committed::New(_)));
    // Re-sends: of the ban's report planned as a coalesce, of the coalesced
    // one planned as a new ban: each answers its first outcome.
    let again = s
        .commit(&[
            planned("a", 1, x, Plan::Coalesce(ban.id)),
            planned("b", 1, x, term(1, ends)),
            planned("c", 1, x, Plan::Coalesce(ban.id)),
            planned("c", 2, x, Plan::Coalesce(ban.id)),
        ])
        .await
        .unwrap();
    assert_eq!(again[0], Committed::Duplicate(ban.id));
    assert_eq!(again[1], Committed::Duplicate(ban.id));
    assert!(matches!(again[2], Committed::Coalesced { event_id, .. } if event_id == ban.id));
    assert!(matches!(again[3], Committed::Coalesced { event_id, .. } if event_id == ban.id));
    // One ban of x, its reporters: its own first, then by first report.
    let rows = s
        .list_bans(&BanFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let xs = ban_of(&rows, x);
    assert_eq!(xs.len(), 1, "{xs:?}");
    assert_eq!(xs[0].event.term.rung, 2);
    assert_eq!(xs[0].event.term.ends_ms, ends);
    let who: Vec<(String, u32)> = xs[0]
        .reporters
        .iter()
        .map(|r| (r.host.clone(), r.count))
        .collect();
    assert_eq!(who, [("a".into(), 1), ("b".into(), 1), ("c".into(), 2)]);
    assert!(
        xs[0]
            .reporters
            .iter()
            .all(|r| r.jail == "sshd" && r.first_ms <= r.last_ms)
    );
    assert!(!xs[0].forgotten);
    // Replay: the ban with a fleet end reaches its reporter too; the one
    // without (no term) does not; coalesced reports are no events.
    let to_a: Vec<u64> = s
        .events_after(0, "a", 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(to_a, [ban.id]);
    let to_b = s.events_after(0, "b", 100).await.unwrap();
    assert_eq!(to_b.len(), 2);
    assert_eq!(to_b[0].term.ends_ms, ends);
    // A ban whose fleet end has passed is not replayed.
    let ended = s
        .commit(&[planned("a", 3, "198.51.100.9", term(1, now - 1))])
        .await
        .unwrap();
    let ids: Vec<u64> = s
        .events_after(0, "b", 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert!(!ids.contains(&ended[0].event_id()), "{ids:?}");
}

/// What the ladder reads before a batch: stored re-sends, each address's
/// latest ban with its term, lifted and forgotten.
async fn ladder_facts_and_forget(b: Backend) {
    let s = b.open().await;
    let now = store::now_ms();
    let x = "203.0.113.5";
    let first = s
        .commit(&[planned("a", 1, x, term(1, now + 60_000))])
        .await
        .unwrap();
    let batch = [
        report("a", 1, x),
        report("b", 1, x),
        report("b", 2, "203.0.113.6"),
    ];
    let facts = s.ladder_facts(&batch).await.unwrap();
    assert_eq!(facts.known.len(), 1);
    assert_eq!(facts.known[&("a".to_string(), 1)].0, first[0].event_id());
    let (id, past) = facts.latest[x];
    assert_eq!(id, first[0].event_id());
    assert_eq!(
        (past.rung, past.ends_ms, past.lifted, past.forgotten),
        (1, now + 60_000, false, false)
    );
    assert!(!facts.latest.contains_key("203.0.113.6"));
    let ladder = Ladder::default();
    assert_eq!(ladder.decide(Some(&past), now), Decision::Coalesce);

    // A plain unban lifts it and keeps it in the history.
    s.unban(x, "admin", false).await.unwrap().unwrap();
    let (_, past) = s.ladder_facts(&batch).await.unwrap().latest[x];
    assert!(past.lifted && !past.forgotten);
    assert!(matches!(
        ladder.decide(Some(&past), now),
        Decision::New { rung: 2, .. }
    ));
    // --forget with nothing active still clears the history.
    assert!(s.unban(x, "admin", true).await.unwrap().is_none());
    let (_, past) = s.ladder_facts(&batch).await.unwrap().latest[x];
    assert!(past.forgotten);
    assert!(matches!(
        ladder.decide(Some(&past), now),
        Decision::New { rung: 1, .. }
    ));
    let listed = s
        .list_bans(&BanFilter {
            ip: Some(x.into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(listed[0].forgotten && listed[0].lifted);
    // A ban after the forget counts again.
    let next = s
        .commit(&[planned("b", 3, x, term(1, now + 60_000))])
        .await
        .unwrap();
    let (id, past) = s.ladder_facts(&batch).await.unwrap().latest[x];
    assert_eq!(id, next[0].event_id());
    assert!(!past.forgotten);
    // Forgetting while a ban is active lifts it and forgets it together.
    let (_, n) = s.unban(x, "admin", true).await.unwrap().unwrap();
    assert_eq!(n, 1);
    let (_, past) = s.ladder_facts(&batch).await.unwrap().latest[x];
    assert!(past.forgotten && past.lifted);
    // The forget marker moves with `hub migrate`.
    assert_eq!(s.dump_names().await.unwrap().forgotten.len(), 1);
}

/// A store written before the ladder (schema 1: no term columns, no
/// `forgotten` table) opens with this build: its columns are added, its
/// bans read as rung 1 with no fleet end, and the next ban of one of its
/// addresses climbs from there.
async fn a_store_from_before_the_ladder_is_upgraded(b: Backend) {
    let s = b.open().await;
    s.touch_host("old-host", None).await.unwrap();
    drop(s);
    // Schema 1 exactly: the columns, index and table the ladder added,
    // removed (SQLite refuses to drop an indexed column).
    b.sql(if b.url.starts_with("sqlite:") {
        "DROP INDEX events_extends"
    } else {
        "DROP INDEX extends ON events"
    })
    .await;
    for stmt in [
        "ALTER TABLE events DROP COLUMN ends_ms",
        "ALTER TABLE events DROP COLUMN rung",
        "ALTER TABLE events DROP COLUMN extends",
        "ALTER TABLE events DROP COLUMN reason",
        "ALTER TABLE hosts DROP COLUMN hub",
        "ALTER TABLE hosts DROP COLUMN hub_since_ms",
        "DROP TABLE hubs",
        "DROP TABLE forgotten",
        "UPDATE banmesh_meta SET v = 1 WHERE k = 'schema_version'",
    ] {
        b.sql(stmt).await;
    }
    let now = store::now_ms();
    // The host's id as stored (not 1 on Galera, which spaces auto-increment
    // ids by the cluster's size).
    b.sql(&format!(
        "INSERT INTO events (kind, reporter_id, node_seq, added_by, created_ms, jailname, \
         protocol, port, ip) SELECT 1, id, 7, 'old-host', {}, 'sshd', 'tcp', '22', '192.0.2.77' \
         FROM hosts WHERE name = 'old-host'",
        now - 3_600_000
    ))
    .await;
    let s = b.open().await;
    let rows = s
        .list_bans(&BanFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].event.term,
        BanTerm::default(),
        "no term: stored before the ladder"
    );
    assert_eq!(rows[0].reporters[0].host, "old-host");
    // Schema 3's columns: the old host is on no hub, and can be.
    let hosts = s.hosts().await.unwrap();
    assert_eq!((hosts[0].hub.clone(), hosts[0].hub_since_ms), (None, None));
    s.subscribed_via("old-host", "hub1", now).await.unwrap();
    assert_eq!(
        s.hosts().await.unwrap()[0].hub.as_deref(),
        Some("hub1"),
        "the added columns are written and read"
    );
    // A re-send of the old report is still recognised.
    let again = s
        .commit(&[report("old-host", 7, "192.0.2.77")])
        .await
        .unwrap();
    assert_eq!(again[0], Committed::Duplicate(rows[0].event.id));
    let batch = [report("web-1", 1, "192.0.2.77")];
    let (_, past) = s.ladder_facts(&batch).await.unwrap().latest["192.0.2.77"];
    let ladder = Ladder::default();
    assert_eq!(ladder.term_of(&past).0, 1);
    assert!(matches!(
        ladder.decide(Some(&past), now),
        Decision::New { rung: 2, .. }
    ));
    drop(s);
    // Idempotent: opened again, nothing to add, the version is this build's.
    let s = b.open().await;
    s.unban("192.0.2.77", "admin", true).await.unwrap().unwrap();
    drop(s);
    b.sql(&format!(
        "UPDATE banmesh_meta SET v = {} WHERE k = 'schema_version' AND v = {}",
        store::SCHEMA_VERSION + 1,
        store::SCHEMA_VERSION
    ))
    .await;
    assert!(
        matches!(
            store::open(&b.url).await,
            Err(store::StoreError::NewerSchema { .. })
        ),
        "the version was brought to this build's, and a newer one is still refused"
    );
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $case() { super::$case(super::Backend::sqlite().await).await })*
        }
        mod mariadb {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $case() { super::$case(super::Backend::mysql().await).await })*
        }
        mod galera {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $case() { super::$case(super::Backend::galera().await).await })*

            #[tokio::test(flavor = "multi_thread")]
            async fn two_stores_on_two_nodes_share_one_order() {
                super::two_stores_on_two_galera_nodes().await
            }
        }
    };
}

conformance!(
    commits_in_order_and_recognises_resends,
    replay_skips_own_and_lifted_bans,
    statuses_are_rows_with_zero_by_default,
    a_reused_sequence_for_another_ban_is_stored_not_dropped,
    enrolment_refuses_what_it_must_and_revocation_sticks,
    list_bans_filters_and_the_ip_table_view,
    a_newer_schema_is_refused_and_the_same_one_reopens,
    the_view_stops_at_its_host_limit,
    names_are_one_case_insensitive_namespace,
    the_view_takes_any_host_names,
    the_allow_list_lifts_what_it_covers_and_travels_as_events,
    refused_reports_are_stored_once,
    the_allow_list_loads_into_another_store,
    fleet_addresses_are_kept,
    terms_and_coalesced_reports,
    ladder_facts_and_forget,
    a_store_from_before_the_ladder_is_upgraded,
    hosts_record_the_hub_they_are_on,
);

/// Two hubs' stores on two nodes of one Galera cluster, one database:
/// event ids follow commit order whichever node committed (one after the
/// other, and at once: the counter row makes the later transaction lose
/// certification and retry), each node replays every event in the same
/// order, a token stored through one node enrols through the other, and a
/// host's hub written through one node is read through the other.
async fn two_stores_on_two_galera_nodes() {
    let (cluster, db) = galera_cluster::shared().await;
    let (a, b) = (
        store::open(&cluster.url(0, &db.0)).await.unwrap(),
        store::open(&cluster.url(1, &db.0)).await.unwrap(),
    );
    // Alternating: each commit's id is above the one before it.
    let mut last = 0;
    for i in 0..20u64 {
        let (s, host) = if i % 2 == 0 {
            (&a, "web-a")
        } else {
            (&b, "web-b")
        };
        let c = s
            .commit(&[report(host, i / 2 + 1, &format!("192.0.2.{}", i + 1))])
            .await
            .unwrap();
        let id = c[0].event_id();
        assert!(
            id > last,
            "commit {i} through node {} got id {id} after {last}",
            i % 2 + 1
        );
        last = id;
    }
    // At once, 2 x 40 batches of 2: every id distinct, each batch's in order.
    let many = |s: Arc<dyn Store>, host: &'static str, net: u8| async move {
        let mut ids = Vec::new();
        for k in 0..40u64 {
            let c = s
                .commit(&[
                    report(host, 100 + 2 * k, &format!("198.51.{net}.{}", 2 * k + 1)),
                    report(host, 101 + 2 * k, &format!("198.51.{net}.{}", 2 * k + 2)),
                ])
                .await
                .unwrap();
            assert!(c[0].event_id() < c[1].event_id());
            ids.extend(self::ids(&c));
        }
        ids
    };
    let (x, y) = tokio::join!(many(a.clone(), "web-a", 1), many(b.clone(), "web-b", 2));
    let mut all: Vec<u64> = x.iter().chain(&y).copied().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 160, "ids are distinct across nodes");
    // Both nodes replay the same 180 events in the same order (a write-set
    // may still be applying on the other node: wait for it).
    let replay = |s: Arc<dyn Store>| async move {
        let events = s.events_after(0, "observer", 1000).await.unwrap();
        events.iter().map(|e| e.id).collect::<Vec<u64>>()
    };
    common::wait_for(
        "both nodes to hold all 180 events",
        std::time::Duration::from_secs(10),
        || {
            let (a, b) = (a.clone(), b.clone());
            async move {
                let (ra, rb) = (replay(a).await, replay(b).await);
                ra.len() == 180 && ra == rb && ra.windows(2).all(|w| w[0] < w[1])
            }
        },
    )
    .await;

    // A token created through node 1 enrols through node 2, once.
    let t = token("ab", None, store::now_ms() + 60_000, 3600);
    a.create_token(&t).await.unwrap();
    let hash = t.hash.clone();
    common::wait_for("the token on node 2", std::time::Duration::from_secs(10), || {
        let (b, hash) = (b.clone(), hash.clone());
        async move { b.enroll(&hash, "new-host").await.unwrap() != Err(EnrollRefused::UnknownToken) }
    })
    .await;
    assert_eq!(
        a.enroll(&hash, "new-host").await.unwrap(),
        Err(EnrollRefused::UsedToken)
    );
    assert!(
        b.hosts()
            .await
            .unwrap()
            .iter()
            .any(|h| h.name == "new-host")
    );

    // A host's hub, written through node 1, read through node 2.
    a.subscribed_via("web-a", "hub1", 42).await.unwrap();
    common::wait_for(
        "the hub claim on node 2",
        std::time::Duration::from_secs(10),
        || {
            let b = b.clone();
            async move {
                b.hosts().await.unwrap().iter().any(|h| {
                    h.name == "web-a"
                        && h.hub.as_deref() == Some("hub1")
                        && h.hub_since_ms == Some(42)
                })
            }
        },
    )
    .await;
}

/// The suite's Galera cluster: started once, by the first case that needs
/// it (~14 s), shared by every Galera case (each its own database), and
/// killed (its data dir removed) when the test process exits: statics are
/// never dropped, so an `atexit` hook does it.
mod galera_cluster {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::common::galera::Galera;

    struct Shared {
        cluster: Galera,
        root: tempfile::TempDir,
    }

    static CLUSTER: tokio::sync::OnceCell<Shared> = tokio::sync::OnceCell::const_new();
    static CASES: AtomicUsize = AtomicUsize::new(0);

    extern "C" fn stop() {
        let Some(s) = CLUSTER.get() else { return };
        for node in &s.cluster.nodes {
            if let Some(p) = &node.proc {
                let pid = p.child.id() as libc::pid_t;
                // SAFETY: plain syscalls on our own child's pid.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
            }
        }
        let _ = std::fs::remove_dir_all(s.root.path());
    }

    /// The cluster, and a new database name with its case number.
    pub async fn shared() -> (&'static Galera, (String, usize)) {
        let s = CLUSTER
            .get_or_init(|| async {
                let root = tempfile::tempdir().unwrap();
                let t = std::time::Instant::now();
                let cluster = Galera::start(root.path(), 3).await;
                println!(
                    "galera: 3-node cluster up in {:.1}s",
                    t.elapsed().as_secs_f64()
                );
                // SAFETY: registers a plain function, called once at exit.
                unsafe { libc::atexit(stop) };
                Shared { cluster, root }
            })
            .await;
        let n = CASES.fetch_add(1, Ordering::Relaxed);
        (&s.cluster, (format!("banmesh_c{n}"), n))
    }
}
