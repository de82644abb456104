//! The hub's fleet policy, driven the way nodes drive it: `SendSignals`
//! over mTLS with several host certificates, against a real hub process on
//! MariaDB. What a user checks: the fleet ban event (reporter `fleet`, its
//! jail, its reason) every host receives, `ListBans`, the hub's log in dry
//! run, and RESOURCE_EXHAUSTED past a host's signal rate.
//!
//! Absence ("no second ban", "not banned") is proven by order, never by
//! waiting: the aggregator takes batches in order, so once a later
//! address's ban has arrived, every signal sent before it was decided.
mod common;

use std::time::Duration;

use banmesh::proto::{
    self, Event, ListBansRequest, PolicyRequest, SignalBatch, SignalKind, SubscribeRequest,
    hub_client::HubClient,
};
use common::*;
use tonic::{Streaming, transport::Channel};

const DEADLINE: Duration = Duration::from_secs(30);

type Client = HubClient<Channel>;

fn now_ms() -> i64 {
    banmesh::clock::now_ms()
}

fn failure(ip: &str) -> proto::Signal {
    proto::Signal {
        kind: SignalKind::Failure as i32,
        ip: ip.into(),
        jail: "sshd".into(),
        at_ms: now_ms(),
        ..Default::default()
    }
}

fn probe(ip: &str, port: u32) -> proto::Signal {
    proto::Signal {
        kind: SignalKind::Probe as i32,
        ip: ip.into(),
        protocol: "tcp".into(),
        port,
        at_ms: now_ms(),
        ..Default::default()
    }
}

async fn send(c: &mut Client, signals: Vec<proto::Signal>) -> proto::SignalBatchAck {
    c.send_signals(SignalBatch { signals })
        .await
        .expect("SendSignals")
        .into_inner()
}

/// `n` failures of `ip` from each client.
async fn failures(clients: &mut [Client], ip: &str, n: usize) {
    for c in clients {
        let ack = send(c, vec![failure(ip); n]).await;
        assert_eq!((ack.accepted, ack.ignored), (n as u32, 0), "{ack:?}");
    }
}

/// Clients for `names`, each subscribed as a node is (which makes it a
/// known host); the first one's stream is returned to read events from.
async fn fleet(hub: &Hub, pki: &Pki, names: &[&str]) -> (Vec<Client>, Streaming<Event>) {
    let mut clients = Vec::new();
    let mut first = None;
    for name in names {
        let mut c = hub_client(&hub.url, client_tls(&pki.host(name))).await;
        let s = c
            .subscribe(SubscribeRequest { after_event_id: 0 })
            .await
            .expect("subscribe")
            .into_inner();
        // The others' streams stay open inside their own task.
        match first {
            None => first = Some(s),
            Some(_) => {
                tokio::spawn(async move {
                    let mut s = s;
                    while let Ok(Some(_)) = s.message().await {}
                });
            }
        }
        clients.push(c);
    }
    (clients, first.unwrap())
}

/// The next ban event of `ip` on `stream`, collecting the other bans seen
/// before it.
async fn ban_of(stream: &mut Streaming<Event>, ip: &str, before: &mut Vec<Event>) -> Event {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let e = stream.message().await.expect("stream").expect("an event");
            if e.ban.as_ref().is_some_and(|b| b.ip == ip) {
                return e;
            }
            before.push(e);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no ban of {ip} within {DEADLINE:?}"))
}

async fn bans_of(c: &mut Client, ip: &str) -> Vec<proto::BanRecord> {
    c.list_bans(ListBansRequest {
        ip: ip.into(),
        ..Default::default()
    })
    .await
    .expect("ListBans")
    .into_inner()
    .bans
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_on_several_hosts_ban_once_from_fleet_on_every_host() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = TestDb::new().await;
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let (mut clients, mut stream) = fleet(&hub, &pki, &["web-1", "web-2", "web-3"]).await;

    // 4 failures seen on each of three hosts: the tenth crosses.
    let ip = "203.0.113.7";
    failures(&mut clients, ip, 4).await;
    // web-1 saw the failures too, and still gets the ban: it is the fleet's.
    let e = ban_of(&mut stream, ip, &mut vec![]).await;
    assert_eq!(e.kind, proto::EventKind::Ban as i32);
    assert_eq!(e.added_by, "fleet");
    assert_eq!(e.ban.as_ref().unwrap().jail, "banmesh-fleet");
    assert!(
        e.reason.starts_with("10 failures on 3 hosts in "),
        "{:?}",
        e.reason
    );

    // The address goes on failing: no second fleet ban. Then another
    // address crosses, which orders everything before it.
    failures(&mut clients[1..], ip, 10).await;
    let marker = "203.0.113.8";
    failures(&mut clients[..2], marker, 5).await;
    let mut between = Vec::new();
    ban_of(&mut stream, marker, &mut between).await;
    assert!(between.is_empty(), "a second ban: {between:?}");

    // One ban in the store, by `fleet`, with every host's status.
    let bans = bans_of(&mut clients[0], ip).await;
    assert_eq!(bans.len(), 1, "{bans:?}");
    let event = bans[0].event.as_ref().unwrap();
    assert_eq!(event.added_by, "fleet");
    assert_eq!(event.ban.as_ref().unwrap().jail, "banmesh-fleet");
    assert_eq!(event.reason, e.reason, "the reason is stored with the ban");
    let hosts: Vec<&str> = bans[0].statuses.iter().map(|s| s.host.as_str()).collect();
    assert_eq!(hosts, ["web-1", "web-2", "web-3"]);

    // `fleet` is no host: not in the hosts list.
    let admin = pki.admin("ops");
    let (ok, out, err) = hub_cli(&["hub", "hosts"], &hub, &admin);
    assert!(ok, "{err}");
    assert!(!out.contains("fleet"), "{out}");
    // The policy shows the defaults and the addresses in the windows.
    let (ok, out, err) = hub_cli(&["hub", "policy"], &hub, &admin);
    assert!(ok, "{err}");
    assert!(
        out.contains("fleet ban      10 failures in 10m on at least 2 hosts"),
        "{out}"
    );
    assert!(out.contains("probe ban      5 closed ports in 1m"), "{out}");
    assert!(!out.contains("dry run"), "{out}");
    assert!(
        out.contains("of at most 1000000 addresses, 0 dropped"),
        "{out}"
    );
    let p = clients[0]
        .policy(PolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.max_tracked_addresses, 1_000_000);
    assert_eq!(p.dropped_addresses, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_host_alone_makes_no_fleet_ban_and_probes_count_distinct_ports() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = TestDb::new().await;
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let (mut clients, mut stream) = fleet(&hub, &pki, &["app-1", "app-2"]).await;

    // Thirty failures, all on app-1: its own jail's business.
    let alone = "198.51.100.20";
    failures(&mut clients[..1], alone, 30).await;
    // Probes: three closed ports on app-1 (one of them twice), two on app-2.
    let scanner = "2001:db8::66";
    let ack = send(
        &mut clients[0],
        vec![
            probe(scanner, 22),
            probe(scanner, 23),
            probe(scanner, 22),
            probe(scanner, 25),
        ],
    )
    .await;
    assert_eq!(ack.accepted, 4);
    send(
        &mut clients[1],
        vec![probe(scanner, 80), probe(scanner, 443)],
    )
    .await;
    let mut before = Vec::new();
    let e = ban_of(&mut stream, scanner, &mut before).await;
    assert_eq!(e.added_by, "fleet");
    assert_eq!(e.ban.as_ref().unwrap().jail, "banmesh-portscan");
    assert!(
        e.reason.starts_with("5 closed ports probed on 2 hosts in "),
        "{:?}",
        e.reason
    );
    assert!(before.is_empty(), "{before:?}");
    assert!(bans_of(&mut clients[0], alone).await.is_empty());

    // One failure seen by a second host makes it a fleet matter.
    failures(&mut clients[1..], alone, 1).await;
    let e = ban_of(&mut stream, alone, &mut vec![]).await;
    assert!(
        e.reason.starts_with("10 failures on 2 hosts in "),
        "{:?}",
        e.reason
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_allow_listed_address_is_never_banned_by_signals() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = TestDb::new().await;
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let admin = pki.admin("ops");
    let (ok, _, err) = hub_cli(&["allow", "add", "192.0.2.0/24"], &hub, &admin);
    assert!(ok, "{err}");
    let (mut clients, mut stream) = fleet(&hub, &pki, &["edge-1", "edge-2"]).await;

    let office = "192.0.2.44";
    failures(&mut clients, office, 10).await;
    let marker = "203.0.113.9";
    failures(&mut clients, marker, 5).await;
    let mut before = Vec::new();
    ban_of(&mut stream, marker, &mut before).await;
    assert!(
        before
            .iter()
            .all(|e| e.kind != proto::EventKind::Ban as i32),
        "{before:?}"
    );
    assert!(bans_of(&mut clients[0], office).await.is_empty());
    // Once the edge holds the list, its signals are not even counted.
    wait_for("allow-listed signals to be ignored", DEADLINE, || {
        let mut c = clients[0].clone();
        async move {
            let ack = send(&mut c, vec![failure(office)]).await;
            ack.ignored == 1
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_logs_what_it_would_ban_and_bans_nothing() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = TestDb::new().await;
    let hub = Hub::start_with(root.path(), &pki, &db.url, "127.0.0.1", 0, |c| {
        c.arg("--signals-dry-run");
    })
    .await;
    let (mut clients, _stream) = fleet(&hub, &pki, &["db-1", "db-2"]).await;

    let ip = "203.0.113.77";
    failures(&mut clients, ip, 5).await;
    wait_for("the hub to log the verdict", DEADLINE, || {
        let log = hub.proc.log_text();
        async move {
            log.lines().any(|l| {
                l.contains("fleet policy would ban")
                    && l.contains(ip)
                    && l.contains("10 failures on 2 hosts")
            })
        }
    })
    .await;
    assert!(bans_of(&mut clients[0], ip).await.is_empty());
    let p = clients[0]
        .policy(PolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(p.dry_run);
    let (ok, out, err) = hub_cli(&["hub", "policy"], &hub, &pki.admin("ops"));
    assert!(ok, "{err}");
    assert!(
        out.contains("dry run        thresholds are logged"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn past_its_signal_rate_a_host_is_refused_and_publishing_is_not() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = TestDb::new().await;
    let hub = Hub::start_with(root.path(), &pki, &db.url, "127.0.0.1", 0, |c| {
        c.args(["--signal-rate", "10/min", "--signal-burst", "100"]);
    })
    .await;
    let (mut clients, _stream) = fleet(&hub, &pki, &["noisy", "quiet"]).await;

    let batch = || {
        (0..100)
            .map(|i| failure(&format!("203.0.113.{}", i % 50 + 1)))
            .collect()
    };
    assert_eq!(send(&mut clients[0], batch()).await.accepted, 100);
    let refused = clients[0]
        .send_signals(SignalBatch { signals: batch() })
        .await
        .expect_err("past the burst");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    let wait: u64 = refused
        .metadata()
        .get("banmesh-retry-after-ms")
        .expect("a wait")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(wait > 0);
    // The other host's signals are its own, and both publish bans as ever.
    assert_eq!(
        send(&mut clients[1], vec![failure("198.51.100.1")])
            .await
            .accepted,
        1
    );
    for (seq, c) in clients.iter_mut().enumerate() {
        let report = proto::Report {
            seq: 1,
            ban: Some(proto::Ban {
                jail: "sshd".into(),
                protocol: "tcp".into(),
                port: "22".into(),
                ip: format!("198.51.100.{}", 100 + seq),
            }),
            ..Default::default()
        };
        let mut acks = c
            .publish(tokio_stream::iter(vec![report]))
            .await
            .expect("publish")
            .into_inner();
        let ack = tokio::time::timeout(DEADLINE, acks.message())
            .await
            .expect("an ack in time")
            .expect("an ack")
            .expect("an ack");
        assert!(ack.rejected.is_empty(), "{ack:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_host_may_enrol_as_fleet() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let mut admin = hub_client(&hub.url, client_tls(&pki.admin("ops"))).await;
    let refused = admin
        .create_token(proto::CreateTokenRequest {
            name: "Fleet".into(),
            ttl_s: 600,
            ..Default::default()
        })
        .await
        .expect_err("a reserved name");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("fleet bans"), "{refused:?}");
}
