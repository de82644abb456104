//! `banmesh-node`, the node-only binary the node's unit runs (issue 19),
//! is `banmesh node` under another name: the same flags and actions (both
//! come from one clap definition; compared here so they cannot drift), the
//! same config file handling, and its own `--version`.
use std::{collections::BTreeSet, process::Command};

fn run(exe: &str, args: &[&str]) -> std::process::Output {
    Command::new(exe).args(args).output().expect("run")
}

fn node(args: &[&str]) -> std::process::Output {
    run(env!("CARGO_BIN_EXE_banmesh-node"), args)
}

fn banmesh_node(args: &[&str]) -> std::process::Output {
    let mut all = vec!["node"];
    all.extend_from_slice(args);
    run(env!("CARGO_BIN_EXE_banmesh"), &all)
}

/// The long flags and the subcommands a `--help` text lists.
fn listed(help: &std::process::Output) -> (BTreeSet<String>, BTreeSet<String>) {
    assert!(help.status.success(), "{help:?}");
    let text = String::from_utf8_lossy(&help.stdout);
    let mut flags = BTreeSet::new();
    let mut commands = BTreeSet::new();
    let mut section = "";
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if !line.starts_with(' ') {
            section = line;
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        match section {
            // An option's own line (a value's description is indented deeper).
            "Options:" if line.len() - line.trim_start().len() <= 6 => {
                let long = line
                    .split(|c: char| c.is_whitespace() || c == ',')
                    .find(|w| w.starts_with("--"))
                    .expect("an option line names its long flag");
                flags.insert(long.split('=').next().unwrap().to_string());
            }
            "Commands:" if !first.is_empty() => {
                commands.insert(first.to_string());
            }
            _ => {}
        }
    }
    (flags, commands)
}

#[test]
fn version_names_the_binary() {
    let out = node(&["--version"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("banmesh-node {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn flags_and_actions_are_those_of_banmesh_node() {
    let (mut flags, commands) = listed(&node(&["--help"]));
    // Its own `--version` (`banmesh node` has the top level's only).
    assert!(flags.remove("--version"), "{flags:?}");
    assert_eq!(
        (flags.clone(), commands.clone()),
        listed(&banmesh_node(&["--help"]))
    );
    for expected in ["--hub", "--config", "--shared-log", "--fail2ban-socket"] {
        assert!(flags.contains(expected), "{expected} not in {flags:?}");
    }
    for action in ["setup-fail2ban", "setup-probes"] {
        assert!(commands.contains(action), "{action} not in {commands:?}");
        assert_eq!(
            listed(&node(&[action, "--help"])),
            listed(&banmesh_node(&[action, "--help"])),
            "{action}"
        );
    }
    let help = String::from_utf8_lossy(&node(&["--help"]).stdout).into_owned();
    assert!(help.contains("Usage: banmesh-node [OPTIONS]"), "{help}");
}

/// A refused config file: the same message and exit code as `banmesh node`.
#[test]
fn config_file_is_read_as_by_banmesh_node() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let bad = dir.path().join("node.toml");
    std::fs::write(&bad, "outbox-limit = \"many\"\n").unwrap();
    for file in [&missing, &bad] {
        let file = file.to_str().unwrap();
        let small = node(&["--config", file]);
        let big = banmesh_node(&["--config", file]);
        assert_eq!(small.status.code(), Some(2), "{small:?}");
        assert_eq!(small.status.code(), big.status.code());
        assert_eq!(small.stderr, big.stderr);
        assert!(
            String::from_utf8_lossy(&small.stderr).contains(file),
            "{small:?}"
        );
    }
}

/// Run from `banmesh-node`, `setup-fail2ban`'s action calls the client
/// beside it (`banmesh-report`, else `banmesh report`), never `banmesh-node`.
#[test]
fn setup_fail2ban_points_the_action_at_the_report_client() {
    let dir = tempfile::tempdir().unwrap();
    let out = node(&[
        "setup-fail2ban",
        "--dry-run",
        "--config-dir",
        dir.path().to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("banmesh-report"), "{text}");
    assert!(!text.contains("banmesh-node"), "{text}");
}
