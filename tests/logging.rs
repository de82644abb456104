//! `--log-format json`: one JSON object per line, and every line of a
//! stream names the host at its other end (the hub's lines name the node
//! in `peer`; a node's lines name itself in `host` and its hub in `hub`).
mod common;

use std::time::Duration;

use common::*;

fn objects(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// The spans of a JSON line, outermost first.
fn spans(line: &serde_json::Value) -> Vec<serde_json::Value> {
    line["spans"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn json_lines_name_the_peer_of_every_stream() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let port = free_port();
    let mut cmd = banmesh();
    cmd.args([
        "hub",
        "--log-format",
        "json",
        "--listen",
        &format!("127.0.0.1:{port}"),
    ])
    .arg("--data-dir")
    .arg(dir.path().join("hub"))
    .args(tls_args(&pki.hub()));
    let hub = Proc::spawn(cmd, dir.path().join("hub.log"));
    let url = format!("https://127.0.0.1:{port}");
    let node = Node::start_with(
        dir.path(),
        &pki,
        "n1",
        &url,
        vec![
            "--no-fail2ban-socket".into(),
            "--log-format".into(),
            "json".into(),
        ],
    )
    .await;
    wait_for(
        "the hub to log n1's subscription",
        Duration::from_secs(30),
        || {
            let text = hub.log_text();
            async move {
                objects(&text).iter().any(|l| {
                    l["fields"]["message"] == "subscribed"
                        && spans(l)
                            .iter()
                            .any(|s| s["name"] == "rpc" && s["peer"] == "n1")
                })
            }
        },
    )
    .await;
    let hub_lines = objects(&hub.log_text());
    assert!(
        hub_lines
            .iter()
            .any(|l| l["fields"]["message"] == "hub listening"),
        "{hub_lines:?}"
    );
    // Every line of an RPC names its caller.
    for line in hub_lines
        .iter()
        .filter(|l| spans(l).iter().any(|s| s["name"] == "rpc"))
    {
        let rpc = spans(line)
            .into_iter()
            .find(|s| s["name"] == "rpc")
            .unwrap();
        if rpc["rpc"]
            .as_str()
            .is_some_and(|r| r.starts_with("banmesh.v1.Hub/"))
        {
            assert_eq!(rpc["peer"], "n1", "{line}");
        }
    }
    // The node's lines: itself and its hub, on every line of its tasks.
    let node_text = node.proc.as_ref().unwrap().log_text();
    let node_lines = objects(&node_text);
    let subscribed = node_lines
        .iter()
        .find(|l| l["fields"]["message"] == "subscribed to hub")
        .unwrap_or_else(|| panic!("{node_text}"));
    assert_eq!(subscribed["span"]["host"], "n1");
    assert_eq!(subscribed["span"]["hub"], url.as_str());
    for line in node_lines.iter().filter(|l| l.get("span").is_some()) {
        assert_eq!(line["span"]["host"], "n1", "{line}");
    }
}
