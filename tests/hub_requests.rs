//! What the hub answers and logs about a request: each request runs inside
//! a span naming the RPC and the caller's certificate name.
mod common;

use std::time::Duration;

use banmesh::proto::RevokeRequest;
use common::*;

const DEADLINE: Duration = Duration::from_secs(20);

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
