//! Issue 13, node side: what an attacker's review found, each driven
//! through the real binary (and real fail2ban, MariaDB where they matter).
mod common;

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use banmesh::hub::store::{self, BanFilter};
use common::{fail2ban::F2bHost, *};
use mysql_async::prelude::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// The forged reporter of the review: a newline, then a whole line that
/// fail2ban's `shared` filter bans from and whose tag is far ahead.
const FORGED: &str = "x\n2026-11-25 12:26:09 +0000 banmesh[999999]: 198.51.100.66: reported by y";

/// A seed database holding the README's `ip_table` and these rows
/// `(added_by, ip)`, all created now.
async fn seed_with(rows: &[(&str, &str)]) -> TestDb {
    let seed = TestDb::new().await;
    let mut c = mysql_async::Conn::from_url(mysql_server()).await.unwrap();
    c.query_drop(format!("CREATE DATABASE {}", seed.name))
        .await
        .unwrap();
    let mut c = seed.conn().await;
    c.query_drop(
        "CREATE TABLE ip_table (
            id bigint(20) unsigned NOT NULL AUTO_INCREMENT,
            added_by varchar(255) DEFAULT NULL,
            created datetime NOT NULL default CURRENT_TIMESTAMP,
            jailname text NOT NULL,
            protocol varchar(16) NOT NULL,
            port varchar(32) NOT NULL,
            ip varchar(64) NOT NULL,
            host_node1 INT DEFAULT 0,
            PRIMARY KEY (id)
        )",
    )
    .await
    .unwrap();
    for (by, ip) in rows {
        c.exec_drop(
            "INSERT INTO ip_table (added_by, jailname, protocol, port, ip) VALUES (?, 'sshd', 'tcp', '22', ?)",
            (by, ip),
        )
        .await
        .unwrap();
    }
    seed
}

/// Item 7: a seed row whose `added_by` is not a host name is skipped and
/// listed, so it never reaches a host's shared.log.
#[tokio::test(flavor = "multi_thread")]
async fn import_seed_skips_a_forged_reporter_and_no_host_writes_it() {
    let seed = seed_with(&[("node1", "198.51.100.1"), (FORGED, "198.51.100.2")]).await;
    let db = TestDb::new().await;
    let out = banmesh()
        .args(["hub", "import-seed", "--from", &seed.url, "--to", &db.url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("skipped 1 seed rows") && stdout.contains("[2]"),
        "{stdout}"
    );

    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let node = Node::start(root.path(), &pki, "node-b", &hub.url).await;
    wait_for("the valid seed ban in shared.log", DEADLINE, || async {
        node.lines_for("198.51.100.1") == 1
    })
    .await;
    let text = std::fs::read_to_string(node.shared_log()).unwrap();
    assert!(!text.contains("198.51.100.66"), "{text}");
    assert_eq!(node.lines_for("198.51.100.2"), 0, "{text}");
}

/// Item 7: a tag far ahead of the hub, already in shared.log (written
/// before this fix, or by anyone who can write the log), does not make the
/// node skip the events that follow a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_tag_in_shared_log_does_not_stop_the_node_applying() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let hub = Hub::start_embedded(root.path(), &pki).await;
    let a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    let mut b = Node::start(root.path(), &pki, "node-b", &hub.url).await;
    let (ok, err) = a.report("sshd", "tcp", "22", "198.51.100.5");
    assert!(ok, "{err}");
    wait_for("the first ban on node b", DEADLINE, || async {
        b.lines_for("198.51.100.5") == 1
    })
    .await;

    b.stop();
    // And a position file behind the log, as a crash between writing the
    // line and saving the position leaves it: the line is recognised.
    std::fs::write(b.dir.join("applied"), "0").unwrap();
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(b.shared_log())
        .unwrap();
    std::io::Write::write_all(
        &mut log,
        format!("{}\n", FORGED.split_once('\n').unwrap().1).as_bytes(),
    )
    .unwrap();
    b.restart().await;

    let (ok, err) = a.report("sshd", "tcp", "22", "198.51.100.7");
    assert!(ok, "{err}");
    wait_for("a ban after the restart on node b", DEADLINE, || async {
        b.lines_for("198.51.100.7") == 1
    })
    .await;
    assert_eq!(b.lines_for("198.51.100.5"), 1, "nothing written twice");
}

/// Item 8: a ban of `::ffff:a.b.c.d` is the IPv4 address everywhere (store,
/// fail2ban), and an unban in either spelling lifts it on the hosts.
#[tokio::test(flavor = "multi_thread")]
async fn an_ipv4_mapped_ban_is_ipv4_and_either_spelling_unbans_it() {
    let root = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let pki = Pki::new(root.path());
    let hub = Hub::start(root.path(), &pki, &db.url).await;
    let h1 = F2bHost::start(root.path(), &pki, "host-1", &hub.url).await;
    let h2 = F2bHost::start(root.path(), &pki, "host-2", &hub.url).await;
    let admin = pki.admin("ops");
    let v4 = "203.0.113.9";

    for unban_as in ["::ffff:203.0.113.9", v4] {
        let (ok, err) = h1.node.report("login", "tcp", "22", "::ffff:203.0.113.9");
        assert!(ok, "{err}");
        wait_for("the ban in host 2's ipset", DEADLINE, || async {
            h2.in_ipset("f2b-shared", v4)
        })
        .await;
        let s = store::open(&db.url).await.unwrap();
        let stored: Vec<String> = s
            .list_bans(&BanFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.event.ban.ip)
            .collect();
        assert!(
            stored.iter().all(|ip| ip == v4) && !stored.is_empty(),
            "{stored:?}"
        );

        let (ok, _, err) = hub_cli(&["unban", unban_as], &hub, &admin);
        assert!(ok, "unban {unban_as}: {err}");
        wait_for(
            &format!("unban {unban_as} to lift it on host 2"),
            DEADLINE,
            || async { !h2.in_ipset("f2b-shared", v4) },
        )
        .await;
    }
}

/// Item 11: paths with a blank, `;` and `%` reach `banmesh report` as one
/// argument each, through fail2ban's own config reader and `sh -c`.
#[test]
fn setup_fail2ban_paths_reach_the_action_as_one_argument_each() {
    let root = tempfile::tempdir().unwrap();
    let conf = root.path().join("fail2ban");
    let copied = Command::new("cp")
        .arg("-r")
        .arg("/etc/fail2ban")
        .arg(&conf)
        .status()
        .unwrap();
    assert!(copied.success(), "fail2ban's config is not installed");
    for entry in std::fs::read_dir(conf.join("jail.d")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let odd = root.path().join("my dir;touch PWNED;100%x");
    let bin = root.path().join("bin dir;touch PWNED").join("banmesh");
    let args_file = root.path().join("args");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::write(
        &bin,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done > '{}'\n",
            args_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = odd.join("node.sock");
    let out = banmesh()
        .args(["node", "setup-fail2ban", "--config-dir"])
        .arg(&conf)
        .arg("--shared-log")
        .arg(root.path().join("shared.log"))
        .arg("--socket")
        .arg(&socket)
        .arg("--data-dir")
        .arg(&odd)
        .arg("--banmesh")
        .arg(&bin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        conf.join("jail.d/login.local"),
        "[login]\nenabled = true\nfilter =\nfailregex = ^x <HOST>\nlogpath = /dev/null\nbanaction = ipset-allports-banmesh\n",
    )
    .unwrap();
    // fail2ban's reading of the action, as it would run it.
    let dump = Command::new("fail2ban-client")
        .arg("-c")
        .arg(&conf)
        .arg("-d")
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    let start = dump
        .find("if [ '<restored>'")
        .unwrap_or_else(|| panic!("no report call in fail2ban's reading:\n{dump}"));
    let end = start + dump[start..].find("; fi").unwrap() + "; fi".len();
    let command = dump[start..end]
        .replace("<restored>", "0")
        .replace("<ip>", "192.0.2.1");
    let ran = Command::new("sh")
        .args(["-c", &command])
        .current_dir(root.path())
        .status()
        .unwrap();
    assert!(ran.success(), "{command}");
    let args = std::fs::read_to_string(&args_file).unwrap();
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(
        args,
        [
            "report",
            "--socket",
            socket.to_str().unwrap(),
            "--data-dir",
            odd.to_str().unwrap(),
            "-j",
            "login",
            "-pr",
            "tcp",
            "-p",
            "0:65535",
            "-i",
            "192.0.2.1"
        ]
    );
    assert!(!root.path().join("PWNED").exists(), "a `;` ran a command");
}

/// Item 11: a bantime carrying a newline (which would add `ignoreip`) is
/// refused with a clear error, and nothing is written.
#[test]
fn setup_fail2ban_refuses_a_bantime_or_interface_that_adds_keys() {
    let root = tempfile::tempdir().unwrap();
    let conf = root.path().join("fail2ban");
    for (flag, value) in [
        ("--bantime", "1d\nignoreip = 0.0.0.0/0"),
        ("--nat-forward", "ppp+\nignoreip = 0.0.0.0/0"),
    ] {
        let out = banmesh()
            .args(["node", "setup-fail2ban", "--config-dir"])
            .arg(&conf)
            .arg("--shared-log")
            .arg(root.path().join("shared.log"))
            .args([flag, value])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} accepted");
        assert!(
            stderr.contains(flag) && stderr.contains("nothing was written"),
            "{stderr}"
        );
        assert!(!conf.exists(), "{flag}: files written");
        assert!(!root.path().join("shared.log").exists());
    }
}

/// Item 13: a symbolic link at shared.log stops the node with a clear
/// error, and the file it points at is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_at_shared_log_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let hub = Hub::start_embedded(root.path(), &pki).await;
    let dir = root.path().join("node-b");
    std::fs::create_dir_all(&dir).unwrap();
    let target = root.path().join("root-owned.conf");
    std::fs::write(&target, "keep me\n").unwrap();
    let log = dir.join("shared.log");
    std::os::unix::fs::symlink(&target, &log).unwrap();
    let tls = pki.host("node-b");
    let mut cmd = banmesh();
    cmd.args(["node", "--hub", &hub.url, "--no-fail2ban-socket"])
        .args(tls_args(&tls))
        .arg("--shared-log")
        .arg(&log)
        .arg("--socket")
        .arg(dir.join("node.sock"))
        .arg("--data-dir")
        .arg(&dir);
    let mut node = Proc::spawn(cmd, root.path().join("node-b.log"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the node runs with a link at shared.log:\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    let text = node.log_text();
    assert!(
        text.contains(&log.display().to_string()) && text.contains("symbolic link"),
        "{text}"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me\n");
}

/// Every file under `dir` that is not a socket or one of `except`, with
/// its mode.
fn files_under(dir: &Path, except: &[&str]) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if meta.is_dir() {
            out.extend(files_under(&path, except));
        } else if !meta.file_type().is_socket() && !except.contains(&name.as_str()) {
            out.push((path, meta.permissions().mode() & 0o777));
        }
    }
    out
}

/// Item 14: what a node and a hub keep under their data dirs (outbox,
/// journal, position, spool, shared.log; the SQLite store and its -wal and
/// -shm) is readable by its owner only, and a loose existing file is
/// tightened.
#[tokio::test(flavor = "multi_thread")]
async fn state_files_are_private() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let hub = Hub::start_embedded(root.path(), &pki).await;
    let a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    let b_dir = root.path().join("node-b");
    std::fs::create_dir_all(&b_dir).unwrap();
    let loose = b_dir.join("outbox.log");
    std::fs::write(&loose, "").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut b = Node::start(root.path(), &pki, "node-b", &hub.url).await;

    let (ok, err) = a.report("sshd", "tcp", "22", "198.51.100.9");
    assert!(ok, "{err}");
    wait_for("the ban on node b", DEADLINE, || async {
        b.lines_for("198.51.100.9") == 1
    })
    .await;
    // A report while node b is down waits in its spool.
    b.stop();
    let (ok, err) = b.report("sshd", "tcp", "22", "198.51.100.10");
    assert!(ok, "{err}");
    let spooled = files_under(&b_dir.join("spool"), &[]);
    assert_eq!(spooled.len(), 1, "{spooled:?}");
    b.restart().await;
    wait_for("the spooled ban on node a", DEADLINE, || async {
        a.lines_for("198.51.100.10") == 1
    })
    .await;

    let mut files = spooled;
    for dir in [root.path().join("hub"), a.dir.clone(), b_dir] {
        // node.log is the test's capture of the node's output.
        files.extend(files_under(&dir, &["node.log"]));
    }
    let names: Vec<String> = files
        .iter()
        .filter_map(|(p, _)| Some(p.file_name()?.to_string_lossy().into_owned()))
        .collect();
    for expected in [
        "banmesh.db",
        "banmesh.db-wal",
        "outbox.log",
        "statuses.log",
        "shared.log",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected}: {names:?}");
    }
    let open: Vec<_> = files.iter().filter(|(_, mode)| mode & 0o077 != 0).collect();
    assert!(open.is_empty(), "readable by others: {open:?}");
    let hub_dir = std::fs::metadata(root.path().join("hub")).unwrap();
    assert_eq!(hub_dir.permissions().mode() & 0o777, 0o700);
    drop(hub);
}
