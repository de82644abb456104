//! A real node process's memory with many active bans known: the hub
//! holds N bans (each with a fleet end a day away, so every one is in the
//! node's lift schedule), a `banmesh node` child process (this binary, no
//! fail2ban socket) catches up on them all, and once idle its
//! `/proc/PID/status` is read: VmRSS, RssAnon (its heap: what it keeps per
//! ban), VmHWM (the catch-up's peak) and its thread count.
//!
//! A separate process, not the bench's in-process nodes, so that the
//! figure is one node's own and counts its runtime, allocator and threads
//! as deployed.
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;

use super::{DB, fleet, ip, round};
use crate::{
    ban::{Ban, BanTerm},
    hub::store::{Committed, NewReport, Plan},
};

/// Kills the node child when the scenario ends, however it ends.
struct NodeProc(Child);

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// Fields of `/proc/PID/status`, in KiB (threads: a count).
fn status_kib(pid: u32, names: &[&str]) -> Vec<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    names
        .iter()
        .map(|name| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// Runs the scenario with `bans` active bans stored at the hub.
pub async fn run(
    root: &Path,
    pki: &fleet::Pki,
    mysql: &str,
    bans: usize,
) -> anyhow::Result<serde_json::Value> {
    let dir = root.join("node-rss");
    let hub = fleet::HubProc::start(&dir, pki, mysql, DB).await?;
    let store = crate::hub::store::open(&format!("{mysql}/{DB}")).await?;
    let ends_ms = crate::clock::now_ms() + 86_400_000;
    let mut last = 0u64;
    let mut i = 0u32;
    while (i as usize) < bans {
        let n = 1000.min(bans - i as usize) as u32;
        let batch: Vec<_> = (0..n)
            .map(|j| NewReport {
                host: "elsewhere".into(),
                seq: u64::from(i + j) + 1,
                ban: Ban::new("sshd", "tcp", "22", &ip(61, i + j)).unwrap(),
                plan: Plan::New(BanTerm {
                    ends_ms,
                    rung: 1,
                    ..Default::default()
                }),
            })
            .collect();
        for c in store.commit(&batch).await? {
            if let Committed::New(e) = c {
                last = last.max(e.id);
            }
        }
        i += n;
    }
    let name = "rss-node";
    let tls = pki.host(name)?;
    let node_dir = dir.join(name);
    std::fs::create_dir_all(&node_dir)?;
    let socket = node_dir.join("node.sock");
    let log = std::fs::File::create(node_dir.join("node.log"))?;
    let t0 = Instant::now();
    let child = NodeProc(
        Command::new(std::env::current_exe()?)
            // A fail2ban socket path that does not answer: the node keeps
            // every ban's lift as with a real fail2ban (it schedules lifts
            // only with a socket configured) and writes the lines.
            .args(["node", "--hub", &hub.url, "--fail2ban-socket"])
            .arg(node_dir.join("no-fail2ban.sock"))
            .args(["--no-failure-signals", "--log-level", "warn"])
            .args(super::fleet::tls_flags(&tls))
            .arg("--shared-log")
            .arg(node_dir.join("shared.log"))
            .arg("--socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(&node_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
    );
    let pid = child.0.id();
    let (rss_start, caught_up) = loop {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "the node did not catch up on {bans} bans within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rss_start = status_kib(pid, &["VmRSS:"])[0];
        if let Ok(s) = crate::report::node_status(&socket).await
            && s.last_applied_event_id >= last
        {
            break (rss_start, t0.elapsed());
        }
    };
    // Idle: past the node's periodic work (the ignore list is re-read
    // every 2 s, statuses flushed, the lift schedule's timer armed).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let f = status_kib(
        pid,
        &["VmRSS:", "RssAnon:", "RssFile:", "VmHWM:", "Threads:"],
    );
    Ok(json!({
        "bans": bans,
        "catch_up_seconds": round(caught_up.as_secs_f64()),
        "rss_mib_while_catching_up": round(rss_start as f64 / 1024.0),
        "rss_mib": round(f[0] as f64 / 1024.0),
        "rss_anon_mib": round(f[1] as f64 / 1024.0),
        "rss_file_mib": round(f[2] as f64 / 1024.0),
        "peak_rss_mib": round(f[3] as f64 / 1024.0),
        "threads": f[4],
        "malloc_arena_max": std::env::var("MALLOC_ARENA_MAX").ok(),
    }))
}
