//! What the hub answers and logs about a request: revocation counts every
//! stream it ends, and each request runs inside a span naming the RPC and
//! the caller's certificate name.
mod common;

use std::time::Duration;

use banmesh::proto::{RevokeRequest, SubscribeRequest};
use common::*;

const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_host_with_two_subscriptions_counts_and_ends_both() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;

    // Two streams of one host, each on its own connection (a node that
    // restarted while its old connection lingers looks like this).
    let tls = pki.host("twice");
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut c = hub_client(&hub.url, client_tls(&tls)).await;
        let s = c
            .subscribe(SubscribeRequest { after_event_id: 0 })
            .await
            .expect("subscribe")
            .into_inner();
        streams.push((c, s));
    }

    let mut admin = hub_client(&hub.url, client_tls(&pki.admin("ops"))).await;
    let r = admin
        .revoke(RevokeRequest {
            name: "twice".into(),
        })
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(
        r.streams_closed, 2,
        "both open Subscribe streams are counted"
    );

    for (_, mut s) in streams {
        let end = tokio::time::timeout(DEADLINE, s.message())
            .await
            .expect("the stream ends at once");
        let status = end.expect_err("the stream ends with an error");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_hub_request_logs_inside_a_span_with_the_rpc_and_the_caller() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let node = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    assert!(node.report("sshd", "tcp", "22", "192.0.2.7").0);

    let mut admin = hub_client(&hub.url, client_tls(&pki.admin("ops"))).await;
    admin
        .revoke(RevokeRequest {
            name: "node-a".into(),
        })
        .await
        .expect("revoke");

    // A unary admin call, and both of the node's streams.
    for (rpc, peer, event) in [
        ("Revoke", "ops", "host revoked"),
        ("Subscribe", "node-a", "subscribed"),
        ("Publish", "node-a", "ending its publish stream"),
    ] {
        let span = format!("rpc{{rpc=banmesh.v1.Hub/{rpc} peer={peer}}}");
        wait_for(&format!("{event:?} inside {span}"), DEADLINE, || {
            let text = hub.proc.log_text();
            let found = text.lines().any(|l| l.contains(&span) && l.contains(event));
            async move { found }
        })
        .await;
    }
}
