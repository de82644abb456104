//! What one certificate can make the hub hold: a real hub process over a
//! store of 20,000 bans and 1,000 hosts, 50 Subscribe streams from one
//! host that are never read, and a `ListBans` asking for everything. Only
//! the per-host cap of streams stays open (the older ones end with
//! RESOURCE_EXHAUSTED), the hub's resident memory stays under a stated
//! bound, and `ListBans` answers at most its cap, with a cursor for the rest.
mod common;

use std::time::Duration;

use banmesh::{
    hub::store::{RawEvent, RawHost},
    proto,
};
use common::*;
use prost::Message;

/// Bans in the store before the hub starts.
const BANS: u64 = 20_000;
/// Hosts in the store: every ban has a status for each in `ListBans`.
const HOSTS: u64 = 1_000;
/// Subscribe streams the test opens as one host and never reads.
const STREAMS: usize = 50;
/// Most resident memory the hub may gain over its idle size while the
/// streams stall and `ListBans` runs. Before the bounds, the 50 stalled
/// streams alone took it from 29 MB to 117 MB (each held a 5,000-event
/// replay page), and one `ListBans` built a 200 MB answer.
const GROWTH_BOUND_KB: u64 = 20_000;

fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// 1,000 hosts (node-a and node-b first) and 20,000 bans by node-a, as
/// raw rows: far faster than committing them one report at a time.
async fn fill(url: &str) {
    let store = banmesh::hub::store::open(url).await.unwrap();
    let now = banmesh::hub::store::now_ms();
    let hosts: Vec<RawHost> = (1..=HOSTS)
        .map(|id| RawHost {
            id,
            name: match id {
                1 => "node-a".into(),
                2 => "node-b".into(),
                n => format!("filler-host-{n:04}"),
            },
            first_seen_ms: now,
            last_seen_ms: now,
        })
        .collect();
    let events: Vec<RawEvent> = (1..=BANS)
        .map(|id| RawEvent {
            id,
            kind: 1,
            reporter_id: 1,
            node_seq: Some(id),
            added_by: "node-a".into(),
            created_ms: now,
            jail: "sshd".into(),
            protocol: "tcp".into(),
            port: "22".into(),
            ip: format!("10.{}.{}.{}", id >> 16, (id >> 8) & 255, id & 255),
            lifted_by: None,
            lifts: None,
            ends_ms: None,
            rung: None,
            extends: None,
            reason: None,
        })
        .collect();
    store.load(&hosts, &events, &[]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_subscriptions_and_huge_listings_stay_bounded() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    fill(&db.url).await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let pid = hub.proc.child.id();
    let idle_kb = status_kb(pid, "VmRSS:");

    // One connection with the smallest windows HTTP/2 allows, so that the
    // hub can hand almost nothing to the socket: whatever it keeps for a
    // stream stays in its own memory.
    let channel = tonic::transport::Endpoint::from_shared(hub.url.clone())
        .unwrap()
        .tls_config(client_tls(&pki.host("node-b")))
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .unwrap();
    let mut node_b = proto::hub_client::HubClient::new(channel);
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let s = node_b
            .subscribe(proto::SubscribeRequest { after_event_id: 0 })
            .await
            .expect("subscribe")
            .into_inner();
        streams.push(s);
    }
    // Let every stream's task read what it will from the store and stall.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stalled_kb = status_kb(pid, "VmRSS:");
    eprintln!("hub RSS: idle {idle_kb} kB, with {STREAMS} stalled streams {stalled_kb} kB");

    // Everything at once, at 1,000 hosts: the answer is cut to what fits.
    let admin = pki.admin("ops");
    let mut ops = hub_client(&hub.url, client_tls(&admin)).await;
    let listing = ops
        .list_bans(proto::ListBansRequest {
            limit: u32::MAX,
            ..Default::default()
        })
        .await
        .expect("ListBans with a huge limit")
        .into_inner();
    let answer_bytes = listing.encoded_len();
    let peak_kb = status_kb(pid, "VmHWM:");
    eprintln!(
        "hub RSS peak {peak_kb} kB; ListBans answer {answer_bytes} bytes, {} bans",
        listing.bans.len()
    );
    assert!(
        listing.bans.len() <= banmesh::hub::service::MAX_LIST_BANS,
        "ListBans returned {} bans",
        listing.bans.len()
    );
    assert!(!listing.bans.is_empty());
    let statuses: usize = listing.bans.iter().map(|b| b.statuses.len()).sum();
    assert!(
        statuses <= banmesh::hub::service::MAX_ANSWER_STATUSES,
        "{statuses} statuses in one answer"
    );
    assert!(answer_bytes < 1 << 20, "a {answer_bytes}-byte answer");
    // The answer is cut short: the cursor names where the next page starts.
    let last = listing.bans.last().unwrap().event.as_ref().unwrap().id;
    assert_eq!(listing.next_after_event_id, last);
    let next = ops
        .list_bans(proto::ListBansRequest {
            limit: u32::MAX,
            after_event_id: listing.next_after_event_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.bans[0].event.as_ref().unwrap().id, last + 1);
    // The last page has no cursor.
    let tail = ops
        .list_bans(proto::ListBansRequest {
            after_event_id: BANS - 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tail.bans.len(), 3);
    assert_eq!(tail.next_after_event_id, 0);

    let peak_kb = status_kb(pid, "VmHWM:");
    assert!(
        peak_kb.saturating_sub(idle_kb) < GROWTH_BOUND_KB,
        "the hub grew from {idle_kb} kB to a {peak_kb} kB peak"
    );

    // The older streams were closed for the newer ones, with a reason; the
    // newest still replay. All are read at once: data the client has not
    // read on one stream holds the connection's window for all of them.
    let cap = banmesh::hub::fanout::MAX_STREAMS_PER_HOST;
    let mut readers = tokio::task::JoinSet::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        readers.spawn(async move {
            let mut events = 0u64;
            let end = loop {
                match tokio::time::timeout(Duration::from_secs(3), s.message()).await {
                    Ok(Ok(Some(_))) => events += 1,
                    Ok(Ok(None)) => break Some(tonic::Status::ok("ended")),
                    Ok(Err(status)) => break Some(status),
                    // Quiet, and still open.
                    Err(_) => break None,
                }
            };
            (i, events, end, s)
        });
    }
    let mut open = Vec::new();
    while let Some(r) = readers.join_next().await {
        let (i, events, end, stream) = r.unwrap();
        if i < STREAMS - cap {
            let status = end.unwrap_or_else(|| panic!("stream {i} is still open"));
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
            assert!(status.message().contains("oldest"), "{status:?}");
        } else {
            assert!(end.is_none(), "stream {i} ended: {end:?}");
            assert_eq!(events, BANS, "stream {i} replayed {events} events");
            // Held open until the end of the test.
            open.push(stream);
        }
    }
    assert_eq!(open.len(), cap);
    let revoked = ops
        .revoke(proto::RevokeRequest {
            name: "node-b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.streams_closed as usize, cap);
}
