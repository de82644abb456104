//! One suite, run unchanged against both store backends: MariaDB (the
//! production store) and the embedded SQLite file (the default).
mod common;

use std::sync::Arc;

use banmesh::{
    ban::{Ban, EventKind, Status},
    hub::store::{self, BanFilter, Committed, NewReport, Store},
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

    async fn open(&self) -> Arc<dyn Store> {
        store::open(&self.url).await.expect("open store")
    }
}

fn report(host: &str, seq: u64, ip: &str) -> NewReport {
    NewReport {
        host: host.into(),
        seq,
        ban: Ban::new("sshd", "tcp", "22", ip).unwrap(),
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
        .unban("192.0.2.1", "admin")
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
    assert!(s.unban("192.0.2.1", "admin").await.unwrap().is_none());
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
    };
}

conformance!(
    commits_in_order_and_recognises_resends,
    replay_skips_own_and_lifted_bans,
    statuses_are_rows_with_zero_by_default,
    a_reused_sequence_for_another_ban_is_stored_not_dropped,
);
