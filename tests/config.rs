//! Config files: every daemon flag is a file key and a `BANMESH_*`
//! variable; file < environment < flag; a bad file is refused naming its
//! line and key, and the daemon does not start; `config check` and
//! `config show` say so without starting anything; `SIGHUP` applies a new
//! log level and names what needs a restart.
mod common;

use std::{path::Path, process::Output, time::Duration};

use banmesh::config::{self, ConfigFile, Daemon};
use clap::ArgAction;
use common::*;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn toml_string(s: &str) -> String {
    format!("{s:?}")
}

/// Walks the CLI definition: each flag of `banmesh hub` and `banmesh node`
/// (those of other branches too, once merged) must be accepted as a file
/// key with its default value, and name its environment variable.
#[test]
fn every_daemon_flag_is_a_file_key_and_a_variable() {
    let cmd = config::command();
    for daemon in Daemon::ALL {
        let sub = config::daemon_command(&cmd, daemon);
        let mut keys = 0;
        for arg in sub.get_arguments() {
            let id = arg.get_id().as_str();
            if config::file::NOT_KEYS.contains(&id) {
                continue;
            }
            let long = arg.get_long().unwrap_or_else(|| {
                panic!(
                    "{} flag {id} has no long name, so no file key",
                    daemon.name()
                )
            });
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert!(
                env.as_deref().is_some_and(|e| e.starts_with("BANMESH_")),
                "--{long} of {} has no BANMESH_ variable",
                daemon.name()
            );
            let numeric = config::file::is_numeric(arg);
            let defaults: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            let value = match (arg.get_action(), defaults.as_slice()) {
                (ArgAction::SetTrue, _) => "true".to_string(),
                (ArgAction::Append, vs) if !vs.is_empty() => format!(
                    "[{}]",
                    vs.iter()
                        .map(|v| toml_string(v))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                (_, [v]) if numeric => v.clone(),
                (_, [v]) => toml_string(v),
                // No default to try: the key must at least be known (its
                // value may be refused).
                _ => {
                    let file = format!("{long} = \"\"\n");
                    if let Err(e) = ConfigFile::parse(Path::new("t.toml"), &file, sub) {
                        assert!(!e.to_string().contains("unknown key"), "{e}");
                    }
                    keys += 1;
                    continue;
                }
            };
            let file = format!("# {}\n{long} = {value}\n", daemon.name());
            let parsed = ConfigFile::parse(Path::new("t.toml"), &file, sub)
                .unwrap_or_else(|e| panic!("{} refuses its own default: {e}", daemon.name()));
            assert_eq!(parsed.settings.len(), 1);
            assert_eq!(parsed.settings[0].id, id);
            assert_eq!(parsed.settings[0].line, 2);
            keys += 1;
        }
        assert!(keys > 10, "{} has only {keys} keys", daemon.name());
        // And the other way: a key with no flag is refused.
        let e = ConfigFile::parse(Path::new("t.toml"), "no-such-flag = 1\n", sub).unwrap_err();
        assert!(e.to_string().contains("unknown key"), "{e}");
    }
}

fn show(dir: &Path, file: &str, env: &[(&str, &str)], flags: &[&str]) -> String {
    let path = dir.join("hub.toml");
    std::fs::write(&path, file).unwrap();
    let mut cmd = banmesh();
    cmd.args(["config", "show", "hub", "--config"])
        .arg(&path)
        .args(flags);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn line<'a>(shown: &'a str, key: &str) -> &'a str {
    shown
        .lines()
        .find(|l| l.starts_with(&format!("{key} =")))
        .unwrap_or_else(|| panic!("no {key} in\n{shown}"))
}

#[test]
fn file_then_environment_then_flag() {
    let dir = tempfile::tempdir().unwrap();
    let file = "report-burst = 5\nreport-rate = \"10/s\"\nlog-level = \"debug\"\n\
                db = \"mysql://banmesh:s3cret@db:3306/banmesh\"\n";
    let shown = show(
        dir.path(),
        file,
        &[
            ("BANMESH_REPORT_RATE", "20/s"),
            ("BANMESH_LOG_LEVEL", "warn"),
        ],
        &["--log-level", "error"],
    );
    assert!(line(&shown, "report-burst").contains("= 5 "), "{shown}");
    assert!(
        line(&shown, "report-burst").ends_with("# file, line 1"),
        "{shown}"
    );
    assert!(line(&shown, "report-rate").contains("\"20/s\""), "{shown}");
    assert!(line(&shown, "report-rate").ends_with("# env BANMESH_REPORT_RATE"));
    assert!(line(&shown, "log-level").contains("\"error\""), "{shown}");
    assert!(line(&shown, "log-level").ends_with("# flag"));
    assert!(line(&shown, "listen").ends_with("# default"));
    // The secret is not shown; the rest of the URL is.
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(line(&shown, "db").contains("mysql://banmesh:<redacted>@db:3306/banmesh"));
    // What `show` prints is itself a good file.
    let again = dir.path().join("again-hub.toml");
    std::fs::write(&again, &shown).unwrap();
    let out = banmesh()
        .args(["config", "check", "--config"])
        .arg(&again)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn bad_files_are_refused_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "listen = \"127.0.0.1:0\"\n\nlisen = \"x\"\n",
            ":3: key `lisen`: unknown key",
        ),
        (
            "report-burst = \"many\"\n",
            ":1: key `report-burst`: invalid value 'many'",
        ),
        (
            "\nlisten = 7443\n",
            ":2: key `listen`: expects a string, not a number",
        ),
        (
            "log-level = \"info,=bad[\"\n",
            ":1: key `log-level`: invalid value",
        ),
        ("listen = \"127.0.0.1:1\n", ":1: not valid TOML"),
        (
            "db = \"sqlite:/x\"\ndb-file = \"/y\"\n",
            "cannot be used with",
        ),
    ];
    for (i, (file, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}-hub.toml"));
        std::fs::write(&path, file).unwrap();
        let check = banmesh()
            .args(["config", "check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(check.status.code(), Some(1), "{}", text(&check));
        let said = text(&check);
        assert!(said.contains(&path.display().to_string()), "{said}");
        assert!(said.contains(expected), "expected {expected:?} in {said}");
        // The daemon does not start with it: it exits at once, saying the same.
        let run = banmesh()
            .args(["hub", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(run.status.code(), Some(2), "{}", text(&run));
        assert!(text(&run).contains(expected), "{}", text(&run));
    }
    assert!(
        !dir.path().join("data").exists(),
        "a refused hub made its data dir"
    );
    // A named file that does not exist is refused too.
    let run = banmesh()
        .args(["hub", "--config", "/nonexistent/hub.toml"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert!(text(&run).contains("/nonexistent/hub.toml does not exist"));
}

#[test]
fn config_check_reports_good_files() {
    let dir = tempfile::tempdir().unwrap();
    let hub = dir.path().join("hub.toml");
    let node = dir.path().join("node.toml");
    std::fs::write(&hub, "listen = \"0.0.0.0:7443\"\nreport-burst = 100\n").unwrap();
    std::fs::write(
        &node,
        "hub = [\"https://hub1:7443\", \"https://hub2:7443\"]\nno-fail2ban-socket-ban = true\n",
    )
    .unwrap();
    for (path, expected) in [
        (&hub, "ok (2 settings for banmesh hub)"),
        (&node, "ok (2 settings for banmesh node)"),
    ] {
        let out = banmesh()
            .args(["config", "check", "--config"])
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{}: {expected}", path.display())
        );
    }
    // A name that says neither needs the daemon named.
    let other = dir.path().join("fleet.toml");
    std::fs::copy(&hub, &other).unwrap();
    let out = banmesh()
        .args(["config", "check", "--config"])
        .arg(&other)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = banmesh()
        .args(["config", "check", "hub", "--config"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// A hub started from a file alone (no flags) serves with the file's
/// settings; SIGHUP applies a new log level live and names a changed
/// listen address as needing a restart.
#[tokio::test]
async fn a_hub_runs_from_its_file_and_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let tls = pki.hub();
    let path = dir.path().join("hub.toml");
    let file = |level: &str, listen: &str| {
        format!(
            "listen = \"{listen}\"\ndata-dir = {:?}\ncert = {:?}\nkey = {:?}\nca = {:?}\nlog-level = \"{level}\"\n",
            dir.path().join("hub").display().to_string(),
            tls.cert.display().to_string(),
            tls.key.display().to_string(),
            tls.ca.display().to_string(),
        )
    };
    std::fs::write(&path, file("info", "127.0.0.1:0")).unwrap();
    let mut cmd = banmesh();
    cmd.args(["hub", "--config"]).arg(&path);
    let hub = Hub::launch(dir.path(), cmd).await;
    assert_ne!(hub.port, 0);
    assert!(listening_ports(hub.proc.child.id()).contains(&hub.port));

    std::fs::write(&path, file("debug", "127.0.0.1:1")).unwrap();
    let pid = hub.proc.child.id().to_string();
    let sighup = || {
        assert!(
            std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        )
    };
    sighup();
    wait_for(
        "the hub to say what it reloaded",
        Duration::from_secs(10),
        || {
            let log = hub.proc.log_text();
            async move {
                log.lines().any(|l| {
                    l.contains("SIGHUP: config re-read")
                        && l.contains("applied=log-level")
                        && l.contains("needs_restart=listen")
                })
            }
        },
    )
    .await;
    // Still serving on the old address.
    assert!(listening_ports(hub.proc.child.id()).contains(&hub.port));

    // A renewed hub certificate: SIGHUP makes new handshakes present it.
    assert!(presented_days(hub.port) > 80);
    let sans = ["localhost".to_string(), "127.0.0.1".to_string()];
    std::fs::remove_file(&tls.cert).unwrap();
    std::fs::remove_file(&tls.key).unwrap();
    banmesh::ca::issue(
        &pki.dir,
        &banmesh::ca::HostCert {
            name: "hub",
            sans: &sans,
            valid_for: Duration::from_secs(10 * 86_400),
            role: banmesh::ca::Role::Hub,
        },
    )
    .unwrap();
    sighup();
    wait_for(
        "the hub to present the renewed certificate",
        Duration::from_secs(10),
        || {
            let days = presented_days(hub.port);
            async move { days <= 10 }
        },
    )
    .await;
    assert!(
        hub.proc
            .log_text()
            .contains("SIGHUP: certificate and key re-read")
    );

    // A broken file on SIGHUP changes nothing.
    std::fs::write(&path, "listen = 1\n").unwrap();
    sighup();
    wait_for(
        "the hub to refuse the broken file",
        Duration::from_secs(10),
        || {
            let log = hub.proc.log_text();
            async move {
                log.contains("config refused; nothing changed") && log.contains("expects a string")
            }
        },
    )
    .await;
    assert!(listening_ports(hub.proc.child.id()).contains(&hub.port));
}

/// Days left on the certificate the hub on `port` presents now (openssl
/// s_client, as an operator would check it).
fn presented_days(port: u16) -> i64 {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null \
             | openssl x509 -noout -enddate"
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let date = text
        .trim()
        .strip_prefix("notAfter=")
        .unwrap_or_else(|| panic!("{text}"));
    let out = std::process::Command::new("date")
        .args(["-d", date, "+%s"])
        .output()
        .unwrap();
    let end: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    (end - banmesh::clock::now_ms() / 1000) / 86_400
}
