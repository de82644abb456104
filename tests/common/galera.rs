//! A 3-node MariaDB Galera cluster on loopback for tests: each node its own
//! data dir, socket and ports (SQL, group communication, IST, SST), none of
//! them 3306; the processes are this test's, stopped when it ends.
//! Node 1 bootstraps the cluster; 2 and 3 join by rsync SST.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::{Proc, free_port, wait_for};

/// One Galera node.
pub struct GaleraNode {
    pub dir: PathBuf,
    pub port: u16,
    pub proc: Option<Proc>,
    args: Vec<String>,
}

/// A running cluster.
pub struct Galera {
    pub nodes: Vec<GaleraNode>,
}

impl Galera {
    /// Starts `n` nodes and waits until each is Synced.
    pub async fn start(root: &Path, n: usize) -> Galera {
        assert!(
            Path::new("/usr/lib/galera/libgalera_smm.so").exists(),
            "galera-4 missing: run scripts/test-deps"
        );
        let gcomm: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let peers: Vec<String> = gcomm.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        // The servers run as `mysql`, as packaged: the rsync SST daemon
        // drops to it, so it must reach and own the data dirs.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut nodes = Vec::new();
        for (i, g) in gcomm.iter().enumerate() {
            let dir = root.join(format!("galera-{}", i + 1));
            let data = dir.join("data");
            std::fs::create_dir_all(&data).unwrap();
            if i == 0 {
                super::install_mariadb_data(&data, "mysql");
            }
            let status = Command::new("chown")
                .args(["-R", "mysql:mysql"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "chown {}", dir.display());
            let port = free_port();
            let (ist, sst) = (free_port(), free_port());
            let args = vec![
                "--no-defaults".to_string(),
                "--user=mysql".into(),
                "--skip-grant-tables".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--datadir={}", data.display()),
                format!("--port={port}"),
                format!("--socket={}", dir.join("sock").display()),
                format!("--pid-file={}", dir.join("pid").display()),
                "--innodb-buffer-pool-size=64M".into(),
                "--innodb-autoinc-lock-mode=2".into(),
                "--binlog-format=ROW".into(),
                "--wsrep-on=ON".into(),
                "--wsrep-provider=/usr/lib/galera/libgalera_smm.so".into(),
                "--wsrep-cluster-name=banmesh-test".into(),
                format!("--wsrep-cluster-address=gcomm://{}", peers.join(",")),
                format!("--wsrep-node-name=n{}", i + 1),
                format!("--wsrep-node-address=127.0.0.1:{g}"),
                format!(
                    "--wsrep-provider-options=gmcast.listen_addr=tcp://127.0.0.1:{g};\
                     ist.recv_addr=127.0.0.1:{ist};gcache.size=64M"
                ),
                "--wsrep-sst-method=rsync".into(),
                format!("--wsrep-sst-receive-address=127.0.0.1:{sst}"),
                "--wsrep-slave-threads=2".into(),
            ];
            let mut node = GaleraNode {
                dir,
                port,
                proc: None,
                args,
            };
            node.launch(i == 0).await;
            nodes.push(node);
        }
        Galera { nodes }
    }

    /// Cuts node `i` off from the others (`on`) or lets it back: Galera's
    /// own partition switch (`gmcast.isolate`), which drops the node's
    /// group connections and refuses new ones, so the node is alone and
    /// non-primary while the others keep the majority. Nothing outside the
    /// cluster's processes changes (unlike firewall rules, nothing to undo
    /// if the test fails: the cluster dies with it).
    pub async fn isolate(&self, i: usize, on: bool) {
        use mysql_async::prelude::Queryable;
        let mut c =
            mysql_async::Conn::from_url(format!("mysql://root@127.0.0.1:{}", self.nodes[i].port))
                .await
                .expect("connect to the Galera node");
        c.query_drop(format!(
            "SET GLOBAL wsrep_provider_options = 'gmcast.isolate={}'",
            u8::from(on)
        ))
        .await
        .expect("gmcast.isolate");
        let _ = c.disconnect().await;
    }

    /// Node `i`'s `wsrep_cluster_status` (Primary, non-Primary), or
    /// `None` when it does not answer.
    pub async fn cluster_status(&self, i: usize) -> Option<String> {
        use mysql_async::prelude::Queryable;
        let mut c =
            mysql_async::Conn::from_url(format!("mysql://root@127.0.0.1:{}", self.nodes[i].port))
                .await
                .ok()?;
        let row: Option<(String, String)> = c
            .query_first("SHOW STATUS LIKE 'wsrep_cluster_status'")
            .await
            .ok()
            .flatten();
        let _ = c.disconnect().await;
        row.map(|(_, v)| v)
    }

    /// `mysql://` URL of database `db` on node `i` (0-based).
    pub fn url(&self, i: usize, db: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{db}", self.nodes[i].port)
    }
}

impl GaleraNode {
    /// Starts the node (bootstrapping a new cluster if `first`) and waits
    /// until it is Synced and answers.
    pub async fn launch(&mut self, first: bool) {
        let mut cmd = Command::new("mariadbd");
        cmd.args(&self.args);
        if first {
            cmd.arg("--wsrep-new-cluster");
        }
        self.proc = Some(Proc::spawn(cmd, self.dir.join("mariadbd.log")));
        let url = format!("mysql://root@127.0.0.1:{}", self.port);
        let log = self.dir.join("mariadbd.log");
        wait_for("a Galera node to sync", Duration::from_secs(60), || {
            let url = url.clone();
            let log = log.clone();
            async move {
                use mysql_async::prelude::Queryable;
                let Ok(mut c) = mysql_async::Conn::from_url(url).await else {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(
                        !text.contains("[ERROR] Aborting"),
                        "Galera node failed:\n{text}"
                    );
                    return false;
                };
                let state: Option<(String, String)> = c
                    .query_first("SHOW STATUS LIKE 'wsrep_local_state_comment'")
                    .await
                    .ok()
                    .flatten();
                let _ = c.disconnect().await;
                matches!(state, Some((_, s)) if s == "Synced")
            }
        })
        .await;
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the server: a hung node,
    /// whose port still accepts connections that never get an answer.
    pub fn pause(&self, on: bool) {
        let pid = self.proc.as_ref().expect("a running node").child.id();
        let signal = if on { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}
