//! A private MariaDB server for tests that stop and restart the database
//! (the shared server on 3306 must stay up for every other test).
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::{Proc, free_port, wait_for};

pub struct PrivateMariaDb {
    pub dir: PathBuf,
    pub port: u16,
    pub proc: Option<Proc>,
}

impl PrivateMariaDb {
    pub async fn start(root: &Path) -> PrivateMariaDb {
        let dir = root.join("mariadb");
        let data = dir.join("data");
        std::fs::create_dir_all(&dir).unwrap();
        super::install_mariadb_data(&data, "root");
        let mut db = PrivateMariaDb {
            dir,
            port: free_port(),
            proc: None,
        };
        db.restart().await;
        db
    }

    /// `mysql://` URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{name}", self.port)
    }

    /// Starts the server (again) and waits until it answers.
    pub async fn restart(&mut self) {
        let mut cmd = Command::new("mariadbd");
        cmd.args([
            "--no-defaults",
            "--user=root",
            "--skip-grant-tables",
            "--bind-address=127.0.0.1",
        ])
        .arg(format!("--datadir={}", self.dir.join("data").display()))
        .arg(format!("--port={}", self.port))
        .arg(format!("--socket={}", self.dir.join("sock").display()))
        .arg(format!("--pid-file={}", self.dir.join("pid").display()))
        .arg("--innodb-buffer-pool-size=64M");
        self.proc = Some(Proc::spawn(cmd, self.dir.join("mariadbd.log")));
        let url = format!("mysql://root@127.0.0.1:{}", self.port);
        wait_for("the private MariaDB", Duration::from_secs(30), || {
            let url = url.clone();
            async move {
                match mysql_async::Conn::from_url(url).await {
                    Ok(c) => {
                        let _ = c.disconnect().await;
                        true
                    }
                    Err(_) => false,
                }
            }
        })
        .await;
    }

    /// Stops the server gracefully (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }
}
