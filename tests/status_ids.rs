//! Statuses are answers about bans that exist: an id above the last event
//! is refused whole, so nobody can pre-set statuses for bans not yet made.
mod common;

use banmesh::proto;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn statuses_for_events_that_do_not_exist_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let dbfile = root.path().join("hub.db");
    let db = format!("sqlite:{}", dbfile.display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    assert!(a.report("sshd", "tcp", "22", "192.0.2.5").0);
    let mut b = hub_client(&hub.url, client_tls(&pki.host("node-b"))).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let last = loop {
        let bans = b
            .list_bans(proto::ListBansRequest::default())
            .await
            .unwrap()
            .into_inner()
            .bans;
        if let Some(e) = bans.first().and_then(|r| r.event.as_ref()) {
            break e.id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the ban never committed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };

    let update = |event_id| proto::StatusUpdate {
        event_id,
        status: proto::Status::Added as i32,
    };
    // One real id beside future ones: the whole call is refused.
    let status = b
        .report_status(proto::StatusBatch {
            updates: vec![update(last), update(last + 1), update(last + 500_000)],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = b
        .report_status(proto::StatusBatch {
            updates: vec![update(0)],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    // Nothing of node-b's refused calls is stored (node-a, which receives
    // its own ban back with the fleet's end, may have answered for it).
    let store = banmesh::hub::store::open(&db).await.unwrap();
    let node_b = store
        .dump_hosts()
        .await
        .unwrap()
        .into_iter()
        .find(|h| h.name == "node-b")
        .map(|h| h.id);
    let statuses = store.dump_statuses(0, 10).await.unwrap();
    assert!(
        statuses.iter().all(|s| Some(s.host_id) != node_b),
        "nothing stored for node-b: {statuses:?}"
    );

    // The ban that exists takes its status.
    let ack = b
        .report_status(proto::StatusBatch {
            updates: vec![update(last)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.stored, 1);
}

/// A node whose journal holds a status the hub will never take (its store
/// was restored from an older backup, say) drops that batch and goes on:
/// later statuses still arrive.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_status_batch_does_not_block_later_statuses() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    // B's journal already holds a status for an event the hub never had.
    let b_dir = root.path().join("node-b");
    std::fs::create_dir_all(&b_dir).unwrap();
    std::fs::write(b_dir.join("statuses.log"), "900000 1\n").unwrap();
    let b = Node::start(root.path(), &pki, "node-b", &hub.url).await;

    assert!(a.report("sshd", "tcp", "22", "192.0.2.77").0);
    wait_for(
        "the ban at B",
        std::time::Duration::from_secs(20),
        || async { b.lines_for("192.0.2.77") == 1 },
    )
    .await;
    let store = banmesh::hub::store::open(&db).await.unwrap();
    wait_for(
        "B's status for the new ban at the hub",
        std::time::Duration::from_secs(20),
        || {
            let store = store.clone();
            async move {
                store
                    .dump_statuses(0, 10)
                    .await
                    .unwrap()
                    .iter()
                    .any(|s| s.status == 1)
            }
        },
    )
    .await;
    assert!(
        b.proc
            .as_ref()
            .unwrap()
            .log_text()
            .contains("the hub refused this batch of statuses"),
        "the node says why it dropped the batch"
    );
}
