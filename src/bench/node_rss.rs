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
//!
//! The same process gives the node's own CPU per applied ban
//! (`/proc/PID/stat`, utime + stime, in 10 ms ticks) over the catch-up
//! (big batches), and then steady (`/proc/PID/task/*/schedstat`, in ns:
//! the ticks are too coarse for a few hundred bans): [`STEADY`] bans published one at a time (a
//! publisher in this process, one every [`STEADY_GAP`]), each reaching
//! the node alone, with the node's 100,000 bans still known; the idle
//! node's own CPU over as long a time before is taken off.
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;

use super::{DB, cpu, fleet, ip, round};
use crate::{
    ban::{Ban, BanTerm},
    hub::store::{Committed, NewReport, Plan},
};

/// Bans published one at a time after the idle reading.
const STEADY: u32 = 500;
/// Time between two of them: longer than the node takes, so each is a batch.
const STEADY_GAP: Duration = Duration::from_millis(10);

/// Kills the node child when the scenario ends, however it ends.
struct NodeProc(Child);

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// The binary run as the node: `banmesh-node` beside this one when it is
/// there (what the package's unit runs), else this one; or
/// `BANMESH_BENCH_NODE_EXE` (an earlier build, or `banmesh`, to compare
/// two nodes under the same scenario).
fn node_exe() -> std::io::Result<std::path::PathBuf> {
    if let Some(exe) = std::env::var_os("BANMESH_BENCH_NODE_EXE") {
        return Ok(exe.into());
    }
    let this = std::env::current_exe()?;
    let beside = this.with_file_name(crate::cli::NODE_BINARY);
    Ok(if beside.is_file() { beside } else { this })
}

/// The node's command: `EXE node`, or `banmesh-node` alone (the node-only
/// binary takes the node's flags without the word).
fn node_command(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    if exe.file_name() != Some(crate::cli::NODE_BINARY.as_ref()) {
        cmd.arg("node");
    }
    cmd
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
    let exe = node_exe()?;
    let mut node = node_command(&exe);
    node.args(["--hub", &hub.url]);
    // A fail2ban socket path that does not answer: the node keeps every
    // ban's lift as with a real fail2ban (it schedules lifts only with a
    // socket configured) and writes the lines. BANMESH_BENCH_NODE_NO_FAIL2BAN
    // leaves it out, as the in-process nodes of `propagation` do: no lift
    // schedule, no fsync per batch (to compare the two figures).
    if std::env::var_os("BANMESH_BENCH_NODE_NO_FAIL2BAN").is_none() {
        node.arg("--fail2ban-socket")
            .arg(node_dir.join("no-fail2ban.sock"));
    }
    let child = NodeProc(
        node.args(["--no-failure-signals", "--log-level", "warn"])
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
    let (rss_start, caught_up, cpu_caught_up) = loop {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "the node did not catch up on {bans} bans within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rss_start = status_kib(pid, &["VmRSS:"])[0];
        if let Ok(s) = crate::report::node_status(&socket).await
            && s.last_applied_event_id >= last
        {
            break (rss_start, t0.elapsed(), cpu::of_pid(pid));
        }
    };
    // Idle: past the node's periodic work (the ignore list is re-read
    // every 2 s, statuses flushed, the lift schedule's timer armed).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let f = status_kib(
        pid,
        &["VmRSS:", "RssAnon:", "RssFile:", "VmHWM:", "Threads:"],
    );
    let steady = steady_cpu(&dir, pki, &hub.url, pid, &node_dir.join("shared.log")).await?;
    // Again once the steady bans ran: what the node holds having run its
    // whole ban path, not only the catch-up (code it faults in then counts).
    let after = status_kib(pid, &["VmRSS:", "RssAnon:", "RssFile:"]);
    Ok(json!({
        "node_binary": exe.file_name().map(|n| n.to_string_lossy().into_owned()),
        "node_cpu_us_per_ban_catching_up": cpu::per_event(Some(0), cpu_caught_up, bans as u64),
        "node_cpu_us_per_ban_steady": steady.0,
        "node_idle_cpu_us_per_s": steady.1,
        "bans": bans,
        "catch_up_seconds": round(caught_up.as_secs_f64()),
        "rss_mib_while_catching_up": round(rss_start as f64 / 1024.0),
        "rss_mib": round(f[0] as f64 / 1024.0),
        "rss_anon_mib": round(f[1] as f64 / 1024.0),
        "rss_file_mib": round(f[2] as f64 / 1024.0),
        "rss_mib_after_steady": round(after[0] as f64 / 1024.0),
        "rss_anon_mib_after_steady": round(after[1] as f64 / 1024.0),
        "rss_file_mib_after_steady": round(after[2] as f64 / 1024.0),
        "peak_rss_mib": round(f[3] as f64 / 1024.0),
        "threads": f[4],
        "malloc_arena_max": std::env::var("MALLOC_ARENA_MAX").ok(),
    }))
}

/// The node's own CPU per ban applied one at a time (idle CPU over as
/// long taken off), and its idle CPU per second: [`STEADY`] bans from a
/// publisher in this process, waited for in the node's `shared.log` (read
/// here, costing the node nothing).
async fn steady_cpu(
    dir: &Path,
    pki: &fleet::Pki,
    hub: &str,
    pid: u32,
    shared_log: &Path,
) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    let (trigger, stop) = crate::shutdown::channel();
    let names = ["rss-feed".to_string()];
    let feed = fleet::publishers_of(dir, pki, hub, &names, stop, |_| Ok(vec![])).await?;
    let outbox = feed[0].0.clone();
    let idle_for = STEADY_GAP * STEADY;
    let (c0, t0) = (threads_cpu_ns(pid), Instant::now());
    tokio::time::sleep(idle_for).await;
    let (c1, t1) = (threads_cpu_ns(pid), Instant::now());
    let idle_per_s = spent_ns(&c0, &c1) as f64 / 1000.0 / (t1 - t0).as_secs_f64();
    let tracer = Tracer::start(pid).await?;
    for j in 0..STEADY {
        let ban = Ban::new("sshd", "tcp", "22", &ip(62, j))?;
        let o = outbox.clone();
        tokio::task::spawn_blocking(move || o.append(&ban)).await??;
        tokio::time::sleep(STEADY_GAP).await;
    }
    // Lines `banmesh[ID]: 162.x.y.z: ...` (this scenario's addresses).
    let marker = format!(": {}.", 100 + 62);
    loop {
        anyhow::ensure!(
            t1.elapsed() < Duration::from_secs(60),
            "the node did not apply {STEADY} steady bans within 60 s"
        );
        let text = std::fs::read_to_string(shared_log).unwrap_or_default();
        if text.matches(&marker).count() >= STEADY as usize {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its statuses reported too (they linger 25 ms before one call, and
    // calls start at most every 250 ms while statuses keep coming).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (c2, t2) = (threads_cpu_ns(pid), Instant::now());
    drop(tracer);
    trigger.trigger();
    if c0.is_empty() || c2.is_empty() {
        return Ok((None, None));
    }
    let busy = spent_ns(&c1, &c2) as f64 / 1000.0 - idle_per_s * (t2 - t1).as_secs_f64();
    Ok((
        Some(round(busy.max(0.0) / f64::from(STEADY))),
        Some(round(idle_per_s)),
    ))
}

/// A profiler attached to the node for the steady phase alone:
/// `BANMESH_BENCH_NODE_TRACE` is a shell command with `{pid}` in it (say
/// `strace -c -f -o /tmp/s.txt -p {pid}` or `perf stat -e ... -p {pid}`),
/// started before the first steady ban and stopped with SIGINT once they
/// are applied, so its counts divide by [`STEADY`] bans. It slows the node:
/// the CPU figure of a traced run is not the one to quote.
struct Tracer(Option<Child>);

impl Tracer {
    async fn start(pid: u32) -> std::io::Result<Tracer> {
        let Some(cmd) = std::env::var("BANMESH_BENCH_NODE_TRACE").ok() else {
            return Ok(Tracer(None));
        };
        let child = Command::new("sh")
            .args([
                "-c",
                &format!("exec {}", cmd.replace("{pid}", &pid.to_string())),
            ])
            .spawn()?;
        // Attached before the first ban (strace and perf need a moment).
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(Tracer(Some(child)))
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            // SAFETY: kill only sends a signal to the tracer this started.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

/// Each thread's time on a CPU so far (ns, `/proc/PID/task/TID/schedstat`).
fn threads_cpu_ns(pid: u32) -> std::collections::HashMap<u32, u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Default::default();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse().ok()?;
            let text = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            Some((tid, text.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

/// CPU spent between two readings: threads in both count their growth, a
/// new thread all of its time; a thread gone by the second reading is
/// missed (a receiving node's work runs on its runtime's workers, which
/// live as long as it does).
fn spent_ns(
    before: &std::collections::HashMap<u32, u64>,
    after: &std::collections::HashMap<u32, u64>,
) -> u64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}
