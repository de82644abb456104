//! Prometheus metrics: both daemons serve `GET /metrics` on `--metrics`;
//! after a small fleet run the counters match what the test did, and
//! `promtool check metrics` accepts the output without a warning.
mod common;

use std::{
    io::{Read, Write},
    process::{Command, Stdio},
    time::Duration,
};

use common::*;

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port open");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

/// The value of the sample `name` (with its labels as written), if present.
fn value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(sample))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

fn promtool(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/test-deps: prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{text}"
    );
}

#[tokio::test]
async fn counters_match_a_small_fleet_run() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let hub_metrics = free_port();
    let mut cmd = banmesh();
    cmd.args(["hub", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("hub"))
        .args(tls_args(&pki.hub()))
        .args(["--metrics", &format!("127.0.0.1:{hub_metrics}")]);
    let hub = Hub::launch(dir.path(), cmd).await;
    let (m1, m2) = (free_port(), free_port());
    let metrics = |port: u16| -> Vec<std::ffi::OsString> {
        vec![
            "--no-fail2ban-socket".into(),
            "--metrics".into(),
            format!("127.0.0.1:{port}").into(),
        ]
    };
    let n1 = Node::start_with(dir.path(), &pki, "n1", &hub.url, metrics(m1)).await;
    let _n2 = Node::start_with(dir.path(), &pki, "n2", &hub.url, metrics(m2)).await;

    for ip in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
        let (ok, err) = n1.report("sshd", "tcp", "22", ip);
        assert!(ok, "{err}");
    }
    wait_for("n2 to apply three bans", Duration::from_secs(30), || {
        let text = scrape(m2);
        async move { value(&text, "banmesh_node_applied_total{status=\"added\"}") == Some(3.0) }
    })
    .await;

    // One report the fleet allow-list refuses.
    let (ok, _, err) = hub_cli(
        &["allow", "add", "198.51.100.0/24"],
        &hub,
        &pki.admin("ops"),
    );
    assert!(ok, "{err}");
    let (ok, err) = n1.report("sshd", "tcp", "22", "198.51.100.9");
    assert!(ok, "{err}");
    wait_for("the refusal to be counted", Duration::from_secs(30), || {
        let text = scrape(hub_metrics);
        async move {
            value(
                &text,
                "banmesh_hub_reports_total{outcome=\"refused\",reason=\"allow_list\"}",
            ) == Some(1.0)
        }
    })
    .await;

    let hub_text = scrape(hub_metrics);
    promtool(&hub_text);
    assert_eq!(
        value(&hub_text, "banmesh_hub_reports_received_total"),
        Some(4.0),
        "{hub_text}"
    );
    assert_eq!(
        value(
            &hub_text,
            "banmesh_hub_reports_total{outcome=\"accepted\",reason=\"\"}"
        ),
        Some(3.0),
        "{hub_text}"
    );
    assert_eq!(
        value(&hub_text, "banmesh_hub_subscribers"),
        Some(2.0),
        "{hub_text}"
    );
    // Three bans to each node (a ban with a fleet end goes back to its
    // reporter too, which holds it until then), and the allow-list change
    // to both.
    wait_for("eight deliveries", Duration::from_secs(30), || {
        let text = scrape(hub_metrics);
        async move { value(&text, "banmesh_hub_deliveries_total") == Some(8.0) }
    })
    .await;
    for host in ["n1", "n2"] {
        wait_for(
            &format!("{host} to catch up"),
            Duration::from_secs(30),
            || {
                let text = scrape(hub_metrics);
                let sample = format!("banmesh_hub_host_lag_events{{host=\"{host}\"}}");
                async move { value(&text, &sample) == Some(0.0) }
            },
        )
        .await;
    }

    let n2_text = scrape(m2);
    promtool(&n2_text);
    assert_eq!(
        value(&n2_text, "banmesh_node_apply_latency_seconds_count"),
        Some(3.0),
        "{n2_text}"
    );
    assert_eq!(value(&n2_text, "banmesh_node_hub_connected"), Some(1.0));
    assert_eq!(
        value(&n2_text, "banmesh_node_hub_connects_total"),
        Some(1.0)
    );
    assert_eq!(
        value(&n2_text, "banmesh_node_shared_log_write_errors_total"),
        Some(0.0)
    );
    let n1_text = scrape(m1);
    promtool(&n1_text);
    wait_for("n1's outbox to empty", Duration::from_secs(30), || {
        let text = scrape(m1);
        async move { value(&text, "banmesh_node_outbox_depth") == Some(0.0) }
    })
    .await;
    // The shipped Grafana dashboard queries only metrics that exist.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/grafana/banmesh.json"),
        )
        .unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("banmesh_") {
                    let family = word.trim_end_matches("_bucket");
                    assert!(
                        [&hub_text, &n1_text, &n2_text]
                            .iter()
                            .any(|t| t.contains(family)),
                        "the dashboard queries {word}, which no daemon serves"
                    );
                    queried += 1;
                }
            }
        }
    }
    assert!(queried >= 10);
    // No address is ever a label.
    for text in [&hub_text, &n1_text, &n2_text] {
        assert!(
            !text.contains("192.0.2.") && !text.contains("198.51.100."),
            "{text}"
        );
    }
}
