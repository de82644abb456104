//! Secrets stay out of what others can read: `--help` never prints the
//! values of `BANMESH_DB` or `BANMESH_TOKEN`, an error naming a database
//! URL never shows its password, and the database URL and the enrolment
//! token can come from a file (`--db-file`, `--token-file`) instead of the
//! command line, which every user of the machine sees in the process list.
mod common;

use std::{os::unix::fs::PermissionsExt, path::Path, process::Output};

use common::*;
use mysql_async::prelude::*;

const SECRET: &str = "s3cret";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn write_secret(path: &Path, line: &str, mode: u32) {
    std::fs::write(path, format!("{line}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn help_never_shows_secret_environment_values() {
    for command in ["hub", "enroll"] {
        let out = banmesh()
            .args([command, "--help"])
            .env("BANMESH_DB", format!("mysql://u:{SECRET}@127.0.0.1:3306/x"))
            .env("BANMESH_TOKEN", format!("{SECRET}-token"))
            .output()
            .unwrap();
        let help = text(&out);
        assert!(out.status.success(), "{help}");
        assert!(!help.contains(SECRET), "`{command} --help` shows:\n{help}");
        // The variable is still named, so an operator knows it exists.
        assert!(help.contains("BANMESH_"), "{help}");
    }
}

#[test]
fn a_mistyped_database_url_is_shown_without_its_password() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let tls = pki.hub();
    for url in [
        format!("mysq://u:{SECRET}@127.0.0.1/db"),
        format!("mariadb://u:{SECRET}@127.0.0.1:3306/db"),
        format!("u:{SECRET}@127.0.0.1/db"),
    ] {
        let out = banmesh()
            .args(["hub", "--listen", "127.0.0.1:0", "--db", &url])
            .arg("--data-dir")
            .arg(root.path().join("hub"))
            .args(tls_args(&tls))
            .output()
            .unwrap();
        let err = text(&out);
        assert!(!out.status.success());
        assert!(err.contains("unsupported --db"), "{err}");
        assert!(!err.contains(SECRET), "the error shows the password: {err}");

        let out = banmesh()
            .args(["hub", "migrate", "--from", &url, "--to"])
            .arg(format!("sqlite:{}", root.path().join("to.db").display()))
            .output()
            .unwrap();
        let err = text(&out);
        assert!(!out.status.success());
        assert!(!err.contains(SECRET), "the error shows the password: {err}");
    }
}

/// A MariaDB user with a password, allowed on `db` only; dropped at the end.
struct DbUser {
    name: String,
}

impl DbUser {
    async fn create(db: &TestDb) -> DbUser {
        let name = format!("u_{}", db.name.trim_start_matches("banmesh_"));
        let mut c = mysql_async::Conn::from_url(mysql_server()).await.unwrap();
        c.query_drop(format!("DROP USER IF EXISTS '{name}'@'%'"))
            .await
            .unwrap();
        c.query_drop(format!("CREATE USER '{name}'@'%' IDENTIFIED BY '{SECRET}'"))
            .await
            .unwrap();
        c.query_drop(format!("GRANT ALL ON `{}`.* TO '{name}'@'%'", db.name))
            .await
            .unwrap();
        c.disconnect().await.unwrap();
        DbUser { name }
    }

    async fn drop_user(self) {
        let mut c = mysql_async::Conn::from_url(mysql_server()).await.unwrap();
        let _ = c
            .query_drop(format!("DROP USER IF EXISTS '{}'@'%'", self.name))
            .await;
        let _ = c.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hub_reads_its_database_url_from_a_file() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let user = DbUser::create(&db).await;
    let pki = Pki::new(root.path());
    let tls = pki.hub();
    let server = mysql_server();
    let at = server.rsplit('@').next().unwrap();
    let url = format!("mysql://{}:{SECRET}@{at}/{}", user.name, db.name);
    let file = root.path().join("db-url");
    let hub_cmd = || {
        let mut cmd = banmesh();
        cmd.args(["hub", "--listen", "127.0.0.1:0", "--db-file"])
            .arg(&file)
            .arg("--data-dir")
            .arg(root.path().join("hub"))
            .args(tls_args(&tls));
        cmd
    };

    // A file every user may read is refused, with what to do about it.
    write_secret(&file, &url, 0o644);
    let out = hub_cmd().output().unwrap();
    let err = text(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("chmod"), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(!err.contains(SECRET), "{err}");

    write_secret(&file, &url, 0o600);
    let hub = Hub::launch(root.path(), hub_cmd()).await;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", hub.proc.child.id())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(SECRET));
    // The hub made its schema in MariaDB, as that user, and serves.
    let mut c = db.conn().await;
    let events: Option<u64> = c.query_first("SELECT COUNT(*) FROM events").await.unwrap();
    assert_eq!(events, Some(0));
    c.disconnect().await.unwrap();
    let node = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    assert!(node.report("sshd", "tcp", "22", "192.0.2.90").0);
    drop(node);
    drop(hub);
    user.drop_user().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn enroll_reads_its_token_from_a_file() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = format!("sqlite:{}", root.path().join("hub.db").display());
    let hub = Hub::start(root.path(), &pki, &db).await;
    let admin = pki.admin("ops");
    let (token, hash) = create_token(&hub, &admin, &["--name", "fresh-2"]);
    let file = root.path().join("token");
    let dir = root.path().join("fresh-2-etc");
    let enroll_from = |file: &Path| {
        banmesh()
            .args(["enroll", "--hub", &format!("127.0.0.1:{}", hub.port)])
            .arg("--token-file")
            .arg(file)
            .args(["--ca-sha256", &hash, "--name", "fresh-2", "--dir"])
            .arg(&dir)
            .output()
            .unwrap()
    };

    // Readable by every user: refused before the token is sent.
    write_secret(&file, &token, 0o604);
    let out = enroll_from(&file);
    let err = text(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("chmod"), "{err}");
    assert!(!err.contains(&token), "{err}");

    write_secret(&file, &token, 0o600);
    let out = enroll_from(&file);
    assert!(out.status.success(), "{}", text(&out));
    assert!(dir.join("host.crt").exists());
    // The token was spent by that call, not the refused one.
    let (ok, err) = enroll(&hub, &token, &hash, "fresh-2", &root.path().join("again"));
    assert!(!ok);
    assert!(err.contains("already used"), "{err}");
}
