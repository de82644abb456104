//! What an enrolment token and a host certificate cannot buy: the hub's
//! identity, a forged hub log line, a flood of log, or a lifetime that
//! breaks the hub (issue 13, items 1, 5 and 15).
mod common;

use std::time::Duration;

use banmesh::proto::{self, enrollment_client::EnrollmentClient};
use common::*;
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

/// `hub token create` flags for a token that may enrol any name.
const ANY_NAME: &[&str] = &["--any-name"];

/// An `Enrollment` client as a new server has one: it trusts the fleet CA
/// and presents no certificate.
async fn enrolment_client(hub: &Hub, pki: &Pki) -> EnrollmentClient<Channel> {
    let ca = Certificate::from_pem(std::fs::read(pki.dir.join("ca.crt")).unwrap());
    let channel = Endpoint::from_shared(hub.url.clone())
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(ca))
        .unwrap()
        .connect()
        .await
        .unwrap();
    EnrollmentClient::new(channel)
}

fn csr() -> String {
    banmesh::ca::key_and_csr("anything").unwrap().1
}

/// The organizational units and IP addresses in a PEM certificate.
fn units_and_ips(pem_path: &std::path::Path) -> (Vec<String>, Vec<String>) {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::from_pem_file(pem_path).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let units = cert
        .subject()
        .iter_organizational_unit()
        .filter_map(|u| u.as_str().ok().map(str::to_string))
        .collect();
    let ips = cert
        .subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::IPAddress(ip) => Some(format!("{ip:?}")),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    (units, ips)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_cannot_buy_the_hubs_names_or_an_ip_address() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let admin = pki.admin("ops");
    let (token, hash) = create_token(&hub, &admin, ANY_NAME);

    // `enroll` itself refuses an address as a name...
    let dir = root.path().join("as-ip");
    let (ok, err) = enroll(&hub, &token, &hash, "127.0.0.1", &dir);
    assert!(!ok, "a token enrolled 127.0.0.1");
    assert!(err.contains("not a valid host name"), "{err}");

    // ...and so does the hub, from a client that skips that check: no IP
    // literal, none of the hub certificate's names (its CN `hub` and the
    // SANs `localhost`, 127.0.0.1, 10.201.0.1), in any case.
    let mut c = enrolment_client(&hub, &pki).await;
    // (Eight: with the enrolment below, within the hub's ten a minute.)
    for name in [
        "127.0.0.1",
        "10.201.0.1",
        "::1",
        "hub",
        "HUB",
        "localhost",
        "LocalHost",
        "host.123",
    ] {
        let status = c
            .enroll(proto::EnrollRequest {
                token: token.clone(),
                name: name.into(),
                csr_pem: csr(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
    }

    // None of that spent the token; what it buys carries no IP address and
    // no hub mark.
    let dir = root.path().join("web-1");
    let (ok, err) = enroll(&hub, &token, &hash, "web-1", &dir);
    assert!(ok, "{err}");
    let (units, ips) = units_and_ips(&dir.join("host.crt"));
    assert!(
        ips.is_empty(),
        "IP SANs in an enrolled certificate: {ips:?}"
    );
    assert!(
        !units.iter().any(|u| u == "banmesh-hub"),
        "an enrolled certificate carries the hub mark: {units:?}"
    );
}

/// A node pointed at `rogue` (a real hub presenting a certificate without
/// the hub mark, dialled as `url`) never applies the ban it holds and logs
/// why; an enrolling server sends it nothing.
async fn refused_as_hub(root: &std::path::Path, pki: &Pki, rogue: &Hub, url: &str) {
    assert!(rogue.proc.log_text().contains("lacks the hub mark"));
    let mut victim = Node {
        name: "victim".into(),
        dir: root.join("victim"),
        proc: None,
        hub_url: url.to_string(),
        tls: pki.host("victim"),
        extra: vec!["--no-fail2ban-socket".into()],
        netns: None,
    };
    victim.launch(false).await;
    // The rogue hub holds a ban, published by a client that does not
    // check the hub's mark (this test's own).
    let mut accomplice = hub_client(url, client_tls(&pki.host("node-y"))).await;
    let report = proto::Report {
        seq: 1,
        ban: Some(proto::Ban {
            jail: "sshd".into(),
            protocol: "tcp".into(),
            port: "22".into(),
            ip: "192.0.2.99".into(),
        }),
        ..Default::default()
    };
    let mut acks = accomplice
        .publish(tokio_stream::iter(vec![report]))
        .await
        .unwrap()
        .into_inner();
    let ack = acks.message().await.unwrap().expect("an ack");
    assert!(ack.rejected.is_empty(), "{ack:?}");

    let log = victim.dir.join("node.log");
    wait_for(
        "the node to log why it refuses the hub",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            async move { text.contains("lacks the hub mark") }
        },
    )
    .await;
    // Several reconnection attempts later, still nothing applied.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        victim.lines_for("192.0.2.99"),
        0,
        "the rogue hub's ban was applied"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("re-issue it with `banmesh ca issue --hub`"),
        "{text}"
    );
    victim.stop();

    // A server enrolling with the right CA pin sends it nothing either.
    let hash = banmesh::ca::fingerprint(&std::fs::read_to_string(pki.dir.join("ca.crt")).unwrap())
        .unwrap();
    let host = url.trim_start_matches("https://");
    let out = banmesh()
        .args(["enroll", "--hub", host, "--token", "a-token", "--ca-sha256"])
        .args([hash.as_str(), "--name", "new-1", "--dir"])
        .arg(root.join("new-etc"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("lacks the hub mark"), "{err}");
    let log = rogue.proc.log_text();
    assert!(
        !log.contains("host enrolled") && !log.contains("enrolment refused"),
        "the rogue hub received an enrolment"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_refuses_a_hub_presenting_a_host_certificate() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    // A host certificate that names 127.0.0.1, as every test node's does
    // (for its inspection port) and as enrolment under `--name 127.0.0.1`
    // gave before: right CA, right address, server-auth usage, no mark.
    let stolen = pki.host("node-x");
    let db = format!("sqlite:{}", root.path().join("rogue.db").display());
    let rogue = Hub::start_presenting(root.path(), &stolen, &db, "127.0.0.1", 0, |_| {}).await;
    refused_as_hub(root.path(), &pki, &rogue, &rogue.url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_refuses_a_hub_presenting_an_enrolled_certificate() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    // A hub reached as 127.0.0.1 only, so `localhost` is not one of its
    // names: a token-holder may enrol it, and the certificate bought then
    // names what a node dialling https://localhost:PORT checks.
    let hub_tls = banmesh::ca::issue_once(
        &pki.dir,
        &banmesh::ca::HostCert {
            name: "hub-main",
            sans: &["127.0.0.1".to_string()],
            valid_for: banmesh::ca::HOST_VALIDITY,
            role: banmesh::ca::Role::Hub,
        },
    )
    .unwrap();
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start_presenting(root.path(), &hub_tls, &db, "127.0.0.1", 0, |_| {}).await;
    let (token, hash) = create_token(&hub, &pki.admin("ops"), ANY_NAME);
    let dir = root.path().join("localhost-etc");
    let (ok, err) = enroll(&hub, &token, &hash, "localhost", &dir);
    assert!(ok, "{err}");

    let db = format!("sqlite:{}", root.path().join("rogue.db").display());
    let rogue = Hub::start_presenting(
        root.path(),
        &enrolled_files(&dir),
        &db,
        "127.0.0.1",
        0,
        |_| {},
    )
    .await;
    let url = format!("https://localhost:{}", rogue.port);
    refused_as_hub(root.path(), &pki, &rogue, &url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn enrolment_names_are_checked_before_they_are_logged_and_attempts_are_rate_limited() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let mut c = enrolment_client(&hub, &pki).await;
    let before = hub.proc.log_text().len();
    let attempt = |name: String, token: &str| proto::EnrollRequest {
        token: token.into(),
        name,
        csr_pem: csr(),
    };

    let forged = "web-1\n2030-01-01T00:00:00.000000Z  INFO banmesh::hub: forged line";
    let status = c.enroll(attempt(forged.into(), "x")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // A name the handler sees (the request is under the enrolment size
    // limit) is refused without being echoed.
    let long = "a".repeat(16 << 10);
    let status = c.enroll(attempt(long, "x")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{:?}", status.code());
    assert!(status.message().len() < 1024, "the answer echoes the name");
    // A 1 MiB request is refused before the hub even buffers it.
    let huge = "a".repeat(1 << 20);
    let status = c.enroll(attempt(huge, "x")).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{:?}", status.code());
    assert!(status.message().len() < 1024, "the answer echoes the name");

    let text = hub.proc.log_text();
    assert!(
        !text.lines().any(|l| l.starts_with("2030-01-01")),
        "a forged log line:\n{text}"
    );
    assert!(
        text.len() - before < 16 * 1024,
        "{} bytes of log for two attempts",
        text.len() - before
    );

    // Ten attempts a minute from one address; the eleventh is refused
    // before the hub looks at it.
    for i in 3..=10 {
        let status = c
            .enroll(attempt(format!("web-{i}"), "not-a-token"))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "attempt {i}: {status:?}"
        );
    }
    let status = c
        .enroll(attempt("web-11".into(), "not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_range_token_lifetimes_are_refused_before_anything_is_spent() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let admin = pki.admin("ops");
    let mut c = hub_client(&hub.url, client_tls(&admin)).await;
    let day = 24 * 3600;
    for (ttl_s, cert_ttl_s) in [
        (u64::MAX, 0),
        (1 << 63, 0),
        ((1 << 63) / 1000 + 1, 0),
        (31 * day, 0),
        (0, u64::MAX),
        (0, 1 << 62),
        (0, 826 * day),
        (0, 59),
    ] {
        let status = c
            .create_token(proto::CreateTokenRequest {
                ttl_s,
                name: "web-9".into(),
                cert_ttl_s,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "ttl_s {ttl_s}, cert_ttl_s {cert_ttl_s}: {status:?}"
        );
    }
    // The bounds themselves are accepted, and the name is still free.
    let r = c
        .create_token(proto::CreateTokenRequest {
            ttl_s: 30 * day,
            name: "web-9".into(),
            cert_ttl_s: 825 * day,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let dir = root.path().join("web-9");
    let (ok, err) = enroll(&hub, &r.token, &r.ca_sha256, "web-9", &dir);
    assert!(ok, "{err}");
}
