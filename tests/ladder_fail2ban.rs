//! The escalation ladder on real fail2ban hosts (network namespaces), with
//! a hub on MariaDB whose ladder is `2s,4s,8s`: every host holds a fleet
//! ban until the fleet's end, not for the `shared` jail's bantime (25d, as
//! `setup-fail2ban` writes it by default), through the fast path and the
//! log path, across a node restart, and on the reporting host when its own
//! jail's ban is shorter.
mod common;

use std::time::Duration;

use common::{fail2ban::F2bHost, *};
use mysql_async::prelude::*;

const DEADLINE: Duration = Duration::from_secs(30);
/// How long after the fleet's end the address must be out of the ipset:
/// the node wakes at the end itself (a second is what the issue asks), plus
/// a second of slack for a loaded test machine.
const LIFT_WITHIN_MS: i64 = 2_000;

/// A hub whose ladder is 2 s, 4 s, 8 s, remembering ends for a minute.
async fn ladder_hub(root: &std::path::Path, pki: &Pki, db: &TestDb) -> Hub {
    hub_with_ladder(root, pki, db, "2s,4s,8s").await
}

async fn hub_with_ladder(root: &std::path::Path, pki: &Pki, db: &TestDb, ladder: &str) -> Hub {
    Hub::start_with(root, pki, &db.url, "127.0.0.1", 0, |c| {
        c.args(["--ladder", ladder, "--ladder-window", "60s"]);
    })
    .await
}

/// `(id, ends_ms, rung)` of the newest ban of `ip` once it has `rung`.
async fn ban_at_rung(db: &TestDb, ip: &str, rung: i64) -> (u64, i64, i64) {
    let newest = || async {
        let mut c = db.conn().await;
        c.exec_first(
            "SELECT id, ends_ms, rung FROM events WHERE ip = ? AND kind = 1 ORDER BY id DESC LIMIT 1",
            (ip,),
        )
        .await
        .ok()
        .flatten()
        .filter(|(_, _, r): &(u64, i64, i64)| *r == rung)
    };
    wait_for(
        &format!("the rung {rung} ban of {ip}"),
        DEADLINE,
        || async { newest().await.is_some() },
    )
    .await;
    newest().await.unwrap()
}

fn now_ms() -> i64 {
    banmesh::clock::now_ms()
}

/// Time from now until `at_ms` (zero if it passed).
fn until(at_ms: i64) -> Duration {
    Duration::from_millis((at_ms - now_ms()).max(0) as u64)
}

/// Asserts the address is in `set` on `host` before the fleet's end and
/// leaves it no earlier than that end and within [`LIFT_WITHIN_MS`] after.
/// Returns how late after the end it was seen gone.
async fn held_until(host: &F2bHost, set: &str, ip: &str, ends_ms: i64) -> i64 {
    wait_for(
        &format!("{ip} in {set} on {} before its end", host.name),
        until(ends_ms),
        || async { host.in_ipset(set, ip) },
    )
    .await;
    wait_for(
        &format!("{ip} out of {set} on {} after its end", host.name),
        until(ends_ms + LIFT_WITHIN_MS),
        || async { !host.in_ipset(set, ip) },
    )
    .await;
    let late = now_ms() - ends_ms;
    assert!(late >= 0, "{ip} lifted {} ms before the fleet's end", -late);
    late
}

/// Reports `ip` from `reporter` three times, each after the previous ban
/// ended, and checks `receiver` holds it 2, 4 then 8 s; `mid_rung_3` runs
/// while the 8 s ban is held. Returns how late each lift was seen.
async fn three_rungs(
    db: &TestDb,
    reporter: &F2bHost,
    receiver: &mut F2bHost,
    ip: &str,
    mid_rung_3: impl AsyncFnOnce(&mut F2bHost, i64),
) -> Vec<i64> {
    let mut late = Vec::new();
    let mut mid = Some(mid_rung_3);
    for (rung, secs) in [(1, 2), (2, 4), (3, 8)] {
        let (ok, err) = reporter.node.report("login", "tcp", "22", ip);
        assert!(ok, "{err}");
        let (id, ends_ms, _) = ban_at_rung(db, ip, rung).await;
        let (_, created): (u64, i64) = {
            let mut c = db.conn().await;
            c.exec_first("SELECT id, created_ms FROM events WHERE id = ?", (id,))
                .await
                .unwrap()
                .unwrap()
        };
        // (The hub reads its clock for the end and the event's time apart:
        // they may differ by a millisecond or so.)
        let lasts = ends_ms - created;
        assert!(
            (lasts - secs * 1000).abs() <= 50,
            "rung {rung} lasts {secs} s, not {lasts} ms"
        );
        if rung == 3 {
            wait_for("the rung 3 ban on the receiver", until(ends_ms), || async {
                receiver.in_ipset("f2b-shared", ip)
            })
            .await;
            (mid.take().unwrap())(receiver, ends_ms).await;
        }
        if now_ms() < ends_ms {
            late.push(held_until(receiver, "f2b-shared", ip, ends_ms).await);
        } else {
            // Back after the end: lifted at once (`restart` returns once
            // the node is connected, which may be after that lift).
            let back = now_ms();
            wait_for(
                "the ended ban lifted once the node is back",
                Duration::from_millis(LIFT_WITHIN_MS as u64),
                || async { !receiver.in_ipset("f2b-shared", ip) },
            )
            .await;
            eprintln!("lifted {} ms after the node was back", now_ms() - back);
            late.push(now_ms() - ends_ms);
        }
        wait_for("status 1 on the receiver", DEADLINE, || async {
            fail2ban::view_latest(db, ip, &receiver.name).await == Some((id, 1))
        })
        .await;
    }
    late
}

#[tokio::test(flavor = "multi_thread")]
async fn each_rung_ends_on_time_through_the_fast_path_and_across_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = ladder_hub(root.path(), &pki, &db).await;
    let h1 = F2bHost::start(root.path(), &pki, "fast-1", &hub.url).await;
    let mut h2 = F2bHost::start(root.path(), &pki, "fast-2", &hub.url).await;

    let ip = "203.0.113.40";
    let late = three_rungs(&db, &h1, &mut h2, ip, async |h2, ends_ms| {
        // Restarted in the middle of the 8 s ban: the saved schedule
        // still lifts it on time.
        h2.node.stop();
        assert!(now_ms() < ends_ms - 1_000, "restart too late to test");
        h2.node.restart().await;
    })
    .await;
    eprintln!("fast path: lifted {late:?} ms after the fleet's ends");
    let log = h2.node_log();
    assert!(
        log.contains("fleet ban ended; lifted from the shared jail"),
        "{log}"
    );
    // Each ban went through fail2ban's socket: one line per rung as well.
    assert_eq!(h2.node.lines_for(ip), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_rung_ends_on_time_through_the_log_path_and_after_an_outage() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = ladder_hub(root.path(), &pki, &db).await;
    let h1 = F2bHost::start(root.path(), &pki, "log-1", &hub.url).await;
    let mut h2 = F2bHost::start(root.path(), &pki, "log-2", &hub.url).await;
    // Log path only: fail2ban bans from the line, for its 25 d bantime.
    h2.node.stop();
    h2.node.extra.push("--no-fail2ban-socket-ban".into());
    h2.node.restart().await;

    let ip = "203.0.113.41";
    let late = three_rungs(&db, &h1, &mut h2, ip, async |h2, ends_ms| {
        // Down across the end: fail2ban keeps the ban (its bantime is the
        // ladder's top), and the node lifts it as soon as it is back.
        h2.node.stop();
        wait_for(
            "the fleet's end to pass",
            until(ends_ms) + DEADLINE,
            || async { now_ms() > ends_ms + 500 },
        )
        .await;
        assert!(h2.in_ipset("f2b-shared", ip), "fail2ban lifted it early");
        h2.node.restart().await;
    })
    .await;
    eprintln!("log path: lifted {late:?} ms after the fleet's ends (the last one after an outage)");
    assert_eq!(h2.node.lines_for(ip), 3);
    let f2b = h2.fail2ban_log();
    assert!(
        f2b.matches(&format!("[shared] Ban {ip}")).count() >= 3,
        "banned from the line each time: {f2b}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reporting_host_holds_its_own_ban_until_the_fleet_s_end() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    // Rungs either side of the reporting jail's 5 s bantime.
    let hub = hub_with_ladder(root.path(), &pki, &db, "2s,10s").await;
    let h1 = F2bHost::start(root.path(), &pki, "own-1", &hub.url).await;
    let h2 = F2bHost::start(root.path(), &pki, "own-2", &hub.url).await;
    // (fail2ban drops a ban whose log line is older than the jail's
    // bantime when its action thread gets to it, 0.3-1 s after the line,
    // whose time has whole seconds: a 1 s bantime often bans nothing.)
    h1.fail2ban()
        .request(&["set", "login", "bantime", "5"])
        .await
        .unwrap();

    // Rung 1, 2 s: host 1's own 5 s ban covers it. Status 1, nothing in
    // its shared jail; host 2 holds it until the fleet's end.
    let ip = "203.0.113.42";
    h1.failed_logins(ip, 3);
    let (id, ends_ms, _) = ban_at_rung(&db, ip, 1).await;
    held_until(&h2, "f2b-shared", ip, ends_ms).await;
    wait_for("status 1 for the covered own ban", DEADLINE, || async {
        fail2ban::view_latest(&db, ip, "own-1").await == Some((id, 1))
    })
    .await;
    assert!(!h1.in_ipset("f2b-shared", ip));
    assert_eq!(h1.node.lines_for(ip), 0);
    wait_for("host 1's own 5 s ban to end", DEADLINE, || async {
        !h1.in_ipset("f2b-login", ip)
    })
    .await;

    // Back again: rung 2, 10 s, past the own jail's 5 s. Host 1's jail
    // lets go after its 5 s; its shared jail holds the address to the
    // fleet's end, as host 2's does.
    h1.failed_logins(ip, 3);
    let (id, ends_ms, _) = ban_at_rung(&db, ip, 2).await;
    let own_gone = async {
        wait_for("host 1's own jail to let go", until(ends_ms), || async {
            !h1.in_ipset("f2b-login", ip)
        })
        .await;
        assert!(
            h1.in_ipset("f2b-shared", ip),
            "held in shared once the own jail let go"
        );
        now_ms()
    };
    let (own_end, late1, late2) = tokio::join!(
        own_gone,
        held_until(&h1, "f2b-shared", ip, ends_ms),
        held_until(&h2, "f2b-shared", ip, ends_ms)
    );
    eprintln!(
        "own ban: own jail out {} ms before the fleet's end; shared lifted {late1} ms (reporter), {late2} ms (other host) after it",
        ends_ms - own_end
    );
    wait_for("status 1 on the reporting host", DEADLINE, || async {
        fail2ban::view_latest(&db, ip, "own-1").await == Some((id, 1))
    })
    .await;
    assert_eq!(h1.node.lines_for(ip), 1, "held through shared.log as well");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_moves_the_lift_of_a_held_ban() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = ladder_hub(root.path(), &pki, &db).await;
    let h1 = F2bHost::start(root.path(), &pki, "upd-1", &hub.url).await;
    let h2 = F2bHost::start(root.path(), &pki, "upd-2", &hub.url).await;

    let ip = "203.0.113.44";
    let (ok, err) = h1.node.report("login", "tcp", "22", ip);
    assert!(ok, "{err}");
    let (first, first_ends, _) = ban_at_rung(&db, ip, 1).await;
    wait_for("the first ban on host 2", until(first_ends), || async {
        h2.in_ipset("f2b-shared", ip)
    })
    .await;
    // Reported again once the 2 s ban is more than half over: the hub
    // extends it to the next rung, counted from now, in one update event.
    wait_for("the ban to be half over", DEADLINE, || async {
        now_ms() > first_ends - 800
    })
    .await;
    let (ok, err) = h1.node.report("login", "tcp", "22", ip);
    assert!(ok, "{err}");
    let (update, ends, _) = ban_at_rung(&db, ip, 2).await;
    let extends: Option<u64> = db
        .conn()
        .await
        .exec_first("SELECT extends FROM events WHERE id = ?", (update,))
        .await
        .unwrap();
    assert_eq!(extends, Some(first), "an update of the first ban");
    assert!(ends > first_ends + 2_000);
    // Host 2 held it: it only moves its lift (status 1, no second line),
    // and keeps the address past the first end until the new one.
    let late = held_until(&h2, "f2b-shared", ip, ends).await;
    eprintln!("update: lifted {late} ms after the new end");
    for host in ["upd-1", "upd-2"] {
        wait_for("status 1 for the update", DEADLINE, || async {
            fail2ban::view_latest(&db, ip, host).await == Some((update, 1))
        })
        .await;
    }
    assert_eq!(h2.node.lines_for(ip), 1);
    assert!(
        h2.node_log()
            .contains("its lift moves to the fleet's new end")
    );
}
