//! The hub's durable store, behind one interface with two backends.
//!
//! Contract every backend keeps (the conformance suite in
//! `tests/store_conformance.rs` runs unchanged against each):
//! - `commit` is atomic for a whole batch: when it returns `Ok`, every event
//!   in it is durable, and its ids increase in batch order.
//! - A report is identified by (reporting host, node sequence); committing
//!   it again returns the first event id with `duplicate = true`.
//! - Per-host status is a row (ban, host, status). A host with no row for a
//!   ban reads as 1 if it reported the ban and 0 (not yet added) otherwise,
//!   so a commit writes no status rows at all and a fleet of thousands
//!   costs nothing per ban until hosts answer.
//! - `events_after` is the replay source for subscribers: events in id
//!   order, without bans the subscriber reported itself and without bans
//!   already lifted.
//! - The view `ip_table` shows bans in the seed's shape, one `host_<name>`
//!   column per known host, rebuilt when a host first appears. A failed
//!   rebuild is logged, never an error: no call fails for the view's sake.
//! - Host and admin names are one namespace, compared case-insensitively:
//!   `WEB-1` is host `web-1`, a revoked name is refused in any case, and no
//!   host can enrol under a name an admin certificate has called with.
//!
//! # Layout
//!
//! The two backends share everything but their drivers and two tuned write
//! paths, so that a behaviour (and the conformance suite's proof of it)
//! cannot drift between them:
//! - `mod.rs`: the [`Store`] trait, its row types, [`StoreError`], [`open`].
//! - `schema.rs`: every table written once as data, and the `Dialect` that
//!   renders it and names each SQL difference between MySQL and SQLite (the
//!   table in its doc is the whole list). A new table or column is one edit.
//! - `executor.rs`: the interface the shared SQL runs on (`exec`, `query`,
//!   `begin`, `commit`) and the values and rows that cross it.
//! - `sql/`: every `Store` method, once, for any backend.
//! - `mysql/`, `sqlite.rs`: driver glue, and each backend's own `commit`
//!   (group commit) and `set_statuses` (grouped status writes), tuned for
//!   its engine: MySQL takes one multi-row `INSERT IGNORE` per batch, SQLite
//!   runs prepared statements row by row inside one transaction.
use async_trait::async_trait;
use thiserror::Error;

use crate::ban::{Ban, Event, Status};

mod executor;
pub mod mysql;
mod schema;
mod sql;
pub mod sqlite;

/// Schema version this build writes; a store with a newer one is refused.
/// 3: `hosts.hub`, `hosts.hub_since_ms` (which hub each host is on).
pub const SCHEMA_VERSION: i64 = 3;

/// A driver's error, kept whole so that `source()` reaches its cause.
pub type Source = Box<dyn std::error::Error + Send + Sync>;

/// Why a store call failed. The driver's error is kept as the `source`;
/// it is also part of the message, because the hub hands these messages to
/// clients and logs them with `%e`, where a bare "database error" would say
/// nothing an operator could act on.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The database could not be opened or connected to. `at` is
    /// `host:port` for MySQL (never the URL: it may hold a password) or the
    /// SQLite file's path.
    #[error("cannot reach the database at {at}: {source}")]
    Unreachable {
        /// `host:port` or the SQLite path.
        at: String,
        /// The driver's error.
        #[source]
        source: Source,
    },
    /// A statement failed, or a row did not hold what the schema says.
    #[error("database error: {0}")]
    Query(#[source] Source),
    /// The hub is shutting down: the request was not (or may not have
    /// been) carried out, and the client should retry elsewhere or later.
    #[error("the hub is shutting down")]
    Stopped,
    /// The store was written by a newer banmesh (see [`SCHEMA_VERSION`]).
    #[error(
        "the database holds banmesh schema version {found}, newer than this build's {SCHEMA_VERSION}: upgrade banmesh before starting the hub"
    )]
    NewerSchema {
        /// The schema version the store records.
        found: i64,
    },
    /// `--db` names no backend, or a MySQL URL that cannot be used (shown
    /// with its password replaced: build it with [`redact`]).
    #[error("unsupported --db {0:?}: use mysql://user:pass@host:port/db or sqlite:PATH")]
    BadUrl(String),
}

impl StoreError {
    /// A `Query` error from a message of banmesh's own.
    pub(crate) fn query(msg: impl Into<String>) -> Self {
        StoreError::Query(msg.into().into())
    }

    /// The transaction lost a conflict and was rolled back: a deadlock, a
    /// lock wait timeout, or (Galera) a certification failure or
    /// brute-force abort, all reported as MySQL error 1213. Retrying the
    /// whole transaction is correct and expected (see `sql::sequence`).
    pub fn is_conflict(&self) -> bool {
        let StoreError::Query(source) = self else {
            return false;
        };
        match source.downcast_ref::<mysql_async::Error>() {
            Some(mysql_async::Error::Server(e)) => matches!(e.code, 1213 | 1205),
            _ => false,
        }
    }
}

/// The `kind` of an `events` row that is not an event: a report coalesced
/// into an active ban (its `extends`). It lives in `events` so that the
/// one `(reporter_id, node_seq)` key recognises a re-sent report whether
/// it became a ban or was coalesced; replay and listings never read it as
/// an event.
pub const COALESCED_KIND: i64 = 5;

/// A report ready to commit: who sent it (from its certificate), what, and
/// what the hub's policy decided for it.
#[derive(Debug, Clone)]
pub struct NewReport {
    /// The reporting host's name, from its certificate.
    pub host: String,
    /// The node's sequence number for this report (its re-send key).
    pub seq: u64,
    /// The ban as the node reported it, already validated.
    pub ban: Ban,
    /// What to store it as; the committer decides it with the ladder.
    pub plan: Plan,
}

/// What the policy decided for one report; the store carries it out
/// unless the report is a re-send (then it answers the first outcome).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// A new ban event with this term (a default term: no fleet end, as
    /// before the ladder; `term.extends` set: an update of an active ban;
    /// `term.reason` set: a ban the hub's fleet policy decided).
    New(crate::ban::BanTerm),
    /// Record it against this active ban: no new event.
    Coalesce(u64),
    /// Record it against the ban that the report at this index of the same
    /// batch became (two reports of one address in one batch).
    CoalesceWith(usize),
}

impl Default for Plan {
    fn default() -> Self {
        Plan::New(Default::default())
    }
}

/// What the ladder needs to know of a batch, read in one go before it is
/// committed.
#[derive(Debug, Clone, Default)]
pub struct LadderFacts {
    /// Reports of the batch already stored, by (host, seq), among those of
    /// addresses the batch holds more than once: the ban they were stored
    /// as or recorded against, and the ban they carried (a re-send carries
    /// the same).
    pub known: std::collections::HashMap<(String, u64), (u64, Ban)>,
    /// Each address's latest ban (by id), with its id.
    pub latest: std::collections::HashMap<String, (u64, crate::hub::ladder::PastBan)>,
}

/// A host that reported a ban: its event's reporter, or one whose reports
/// were coalesced into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReporterRow {
    /// The host's name.
    pub host: String,
    /// The jail of its first report.
    pub jail: String,
    /// How many reports.
    pub count: u32,
    /// First and last report, Unix ms.
    pub first_ms: i64,
    /// See `first_ms`.
    pub last_ms: i64,
}

/// The outcome of one report in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    /// Stored now, as this event.
    New(Event),
    /// Stored before (a re-send), as this event id (for a report that was
    /// coalesced, the ban it was recorded against).
    Duplicate(u64),
    /// Recorded against the active ban `event_id` (row `row`, an id no
    /// event takes); nothing to fan out.
    Coalesced {
        /// The ban it was recorded against.
        event_id: u64,
        /// Its own row's id.
        row: u64,
    },
    /// Not an event: the address is on the allow-list (this entry, as
    /// shown to the node), and the report is in `refused_reports`. Only
    /// the committer gives this answer; a store's `commit` never does.
    Refused {
        /// The reported address.
        ip: String,
        /// The entry that matched, as stored and shown.
        entry: String,
    },
}

impl Committed {
    /// The event's id, new or first stored (0 for a refused report).
    pub fn event_id(&self) -> u64 {
        match self {
            Committed::New(e) => e.id,
            Committed::Duplicate(id) => *id,
            Committed::Coalesced { event_id, .. } => *event_id,
            Committed::Refused { .. } => 0,
        }
    }
}

/// Filters for `list_bans`; `None` is any.
#[derive(Debug, Clone, Default)]
pub struct BanFilter {
    /// Only bans of this address.
    pub ip: Option<String>,
    /// Only bans reported by this host.
    pub added_by: Option<String>,
    /// Only bans from this fail2ban jail.
    pub jail: Option<String>,
    /// Only bans created at or after this time (Unix ms).
    pub since_ms: Option<i64>,
    /// Only bans with ids above this (paging).
    pub after_id: u64,
    /// At most this many bans.
    pub limit: usize,
}

/// A stored ban with every known host's status.
#[derive(Debug, Clone)]
pub struct BanRow {
    /// The ban event: its id, address, jail and reporter.
    pub event: Event,
    /// An unban lifted it.
    pub lifted: bool,
    /// `(host, status)` for every known host, sorted by host.
    pub statuses: Vec<(String, Status)>,
    /// Who reported it: the event's reporter first, then the hosts whose
    /// reports were coalesced into it, by first report.
    pub reporters: Vec<ReporterRow>,
    /// An admin's `unban --forget` cleared it from the address's history.
    pub forgotten: bool,
}

/// An allow-list entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRow {
    /// The network, canonical.
    pub network: crate::allow::Network,
    /// The admin's note (`--note`), may be empty.
    pub note: String,
    /// The admin who added it.
    pub added_by: String,
    /// When, Unix ms.
    pub added_ms: i64,
}

/// What adding an allow-list entry committed, in id order.
#[derive(Debug, Clone)]
pub struct AllowAdded {
    /// The entry as stored.
    pub entry: AllowRow,
    /// The allow-add event.
    pub event: Event,
    /// One unban event per address inside the network that had an active
    /// ban, after `event`.
    pub unbans: Vec<Event>,
    /// Active bans lifted (an address may have had several).
    pub lifted: u32,
}

/// A report refused because its address is on the allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRow {
    /// Row id (paging).
    pub id: u64,
    /// The reporting host, from its certificate.
    pub host: String,
    /// Its report sequence.
    pub seq: u64,
    /// The ban it reported.
    pub ban: Ban,
    /// When the hub refused it, Unix ms.
    pub created_ms: i64,
    /// The entry that matched (CIDR, or a built-in or fleet address with its reason).
    pub allowed_by: String,
}

/// A host the hub has seen.
#[derive(Debug, Clone)]
pub struct HostRow {
    /// The host's name, from its certificate's common name; the identity every
    /// status is stored under.
    pub name: String,
    /// When the hub first stored this host (enrolment or first connection), Unix ms.
    pub first_seen_ms: i64,
    /// When the host last connected, Unix ms: a stale value means a silent node.
    pub last_seen_ms: i64,
    /// When it enrolled with a token; `None` for a host issued by `ca issue` or imported.
    pub enrolled_ms: Option<i64>,
    /// When its certificate (as last presented) expires, Unix ms; `None` until it connects.
    pub cert_expires_ms: Option<i64>,
    /// Revoked hosts are refused at connect and their name cannot be enrolled again.
    pub revoked: bool,
    /// The hub (its `--name`) the host is subscribed through, as that hub
    /// recorded it when the stream opened; `None` when no hub claims it.
    /// A hub killed with -9 leaves its claims: see [`Store::subscribed_via`].
    pub hub: Option<String>,
    /// Since when `hub` claims it, Unix ms.
    pub hub_since_ms: Option<i64>,
    /// When `hub` last recorded that it is alive (`hub::presence`), Unix
    /// ms; `None` when it never did (no claim, or a hub on SQLite).
    pub hub_seen_ms: Option<i64>,
}

/// An enrolment token to store.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// Hex SHA-256 of the token.
    pub hash: String,
    /// The only host name it may enrol, if bound.
    pub name: Option<String>,
    /// When the token stops being accepted, Unix ms.
    pub expires_ms: i64,
    /// Validity of the certificate it buys, seconds.
    pub cert_ttl_s: i64,
}

/// A successful enrolment: how long the certificate may be valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enrolled {
    /// Validity of the certificate the host is issued, seconds.
    pub cert_ttl_s: i64,
}

/// Why an enrolment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollRefused {
    /// No stored token has this hash: mistyped, or never created on this hub.
    #[error("unknown enrolment token")]
    UnknownToken,
    /// The token enrolled a host already; tokens are one-time.
    #[error("this enrolment token was already used")]
    UsedToken,
    /// The token's expiry has passed.
    #[error("this enrolment token has expired; create a new one with `banmesh hub token create`")]
    ExpiredToken,
    /// The token is bound to another host name (the one given).
    #[error("this enrolment token is for host {0:?} only")]
    OtherName(String),
    /// A live host already holds the name; revoke it first to replace it.
    #[error("the name {0:?} is held by another host (revoke it first to replace that host)")]
    NameTaken(String),
    /// The name was revoked; a revoked name is never reused.
    #[error("the name {0:?} was revoked and cannot be enrolled again")]
    NameRevoked(String),
    /// The name is an admin's (admins and hosts share one namespace).
    #[error(
        "the name {0:?} belongs to an admin certificate; hosts and admins share one namespace, so choose another name"
    )]
    AdminName(String),
}

/// What the hub knew of a name it was told to revoke.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Revocation {
    /// The host the name belongs to, as stored (its first connection's
    /// letter case), if a host ever connected or enrolled under it.
    pub host: Option<String>,
    /// An admin certificate has called the hub under this name.
    pub admin: bool,
}

/// What the store knows of a name an enrolment asks for.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NameState {
    /// A host holds it: `Some(revoked)`.
    pub host: Option<bool>,
    /// It is in `revoked_names`.
    pub revoked: bool,
    /// An admin certificate has called under it.
    pub admin: bool,
}

/// A token row as read inside the enrolment transaction.
pub(crate) struct TokenRow {
    pub name: Option<String>,
    pub expires_ms: i64,
    pub used: bool,
    pub cert_ttl_s: i64,
}

/// The enrolment rules, shared by both backends: `known` is what the
/// store holds under the name, in any letter case.
pub(crate) fn check_enrolment(
    token: Option<TokenRow>,
    name: &str,
    known: NameState,
    now_ms: i64,
) -> Result<Enrolled, EnrollRefused> {
    let t = token.ok_or(EnrollRefused::UnknownToken)?;
    if t.used {
        return Err(EnrollRefused::UsedToken);
    }
    if t.expires_ms <= now_ms {
        return Err(EnrollRefused::ExpiredToken);
    }
    if let Some(bound) = t.name.filter(|b| !b.eq_ignore_ascii_case(name)) {
        return Err(EnrollRefused::OtherName(bound));
    }
    if known.admin {
        return Err(EnrollRefused::AdminName(name.to_string()));
    }
    match (known.revoked, known.host) {
        (true, _) | (_, Some(true)) => Err(EnrollRefused::NameRevoked(name.to_string())),
        (false, Some(false)) => Err(EnrollRefused::NameTaken(name.to_string())),
        (false, None) => Ok(Enrolled {
            cert_ttl_s: t.cert_ttl_s,
        }),
    }
}

/// The hub's store; see the module doc for the contract.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records that a host connected (and its certificate's expiry); adds
    /// its `ip_table` column when new. Admins are not hosts: never touched.
    async fn touch_host(&self, name: &str, cert_expires_ms: Option<i64>) -> Result<(), StoreError>;
    /// Stores a one-time enrolment token (its SHA-256, never the token).
    async fn create_token(&self, token: &NewToken) -> Result<(), StoreError>;
    /// Spends a token for `name` and records the host and the certificate
    /// lifetime it enrolled with, in one transaction; refuses an unknown,
    /// used or expired token, a token bound to another name, and a name
    /// (in any letter case) held by a host, revoked, or an admin's.
    async fn enroll(
        &self,
        token_hash: &str,
        name: &str,
    ) -> Result<Result<Enrolled, EnrollRefused>, StoreError>;
    /// Revokes a name (in any letter case) for good: a host's, an admin's,
    /// or one nothing has connected under yet. `by` is the revoking admin.
    /// Revoking twice is not an error.
    async fn revoke(&self, name: &str, by: &str) -> Result<Revocation, StoreError>;
    /// Every revoked name, in lower case, sorted.
    async fn revoked(&self) -> Result<Vec<String>, StoreError>;
    /// Brings the `ip_table` view up to date with hosts that joined through
    /// other hubs (several hubs on one store): one `COUNT(*)` when none did.
    async fn refresh_view(&self) -> Result<(), StoreError>;
    /// Records that an admin certificate called under `name`, so that no
    /// host can enrol as it. Idempotent.
    async fn record_admin(&self, name: &str) -> Result<(), StoreError>;
    /// Records one of the fleet's own addresses and whose it is (the first
    /// owner stays). Idempotent.
    async fn note_fleet_address(&self, ip: &str, owner: &str) -> Result<(), StoreError>;
    /// Every recorded fleet address and its owner, read at the hub's start.
    async fn fleet_addresses(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// The certificate lifetime host `name` enrolled with, seconds; `None`
    /// for a host that did not enrol with a token.
    async fn cert_ttl(&self, name: &str) -> Result<Option<i64>, StoreError>;
    /// Commits a batch of reports in one transaction (see the module doc).
    async fn commit(&self, batch: &[NewReport]) -> Result<Vec<Committed>, StoreError> {
        self.commit_at(batch, now_ms()).await
    }
    /// [`Store::commit`] with new events created at `now_ms`: the time the
    /// committer planned their terms at, so that a fleet end is exactly its
    /// rung's duration after the ban's creation.
    async fn commit_at(
        &self,
        batch: &[NewReport],
        now_ms: i64,
    ) -> Result<Vec<Committed>, StoreError>;
    /// Replay: up to `limit` events after `after`, as seen by `subscriber`.
    async fn events_after(
        &self,
        after: u64,
        subscriber: &str,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError>;
    /// The committer's reads of what is stored (its read-back of events
    /// committed unpublished, its poll of other hubs' commits): every
    /// event after `after` any subscriber may get, as `events_after` for
    /// one that excludes nothing, on the connection the committer's
    /// commits run on (MySQL: kept out of the pool, `mysql::dedicated`).
    async fn committed_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError>;
    /// Lifts every active ban of `ip`; `None` when none was active. With
    /// `forget`, also clears the address's ladder history (every ban up to
    /// now), in the same transaction, active ban or not.
    async fn unban(
        &self,
        ip: &str,
        by: &str,
        forget: bool,
    ) -> Result<Option<(Event, u32)>, StoreError>;
    /// What the ladder needs for `batch`: which of its reports (of an
    /// address it holds more than once) are stored already, and the latest
    /// ban of each of its addresses.
    async fn ladder_facts(&self, batch: &[NewReport]) -> Result<LadderFacts, StoreError>;
    /// Stores hosts' statuses for events they applied, many hosts in one
    /// statement: `(host, event id, status)`.
    async fn set_statuses(&self, updates: &[(String, u64, Status)]) -> Result<usize, StoreError>;
    /// Bans (not unbans) matching `filter`, in id order, with every known
    /// host's status.
    async fn list_bans(&self, filter: &BanFilter) -> Result<Vec<BanRow>, StoreError>;
    /// Every host row, sorted by name.
    async fn hosts(&self) -> Result<Vec<HostRow>, StoreError>;
    /// Records that `host` subscribed through hub `hub` at `since_ms`, so
    /// that every hub sharing the store can tell which hub each host is
    /// on. One write per stream opened, never per event. The last
    /// subscription wins: a host that moves to another hub is claimed by it.
    async fn subscribed_via(&self, host: &str, hub: &str, since_ms: i64) -> Result<(), StoreError>;
    /// Clears the claim [`Store::subscribed_via`] wrote, if it still holds
    /// (same hub and same `since_ms`): a claim another subscription wrote
    /// since (on this hub or another) stays. A hub killed with -9 clears
    /// nothing: its claims stay until the host subscribes again, anywhere,
    /// or the hub starts again ([`Store::release_hub`]). True when cleared.
    async fn unsubscribed_via(
        &self,
        host: &str,
        hub: &str,
        since_ms: i64,
    ) -> Result<bool, StoreError>;
    /// Clears every claim of hub `hub`: run at the hub's start, when it
    /// has no stream, so claims an earlier run left (killed, or the
    /// database away at its stop) do not outlive it. How many were cleared.
    async fn release_hub(&self, hub: &str) -> Result<u64, StoreError>;
    /// Records that hub `hub` is alive at `now_ms` (`hub::presence`).
    async fn hub_seen(&self, hub: &str, now_ms: i64) -> Result<(), StoreError>;
    /// The allow-list entries, by network text.
    async fn allow_entries(&self) -> Result<Vec<AllowRow>, StoreError>;
    /// Adds an entry and, in the same transaction, its allow-add event and
    /// an unban event for every address inside it with an active ban;
    /// `None` (nothing written) when the network is already listed.
    async fn allow_add(&self, entry: &AllowRow) -> Result<Option<AllowAdded>, StoreError>;
    /// Removes an entry and writes its allow-remove event (by `by`); `None`
    /// (nothing written) when the network is not listed.
    async fn allow_remove(
        &self,
        network: &crate::allow::Network,
        by: &str,
    ) -> Result<Option<Event>, StoreError>;
    /// Inserts allow-list rows as they are (`hub migrate`), without events
    /// (those are copied with the other events); a listed network is skipped.
    async fn load_allow(&self, rows: &[AllowRow]) -> Result<(), StoreError>;
    /// Stores refused reports, with the entry each matched; a report
    /// (host, seq) already stored is skipped.
    async fn refuse(&self, refused: &[(NewReport, String)]) -> Result<(), StoreError>;
    /// Up to `limit` refused reports with ids above `after`, in id order.
    async fn refused(&self, after: u64, limit: usize) -> Result<Vec<RefusedRow>, StoreError>;
    /// Highest event id stored (0 when empty); coalesced reports' rows are
    /// not events.
    async fn last_event_id(&self) -> Result<u64, StoreError>;
    /// Highest report sequence stored for a host (0 when none): told to
    /// the node when it publishes, so a node whose outbox was reset (from a
    /// backup, say) numbers its next reports above it.
    async fn last_seq(&self, host: &str) -> Result<u64, StoreError>;

    // Raw rows, ids preserved: moving a hub's data between backends
    // (`hub migrate`) and importing the seed's table (`hub import-seed`).

    /// Every host row.
    async fn dump_hosts(&self) -> Result<Vec<RawHost>, StoreError>;
    /// Up to `limit` event rows with ids above `after`, in id order.
    async fn dump_events(&self, after: u64, limit: usize) -> Result<Vec<RawEvent>, StoreError>;
    /// Up to `limit` status rows with event ids above `after`, in event order.
    async fn dump_statuses(&self, after: u64, limit: usize) -> Result<Vec<RawStatus>, StoreError>;
    /// Inserts raw rows as they are; rows whose key exists are skipped.
    async fn load(
        &self,
        hosts: &[RawHost],
        events: &[RawEvent],
        statuses: &[RawStatus],
    ) -> Result<(), StoreError>;
    /// Counts of (hosts, events, statuses).
    async fn counts(&self) -> Result<(u64, u64, u64), StoreError>;
    /// The namespace's rows: revoked names (hosts revoked by earlier builds
    /// included), admin names, enrolled lifetimes.
    async fn dump_names(&self) -> Result<RawNames, StoreError>;
    /// Inserts namespace rows, skipping names already present, and flags
    /// the hosts (loaded before) whose names are revoked.
    async fn load_names(&self, names: &RawNames) -> Result<(), StoreError>;
}

/// The namespace tables as stored: what `hub migrate` carries besides
/// hosts, events and statuses, so that no revocation is lost on the way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawNames {
    /// `(name, revoked_ms, revoked_by)` of every revoked name.
    pub revoked: Vec<(String, i64, String)>,
    /// `(name, first_seen_ms)` of every admin name.
    pub admins: Vec<(String, i64)>,
    /// `(name in lower case, cert_ttl_s)` of every enrolled host.
    pub lifetimes: Vec<(String, i64)>,
    /// `(ip, up_to, forgotten_ms, forgotten_by)` of every address whose
    /// ladder history an admin cleared (`unban --forget`).
    pub forgotten: Vec<(String, u64, i64, String)>,
}

/// A host row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawHost {
    /// The host's row id, which status rows refer to.
    pub id: u64,
    /// The host's name (its certificate's common name).
    pub name: String,
    /// When the hub first stored this host, Unix ms.
    pub first_seen_ms: i64,
    /// When the host last connected, Unix ms.
    pub last_seen_ms: i64,
}

/// An event row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    /// The event id: the fleet-wide order in which nodes replay.
    pub id: u64,
    /// 1 a ban, 2 an unban.
    pub kind: i64,
    /// The reporting host's id; 0 for an admin's unban.
    pub reporter_id: u64,
    /// The reporting node's sequence number (its re-send key); `None` for unbans and imported rows.
    pub node_seq: Option<u64>,
    /// The reporter's host name (or the admin's, for an unban).
    pub added_by: String,
    /// When the hub committed it, Unix ms.
    pub created_ms: i64,
    /// The fail2ban jail the ban came from.
    pub jail: String,
    /// The protocol from the jail's action (`tcp`, `udp`, ...).
    pub protocol: String,
    /// The port (or ports) from the jail's action, as fail2ban wrote it.
    pub port: String,
    /// The banned address.
    pub ip: String,
    /// For a ban, the id of the unban event that lifted it; `None` while active.
    pub lifted_by: Option<u64>,
    /// For an unban, the id of the latest ban event it lifted.
    pub lifts: Option<u64>,
    /// For a ban: its fleet end, Unix ms (`None`: stored before the ladder).
    pub ends_ms: Option<i64>,
    /// For a ban: its rung (`None`: stored before the ladder).
    pub rung: Option<i64>,
    /// For a ban: the ban it extends; for a coalesced report (kind 5): the
    /// ban it was recorded against.
    pub extends: Option<u64>,
    /// For a ban the hub's policy decided: why.
    pub reason: Option<String>,
}

/// A status row as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawStatus {
    /// The event the status is for.
    pub event_id: u64,
    /// The host (row id) the status is from.
    pub host_id: u64,
    /// The status code, in the seed's numbers (see [`Status`]).
    pub status: i64,
}

/// Opens the store named by `--db`, creating or migrating its schema.
pub async fn open(url: &str) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if url.starts_with("mysql://") {
        Ok(std::sync::Arc::new(mysql::MysqlStore::open(url).await?))
    } else if let Some(path) = url.strip_prefix("sqlite:") {
        Ok(std::sync::Arc::new(
            sqlite::SqliteStore::open(path.trim_start_matches("//")).await?,
        ))
    } else {
        Err(StoreError::BadUrl(redact(url)))
    }
}

/// `url` with its password replaced by `***`: the one form in which a
/// database URL may appear in an error or a log line. It holds for URLs
/// that do not parse (a mistyped scheme such as `mysq://` or `mariadb://`,
/// no scheme at all): the credentials are whatever precedes the last `@`,
/// and the password is everything after the user's name there. A
/// `password=` query parameter is hidden too.
pub fn redact(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let mut out = match url[start..].rfind('@').map(|at| start + at) {
        Some(at) => match url[start..at].find(':') {
            Some(colon) => format!("{}:***{}", &url[..start + colon], &url[at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    };
    if let Some(q) = out.find('?') {
        let query: Vec<String> = out[q + 1..]
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.to_ascii_lowercase().contains("pass") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{}?{}", &out[..q], query.join("&"));
    }
    out
}

pub use crate::clock::now_ms;
pub use schema::MAX_VIEW_HOSTS;

/// The `events` row a report's [`Plan`] writes, shared by both backends'
/// commits.
pub(crate) struct Stored {
    pub kind: i64,
    pub ends_ms: Option<i64>,
    pub rung: Option<i64>,
    pub extends: Option<u64>,
    pub reason: Option<String>,
    term: crate::ban::BanTerm,
}

impl Stored {
    /// The row for `plan`; `outcome(i)` is the event id report `i` of the
    /// batch was stored as (a `CoalesceWith` names an earlier report).
    pub fn of(plan: &Plan, outcome: impl Fn(usize) -> Option<u64>) -> Stored {
        let into = match plan {
            Plan::New(term) => {
                return Stored {
                    kind: 1,
                    ends_ms: (term.ends_ms > 0).then_some(term.ends_ms),
                    rung: (term.rung > 0).then_some(i64::from(term.rung)),
                    extends: (term.extends > 0).then_some(term.extends),
                    reason: (!term.reason.is_empty()).then(|| term.reason.clone()),
                    term: term.clone(),
                };
            }
            Plan::Coalesce(id) => *id,
            Plan::CoalesceWith(i) => outcome(*i).unwrap_or(0),
        };
        if into == 0 {
            // No ban to record it against (cannot happen: the committer
            // names only earlier reports): never drop a report, ban it.
            return Stored::of(&Plan::default(), outcome);
        }
        Stored {
            kind: COALESCED_KIND,
            ends_ms: None,
            rung: None,
            extends: Some(into),
            reason: None,
            term: Default::default(),
        }
    }

    /// The outcome once the row is stored as `id`.
    pub fn committed(self, id: u64, r: &NewReport, now: i64) -> Committed {
        match (self.kind, self.extends) {
            (COALESCED_KIND, Some(event_id)) => Committed::Coalesced { event_id, row: id },
            _ => Committed::New(Event {
                id,
                kind: crate::ban::EventKind::Ban,
                ban: r.ban.clone(),
                added_by: r.host.clone(),
                created_ms: now,
                lifts: 0,
                term: self.term,
            }),
        }
    }
}

/// Joins bans with every known host's status (where a host has no row: 1
/// for the reporter, 0 for the others).
pub(crate) fn assemble_bans(
    bans: Vec<(Event, bool)>,
    hosts: &[(u64, String)],
    statuses: &std::collections::HashMap<(u64, u64), i64>,
) -> Vec<BanRow> {
    bans.into_iter()
        .map(|(event, lifted)| {
            let mut statuses: Vec<(String, Status)> = hosts
                .iter()
                .map(|(hid, name)| {
                    let implied = i64::from(*name == event.added_by);
                    let code = statuses.get(&(event.id, *hid)).copied().unwrap_or(implied);
                    (
                        name.clone(),
                        Status::from_code(code).unwrap_or(Status::Error),
                    )
                })
                .collect();
            statuses.sort();
            BanRow {
                event,
                lifted,
                statuses,
                reporters: Vec::new(),
                forgotten: false,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_the_password_of_any_url() {
        for (url, shown) in [
            ("mysql://u:p4ss@db:3306/x", "mysql://u:***@db:3306/x"),
            ("mysq://u:p4ss@db/x", "mysq://u:***@db/x"),
            ("mariadb://u:p:4@ss@db/x", "mariadb://u:***@db/x"),
            ("u:p4ss@db/x", "u:***@db/x"),
            ("mysql://u@db/x", "mysql://u@db/x"),
            ("sqlite:/var/lib/x.db", "sqlite:/var/lib/x.db"),
            (
                "mysql://db/x?user=u&password=p4ss",
                "mysql://db/x?user=u&password=***",
            ),
        ] {
            assert_eq!(redact(url), shown);
        }
    }
}
