//! systemd: the shipped units pass `systemd-analyze verify` and carry
//! their hardening; both daemons, started with a `NOTIFY_SOCKET` of the
//! test's own, send `READY=1` only once they serve (the test connects
//! right after it) and `WATCHDOG=1` within every `WATCHDOG_USEC`.
mod common;

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::*;

fn unit(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging/systemd")
        .join(name)
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for name in ["banmesh-hub.service", "banmesh-node.service"] {
        let text = std::fs::read_to_string(unit(name)).unwrap();
        for line in [
            "Type=notify",
            "WatchdogSec=",
            "Restart=on-failure",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "ExecReload=/bin/kill -HUP $MAINPID",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(line)),
                "{name} lacks {line}"
            );
        }
        // verify checks that ExecStart runs: point it at the built binary.
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            text.replace("/usr/bin/banmesh", env!("CARGO_BIN_EXE_banmesh")),
        )
        .unwrap();
        paths.push(path);
    }
    let hub = std::fs::read_to_string(unit("banmesh-hub.service")).unwrap();
    assert!(
        hub.contains("\nUser=banmesh\n"),
        "the hub runs as its own user"
    );
    assert!(
        hub.contains("\nCapabilityBoundingSet=\n"),
        "the hub holds no capability"
    );
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()
        .expect("systemd-analyze is installed (scripts/test-deps)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// The test's own notify socket: what a daemon tells systemd arrives here.
struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Notify { socket, path }
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("NOTIFY_SOCKET", &self.path)
            .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string());
    }

    /// The next message, or a panic after 30 s.
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .expect("a message from the daemon");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn until_ready(&self) {
        loop {
            let m = self.next();
            if m.lines().any(|l| l == "READY=1") {
                return;
            }
        }
    }

    /// Three pings, each within the watchdog timeout of the one before.
    fn watchdog_pings(&self) {
        let mut last = Instant::now();
        let mut pings = 0;
        while pings < 3 {
            let m = self.next();
            if m.lines().any(|l| l == "WATCHDOG=1") {
                let gap = last.elapsed();
                assert!(gap < WATCHDOG, "a ping came {gap:?} after the last one");
                last = Instant::now();
                pings += 1;
            }
        }
    }
}

/// systemd would kill a daemon silent this long.
const WATCHDOG: Duration = Duration::from_secs(3);

#[tokio::test]
async fn hub_is_ready_only_when_it_serves_and_pings_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let notify = Notify::bind(dir.path());
    let port = free_port();
    let mut cmd = banmesh();
    cmd.args([
        "hub",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
    ])
    .arg(dir.path().join("hub"))
    .args(tls_args(&pki.hub()));
    notify.env(&mut cmd);
    let _hub = Proc::spawn(cmd, dir.path().join("hub.log"));
    notify.until_ready();
    // Right away: an mTLS gRPC connection to it succeeds.
    let _client = hub_client(
        &format!("https://127.0.0.1:{port}"),
        client_tls(&pki.host("h1")),
    )
    .await;
    notify.watchdog_pings();
}

#[tokio::test]
async fn node_is_ready_only_when_it_serves_and_pings_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let notify = Notify::bind(dir.path());
    let node_dir = dir.path().join("n1");
    // No hub: readiness is about the node's own socket and outbox.
    let mut cmd = banmesh();
    cmd.args([
        "node",
        "--hub",
        "https://127.0.0.1:9",
        "--no-fail2ban-socket",
    ])
    .args(tls_args(&pki.host("n1")))
    .arg("--shared-log")
    .arg(node_dir.join("shared.log"))
    .arg("--socket")
    .arg(node_dir.join("node.sock"))
    .arg("--data-dir")
    .arg(&node_dir);
    notify.env(&mut cmd);
    std::fs::create_dir_all(&node_dir).unwrap();
    let _node = Proc::spawn(cmd, dir.path().join("node.log"));
    notify.until_ready();
    // Right away: the report socket answers.
    let status = banmesh::report::node_status(&node_dir.join("node.sock"))
        .await
        .expect("the node answers as soon as it said READY=1");
    assert_eq!(status.name, "n1");
    notify.watchdog_pings();
}
