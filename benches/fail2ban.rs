//! What a ban costs end to end on real fail2ban: two test hosts in network
//! namespaces, each with its own fail2ban-server and banmesh node, a hub on
//! MariaDB. Bans arrive at random moments (gaps of 0-2 s: back-to-back bans
//! line up with fail2ban's polling and hide its cost).
//!
//! For each mode (fast path on, then off) and each sample:
//! - report: `banmesh report` on host A (what A's action runs) -> IP in
//!   host B's ipset;
//! - logins: three failed logins in A's log -> IP in A's ipset (A's own
//!   detection) and -> IP in B's ipset.
//!
//! `cargo bench --bench fail2ban` (n = 50 per path and mode);
//! `-- --quick` for n = 10. Needs root, fail2ban, ipset (scripts/test-deps).
#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{fail2ban::F2bHost, *};

/// Answers "is IP in this ipset" from a shell kept inside the namespace.
struct IpsetProbe {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl IpsetProbe {
    fn new(ns: &str, set: &str) -> IpsetProbe {
        let script = format!(
            "while read ip; do ipset test {set} $ip >/dev/null 2>&1 && echo 1 || echo 0; done"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        IpsetProbe { child, out }
    }

    fn has(&mut self, ip: &str) -> bool {
        writeln!(self.child.stdin.as_mut().unwrap(), "{ip}").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        line.trim() == "1"
    }

    /// Polls until the IP is in the set; the time it appeared, from `t0`.
    fn wait(&mut self, ip: &str, t0: Instant) -> Option<f64> {
        while t0.elapsed() < Duration::from_secs(10) {
            if self.has(ip) {
                return Some(t0.elapsed().as_secs_f64() * 1000.0);
            }
        }
        None
    }
}

impl Drop for IpsetProbe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stats(mut v: Vec<f64>) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| (v[((v.len() as f64 - 1.0) * p).round() as usize] * 10.0).round() / 10.0;
    serde_json::json!({"n": v.len(), "median_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "max_ms": at(1.0)})
}

fn random_gap(seed: &mut u64) -> Duration {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    Duration::from_millis(*seed % 2000)
}

async fn mode(fast: bool, n: usize, seed: &mut u64) -> serde_json::Value {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let a = F2bHost::start(root.path(), &pki, "host-a", &hub.url).await;
    let mut b = F2bHost::start(root.path(), &pki, "host-b", &hub.url).await;
    if !fast {
        b.node.stop();
        b.node.extra.push("--no-fail2ban-socket-ban".into());
        b.node.restart().await;
    }
    let mut a_login = IpsetProbe::new(&a.ns, "f2b-login");
    let mut b_shared = IpsetProbe::new(&b.ns, "f2b-shared");
    let (mut report, mut login_b, mut login_a) = (vec![], vec![], vec![]);
    for i in 0..n {
        tokio::time::sleep(random_gap(seed)).await;
        let ip = format!("198.18.{}.{}", i / 200, i % 200 + 1);
        let t0 = Instant::now();
        let (ok, err) = a.node.report("login", "tcp", "22", &ip);
        assert!(ok, "{err}");
        report.extend(b_shared.wait(&ip, t0));

        tokio::time::sleep(random_gap(seed)).await;
        let ip = format!("198.19.{}.{}", i / 200, i % 200 + 1);
        let t0 = Instant::now();
        a.failed_logins(&ip, 3);
        login_a.extend(a_login.wait(&ip, t0));
        login_b.extend(b_shared.wait(&ip, t0));
    }
    serde_json::json!({
        "fast_path": fast,
        "report_to_b_ipset": stats(report),
        "failed_logins_to_a_ipset": stats(login_a),
        "failed_logins_to_b_ipset": stats(login_b),
    })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 10 } else { 50 };
    common::fail2ban::require_tools();
    let mut seed = 0x853C49E6748FEA9Bu64;
    let mut runs = Vec::new();
    for fast in [true, false] {
        eprintln!(
            "fast path {}: {n} samples per path ...",
            if fast { "on" } else { "off" }
        );
        runs.push(mode(fast, n, &mut seed).await);
    }
    println!("real fail2ban, random arrival (gaps 0-2 s), n = {n} per row");
    println!(
        "{:<54} {:>9} {:>9} {:>9} {:>9}",
        "path", "median ms", "p90 ms", "p99 ms", "max ms"
    );
    for r in &runs {
        let tag = if r["fast_path"] == true {
            "fast path on "
        } else {
            "fast path off"
        };
        for (key, what) in [
            ("report_to_b_ipset", "A's report -> B's ipset"),
            (
                "failed_logins_to_a_ipset",
                "failed logins -> A's ipset (detection)",
            ),
            ("failed_logins_to_b_ipset", "failed logins -> B's ipset"),
        ] {
            let v = &r[key];
            let f = |k: &str| v[k].to_string();
            println!(
                "{tag} {what:<40} {:>9} {:>9} {:>9} {:>9}",
                f("median_ms"),
                f("p90_ms"),
                f("p99_ms"),
                f("max_ms")
            );
        }
    }
    println!("{}", serde_json::json!({"fail2ban": runs}));
}
