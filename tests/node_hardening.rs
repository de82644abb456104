//! Issue 13, node side: what an attacker's review found, each driven
//! through the real binary (and real fail2ban, MariaDB where they matter).
mod common;

use std::{os::unix::fs::PermissionsExt, process::Command, time::Duration};

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

        let out = banmesh()
            .args(["unban", unban_as, "--hub", &hub.url])
            .args(tls_args(&admin))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "unban {unban_as}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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
