//! One node's `Publish` stream: reports in, acks out, and what an ack
//! promises.
//!
//! Contract:
//! - An ack for report `seq` is sent only once that report is durable: its
//!   transaction has committed (`duplicate` when an earlier send of the same
//!   `(host, seq)` already had). A report the hub refuses (not a valid ban)
//!   is acked at once with `rejected` set and nothing stored; sending it
//!   again would not help.
//! - Acks go out in the order the reports came in, so an ack also covers
//!   every earlier report of the stream. Accepted reports whose commit is
//!   already known when an ack is built are folded into it: the ack carries
//!   the last folded `seq` and `event_id` and `count` = reports covered, so a
//!   busy stream costs one ack per commit, not one per report. A rejected
//!   ack is never folded (it carries its own reason and `count` 1).
//! - A report whose address is on the fleet allow-list is answered, in
//!   its place, with `rejected` and `allowed_by` set (the entry that
//!   matched) once the committer has stored it as refused; like any
//!   rejected ack it is never folded, so the node learns which report it
//!   was and logs it once.
//! - A failed commit, or the committer going away (hub shutdown), ends the
//!   stream with UNAVAILABLE and acks nothing from that report on. The node
//!   keeps those reports in its outbox and sends them again on its next
//!   stream; `(host, seq)` makes the replay idempotent.
//! - Revoking the host ends the stream with PERMISSION_DENIED after the
//!   acks of the reports already read.
//! - A report past the host's rate limit (see `rate_limit`) is not taken:
//!   the stream ends with RESOURCE_EXHAUSTED and the wait in a trailer,
//!   after the acks of the reports before it. That report and those after
//!   it stay in the node's outbox, for a new stream after the wait.
//!
//! Why it holds: one reader task validates each report and queues it with
//! the committer, then puts its pending ack on a bounded channel in arrival
//! order; one writer task takes pending acks in that same order and builds
//! an ack only from a resolved commit. The committer answers a report only
//! after its transaction commits (see `committer`), and folding only ever
//! takes results that are already resolved (`try_recv`), never waits out
//! of order. Both queues are bounded ([`ACK_QUEUE`]): a node that does not
//! read its acks slows its own reader, not the hub.
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

use super::{
    committer::Committer,
    rate_limit::HostGate,
    store::{Committed, NewReport, StoreError},
};
use crate::{ban::Ban, proto, shutdown::Shutdown};

/// Acks that may wait for the node to read them (and pending acks that may
/// wait for their commit).
pub const ACK_QUEUE: usize = 1024;

/// What the stream answers with: acks, then maybe one closing status.
pub type Acks = ReceiverStream<Result<proto::Ack, Status>>;

/// An ack in the making: answered at once (a refused report) or when the
/// committer has it durable. Kept in arrival order.
enum PendingAck {
    Ready(proto::Ack),
    Committing(u64, oneshot::Receiver<Result<Committed, Arc<StoreError>>>),
    /// Ends the stream with this status.
    Failed(Status),
}

/// Where one publish stream's reports go: the committer, past the host's
/// rate limit.
pub struct Sink {
    /// Group-commits the reports.
    pub committer: Committer,
    /// Admits each report under the host's rate limit.
    pub gate: HostGate,
}

/// Starts the reader and writer of one publish stream from `host` (the
/// name in its certificate), in a `publish` span inside the current one
/// (the request's); returns the acks.
pub fn start(
    host: String,
    inbound: Streaming<proto::Report>,
    sink: Sink,
    revoked: impl Future<Output = ()> + Send + 'static,
    shutdown: Shutdown,
) -> Acks {
    let span = info_span!("publish");
    let (pending_tx, pending_rx) = mpsc::channel::<PendingAck>(ACK_QUEUE);
    let (ack_tx, ack_rx) = mpsc::channel(ACK_QUEUE);
    tokio::spawn(read(host, inbound, sink, revoked, shutdown, pending_tx).instrument(span.clone()));
    tokio::spawn(write(pending_rx, ack_tx).instrument(span));
    ReceiverStream::new(ack_rx)
}

/// Reader: validates and queues each report with the committer, so many
/// are in flight at once and share a transaction.
async fn read(
    host: String,
    mut inbound: Streaming<proto::Report>,
    Sink { committer, gate }: Sink,
    revoked: impl Future<Output = ()>,
    mut shutdown: Shutdown,
    pending_tx: mpsc::Sender<PendingAck>,
) {
    tokio::pin!(revoked);
    loop {
        let next = tokio::select! {
            m = inbound.next() => m,
            _ = shutdown.recv() => None,
            _ = &mut revoked => {
                info!("host revoked; ending its publish stream");
                let denied = Status::permission_denied("this host has been revoked");
                let _ = pending_tx.send(PendingAck::Failed(denied)).await;
                None
            }
        };
        let report = match next {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                info!(error = %e, "publish stream ended");
                break;
            }
            None => break,
        };
        crate::metrics::hub::get().reports.inc();
        if let Err(wait) = gate.admit() {
            crate::metrics::hub::refused("rate_limited");
            // Not taken: it and all sent after it stay in the outbox.
            let _ = pending_tx
                .send(PendingAck::Failed(gate.exhausted(wait)))
                .await;
            break;
        }
        let pending = match Ban::from_proto(report.ban.as_ref()) {
            Err(e) => {
                warn!(seq = report.seq, reason = %e, "report refused");
                crate::metrics::hub::refused("invalid");
                PendingAck::Ready(proto::Ack {
                    seq: report.seq,
                    rejected: e.to_string(),
                    count: 1,
                    ..Default::default()
                })
            }
            Ok(ban) => {
                tracing::debug!(target: crate::hops::TARGET, hop = "recv", hop_ip = %ban.ip, hop_us = crate::hops::now_us());
                let new = NewReport {
                    host: host.clone(),
                    seq: report.seq,
                    ban,
                    plan: Default::default(),
                };
                PendingAck::Committing(report.seq, committer.report(new).await)
            }
        };
        if pending_tx.send(pending).await.is_err() {
            break;
        }
    }
}

/// Writer: answers in arrival order once each report is durable, folding
/// in the ones already committed behind it.
async fn write(
    mut pending_rx: mpsc::Receiver<PendingAck>,
    ack_tx: mpsc::Sender<Result<proto::Ack, Status>>,
) {
    let mut next = pending_rx.recv().await;
    while let Some(p) = next.take() {
        let mut ack = match resolve(p).await {
            Ok(ack) => ack,
            Err(status) => {
                let _ = ack_tx.send(Err(status)).await;
                break;
            }
        };
        next = fold(&mut ack, &mut pending_rx);
        if ack_tx.send(Ok(ack)).await.is_err() {
            break;
        }
        if next.is_none() {
            next = pending_rx.recv().await;
        }
    }
}

/// Folds into `ack` every queued report whose commit is already known;
/// returns the first pending ack it could not fold, to be answered next.
fn fold(ack: &mut proto::Ack, pending_rx: &mut mpsc::Receiver<PendingAck>) -> Option<PendingAck> {
    if !ack.rejected.is_empty() {
        return None;
    }
    loop {
        match pending_rx.try_recv() {
            Ok(PendingAck::Committing(seq, mut rx)) => match rx.try_recv() {
                Ok(Ok(Committed::Refused { ip, entry })) => {
                    return Some(PendingAck::Ready(refused_ack(seq, &ip, entry)));
                }
                Ok(Ok(c)) => answer(ack, seq, &c),
                Ok(Err(e)) => return Some(PendingAck::Failed(unavailable(e))),
                Err(oneshot::error::TryRecvError::Empty) => {
                    return Some(PendingAck::Committing(seq, rx));
                }
                Err(oneshot::error::TryRecvError::Closed) => {
                    return Some(PendingAck::Failed(shutting_down()));
                }
            },
            Ok(other) => return Some(other),
            Err(_) => return None,
        }
    }
}

/// Waits for one pending report's outcome.
async fn resolve(p: PendingAck) -> Result<proto::Ack, Status> {
    match p {
        PendingAck::Ready(ack) => Ok(ack),
        PendingAck::Failed(status) => Err(status),
        PendingAck::Committing(seq, rx) => match rx.await {
            Ok(Ok(Committed::Refused { ip, entry })) => Ok(refused_ack(seq, &ip, entry)),
            Ok(Ok(c)) => {
                let mut ack = proto::Ack::default();
                answer(&mut ack, seq, &c);
                Ok(ack)
            }
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(shutting_down()),
        },
    }
}

/// Makes `ack` answer one more accepted report, `seq`, with its outcome
/// (acks are cumulative: the fields are those of the last report); counts
/// it in the metrics. The one place an outcome becomes ack fields, for a
/// lone ack and a folded one alike.
fn answer(ack: &mut proto::Ack, seq: u64, c: &Committed) {
    crate::metrics::hub::committed(c);
    ack.seq = seq;
    ack.event_id = c.event_id();
    ack.duplicate = matches!(c, Committed::Duplicate(_));
    ack.coalesced = matches!(c, Committed::Coalesced { .. });
    ack.count += 1;
}

/// The ack of a report of `ip` refused by the allow-list `entry`.
fn refused_ack(seq: u64, ip: &str, entry: String) -> proto::Ack {
    crate::metrics::hub::refused("allow_list");
    proto::Ack {
        seq,
        rejected: format!("{ip} is on the fleet allow-list ({entry}): not shared"),
        count: 1,
        allowed_by: entry,
        ..Default::default()
    }
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(e.to_string())
}

fn shutting_down() -> Status {
    Status::unavailable("the hub is shutting down")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Report `seq`, whose commit is already known.
    fn committed(seq: u64, c: Committed) -> PendingAck {
        let (tx, rx) = oneshot::channel();
        tx.send(Ok(c)).unwrap();
        PendingAck::Committing(seq, rx)
    }

    #[test]
    fn acks_fold_committed_reports_and_stop_at_the_first_unknown() {
        let (tx, mut rx) = mpsc::channel(8);
        for (seq, id) in [(2, 11), (3, 12)] {
            tx.try_send(committed(seq, Committed::Duplicate(id)))
                .unwrap();
        }
        let (_still_committing, r) = oneshot::channel();
        tx.try_send(PendingAck::Committing(4, r)).unwrap();
        let mut ack = proto::Ack {
            seq: 1,
            event_id: 10,
            count: 1,
            ..Default::default()
        };
        let next = fold(&mut ack, &mut rx);
        assert_eq!((ack.seq, ack.event_id, ack.count), (3, 12, 3));
        assert!(ack.duplicate);
        assert!(matches!(next, Some(PendingAck::Committing(4, _))));
    }

    #[test]
    fn a_rejected_ack_is_never_folded() {
        let (tx, mut rx) = mpsc::channel(8);
        tx.try_send(committed(2, Committed::Duplicate(11))).unwrap();
        let mut ack = proto::Ack {
            seq: 1,
            rejected: "not an IP address".into(),
            count: 1,
            ..Default::default()
        };
        assert!(fold(&mut ack, &mut rx).is_none());
        assert_eq!((ack.seq, ack.count), (1, 1));
        assert!(
            rx.try_recv().is_ok(),
            "the next report waits for its own ack"
        );
    }
}
