//! Hubs on a live Galera cluster issue no DDL in the cluster's total order
//! (issue 18). Measured on this machine: `CREATE OR REPLACE VIEW` through
//! two Galera nodes while a third upserts rows stalls the whole cluster
//! for good, and a hub rebuilt the `ip_table` view on every new host's
//! first call: a dozen new hosts connecting through three hubs at once
//! wedged the cluster (no node ever connected). Now the view is rebuilt
//! only when its columns change, under `wsrep_OSU_method = RSU` (on the
//! hub's own node), and a hub whose store is at this build's schema
//! version runs no DDL when it starts.
mod common;

use std::time::Duration;

use common::{Hub, Node, Pki, galera::Galera, wait_for};
use mysql_async::prelude::Queryable;

/// The `host_*` columns of `ip_table` as Galera node `url` sees it.
async fn view_hosts(url: &str) -> usize {
    let Ok(mut c) = mysql_async::Conn::from_url(url).await else {
        return 0;
    };
    let n: Option<u64> = c
        .query_first(
            "SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = 'banmesh' \
             AND TABLE_NAME = 'ip_table' AND COLUMN_NAME LIKE 'host\\_%'",
        )
        .await
        .ok()
        .flatten();
    let _ = c.disconnect().await;
    n.unwrap_or(0) as usize
}

/// DDL statements this Galera node has executed (its own and replicated).
async fn ddl_count(url: &str) -> u64 {
    let mut c = mysql_async::Conn::from_url(url).await.unwrap();
    let rows: Vec<(String, u64)> = c
        .query(
            "SHOW GLOBAL STATUS WHERE Variable_name IN \
             ('Com_create_table', 'Com_create_view', 'Com_create_index', 'Com_alter_table', \
              'Com_drop_view', 'Com_create_db')",
        )
        .await
        .unwrap();
    let _ = c.disconnect().await;
    rows.iter().map(|(_, v)| v).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn new_hosts_through_three_hubs_at_once_do_not_stall_the_cluster() {
    // BANMESH_KEEP_TEST_DIR=1 keeps the logs of a failed run.
    let root = tempfile::Builder::new()
        .disable_cleanup(std::env::var_os("BANMESH_KEEP_TEST_DIR").is_some())
        .tempdir()
        .unwrap();
    println!("galera_ddl: test dir {}", root.path().display());
    let pki = Pki::new(root.path());
    let cluster = Galera::start(root.path(), 3).await;
    let mut hubs = Vec::new();
    for i in 0..3 {
        let dir = root.path().join(format!("hub{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        hubs.push(Hub::start(&dir, &pki, &cluster.url(i, "banmesh")).await);
    }

    // Twelve hosts never seen before, all connecting at once, four per
    // hub: each one's first call adds a host and a view column. Each
    // `Node::start` waits (with a deadline) until its node is connected.
    let starts = (0..12).map(|i| {
        let (root, pki, url) = (root.path(), &pki, hubs[i % 3].url.clone());
        async move { Node::start(root, pki, &format!("new-{i}"), &url).await }
    });
    let nodes = futures_util::future::join_all(starts).await;

    // Every Galera node's `ip_table` gains all twelve columns: each hub
    // keeps its own node's view, also for hosts of the other hubs.
    for i in 0..3 {
        let url = cluster.url(i, "banmesh");
        wait_for(
            "ip_table columns for every host on every Galera node",
            Duration::from_secs(20),
            || {
                let url = url.clone();
                async move {
                    let n = view_hosts(&url).await;
                    n == 12
                }
            },
        )
        .await;
    }

    // The cluster still commits: a ban through hub 1 reaches a node of hub 3.
    let (ok, err) = nodes[0].report("sshd", "tcp", "22", "198.51.100.77");
    assert!(ok, "{err}");
    wait_for("the ban across hubs", Duration::from_secs(20), || {
        let got = nodes[2].lines_for("198.51.100.77");
        async move { got == 1 }
    })
    .await;

    // A hub restarted beside live hubs runs no DDL: the schema is current.
    let url = cluster.url(0, "banmesh");
    let before = ddl_count(&url).await;
    hubs[0].proc.kill();
    let dir = root.path().join("hub0-again");
    std::fs::create_dir_all(&dir).unwrap();
    hubs[0] = Hub::start(&dir, &pki, &url).await;
    assert_eq!(
        ddl_count(&url).await,
        before,
        "a hub on a current store issued DDL at start"
    );
}
