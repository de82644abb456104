//! The README's first command: `banmesh demo` on a machine with no database
//! and no certificates finishes, shows every ban arriving on every other
//! node, prints the status table, exits 0 and leaves nothing behind.
mod common;

use std::collections::HashSet;

#[test]
fn the_demo_shows_every_ban_crossing_the_fleet_and_exits_cleanly() {
    let out = common::banmesh()
        .args(["demo", "--bans", "5", "--gap", "50ms"])
        .output()
        .expect("run banmesh demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Every (ban, other node) pair appears once in the arrivals table.
    let mut arrivals = HashSet::new();
    for line in stdout.lines().filter(|l| l.ends_with(" ms")) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (from, ip, to) = (cols[0], cols[1], cols[2]);
        assert_ne!(
            from, to,
            "a ban is not delivered back to its reporter: {line}"
        );
        assert!(
            arrivals.insert((ip.to_string(), to.to_string())),
            "duplicate arrival: {line}"
        );
    }
    assert_eq!(arrivals.len(), 5 * 2, "5 bans x 2 other nodes:\n{stdout}");

    // The status table: one row per ban, every host at 1.
    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("id "))
        .collect();
    assert!(
        table[0].contains("host_node1") && table[0].contains("host_node3"),
        "{stdout}"
    );
    let rows: Vec<&str> = table[1..]
        .iter()
        .take_while(|l| !l.is_empty())
        .copied()
        .collect();
    assert_eq!(rows.len(), 5, "{stdout}");
    for row in rows {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            &cols[cols.len() - 3..],
            ["1", "1", "1"],
            "statuses in {row:?}"
        );
    }

    // Its temp dir is gone.
    let dir = stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("banmesh demo: a throwaway fleet in "))
        .expect("first line names the demo dir");
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
}

/// The README's command is `cargo run --release -- demo`: with
/// `banmesh-report` beside it the package has two binaries, and cargo
/// runs neither unless the manifest names one.
#[test]
fn cargo_run_picks_the_banmesh_binary() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "{out:?}");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(meta["packages"][0]["default_run"], "banmesh", "{meta}");
}
