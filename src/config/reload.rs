//! `SIGHUP`: read the settings again, apply what can change live, and say
//! in the log what was applied and what waits for a restart.
//!
//! Live: `log-level`, and the hub's certificate and key files (re-read by
//! [`crate::certificate_reload`]: new handshakes present the renewed
//! pair). Everything else (listen addresses, store, paths, certificate
//! paths, limits) is read once at start; a changed value is named in the
//! log as needing `systemctl restart`. A node renews its own certificate
//! and reconnects with it, without a signal.
use std::ffi::OsString;

use tracing::{info, warn};

use super::{Effective, Source};
use crate::logging::LogHandle;

/// What a daemon needs to reload itself on `SIGHUP`.
pub struct Reloader {
    /// The process's argv, parsed again with the file re-read.
    pub argv: Vec<OsString>,
    /// The settings the daemon runs with now.
    pub current: Effective,
    /// The live log filter.
    pub log: LogHandle,
    /// `log-level` as last applied.
    live_level: Vec<OsString>,
}

fn values(e: &Effective, id: &str) -> Vec<OsString> {
    e.matches
        .get_raw(id)
        .map(|v| v.map(|s| s.to_os_string()).collect())
        .unwrap_or_default()
}

impl Reloader {
    /// A reloader for a daemon started with `argv` and `current`.
    pub fn new(argv: Vec<OsString>, current: Effective, log: LogHandle) -> Self {
        let live_level = values(&current, "log_level");
        Reloader {
            argv,
            current,
            log,
            live_level,
        }
    }

    /// Handles every `SIGHUP` until the process ends.
    pub fn spawn(mut self) {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            warn!("cannot catch SIGHUP: reloading is off");
            return;
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                self.reload();
            }
        });
    }

    /// Reads the settings again and applies what can change live.
    pub fn reload(&mut self) {
        let next = match super::load(self.argv.clone()) {
            Ok(Ok(super::Loaded {
                effective: Some(e), ..
            })) => e,
            Ok(Err(e)) => {
                warn!(error = %e, "SIGHUP: config refused; nothing changed");
                return;
            }
            Ok(Ok(_)) => return,
            Err(e) => {
                warn!(error = %super::file::clap_message(&e), "SIGHUP: config refused; nothing changed");
                return;
            }
        };
        for (cert, result) in crate::certificate_reload::reload_all() {
            match result {
                Ok(()) => {
                    info!(%cert, "SIGHUP: certificate and key re-read; new connections present them")
                }
                Err(e) => {
                    warn!(%cert, error = %e, "SIGHUP: certificate not re-read; the old one stays")
                }
            }
        }
        let cmd = super::command();
        let mut applied = Vec::new();
        let mut restart = Vec::new();
        for (id, _) in &next.sources {
            let now = if id == "log_level" {
                self.live_level.clone()
            } else {
                values(&self.current, id)
            };
            if now == values(&next, id) {
                continue;
            }
            let key = super::daemon_command(&cmd, next.daemon)
                .get_arguments()
                .find(|a| a.get_id() == id.as_str())
                .and_then(|a| a.get_long())
                .unwrap_or(id)
                .to_string();
            if id == "log_level" {
                let level = next
                    .matches
                    .get_one::<String>(id)
                    .cloned()
                    .unwrap_or_default();
                let level_is_default = next
                    .sources
                    .iter()
                    .any(|(i, s)| i == id && *s == Source::Default);
                let directives = match std::env::var("RUST_LOG") {
                    Ok(env) if level_is_default => env,
                    _ => level,
                };
                match self.log.set(&directives) {
                    Ok(()) => applied.push(key),
                    Err(e) => warn!(error = %e, "SIGHUP: cannot apply log-level"),
                }
            } else {
                restart.push(key);
            }
        }
        if applied.is_empty() && restart.is_empty() {
            info!("SIGHUP: config re-read; nothing changed");
        } else {
            info!(
                applied = %applied.join(", "),
                needs_restart = %restart.join(", "),
                "SIGHUP: config re-read"
            );
        }
        if !restart.is_empty() {
            warn!(keys = %restart.join(", "), "SIGHUP: these settings change only with a restart");
        }
        // The rest keeps running as started: `current` stays what runs,
        // but for the filter, which now is the new one.
        if !applied.is_empty() {
            self.live_level = values(&next, "log_level");
        }
    }
}
