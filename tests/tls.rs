//! Mutual TLS is not optional: clients without a certificate, or with one
//! from another CA, are refused by the hub.
mod common;

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
