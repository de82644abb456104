//! Mutual TLS is not optional: clients without a certificate, or with one
//! from another CA, are refused by the hub.
mod common;

use std::time::Duration;

use banmesh::proto::{self, hub_client::HubClient};
use common::*;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

async fn hosts_with(url: &str, tls: ClientTlsConfig) -> Result<(), String> {
    let channel = Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    HubClient::new(channel)
        .hosts(proto::HostsRequest {})
        .await
        .map(|_| ())
        .map_err(|s| format!("rpc: {s:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hub_refuses_clients_without_a_fleet_certificate() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let ca = Certificate::from_pem(std::fs::read(pki.dir.join("ca.crt")).unwrap());

    // A fleet certificate works: the control case.
    let good = pki.host("node-a");
    let identity = Identity::from_pem(
        std::fs::read(&good.cert).unwrap(),
        std::fs::read(&good.key).unwrap(),
    );
    let ok = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .identity(identity);
    hosts_with(&hub.url, ok)
        .await
        .expect("a fleet certificate is accepted");

    // No client certificate.
    let none = ClientTlsConfig::new().ca_certificate(ca.clone());
    assert!(
        hosts_with(&hub.url, none).await.is_err(),
        "no certificate must be refused"
    );

    // A certificate from another CA, with the same host name.
    let other_root = tempfile::tempdir().unwrap();
    let other = Pki::new(other_root.path()).host("node-a");
    let identity = Identity::from_pem(
        std::fs::read(&other.cert).unwrap(),
        std::fs::read(&other.key).unwrap(),
    );
    let foreign = ClientTlsConfig::new().ca_certificate(ca).identity(identity);
    assert!(
        hosts_with(&hub.url, foreign).await.is_err(),
        "a foreign CA must be refused"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_certificates_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    // A certificate whose validity ends now.
    let signer =
        banmesh::ca::CaSigner::load(&pki.dir.join("ca.crt"), &pki.dir.join("ca.key")).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let req = banmesh::ca::HostCert {
        name: "old",
        sans: &[],
        valid_for: Duration::ZERO,
        role: banmesh::ca::Role::Host,
    };
    let pem = signer.sign(&req, &key).unwrap();
    let files = banmesh::tls::TlsFiles {
        cert: root.path().join("old.crt"),
        key: root.path().join("old.key"),
        ca: pki.dir.join("ca.crt"),
    };
    std::fs::write(&files.cert, pem).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    let past = std::time::Instant::now() + Duration::from_millis(1100);
    wait_for(
        "the certificate to expire",
        Duration::from_secs(5),
        || async move { std::time::Instant::now() > past },
    )
    .await;
    assert!(
        hosts_with(&hub.url, client_tls(&files)).await.is_err(),
        "an expired certificate must be refused"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_hosts_are_refused_and_their_streams_end() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let victim = pki.host("node-r");
    let mut c = hub_client(&hub.url, client_tls(&victim)).await;
    let mut stream = c
        .subscribe(proto::SubscribeRequest { after_event_id: 0 })
        .await
        .unwrap()
        .into_inner();

    // A node certificate cannot call admin RPCs.
    let node_b = pki.host("node-b");
    let mut nb = hub_client(&hub.url, client_tls(&node_b)).await;
    for status in [
        nb.revoke(proto::RevokeRequest {
            name: "node-r".into(),
        })
        .await
        .unwrap_err(),
        nb.unban(proto::UnbanRequest {
            ip: "192.0.2.1".into(),
            forget: false,
        })
        .await
        .unwrap_err(),
        nb.create_token(proto::CreateTokenRequest::default())
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    }

    let admin = pki.admin("ops");
    let out = banmesh()
        .args(["hub", "revoke", "node-r", "--hub", &hub.url])
        .args(tls_args(&admin))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The open stream ends within a second.
    let ended = tokio::time::timeout(Duration::from_secs(1), stream.message()).await;
    let status = ended
        .expect("stream still open a second after revoke")
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    // And the identity is refused from then on.
    let status = c.hosts(proto::HostsRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
}

/// A report message with an extra field claiming another host's name: the
/// hub ignores it and stores the certificate's name.
#[derive(Clone, PartialEq, prost::Message)]
struct ForgedReport {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(message, optional, tag = "2")]
    ban: Option<proto::Ban>,
    #[prost(string, tag = "15")]
    added_by: String,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_report_cannot_claim_another_hosts_name() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let dbfile = root.path().join("hub.db");
    let db = format!("sqlite:{}", dbfile.display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let a = pki.host("node-a");
    let channel = Endpoint::from_shared(hub.url.clone())
        .unwrap()
        .tls_config(client_tls(&a))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let forged = ForgedReport {
        seq: 1,
        ban: Some(proto::Ban {
            jail: "sshd".into(),
            protocol: "tcp".into(),
            port: "22".into(),
            ip: "192.0.2.99".into(),
        }),
        added_by: "node-b".into(),
    };
    let codec = tonic_prost::ProstCodec::<ForgedReport, proto::Ack>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/banmesh.v1.Hub/Publish");
    let mut acks = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(vec![forged])),
            path,
            codec,
        )
        .await
        .unwrap()
        .into_inner();
    let ack = acks.message().await.unwrap().expect("an ack");
    assert!(ack.rejected.is_empty() && ack.event_id > 0, "{ack:?}");
    let store = banmesh::hub::store::open(&db).await.unwrap();
    let events = store.dump_events(0, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].added_by, "node-a",
        "added_by comes from the certificate"
    );
}
