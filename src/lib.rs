//! banmesh shares fail2ban bans across a fleet in near real time.
//!
//! A ban on one server is handed by fail2ban's action to the local **node**,
//! which streams it over mutual TLS to the **hub**; the hub commits it to
//! its store (MySQL, or an embedded SQLite file) and fans it out to every
//! other node, which writes it into fail2ban's `shared` jail and reports its
//! status back. See `docs/DESIGN.md` in the repository for the semantics and the path of a ban through the files.
//!
//! # Layout
//! - [`ban`]: domain types (ban, event, status) and input validation.
//! - [`allow`]: the fleet allow-list: networks, longest-prefix lookup, built-ins.
//! - [`hub`]: the hub daemon: store, group committer, fan-out, subscriptions.
//! - [`node`]: the node daemon: outbox, publisher, subscriber, apply.
//! - [`report`]: the `banmesh report` client fail2ban's action runs.
//! - [`status`]: `banmesh status`, the local node's health for people and monitoring.
//! - [`admin`]: operator commands: unban, bans, hosts, tokens, revoke, migrate, import-seed.
//! - [`enroll`]: `banmesh enroll`, a new server trading a token for its certificate.
//! - [`fail2ban`]: fail2ban's control socket and the configuration banmesh installs.
//! - [`metrics`]: Prometheus metrics of both daemons (`--metrics ADDR`).
//! - [`logging`]: text or JSON log lines, and the filter SIGHUP changes.
//! - [`tls`]: mTLS configuration and peer identity.
//! - [`certificate_reload`]: the hub's certificate, re-read on SIGHUP.
//! - [`ca`]: the fleet CA: make it, sign hosts and admins.
//! - [`config`]: the daemons' config files, `BANMESH_*` variables and flags, merged.
//! - [`clock`]: the fleet's clock (Unix milliseconds), shared by hub and node.
//! - [`systemd`]: readiness and watchdog pings for `Type=notify` units.
//! - [`shutdown`]: graceful shutdown as a value.
//! - [`cli`]: the `clap` definitions and dispatch behind the `banmesh` binary.
//! - [`demo`]: a throwaway local fleet for a first look.
//! - [`bench`](mod@bench): the benchmark harness (`banmesh bench`).
//! - [`proto`]: generated gRPC code.

#![warn(missing_docs)]

pub mod admin;
pub mod allow;
pub mod ban;
pub mod bench;
pub mod ca;
pub mod certificate_reload;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod enroll;
pub mod fail2ban;
pub mod hops;
pub mod hostname;
pub mod hub;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod proto;
pub mod report;
pub mod shutdown;
pub mod status;
pub mod systemd;
pub mod tls;
