//! Database faults under hubs on a MariaDB Galera cluster (issue 18, item
//! 3): a 3-node cluster on loopback (its own ports, never the server on
//! 3306) and three hubs:
//! - hub A on Galera node 3 with node 1 as its second `--db` address;
//! - hub B on node 1;
//! - hub C on node 3 only.
//!
//! Two test clients act as nodes reporting without pause (one through hub
//! A, one through B: each keeps an outbox and sends what was not acked
//! again on a new stream, as a node does), and two subscribe (one on A, one
//! on C, resubscribing from their last id when a stream ends).
//!
//! 1. kill -9 Galera node 3: hub A moves to node 1 and keeps taking
//!    reports; hub C, with nowhere to go, ends its streams with UNAVAILABLE
//!    and refuses new ones; node 3 restarts and hub C serves again by
//!    itself. A hub started meanwhile with node 3 first in its `--db`
//!    opens node 1.
//! 2. node 3 cut off from the cluster (non-primary): hub C stops serving
//!    (UNAVAILABLE); once the partition heals it serves again.
//! 3. node 3 hangs (SIGSTOP: connections accepted, never answered): hub C
//!    stops serving once its bounded check times out, and serves again
//!    once node 3 answers.
//!
//! Then: every report is in the store exactly once, and each subscriber
//! received every event exactly once, in id order (no gap, no duplicate).
//! Times measured are printed (detection, move, back to serving).
mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use banmesh::proto::{self, hub_client::HubClient};
use common::{Hub, Pki, client_tls, galera::Galera, wait_for};
use mysql_async::prelude::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status,
    transport::{Channel, ClientTlsConfig, Endpoint},
};

/// A password in every hub's `--db` (the test cluster skips grant
/// checks): no message a client gets may show it.
const PASSWORD: &str = "s3cret-pw";

/// How a stream or call ended: when, its code and message.
type End = (Instant, Code, String);

async fn connect(url: &str, tls: &ClientTlsConfig) -> Result<HubClient<Channel>, Status> {
    let channel = Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls.clone())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(HubClient::new(channel))
}

/// A reporting node as the test keeps it.
#[derive(Default)]
struct Outbox {
    /// Reports not acked yet, by seq: the address.
    unacked: BTreeMap<u64, String>,
    /// The last seq handed out.
    last: u64,
    /// The third octet of its first addresses (each reporter its own).
    net: u64,
    /// When each ack came, and the seq it acked up to.
    acks: Vec<(Instant, u64)>,
    /// How each Publish stream ended.
    ends: Vec<End>,
}

impl Outbox {
    /// A new report of a new address.
    fn add(&mut self) {
        self.last += 1;
        let seq = self.last;
        let ip = format!("198.51.{}.{}", self.net + seq / 200, seq % 200 + 1);
        self.unacked.insert(seq, ip);
    }

    /// Reports above `after` not acked yet, in seq order.
    fn after(&self, after: u64) -> Vec<proto::Report> {
        self.unacked
            .range(after + 1..)
            .map(|(seq, ip)| proto::Report {
                seq: *seq,
                ban: Some(proto::Ban {
                    jail: "sshd".into(),
                    protocol: "tcp".into(),
                    port: "22".into(),
                    ip: ip.clone(),
                }),
                ..Default::default()
            })
            .collect()
    }
}

/// One Publish stream: sends every unacked report, then new ones as they
/// come, and drops from the outbox what is acked (acks are cumulative).
async fn publish_once(
    url: &str,
    tls: &ClientTlsConfig,
    outbox: &Mutex<Outbox>,
) -> Result<(), Status> {
    let mut client = connect(url, tls).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(8192);
    let mut sent = 0;
    let send = |sent: &mut u64| {
        let reports = outbox.lock().unwrap().after(*sent);
        if let Some(r) = reports.last() {
            *sent = r.seq;
        }
        reports
    };
    for r in send(&mut sent) {
        let _ = tx.send(r).await;
    }
    let mut acks = client.publish(ReceiverStream::new(rx)).await?.into_inner();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            ack = acks.message() => match ack? {
                Some(ack) => {
                    assert!(ack.rejected.is_empty(), "report refused: {ack:?}");
                    let mut o = outbox.lock().unwrap();
                    o.unacked.retain(|seq, _| *seq > ack.seq);
                    o.acks.push((Instant::now(), ack.seq));
                }
                None => return Ok(()),
            },
            _ = tick.tick() => {
                for r in send(&mut sent) {
                    if tx.send(r).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// A node's publisher: a new stream 100 ms after each one ends.
async fn publisher(url: String, tls: ClientTlsConfig, outbox: Arc<Mutex<Outbox>>) {
    loop {
        if let Err(s) = publish_once(&url, &tls, &outbox).await {
            let end = (Instant::now(), s.code(), s.message().to_string());
            outbox.lock().unwrap().ends.push(end);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a subscriber got.
#[derive(Default)]
struct Received {
    /// Every event id, in the order received.
    ids: Vec<u64>,
    /// When each Subscribe call was accepted.
    accepted: Vec<Instant>,
    /// Subscribe calls refused.
    refused: Vec<End>,
    /// Streams that ended with an error.
    ended: Vec<End>,
}

/// A node's subscription: from its last id, again 100 ms after each end.
async fn subscriber(url: String, tls: ClientTlsConfig, got: Arc<Mutex<Received>>) {
    loop {
        let after = got.lock().unwrap().ids.last().copied().unwrap_or(0);
        let accepted = async {
            let mut client = connect(&url, &tls).await?;
            client
                .subscribe(proto::SubscribeRequest {
                    after_event_id: after,
                })
                .await
        };
        match accepted.await {
            Err(s) => {
                let end = (Instant::now(), s.code(), s.message().to_string());
                got.lock().unwrap().refused.push(end);
            }
            Ok(stream) => {
                got.lock().unwrap().accepted.push(Instant::now());
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(e)) => got.lock().unwrap().ids.push(e.id),
                        Ok(None) => break,
                        Err(s) => {
                            let end = (Instant::now(), s.code(), s.message().to_string());
                            got.lock().unwrap().ended.push(end);
                            break;
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `outbox` has `n` acks after `since`; returns when the
/// first of them came.
async fn acks_after(what: &str, outbox: &Mutex<Outbox>, since: Instant, n: usize) -> Instant {
    wait_for(what, Duration::from_secs(40), || {
        let ok = outbox
            .lock()
            .unwrap()
            .acks
            .iter()
            .filter(|(t, _)| *t > since)
            .count()
            >= n;
        async move { ok }
    })
    .await;
    let o = outbox.lock().unwrap();
    o.acks.iter().find(|(t, _)| *t > since).unwrap().0
}

/// Waits until a report made after `seq` is acked; returns when.
async fn acked_past(what: &str, outbox: &Mutex<Outbox>, seq: u64) -> Instant {
    wait_for(what, Duration::from_secs(40), || {
        let ok = outbox.lock().unwrap().acks.iter().any(|(_, s)| *s > seq);
        async move { ok }
    })
    .await;
    let o = outbox.lock().unwrap();
    o.acks.iter().find(|(_, s)| *s > seq).unwrap().0
}

/// The first end (stream or refusal) after `since`.
fn first_end(got: &Mutex<Received>, since: Instant) -> Option<End> {
    let g = got.lock().unwrap();
    g.ended
        .iter()
        .chain(g.refused.iter())
        .filter(|e| e.0 > since)
        .min_by_key(|e| e.0)
        .cloned()
}

/// Waits for a Subscribe accepted after `since`; returns when.
async fn accepted_after(what: &str, got: &Mutex<Received>, since: Instant) -> Instant {
    wait_for(what, Duration::from_secs(40), || {
        let ok = got.lock().unwrap().accepted.iter().any(|t| *t > since);
        async move { ok }
    })
    .await;
    let g = got.lock().unwrap();
    *g.accepted.iter().find(|t| **t > since).unwrap()
}

fn ms(from: Instant, to: Instant) -> u128 {
    to.saturating_duration_since(from).as_millis()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_whose_galera_node_fails_moves_or_stops_serving_and_loses_nothing() {
    // BANMESH_KEEP_TEST_DIR=1 keeps the logs of a failed run.
    let root = tempfile::Builder::new()
        .disable_cleanup(std::env::var_os("BANMESH_KEEP_TEST_DIR").is_some())
        .tempdir()
        .unwrap();
    println!("galera faults: test dir {}", root.path().display());
    let pki = Pki::new(root.path());
    let t0 = Instant::now();
    let mut cluster = Galera::start(root.path(), 3).await;
    println!(
        "galera faults: 3-node cluster up in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let url = |i: usize| format!("mysql://root:{PASSWORD}@127.0.0.1:{}/banmesh", ports[i]);
    let start = |name: &str, db: String, more: Option<String>| {
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = &pki;
        async move {
            Hub::start_with(&dir, pki, &db, "127.0.0.1", 0, |cmd| {
                // A second address by repeating the flag.
                if let Some(more) = more {
                    cmd.args(["--db", &more]);
                }
            })
            .await
        }
    };
    // B first: it creates the schema.
    let hub_b = start("hub-b", url(0), None).await;
    let hub_a = start("hub-a", url(2), Some(url(0))).await;
    let hub_c = start("hub-c", url(2), None).await;

    let tls = |name: &str| client_tls(&pki.host(name));
    let outbox = |net| {
        Arc::new(Mutex::new(Outbox {
            net,
            ..Default::default()
        }))
    };
    let (rep_a, rep_b) = (outbox(100), outbox(150));
    let sub_a = Arc::new(Mutex::new(Received::default()));
    let sub_c = Arc::new(Mutex::new(Received::default()));
    let mut tasks = vec![
        tokio::spawn(publisher(hub_a.url.clone(), tls("rep-a"), rep_a.clone())),
        tokio::spawn(publisher(hub_b.url.clone(), tls("rep-b"), rep_b.clone())),
        tokio::spawn(subscriber(hub_a.url.clone(), tls("sub-a"), sub_a.clone())),
        tokio::spawn(subscriber(hub_c.url.clone(), tls("sub-c"), sub_c.clone())),
    ];
    // Each reporter: a new report every 25 ms until told to stop.
    let reporting = Arc::new(std::sync::atomic::AtomicBool::new(true));
    for outbox in [rep_a.clone(), rep_b.clone()] {
        let reporting = reporting.clone();
        tasks.push(tokio::spawn(async move {
            while reporting.load(std::sync::atomic::Ordering::Relaxed) {
                outbox.lock().unwrap().add();
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }));
    }
    acks_after("reports through hubs A and B", &rep_a, t0, 20).await;
    acks_after("reports through hub B", &rep_b, t0, 20).await;

    // 1. kill -9 Galera node 3.
    let seq_at_kill = rep_a.lock().unwrap().last;
    let b_at_kill = rep_b.lock().unwrap().last;
    let killed = Instant::now();
    cluster.nodes[2].kill();
    let log_a = hub_a.proc.log.clone();
    wait_for("hub A to move to node 1", Duration::from_secs(20), || {
        let moved = std::fs::read_to_string(&log_a)
            .unwrap_or_default()
            .contains("moved to another database address");
        async move { moved }
    })
    .await;
    let moved = Instant::now();
    let first_ack = acked_past(
        "a report made after the kill acked by hub A",
        &rep_a,
        seq_at_kill,
    )
    .await;
    let b_ack = acked_past(
        "a report made after the kill acked by hub B",
        &rep_b,
        b_at_kill,
    )
    .await;
    wait_for("hub C to stop serving", Duration::from_secs(20), || {
        let ended = first_end(&sub_c, killed).is_some();
        async move { ended }
    })
    .await;
    let (c_down, code, msg) = first_end(&sub_c, killed).unwrap();
    assert_eq!(code, Code::Unavailable, "hub C's stream ended with {msg}");
    println!(
        "galera faults: kill -9 node 3: hub A moved to node 1 within {} ms (log seen), \
         the first report made after the kill acked through it {} ms after the kill; \
         (through hub B, on node 1 all along: {} ms: the cluster's own stall); \
         hub C stopped serving after {} ms ({msg})",
        ms(killed, moved),
        ms(killed, first_ack),
        ms(killed, b_ack),
        ms(killed, c_down)
    );
    // A hub started now skips the dead first address for the next one.
    let hub_d = start("hub-d", url(2), Some(url(0))).await;
    let text = hub_d.proc.log_text();
    assert!(
        text.contains(&format!("database at=127.0.0.1:{} addresses=2", ports[0])),
        "hub D opened node 1:\n{text}"
    );
    assert!(!text.contains(PASSWORD), "{text}");
    drop(hub_d);
    let restarting = Instant::now();
    cluster.nodes[2].launch(false).await;
    let synced = Instant::now();
    let c_up = accepted_after("hub C to serve again", &sub_c, c_down).await;
    println!(
        "galera faults: node 3 restarted and synced in {} ms; hub C serving again {} ms after that",
        ms(restarting, synced),
        ms(synced, c_up)
    );

    // 2. node 3 cut off from the cluster: non-primary.
    acks_after(
        "reports through hub B before the partition",
        &rep_b,
        c_up,
        10,
    )
    .await;
    let cut = Instant::now();
    cluster.isolate(2, true).await;
    // Galera declares the partition after its own timeouts (evs.suspect_timeout).
    wait_for("node 3 non-primary", Duration::from_secs(30), || async {
        cluster
            .cluster_status(2)
            .await
            .is_some_and(|s| s != "Primary")
            || first_end(&sub_c, cut).is_some()
    })
    .await;
    let non_primary = Instant::now();
    wait_for(
        "hub C to stop serving (partition)",
        Duration::from_secs(10),
        || {
            let ended = first_end(&sub_c, cut).is_some();
            async move { ended }
        },
    )
    .await;
    let (c_down, code, msg) = first_end(&sub_c, cut).unwrap();
    assert_eq!(code, Code::Unavailable, "{msg}");
    println!(
        "galera faults: node 3 partitioned: non-primary {} ms after the cut; hub C stopped \
         serving {} ms after the test saw that ({msg})",
        ms(cut, non_primary),
        c_down.saturating_duration_since(non_primary).as_millis()
    );
    // While cut off, new calls are refused with the reason.
    wait_for(
        "a Subscribe refused by hub C",
        Duration::from_secs(10),
        || {
            let refused = sub_c.lock().unwrap().refused.iter().any(|e| e.0 > c_down);
            async move { refused }
        },
    )
    .await;
    let refusal = sub_c
        .lock()
        .unwrap()
        .refused
        .iter()
        .find(|e| e.0 > c_down)
        .cloned()
        .unwrap();
    assert_eq!(refusal.1, Code::Unavailable, "{}", refusal.2);
    assert!(refusal.2.contains("cannot serve"), "{}", refusal.2);
    // Enrolment too, before the token is looked at.
    let channel = Endpoint::from_shared(hub_c.url.clone())
        .unwrap()
        .tls_config(tls("enrolling"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let enrolled = proto::enrollment_client::EnrollmentClient::new(channel)
        .enroll(proto::EnrollRequest {
            token: "no-such-token".into(),
            name: "new-host".into(),
            csr_pem: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(enrolled.code(), Code::Unavailable, "{}", enrolled.message());
    // Reports through hub B go on meanwhile.
    acks_after(
        "reports through hub B during the partition",
        &rep_b,
        c_down,
        10,
    )
    .await;
    let healed = Instant::now();
    cluster.isolate(2, false).await;
    let c_up = accepted_after("hub C to serve again after the partition", &sub_c, healed).await;
    println!(
        "galera faults: partition healed: hub C serving again {} ms later",
        ms(healed, c_up)
    );

    // 3. node 3 hangs (SIGSTOP): its port takes connections that never get
    // an answer. Hub C stops serving after its check times out, and serves
    // again once node 3 answers (thawed before the cluster evicts it).
    acks_after(
        "reports through hub B after the partition",
        &rep_b,
        c_up,
        10,
    )
    .await;
    let hung = Instant::now();
    cluster.nodes[2].pause(true);
    wait_for(
        "hub C to stop serving (hang)",
        Duration::from_secs(10),
        || {
            let ended = first_end(&sub_c, hung).is_some();
            async move { ended }
        },
    )
    .await;
    cluster.nodes[2].pause(false);
    let thawed = Instant::now();
    let (c_down, code, msg) = first_end(&sub_c, hung).unwrap();
    assert_eq!(code, Code::Unavailable, "{msg}");
    let c_up = accepted_after("hub C to serve again after the hang", &sub_c, thawed).await;
    println!(
        "galera faults: node 3 hung: hub C stopped serving {} ms later ({msg}); \
         serving again {} ms after the thaw",
        ms(hung, c_down),
        ms(thawed, c_up)
    );

    // Everything sent is acked, stored once, and delivered once.
    reporting.store(false, std::sync::atomic::Ordering::Relaxed);
    for (name, outbox) in [("rep-a", &rep_a), ("rep-b", &rep_b)] {
        wait_for(
            &format!("every report of {name} acked"),
            Duration::from_secs(30),
            || {
                let empty = outbox.lock().unwrap().unacked.is_empty();
                async move { empty }
            },
        )
        .await;
    }
    let mut db = mysql_async::Conn::from_url(url(0)).await.unwrap();
    for (name, outbox) in [("rep-a", &rep_a), ("rep-b", &rep_b)] {
        let sent = outbox.lock().unwrap().last;
        let (rows, seqs): (u64, u64) = db
            .exec_first(
                "SELECT COUNT(*), COUNT(DISTINCT e.node_seq) FROM events e \
                 JOIN hosts h ON h.id = e.reporter_id WHERE h.name = ?",
                (name,),
            )
            .await
            .unwrap()
            .unwrap();
        println!("galera faults: {name}: {sent} reports sent, {rows} stored");
        assert_eq!(
            (rows, seqs),
            (sent, sent),
            "{name}: each report stored once"
        );
    }
    let events: Vec<u64> = db
        .query("SELECT id FROM events WHERE kind <> 5 ORDER BY id")
        .await
        .unwrap();
    let last = *events.last().unwrap();
    for (name, got) in [("sub-a", &sub_a), ("sub-c", &sub_c)] {
        wait_for(
            &format!("{name} to receive every event"),
            Duration::from_secs(30),
            || {
                let done = got.lock().unwrap().ids.last() >= Some(&last);
                async move { done }
            },
        )
        .await;
        let g = got.lock().unwrap();
        let codes: Vec<Code> = g.ended.iter().map(|e| e.1).collect();
        println!(
            "galera faults: {name}: {} events, {} streams ended early ({codes:?}), {} calls refused",
            g.ids.len(),
            g.ended.len(),
            g.refused.len()
        );
        assert_eq!(g.ids, events, "{name}: every event once, in order");
        for (_, code, msg) in g.ended.iter().chain(g.refused.iter()) {
            assert!(
                !msg.contains(PASSWORD),
                "{name} was told the password: {msg}"
            );
            assert_eq!(*code, Code::Unavailable, "{name}: {msg}");
        }
    }
    let ends = rep_a.lock().unwrap().ends.clone();
    println!(
        "galera faults: rep-a: {} Publish streams ended early",
        ends.len()
    );
    for (_, _, msg) in &ends {
        assert!(
            !msg.contains(PASSWORD),
            "rep-a was told the password: {msg}"
        );
    }
    for t in tasks {
        t.abort();
    }
    drop((hub_a, hub_b, hub_c));
}
