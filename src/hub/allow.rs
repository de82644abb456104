//! The fleet allow-list at the hub: the check the committer makes on
//! every report ([`Guard`], [`refuse`]), and the admin RPCs that change
//! and show the list. Why no ban inside an entry is committed after it is
//! in the committer's module doc: the list changes only inside that one
//! task, between commits.
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{
    committer::Reply,
    fleet::FleetAddrs,
    service::{HubService, unavailable},
    store::{AllowRow, Committed, NewReport, Store},
};
use crate::{
    allow::{AllowList, Allowed},
    proto,
};

/// Longest note kept with an allow-list entry (the column's size).
const MAX_NOTE: usize = 255;

fn allow_entry(r: AllowRow) -> proto::AllowEntry {
    proto::AllowEntry {
        network: r.network.to_string(),
        note: r.note,
        added_by: r.added_by,
        added_ms: r.added_ms,
    }
}

/// What the committer checks each report against: the allow-list (with
/// its built-ins) and the fleet's own addresses.
pub(super) struct Guard {
    /// The built-ins and the admins' entries.
    pub list: AllowList,
    /// The fleet's own addresses.
    pub fleet: FleetAddrs,
}

impl Guard {
    /// Why the report's address may not be banned, as the node is told.
    fn refuses(&self, ip: &str) -> Option<String> {
        let addr = crate::ban::parse_ip(ip)?;
        if let Some(who) = self.fleet.owner(addr) {
            return Some(format!("{} of {who}", Allowed::Fleet(addr)));
        }
        self.list.check(addr).map(|a| a.to_string())
    }
}

/// Takes the reports the guard refuses out of `batch` (and their replies),
/// stores them as refused and answers them; on a store error they are
/// answered with it (the node keeps them and sends them again).
pub(super) async fn refuse(
    store: &dyn Store,
    guard: &Guard,
    batch: &mut Vec<NewReport>,
    replies: &mut Vec<Reply<Committed>>,
) {
    let mut refused = Vec::new();
    let mut refused_replies = Vec::new();
    let mut i = 0;
    while i < batch.len() {
        match guard.refuses(&batch[i].ban.ip) {
            Some(why) => {
                refused.push((batch.remove(i), why));
                refused_replies.push(replies.remove(i));
            }
            None => i += 1,
        }
    }
    if refused.is_empty() {
        return;
    }
    match store.refuse(&refused).await {
        Ok(()) => {
            for ((r, why), reply) in refused.into_iter().zip(refused_replies) {
                tracing::info!(host = %r.host, seq = r.seq, ip = %r.ban.ip, allowed_by = %why,
                    "report refused: the address is on the allow-list");
                let _ = reply.send(Ok(Committed::Refused {
                    ip: r.ban.ip,
                    entry: why,
                }));
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot store refused reports; they stay in the nodes' outboxes");
            let e = Arc::new(e);
            for reply in refused_replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// `AllowAdd`: admins only; the network is checked here, the entry and
/// the lifting of the bans inside it go through the committer.
pub(super) async fn add(
    svc: &HubService,
    request: Request<proto::AllowAddRequest>,
) -> Result<Response<proto::AllowAddResponse>, Status> {
    let admin = svc.access.admin(&request)?.name;
    let r = request.into_inner();
    let network: crate::allow::Network = r
        .network
        .parse()
        .map_err(|e: crate::allow::InvalidNetwork| Status::invalid_argument(e.to_string()))?;
    if r.note.chars().count() > MAX_NOTE || r.note.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "the note must be at most {MAX_NOTE} characters, without control characters"
        )));
    }
    let entry = AllowRow {
        network,
        note: r.note,
        added_by: admin.clone(),
        added_ms: crate::clock::now_ms(),
    };
    match svc.committer.allow_add(entry).await {
        Ok(Some(added)) => {
            info!(%network, by = %admin, event = added.event.id, lifted = added.lifted,
                "allow-list entry added");
            Ok(Response::new(proto::AllowAddResponse {
                event_id: added.event.id,
                lifted: added.lifted,
                entry: Some(allow_entry(added.entry)),
            }))
        }
        Ok(None) => Err(Status::already_exists(format!(
            "{network} is already on the allow-list"
        ))),
        Err(e) => Err(unavailable(e)),
    }
}

/// `AllowList`: any fleet certificate; entries from the store, the
/// built-ins, and the fleet addresses this hub has seen.
pub(super) async fn list(
    svc: &HubService,
    request: Request<proto::AllowListRequest>,
) -> Result<Response<proto::AllowListResponse>, Status> {
    svc.access.member(&request)?;
    let entries = svc.store.allow_entries().await.map_err(unavailable)?;
    let fixed = |network: String, note: String| proto::AllowEntry {
        network,
        note,
        added_by: "built-in".into(),
        added_ms: 0,
    };
    Ok(Response::new(proto::AllowListResponse {
        entries: entries.into_iter().map(allow_entry).collect(),
        builtin: crate::allow::builtin()
            .into_iter()
            .map(|(n, why)| fixed(n.to_string(), why.into()))
            .collect(),
        fleet: svc
            .fleet
            .all()
            .into_iter()
            .map(|(ip, who)| fixed(crate::allow::Network::host(ip).to_string(), who))
            .collect(),
    }))
}

/// `AllowRemove`: admins only; lifts nothing and re-applies nothing.
pub(super) async fn remove(
    svc: &HubService,
    request: Request<proto::AllowRemoveRequest>,
) -> Result<Response<proto::AllowRemoveResponse>, Status> {
    let admin = svc.access.admin(&request)?.name;
    let network: crate::allow::Network = request
        .get_ref()
        .network
        .parse()
        .map_err(|e: crate::allow::InvalidNetwork| Status::invalid_argument(e.to_string()))?;
    match svc.committer.allow_remove(network, admin.clone()).await {
        Ok(Some(event)) => {
            info!(%network, by = %admin, event = event.id, "allow-list entry removed");
            Ok(Response::new(proto::AllowRemoveResponse {
                event_id: event.id,
            }))
        }
        Ok(None) => Err(Status::not_found(format!(
            "{network} is not on the allow-list (see `banmesh allow list`)"
        ))),
        Err(e) => Err(unavailable(e)),
    }
}

/// `ListRefused`: any fleet certificate; refused reports in id order.
pub(super) async fn refused(
    svc: &HubService,
    request: Request<proto::ListRefusedRequest>,
) -> Result<Response<proto::ListRefusedResponse>, Status> {
    svc.access.member(&request)?;
    let r = request.into_inner();
    let limit = match r.limit {
        0 => 100,
        n => n.min(10_000) as usize,
    };
    let rows = svc
        .store
        .refused(r.after_id, limit)
        .await
        .map_err(unavailable)?;
    Ok(Response::new(proto::ListRefusedResponse {
        refused: rows
            .into_iter()
            .map(|r| proto::RefusedReport {
                id: r.id,
                host: r.host,
                seq: r.seq,
                ban: Some(r.ban.to_proto()),
                created_ms: r.created_ms,
                allowed_by: r.allowed_by,
            })
            .collect(),
    }))
}
