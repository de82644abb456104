//! The benchmark harness runs end to end (small sizes; the figures are the
//! README's business, not a test's).
mod common;

#[test]
fn bench_quick_runs_every_scenario() {
    let out = common::banmesh()
        .args([
            "bench",
            "--quick",
            "--nodes",
            "5",
            "--subscribers",
            "50",
            "--catch-up",
            "5000",
            "--ingest",
            "1000",
            "--allow-entries",
            "300",
            "--wave-hosts",
            "5",
            "--wave-addresses",
            "40",
        ])
        .args(["--mysql", &common::mysql_server()])
        // Should it fail, the nodes' warnings say why.
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(json["propagation"][0]["steady"]["n"], 50);
    // The same run with an allow-list that covers none of its bans.
    assert_eq!(json["propagation_allow_list"][0]["allow_entries"], 300);
    assert_eq!(json["propagation_allow_list"][0]["steady"]["n"], 50);
    assert!(stdout.contains("steady, 300 allowed"), "{stdout}");
    assert_eq!(json["ingest"]["reports"], 10_000);
    assert_eq!(json["fanout"]["deliveries"], 50 * 2000);
    assert_eq!(json["catch_up"]["bans"], 5000);
    assert_eq!(json["report"]["n"], 200);
    // The scanning wave: five hosts report the same 40 addresses; one fleet
    // ban each, delivered once to every host.
    assert_eq!(json["wave"]["fleet_bans"], 40);
    assert_eq!(json["wave"]["deliveries_per_host_min"], 40);
    assert_eq!(json["wave"]["deliveries_per_host_max"], 40);
    // Fleet signals: every threshold crossing became a ban on all 10 nodes,
    // and the windows held the addresses sent.
    assert_eq!(json["signal_to_ban"]["latency"]["n"], 20);
    assert_eq!(json["signal_ingest"]["accepted"], 100_000);
    assert_eq!(json["signal_memory"]["addresses"], 20_000);
}
