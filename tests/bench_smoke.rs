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
            "--node-rss-bans",
            "2000",
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
    // 50 bans at once from one node (200 in the full run).
    assert_eq!(json["propagation"][0]["burst_one_node"]["n"], 50);
    // The same run with an allow-list that covers none of its bans.
    assert_eq!(json["propagation_allow_list"][0]["allow_entries"], 300);
    assert_eq!(json["propagation_allow_list"][0]["steady"]["n"], 50);
    assert!(stdout.contains("steady, 300 allowed"), "{stdout}");
    assert_eq!(json["ingest"]["reports"], 10_000);
    assert_eq!(json["fanout"]["deliveries"], 50 * 2000);
    assert_eq!(json["catch_up"]["bans"], 5000);
    // A real node process caught up on 2,000 active bans; its memory is read.
    assert_eq!(json["node_rss"]["bans"], 2000);
    assert!(
        json["node_rss"]["rss_mib"].as_f64().unwrap() > 0.0,
        "{json}"
    );
    assert!(json["node_rss"]["rss_anon_mib"].as_f64().unwrap() > 0.0);
    assert!(json["fanout"]["hub_rss_per_added_subscriber_kib"].is_u64());
    assert_eq!(json["report"]["n"], 200);
    // The small client fail2ban's action runs, built beside banmesh.
    assert_eq!(json["report"]["banmesh_report_binary"]["n"], 200);
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

    // The path hop by hop: printed, and each ban's hops sum to its end to
    // end time, so the hops' means sum to the mean end to end (a sum of
    // medians is no median of sums: only the means are held to it).
    assert!(
        stdout.contains("hub received -> committed (store)"),
        "{stdout}"
    );
    assert!(stdout.contains("sum of hops"), "{stdout}");
    for mode in ["steady_hops", "burst_hops", "burst_one_node_hops"] {
        let hops = &json["propagation"][0][mode];
        assert_eq!(hops["rows"].as_array().unwrap().len(), 9, "{hops}");
        assert!(
            hops["n"].as_u64().unwrap() > 0,
            "no ban was matched to the hub's stamps: {hops}"
        );
        let sum = hops["sum_of_means_ms"].as_f64().unwrap();
        let e2e = hops["end_to_end"]["mean_ms"].as_f64().unwrap();
        assert!(
            e2e > 0.0 && (sum - e2e).abs() <= 0.1 * e2e,
            "hops {sum} ms vs end to end {e2e} ms"
        );
    }
    // Costs per event, from each process's own CPU accounting.
    for (scenario, field) in [
        ("propagation", "node_cpu_us_per_applied_ban"),
        ("ingest", "hub_cpu_us_per_report"),
        ("ingest", "mariadb_cpu_us_per_report"),
        ("fanout", "hub_cpu_us_per_delivery"),
    ] {
        let v = if scenario == "propagation" {
            &json[scenario][0][field]
        } else {
            &json[scenario][field]
        };
        assert!(
            v.as_f64().is_some_and(|x| x > 0.0),
            "{scenario}.{field}: {v}"
        );
    }
    assert!(stdout.contains("MariaDB"), "{stdout}");
}
