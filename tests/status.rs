//! `banmesh status` on a node: what a person needs at a glance, and an
//! exit code a monitoring check can use (0 fine, 1 a problem, 2 no node).
mod common;

use std::time::Duration;

use common::*;

fn status(node: &Node) -> (Option<i32>, String) {
    let out = banmesh()
        .arg("status")
        .arg("--socket")
        .arg(node.socket())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn status_says_what_is_wrong_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut hub = Hub::start_embedded(dir.path(), &pki).await;
    let mut node = Node::start(dir.path(), &pki, "n1", &hub.url).await;

    let (code, text) = status(&node);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("node         n1\n"), "{text}");
    assert!(
        text.contains(&format!("hub          {} (connected)", hub.url)),
        "{text}"
    );
    assert!(text.contains("lag          0 events"), "{text}");
    assert!(text.contains("outbox       0 reports waiting"), "{text}");
    assert!(text.contains("fail2ban     not used"), "{text}");
    assert!(text.contains("certificate  expires "), "{text}");
    assert!(text.contains("status       OK"), "{text}");

    // The hub goes away: the node says so, and the check fails.
    hub.proc.stop();
    wait_for(
        "status to see the hub gone",
        Duration::from_secs(30),
        || {
            let (code, text) = status(&node);
            async move { code == Some(1) && text.contains("PROBLEM      not connected to the hub") }
        },
    )
    .await;
    let (_, text) = status(&node);
    assert!(
        !text.contains("last error   none"),
        "the lost hub is the last error:\n{text}"
    );

    // No node at all: exit 2.
    node.stop();
    let (code, text) = status(&node);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("the node does not answer"), "{text}");
}
