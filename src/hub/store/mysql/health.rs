//! Whether a MySQL / MariaDB server can take the hub's statements now: the
//! check behind `hub::db_health`, cheap enough to run four times a second.
//!
//! A plain server is healthy when it answers. A Galera node (`wsrep_on`)
//! also needs `wsrep_ready = ON` and `wsrep_cluster_status = Primary`: a
//! node cut off from the majority (non-primary) still accepts connections
//! but refuses every statement on a table with error 1047 ("WSREP has not
//! yet prepared node for application use"), and a node that is joining
//! serves data that may be behind. `SHOW` statements work in both states,
//! so the check says which it is.
use mysql_async::{Conn, prelude::*};

use super::MysqlStore;

/// The Galera status variables the check reads.
const WSREP_STATUS: &str = "SHOW GLOBAL STATUS WHERE Variable_name IN \
     ('wsrep_ready', 'wsrep_cluster_status', 'wsrep_local_state_comment')";

/// `Ok` when the server on `conn` (at `at`) can take the hub's statements;
/// otherwise why not, naming the server by `host:port` only.
pub(super) async fn state(conn: &mut Conn, at: &str) -> Result<(), String> {
    let failed = |e: mysql_async::Error| format!("the database at {at} does not answer: {e}");
    let wsrep: Option<(String, String)> = conn
        .query_first("SHOW GLOBAL VARIABLES LIKE 'wsrep_on'")
        .await
        .map_err(failed)?;
    if !matches!(&wsrep, Some((_, on)) if on.eq_ignore_ascii_case("ON")) {
        // Not a Galera node (MySQL has no such variable; MariaDB says OFF).
        return conn.query_drop("SELECT 1").await.map_err(failed);
    }
    let vars: Vec<(String, String)> = conn.query(WSREP_STATUS).await.map_err(failed)?;
    let var = |name: &str| {
        vars.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map_or("unknown", |(_, v)| v.as_str())
            .to_string()
    };
    let (ready, cluster, state) = (
        var("wsrep_ready"),
        var("wsrep_cluster_status"),
        var("wsrep_local_state_comment"),
    );
    if ready.eq_ignore_ascii_case("ON") && cluster.eq_ignore_ascii_case("Primary") {
        Ok(())
    } else {
        Err(format!(
            "the Galera node at {at} cannot take statements \
             (wsrep_cluster_status={cluster}, wsrep_ready={ready}, state {state}): \
             it is cut off from the cluster's majority or not yet synced"
        ))
    }
}

impl MysqlStore {
    /// Checks `--db` address `index` on `conn`, the caller's own connection
    /// to it (connected here when `None`, and reset to `None` after a
    /// failure): never a pooled one, so a busy pool cannot make a healthy
    /// server look sick. The caller bounds it with a timeout (a blackholed
    /// server never answers) and then resets `conn` too.
    pub async fn probe(&self, index: usize, conn: &mut Option<Conn>) -> Result<(), String> {
        let target = &self.targets[index];
        if conn.is_none() {
            // No database selected: the check needs none.
            let opts =
                mysql_async::OptsBuilder::from_opts(target.opts.clone()).db_name(None::<String>);
            match Conn::new(opts).await {
                Ok(c) => *conn = Some(c),
                Err(e) => {
                    return Err(format!("cannot reach the database at {}: {e}", target.at));
                }
            }
        }
        let result = state(conn.as_mut().unwrap(), &target.at).await;
        if result.is_err() {
            *conn = None;
        }
        result
    }
}
