//! Shared fixtures: a database per test on the real MariaDB, a fleet CA,
//! and hub and node processes of the real `banmesh` binary.
#![allow(dead_code)]

pub mod fail2ban;
pub mod galera;
pub mod mariadb;

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use banmesh::{ca, tls::TlsFiles};
use mysql_async::prelude::*;

/// The MariaDB server tests use; `.ci/run` installs and starts it.
pub fn mysql_server() -> String {
    std::env::var("BANMESH_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// A fresh database on the test server, dropped when the guard goes.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl TestDb {
    pub async fn new() -> TestDb {
        let name = format!(
            "banmesh_t{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let server = mysql_server();
        let mut c = mysql_async::Conn::from_url(&server)
            .await
            .unwrap_or_else(|e| {
                panic!("MariaDB is not reachable at {server} ({e}); run .ci/run or start mariadbd")
            });
        c.query_drop(format!("DROP DATABASE IF EXISTS {name}"))
            .await
            .unwrap();
        c.disconnect().await.unwrap();
        TestDb {
            url: format!("{server}/{name}"),
            name,
        }
    }

    pub async fn conn(&self) -> mysql_async::Conn {
        mysql_async::Conn::from_url(&self.url)
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (server, name) = (mysql_server(), self.name.clone());
        // Best effort, on a thread of its own: Drop may run inside a runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut c) = mysql_async::Conn::from_url(&server).await {
                    let _ = c
                        .query_drop(format!("DROP DATABASE IF EXISTS {name}"))
                        .await;
                    let _ = c.disconnect().await;
                }
            });
        })
        .join();
    }
}

/// A fleet CA in a temp dir, issuing certificates on demand.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(root: &Path) -> Pki {
        let dir = root.join("pki");
        ca::init(&dir).expect("ca init");
        Pki { dir }
    }

    /// Issues (once) and returns the TLS files of host `name`.
    pub fn host(&self, name: &str) -> TlsFiles {
        self.issue(name, ca::Role::Host)
    }

    pub fn admin(&self, name: &str) -> TlsFiles {
        self.issue(name, ca::Role::Admin)
    }

    /// The hub's certificate (named `hub`, with the hub mark), as `banmesh
    /// ca issue --hub` makes it.
    pub fn hub(&self) -> TlsFiles {
        self.issue("hub", ca::Role::Hub)
    }

    fn issue(&self, name: &str, role: ca::Role) -> TlsFiles {
        let sans = [
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            // The host side of the fault suite's network namespace link.
            "10.201.0.1".to_string(),
        ];
        let req = ca::HostCert {
            name,
            sans: &sans,
            valid_for: ca::HOST_VALIDITY,
            role,
        };
        ca::issue_once(&self.dir, &req).expect("issue certificate")
    }
}

/// Polls `check` until it holds or the deadline passes.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The TCP ports process `pid` listens on, read from `/proc`. For a
/// process told to listen on port 0 whose log does not name the port it got
/// (the node's inspection port logs the address it was given): the kernel's
/// socket table is the authority, with no window for another process to
/// take the port in between, as with [`free_port`].
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: std::collections::HashSet<String> = fds
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            // sl local_address rem_address st ... inode (field 9); 0A is LISTEN.
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if *state != "0A" || !inodes.contains(*inode) {
                continue;
            }
            ports.extend(
                local
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok()),
            );
        }
    }
    ports
}

pub fn banmesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_banmesh"))
}

/// A child process stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn banmesh");
        Proc { child, log }
    }

    /// SIGTERM and wait: a graceful stop.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// A hub process on a free port.
pub struct Hub {
    pub proc: Proc,
    pub port: u16,
    pub url: String,
}

impl Hub {
    /// A hub on a port the kernel picks (read back from its log, so no
    /// other process can take the port between choosing and binding it).
    pub async fn start(root: &Path, pki: &Pki, db: &str) -> Hub {
        Self::start_on(root, pki, db, 0).await
    }

    pub async fn start_on(root: &Path, pki: &Pki, db: &str, port: u16) -> Hub {
        Self::start_listening(root, pki, db, "127.0.0.1", port).await
    }

    pub async fn start_listening(root: &Path, pki: &Pki, db: &str, ip: &str, port: u16) -> Hub {
        Self::spawn(root, &pki.hub(), &format!("{ip}:{port}"), Some(db), |_| {}).await
    }

    /// A hub whose command `tweak` adjusts before it is spawned.
    pub async fn start_with(
        root: &Path,
        pki: &Pki,
        db: &str,
        ip: &str,
        port: u16,
        tweak: impl FnOnce(&mut Command),
    ) -> Hub {
        Self::spawn(root, &pki.hub(), &format!("{ip}:{port}"), Some(db), tweak).await
    }

    /// A hub presenting `tls` (the fleet's hub certificate, or in attack
    /// tests another one).
    pub async fn start_presenting(
        root: &Path,
        tls: &TlsFiles,
        db: &str,
        ip: &str,
        port: u16,
        tweak: impl FnOnce(&mut Command),
    ) -> Hub {
        Self::spawn(root, tls, &format!("{ip}:{port}"), Some(db), tweak).await
    }

    /// A hub on its default embedded store, under `root/hub`.
    pub async fn start_embedded(root: &Path, pki: &Pki) -> Hub {
        Self::spawn(root, &pki.hub(), "127.0.0.1:0", None, |_| {}).await
    }

    async fn spawn(
        root: &Path,
        tls: &TlsFiles,
        listen: &str,
        db: Option<&str>,
        tweak: impl FnOnce(&mut Command),
    ) -> Hub {
        let mut cmd = banmesh();
        cmd.args(["hub", "--listen", listen]);
        if let Some(db) = db {
            cmd.args(["--db", db]);
        }
        cmd.arg("--data-dir")
            .arg(root.join("hub"))
            .args(tls_args(tls));
        tweak(&mut cmd);
        Self::launch(root, cmd).await
    }

    /// Spawns a prepared `banmesh hub` command and waits until it listens.
    pub async fn launch(root: &Path, cmd: Command) -> Hub {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let proc = Proc::spawn(cmd, root.join(format!("hub-{n}.log")));
        let mut bound = 0u16;
        let log = proc.log.clone();
        wait_for("the hub to listen", Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                !text.lines().any(|l| l.starts_with("banmesh: ")),
                "the hub failed:\n{text}"
            );
            if let Some(addr) = text.split("hub listening addr=").nth(1) {
                let addr = addr.split_whitespace().next().unwrap_or_default();
                bound = addr
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
            }
            let up = bound != 0;
            async move { up }
        })
        .await;
        Hub {
            proc,
            port: bound,
            url: format!("https://127.0.0.1:{bound}"),
        }
    }
}

/// Runs `banmesh ARGS --hub URL` with `tls`, as an operator would;
/// returns (success, stdout, stderr).
pub fn hub_cli(args: &[&str], hub: &Hub, tls: &TlsFiles) -> (bool, String, String) {
    let out = banmesh()
        .args(args)
        .args(["--hub", &hub.url])
        .args(tls_args(tls))
        .output()
        .expect("run banmesh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn tls_args(tls: &TlsFiles) -> Vec<std::ffi::OsString> {
    vec![
        "--cert".into(),
        tls.cert.clone().into(),
        "--key".into(),
        tls.key.clone().into(),
        "--ca".into(),
        tls.ca.clone().into(),
    ]
}

/// A node process with its own data dir, socket and shared.log.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub proc: Option<Proc>,
    pub hub_url: String,
    pub tls: TlsFiles,
    /// Extra `banmesh node` flags.
    pub extra: Vec<std::ffi::OsString>,
    /// Runs the node inside this network namespace.
    pub netns: Option<String>,
}

impl Node {
    /// A node that applies through shared.log only (no fail2ban here).
    pub async fn start(root: &Path, pki: &Pki, name: &str, hub_url: &str) -> Node {
        Self::start_with(
            root,
            pki,
            name,
            hub_url,
            vec!["--no-fail2ban-socket".into()],
        )
        .await
    }

    pub async fn start_with(
        root: &Path,
        pki: &Pki,
        name: &str,
        hub_url: &str,
        extra: Vec<std::ffi::OsString>,
    ) -> Node {
        let mut node = Node {
            name: name.to_string(),
            dir: root.join(name),
            proc: None,
            hub_url: hub_url.to_string(),
            tls: pki.host(name),
            extra,
            netns: None,
        };
        node.restart().await;
        node
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("node.sock")
    }

    pub fn shared_log(&self) -> PathBuf {
        self.dir.join("shared.log")
    }

    pub fn shared_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.shared_log())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// How many lines of shared.log name this IP.
    pub fn lines_for(&self, ip: &str) -> usize {
        let needle = format!(": {ip}: reported by");
        self.shared_lines()
            .iter()
            .filter(|l| l.contains(&needle))
            .count()
    }

    /// Starts (again) and waits until it answers on its socket and is
    /// connected to the hub.
    pub async fn restart(&mut self) {
        self.launch(true).await;
    }

    /// Starts (again) and waits until it answers on its socket, and, when
    /// `connected`, until it is connected to the hub.
    pub async fn launch(&mut self, connected: bool) {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_banmesh")]);
                c
            }
            None => banmesh(),
        };
        cmd.args(["node", "--hub", &self.hub_url])
            .args(tls_args(&self.tls))
            .arg("--shared-log")
            .arg(self.shared_log())
            .arg("--socket")
            .arg(self.socket())
            .arg("--data-dir")
            .arg(&self.dir)
            .args(&self.extra);
        std::fs::create_dir_all(&self.dir).unwrap();
        self.proc = Some(Proc::spawn(cmd, self.dir.join("node.log")));
        let socket = self.socket();
        wait_for(
            &format!("node {} to connect", self.name),
            Duration::from_secs(30),
            || {
                let socket = socket.clone();
                async move {
                    matches!(banmesh::report::node_status(&socket).await, Ok(s) if s.hub_connected || !connected)
                }
            },
        )
        .await;
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Runs `banmesh report` against this node; returns (success, stderr).
    pub fn report(&self, jail: &str, proto: &str, port: &str, ip: &str) -> (bool, String) {
        let out = banmesh()
            .arg("report")
            .arg("--socket")
            .arg(self.socket())
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["-j", jail, "-pr", proto, "-p", port, "-i", ip])
            .output()
            .expect("run banmesh report");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Runs `banmesh hub token create` with an admin certificate; returns
/// (token, ca_sha256).
pub fn create_token(hub: &Hub, admin: &TlsFiles, extra: &[&str]) -> (String, String) {
    let out = banmesh()
        .args(["hub", "token", "create", "--hub", &hub.url])
        .args(tls_args(admin))
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
    };
    (field("token:"), field("ca-sha256:"))
}

/// Runs `banmesh enroll`; returns (success, stderr).
pub fn enroll(hub: &Hub, token: &str, hash: &str, name: &str, dir: &Path) -> (bool, String) {
    let out = banmesh()
        .args([
            "enroll",
            "--hub",
            &format!("127.0.0.1:{}", hub.port),
            "--token",
            token,
        ])
        .args(["--ca-sha256", hash, "--name", name, "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The TLS files `enroll` writes into `dir`.
pub fn enrolled_files(dir: &Path) -> TlsFiles {
    TlsFiles {
        cert: dir.join("host.crt"),
        key: dir.join("host.key"),
        ca: dir.join("ca.crt"),
    }
}

/// mTLS client settings presenting `files` and trusting their CA.
pub fn client_tls(files: &TlsFiles) -> tonic::transport::ClientTlsConfig {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&files.ca).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(&files.cert).unwrap(),
            std::fs::read(&files.key).unwrap(),
        ))
}

/// A hub client over mTLS with these settings.
pub async fn hub_client(
    url: &str,
    tls: tonic::transport::ClientTlsConfig,
) -> banmesh::proto::hub_client::HubClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    banmesh::proto::hub_client::HubClient::new(channel)
}

/// Initialises a MariaDB data directory at `data` for `user` (root login
/// without a password, no test database), as the tests' private servers
/// need; panics with the tool's output when it fails.
pub fn install_mariadb_data(data: &Path, user: &str) {
    let out = Command::new("mariadb-install-db")
        .args([
            "--no-defaults",
            &format!("--user={user}"),
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ])
        .arg(format!("--datadir={}", data.display()))
        .output()
        .expect("mariadb-install-db (run scripts/test-deps)");
    assert!(
        out.status.success(),
        "mariadb-install-db: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
