//! The committer's own connection, kept between commits.
//!
//! A connection that goes back to the pool is reset there
//! (`COM_RESET_CONNECTION`: one more round trip on the server's side) and
//! the reset drops its prepared statements, so the next commit prepared
//! the counter bump afresh and the ladder read too: two round trips of
//! ~0.15 ms each on a commit's critical path (measured with
//! `strace -T`, docs/perf/commit-latency.txt). The committer is the only
//! caller of the ladder read and the group commit and runs them one after
//! the other, so one connection kept out of the pool serves it with its
//! statement cache warm.
//!
//! A connection is kept only after a clean use (a committed transaction,
//! reads without error): anything else goes back to the pool, which rolls
//! back what it left open and resets it, and the next use takes a fresh
//! one. One idle longer than [`MAX_IDLE`] goes back too (the pool checks
//! a connection it hands out; a kept one the server closed meanwhile
//! would fail the next commit). After a move to another `--db` address
//! (or a renewed pool) a connection of the old pool is never reused: the
//! generation it was taken under no longer matches.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use mysql_async::Conn;

use super::MysqlStore;
use crate::hub::store::StoreError;

/// Longest pause after which a kept connection is not trusted any more.
pub(super) const MAX_IDLE: Duration = Duration::from_secs(10);

/// The slot: the kept connection, its pool's generation, when last used.
#[derive(Default)]
pub(super) struct Slot(Mutex<Option<(u64, Instant, Conn)>>);

impl Slot {
    /// Empties the slot (the pool moved: its connection is of the old one).
    pub(super) fn clear(&self) {
        let old = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(old);
    }
}

/// A connection lent to the committer; back in the slot only through
/// [`Lease::keep`], else returned to its pool when dropped.
pub(super) struct Lease<'a> {
    store: &'a MysqlStore,
    generation: u64,
    conn: Conn,
}

impl Lease<'_> {
    /// The connection itself.
    pub(super) fn conn(&mut self) -> &mut Conn {
        &mut self.conn
    }

    /// Puts the connection back for the next commit (after a clean use),
    /// unless the pool moved meanwhile.
    pub(super) fn keep(self) {
        let Lease {
            store,
            generation,
            conn,
        } = self;
        // mysql_async marks a connection whose exchange was cut off
        // (a cancelled statement, a broken socket) disconnected; its pool
        // would never hand it out again, and neither does the slot.
        if store.generation() != generation || conn.is_disconnected() {
            return;
        }
        let mut slot = store.dedicated.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some((generation, Instant::now(), conn));
        }
    }
}

impl MysqlStore {
    /// The committer's connection: the one kept from its last clean use if
    /// still fresh and of the pool in use, else one from the pool.
    pub(super) async fn lease(&self) -> Result<Lease<'_>, StoreError> {
        let generation = self.generation();
        let kept = self
            .dedicated
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((g, used, conn)) = kept
            && g == generation
            && used.elapsed() < MAX_IDLE
            && !conn.is_disconnected()
        {
            return Ok(Lease {
                store: self,
                generation,
                conn,
            });
        }
        Ok(Lease {
            store: self,
            generation,
            conn: self.conn().await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ban::Ban,
        hub::store::{NewReport, Plan, Store, executor::Backend},
    };

    fn server() -> String {
        std::env::var("BANMESH_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
    }

    fn report(seq: u64) -> NewReport {
        NewReport {
            host: "web-1".into(),
            seq,
            ban: Ban::new("sshd", "tcp", "22", &format!("192.0.2.{seq}")).unwrap(),
            plan: Plan::default(),
        }
    }

    /// The server's id of the kept connection, if one is kept.
    fn kept(store: &MysqlStore) -> Option<u32> {
        store
            .dedicated
            .0
            .lock()
            .unwrap()
            .as_ref()
            .map(|(_, _, c)| c.id())
    }

    /// Commits keep their connection (the same server thread every time,
    /// its statements prepared), a failed use gives it back to the pool,
    /// and after a move the old pool's connection is never used again.
    #[tokio::test]
    async fn commits_keep_one_connection_until_it_fails_or_the_pool_moves() {
        let name = format!("banmesh_u{}_dedicated", std::process::id());
        let store = MysqlStore::open(&format!("{}/{name}", server()))
            .await
            .expect("open the test database");
        store.commit_at(&[report(1)], 1).await.unwrap();
        let first = kept(&store).expect("a clean commit keeps its connection");
        store.commit_at(&[report(2)], 2).await.unwrap();
        store.ladder_facts(&[report(3)]).await.unwrap();
        store.committed_after(0, 10).await.unwrap();
        assert_eq!(kept(&store), Some(first), "the same connection serves on");

        // A failed statement: the connection is not kept.
        let mut ex = store.commit_session().await.unwrap();
        assert!(
            ex.query("SELECT nonsense FROM nowhere", vec![])
                .await
                .is_err()
        );
        drop(ex);
        assert_eq!(kept(&store), None);
        store.commit_at(&[report(4)], 4).await.unwrap();
        assert!(kept(&store).is_some(), "kept again after a clean commit");

        // A statement cut off mid-way (the database watch's bound cancels
        // calls): its answer is unread, so the connection is not kept.
        let mut ex = store.commit_session().await.unwrap();
        let cut = tokio::time::timeout(
            Duration::from_millis(100),
            ex.query("SELECT SLEEP(2)", vec![]),
        )
        .await;
        assert!(cut.is_err(), "the statement was cut off");
        drop(ex);
        assert_eq!(kept(&store), None, "a connection with an unread answer");
        store.commit_at(&[report(6)], 6).await.unwrap();
        store.committed_after(0, 10).await.unwrap();
        let second = kept(&store).expect("kept again after a clean commit");

        // A lease taken before a move is not kept after it.
        let lease = store.lease().await.unwrap();
        assert_eq!(lease.conn.id(), second);
        store.move_to(0);
        lease.keep();
        assert_eq!(kept(&store), None, "a connection of the old pool");
        store.commit_at(&[report(5)], 5).await.unwrap();
        assert!(kept(&store).is_some_and(|id| id != second));

        let mut c = store.conn().await.unwrap();
        mysql_async::prelude::Queryable::query_drop(&mut c, format!("DROP DATABASE {name}"))
            .await
            .unwrap();
    }
}
