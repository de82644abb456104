//! A ban's path, hop by hop: each ban's end-to-end time (the `report`
//! call until the last other node applied it) cut at the timestamps of
//! that one ban on its way to that one node, so that its hops sum exactly
//! to its end-to-end time. The hub's stamps come from its log
//! ([`crate::hops`]); the nodes' from the apply task ([`Observed`]); the
//! report's from this process. All are the machine's wall clock.
use std::{
    collections::HashMap,
    path::Path,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::json;

use crate::node::apply::Observed;

/// A ban reported and not yet applied on every other node.
pub struct InFlight {
    from: usize,
    t0: Instant,
    returned: Instant,
    left: usize,
}

impl InFlight {
    /// Reported by node `from`: `t0` the call, `returned` its answer
    /// (outbox fsynced), `left` the nodes that must apply it.
    pub fn new(from: usize, t0: Instant, returned: Instant, left: usize) -> InFlight {
        InFlight {
            from,
            t0,
            returned,
            left,
        }
    }
}

/// A ban applied on every other node: its last node and what it observed.
pub struct Done {
    ip: String,
    t0: Instant,
    returned: Instant,
    node: usize,
    observed: Observed,
}

impl Done {
    /// The report call until the last node was done with it.
    pub fn end_to_end_ms(&self) -> f64 {
        self.observed.at.duration_since(self.t0).as_secs_f64() * 1000.0
    }
}

/// Counts node `node`'s batch against the bans in flight; those it
/// completes move to `out`.
pub fn absorb(
    pending: &mut HashMap<String, InFlight>,
    out: &mut Vec<Done>,
    (node, observed): (usize, Observed),
) {
    for ip in &observed.ips {
        let Some(p) = pending.get_mut(ip) else {
            continue;
        };
        if p.from != node {
            p.left -= 1;
        }
        if p.left == 0 {
            let p = pending.remove(ip).expect("just found");
            out.push(Done {
                ip: ip.clone(),
                t0: p.t0,
                returned: p.returned,
                node,
                observed: observed.clone(),
            });
        }
    }
}

/// The hub's hop stamps, read back from its log.
#[derive(Default)]
pub struct HubLog {
    recv: HashMap<String, u64>,
    commit: HashMap<String, (u64, u64)>,
    sent: HashMap<(u64, String), u64>,
}

/// The hops, in path order.
const HOPS: [&str; 9] = [
    "report call -> accepted (outbox fsync)",
    "node outbox -> hub received",
    "hub received -> committed (store)",
    "hub committed -> sent to the node",
    "hub sent -> node apply task has it",
    "node: decided, fail2ban socket",
    "node: status journaled (no fsync)",
    "node: line written (shared.log)",
    "node: position moved (observed)",
];

impl HubLog {
    /// Reads the hop lines of the hub's log at `path`.
    pub fn read(path: &Path) -> anyhow::Result<HubLog> {
        Self::read_all(&[path])
    }

    /// Reads the hop lines of several hubs' logs as one: with hubs on one
    /// Galera cluster, a ban is received and committed by one hub and
    /// sent by each hub to its own nodes.
    pub fn read_all(paths: &[&Path]) -> anyhow::Result<HubLog> {
        let mut text = String::new();
        for p in paths {
            text.push_str(&std::fs::read_to_string(p)?);
        }
        let mut log = HubLog::default();
        for line in text.lines().filter_map(crate::hops::parse) {
            match line.hop.as_str() {
                "recv" => {
                    log.recv.entry(line.ip).or_insert(line.us);
                }
                "commit" => {
                    log.commit.entry(line.ip).or_insert((line.id, line.us));
                }
                "sent" => {
                    log.sent.entry((line.id, line.host)).or_insert(line.us);
                }
                _ => {}
            }
        }
        Ok(log)
    }

    /// Each hop's durations (µs) for the bans of `done` the log covers.
    fn hops(&self, done: &[Done]) -> Vec<[f64; 9]> {
        // One reading ties this process's monotonic clock to the wall clock.
        let (anchor, anchor_us) = (Instant::now(), wall_us());
        let wall = |t: Instant| anchor_us - anchor.duration_since(t).as_secs_f64() * 1e6;
        done.iter()
            .filter_map(|d| {
                let recv = *self.recv.get(&d.ip)? as f64;
                let (id, commit) = *self.commit.get(&d.ip)?;
                let sent = *self.sent.get(&(id, format!("bench-{}", d.node)))? as f64;
                let o = &d.observed;
                let t = [
                    wall(d.t0),
                    wall(d.returned),
                    recv,
                    commit as f64,
                    sent,
                    wall(o.received),
                    wall(o.stamps.socket),
                    wall(o.stamps.journaled),
                    wall(o.stamps.written),
                    wall(o.at),
                ];
                let mut h = [0.0; 9];
                for i in 0..9 {
                    h[i] = t[i + 1] - t[i];
                }
                Some(h)
            })
            .collect()
    }

    /// The hop table of `done`: each hop's p50, p99 and mean, the bans'
    /// end-to-end figures, and the sums (the sum of means is the mean
    /// end-to-end exactly; a sum of medians is not a median of sums).
    pub fn table(&self, done: &[Done]) -> serde_json::Value {
        let hops = self.hops(done);
        if hops.is_empty() {
            return json!(null);
        }
        let column = |i: usize| hops.iter().map(|h| h[i]).collect::<Vec<_>>();
        let rows: Vec<_> = (0..9)
            .map(|i| {
                let s = Stats::of(column(i));
                json!({"hop": HOPS[i], "p50_ms": s.p50, "p99_ms": s.p99, "mean_ms": s.mean})
            })
            .collect();
        let e2e = Stats::of(hops.iter().map(|h| h.iter().sum()).collect());
        let sum = |k: &str| {
            ms(rows
                .iter()
                .map(|r| r[k].as_f64().unwrap_or(0.0) * 1000.0)
                .sum())
        };
        json!({
            "n": hops.len(),
            "of": done.len(),
            "rows": rows,
            "end_to_end": {"p50_ms": e2e.p50, "p99_ms": e2e.p99, "mean_ms": e2e.mean},
            "sum_of_means_ms": sum("mean_ms"),
            "sum_of_p50s_ms": sum("p50_ms"),
        })
    }
}

fn wall_us() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// Microseconds as milliseconds, three decimals (hops are sub-millisecond).
fn ms(us: f64) -> f64 {
    (us / 1000.0 * 1000.0).round() / 1000.0
}

struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
}

impl Stats {
    fn of(mut v: Vec<f64>) -> Stats {
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        Stats {
            p50: ms(at(0.5)),
            p99: ms(at(0.99)),
            mean: ms(v.iter().sum::<f64>() / v.len() as f64),
        }
    }
}

/// Prints a hop table (`table`'s JSON) under `title`.
pub fn print(title: &str, t: &serde_json::Value) {
    if t.is_null() {
        return;
    }
    println!(
        "  {title}: hops of {} of {} bans (to the last node)",
        t["n"], t["of"]
    );
    println!(
        "    {:<40} {:>9} {:>9} {:>9}",
        "hop", "p50 ms", "p99 ms", "mean ms"
    );
    let f = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x:.3}"));
    for r in t["rows"].as_array().into_iter().flatten() {
        println!(
            "    {:<40} {:>9} {:>9} {:>9}",
            r["hop"].as_str().unwrap_or(""),
            f(&r["p50_ms"]),
            f(&r["p99_ms"]),
            f(&r["mean_ms"])
        );
    }
    let e = &t["end_to_end"];
    println!(
        "    {:<40} {:>9} {:>9} {:>9}",
        "sum of hops",
        f(&t["sum_of_p50s_ms"]),
        "",
        f(&t["sum_of_means_ms"])
    );
    println!(
        "    {:<40} {:>9} {:>9} {:>9}",
        "end to end",
        f(&e["p50_ms"]),
        f(&e["p99_ms"]),
        f(&e["mean_ms"])
    );
}
