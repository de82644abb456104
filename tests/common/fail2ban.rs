//! A test host with real fail2ban: its own network namespace (own ipset
//! and iptables), its own fail2ban-server (private config dir, socket, pid
//! file, database, log), configured by `banmesh node setup-fail2ban`, and a
//! banmesh node beside it.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use banmesh::fail2ban::Fail2ban;

use super::{Node, Pki, TestDb, wait_for};

/// Fails the test with a clear reason when the real tools are missing.
pub fn require_tools() {
    for tool in ["fail2ban-server", "ipset", "iptables", "ip"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is not installed: run scripts/test-deps (as root) first"
        );
    }
    let uid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "fail2ban test hosts need root (network namespaces, ipset)"
    );
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub struct F2bHost {
    pub name: String,
    pub ns: String,
    pub dir: PathBuf,
    pub node: Node,
}

impl F2bHost {
    pub async fn start(root: &Path, pki: &Pki, name: &str, hub_url: &str) -> F2bHost {
        Self::start_with(root, pki, name, hub_url, "").await
    }

    /// [`F2bHost::start`], with `shared_jail` (lines such as `ignoreip =
    /// ...`) added to the `shared` jail's configuration before fail2ban
    /// starts, in a file of the test's own beside setup-fail2ban's.
    pub async fn start_with(
        root: &Path,
        pki: &Pki,
        name: &str,
        hub_url: &str,
        shared_jail: &str,
    ) -> F2bHost {
        require_tools();
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let ns = format!("bm{}{}", std::process::id(), name.replace('-', ""));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run(Command::new("ip").args(["netns", "add", &ns]));
        run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));

        let conf = dir.join("fail2ban");
        run(Command::new("cp").arg("-r").arg("/etc/fail2ban").arg(&conf));
        for entry in std::fs::read_dir(conf.join("jail.d")).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        std::fs::write(
            conf.join("fail2ban.local"),
            format!(
                "[Definition]\nsocket = {d}/f2b.sock\npidfile = {d}/f2b.pid\ndbfile = {d}/f2b.sqlite3\nlogtarget = {d}/f2b.log\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let node_dir = dir.join("node");
        // The real setup command, as an operator runs it.
        run(super::banmesh()
            .args(["node", "setup-fail2ban", "--config-dir"])
            .arg(&conf)
            .arg("--shared-log")
            .arg(node_dir.join("shared.log"))
            .arg("--socket")
            .arg(node_dir.join("node.sock")));
        // A jail of the host's own, reporting through banmesh's action.
        std::fs::write(
            conf.join("jail.d/login.local"),
            format!(
                "[login]\nenabled = true\nfilter =\nfailregex = ^ Failed password for \\S+ from <HOST>\nlogpath = {}\nbanaction = ipset-allports-banmesh\nmaxretry = 3\nfindtime = 600\nbantime = 3600\n",
                dir.join("auth.log").display()
            ),
        )
        .unwrap();
        std::fs::write(dir.join("auth.log"), "").unwrap();
        if !shared_jail.is_empty() {
            std::fs::write(
                conf.join("jail.d/zz-test.local"),
                format!("[shared]\n{shared_jail}\n"),
            )
            .unwrap();
        }
        let mut host = F2bHost {
            name: name.to_string(),
            ns,
            dir: dir.clone(),
            node: Node {
                name: name.to_string(),
                dir: node_dir,
                proc: None,
                hub_url: hub_url.to_string(),
                tls: pki.host(name),
                extra: vec!["--fail2ban-socket".into(), dir.join("f2b.sock").into()],
                netns: None,
            },
        };
        host.start_fail2ban().await;
        host.node.restart().await;
        host
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("f2b.sock")
    }

    pub fn fail2ban(&self) -> Fail2ban {
        Fail2ban::new(&self.socket())
    }

    pub async fn start_fail2ban(&mut self) {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns, "fail2ban-server", "-b", "-c"])
            .arg(self.dir.join("fail2ban"))
            .arg("-s")
            .arg(self.socket())
            .arg("-p")
            .arg(self.dir.join("f2b.pid"))
            .arg("--logtarget")
            .arg(self.dir.join("f2b.log")));
        let socket = self.socket();
        wait_for(
            &format!("fail2ban on {}", self.name),
            Duration::from_secs(30),
            || {
                let socket = socket.clone();
                async move {
                    let mut c = Fail2ban::new(&socket);
                    c.ping().await.is_ok()
                        && c.request(&["status", "shared"]).await.is_ok()
                        && c.request(&["status", "login"]).await.is_ok()
                }
            },
        )
        .await;
    }

    /// Stops fail2ban and waits until its server is gone.
    pub async fn stop_fail2ban(&mut self) {
        let mut c = self.fail2ban();
        let _ = c.request(&["stop"]).await;
        let socket = self.socket();
        wait_for("fail2ban to stop", Duration::from_secs(30), || {
            let socket = socket.clone();
            async move { Fail2ban::new(&socket).ping().await.is_err() }
        })
        .await;
        let pid = self.dir.join("f2b.pid");
        wait_for("fail2ban's pid file to go", Duration::from_secs(30), || {
            let gone = !pid.exists();
            async move { gone }
        })
        .await;
    }

    /// Appends failed-login lines that the `login` jail counts.
    pub fn failed_logins(&self, ip: &str, n: usize) {
        use std::io::Write;
        let now = chrono::Local::now().format("%Y-%m-%d %H:%M:%S");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("auth.log"))
            .unwrap();
        let lines: String = (0..n)
            .map(|i| {
                format!(
                    "{now} Failed password for root from {ip} port {} ssh2\n",
                    40000 + i
                )
            })
            .collect();
        f.write_all(lines.as_bytes()).unwrap();
    }

    /// Whether the IP is in one of this host's ipsets (`f2b-shared`, `f2b-login`).
    pub fn in_ipset(&self, set: &str, ip: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, "ipset", "test", set, ip])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// The node's own log (`node.log` in its data dir).
    pub fn node_log(&self) -> String {
        std::fs::read_to_string(self.node.dir.join("node.log")).unwrap_or_default()
    }

    pub fn fail2ban_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("f2b.log")).unwrap_or_default()
    }
}

impl Drop for F2bHost {
    fn drop(&mut self) {
        self.node.stop();
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("f2b.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
            let pid_file = self.dir.join("f2b.pid");
            for _ in 0..200 {
                if !pid_file.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// The newest ban of `ip` (its id) and `host`'s status for it, from the
/// seed-shaped `ip_table` view; `None` while there is no such ban (or column).
pub async fn view_latest(db: &TestDb, ip: &str, host: &str) -> Option<(u64, i64)> {
    use mysql_async::prelude::*;
    let col = banmesh::ban::seed_column(host);
    let mut c = db.conn().await;
    c.exec_first(
        format!("SELECT id, {col} FROM ip_table WHERE ip = ? ORDER BY id DESC LIMIT 1"),
        (ip,),
    )
    .await
    .ok()
    .flatten()
}

/// `host`'s status for the newest ban of `ip` in the `ip_table` view.
pub async fn view_status(db: &TestDb, ip: &str, host: &str) -> Option<i64> {
    use mysql_async::prelude::*;
    let col = banmesh::ban::seed_column(host);
    let mut c = db.conn().await;
    c.exec_first(
        format!("SELECT {col} FROM ip_table WHERE ip = ? ORDER BY id DESC LIMIT 1"),
        (ip,),
    )
    .await
    .ok()
    .flatten()
}
