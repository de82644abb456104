//! `banmesh node setup-fail2ban`: writes the fail2ban configuration the
//! seed's README asks an operator to make by hand.
//!
//! - `filter.d/shared.local`: the `shared` filter, matching the lines the
//!   node writes ([`shared_log::failregex`]);
//! - `action.d/ipset-allports-shared.local`: the ipset all-ports action of
//!   the `shared` jail (it never reports: those bans came from the fleet);
//! - `action.d/ipset-allports-banmesh.local`: the same action whose
//!   `actionban` also runs `banmesh report`, for every other jail, only for
//!   new bans (`<restored>` = 0), not those fail2ban restores at its start;
//! - `jail.d/shared.local`: the `shared` jail reading `shared.log`;
//! - `shared.log` itself (fail2ban refuses to start a jail whose log is
//!   missing).
//!
//! Every file carries a marker line. A file without it was not written by
//! banmesh and is never overwritten; one with it is rewritten only when its
//! content would change, so a second run changes nothing.
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::node::shared_log;

/// First line of every file banmesh writes.
pub const MARKER: &str =
    "# Written by `banmesh node setup-fail2ban`; edits are replaced on the next run.";

/// Why `setup-fail2ban` stopped.
#[derive(Debug, Error)]
pub enum SetupError {
    /// A configuration file (or its directory, or `shared.log`) could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory being written.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file exists without banmesh's marker line: an operator's own file, never overwritten.
    #[error(
        "{0} exists and was not written by banmesh; left as it is (move it away to let banmesh write it)"
    )]
    NotOurs(PathBuf),
}

/// What to write.
#[derive(Debug, Clone)]
pub struct Setup {
    /// fail2ban's configuration directory (`/etc/fail2ban`).
    pub config_dir: PathBuf,
    /// Log file of the `shared` jail, which the node appends bans from other hosts to.
    pub shared_log: PathBuf,
    /// The node's socket, carried into the `banmesh report` call.
    pub socket: PathBuf,
    /// The node's data dir, carried into it too (its spool).
    pub data_dir: PathBuf,
    /// Absolute path of the banmesh binary for the action.
    pub banmesh: PathBuf,
    /// fail2ban's `bantime` for the shared jail (`1d`, `25d`, seconds).
    pub bantime: String,
    /// Interface of the seed's "NAT FORWARD" rule, for hosts that forward.
    pub nat_forward: Option<String>,
}

/// One file and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The file was created or its content replaced.
    Written(PathBuf),
    /// The file already had this content; a second run changes nothing.
    Unchanged(PathBuf),
}

impl Setup {
    /// The files, as (path, content).
    pub fn files(&self) -> Vec<(PathBuf, String)> {
        let dir = &self.config_dir;
        let forward = |verb: &str| {
            self.nat_forward.as_ref().map_or(String::new(), |iface| {
                format!(
                    "\n              <iptables> {verb} FORWARD -i {iface} -m set --match-set <ipmset> src -j <blocktype>"
                )
            })
        };
        let nat = if self.nat_forward.is_some() {
            format!(
                "actionstart = %(known/actionstart)s{}\nactionstop = %(known/actionstop)s{}\n",
                forward("-I"),
                forward("-D")
            )
        } else {
            String::new()
        };
        let action_head = format!(
            "{MARKER}\n[INCLUDES]\nbefore = iptables-ipset.conf\n\n[Init]\ntype = allports\n\n[Definition]\n{nat}"
        );
        vec![
            (
                dir.join("filter.d/shared.local"),
                format!(
                    "{MARKER}\n# Lines banmesh appends to shared.log for bans from other hosts.\n[Definition]\nfailregex = {}\nignoreregex =\n",
                    shared_log::failregex()
                ),
            ),
            (
                dir.join("action.d/ipset-allports-shared.local"),
                action_head.clone(),
            ),
            (
                dir.join("action.d/ipset-allports-banmesh.local"),
                format!(
                    "{action_head}actionban = %(known/actionban)s\n            if [ '<restored>' = '0' ]; then {} report --socket {} --data-dir {} -j '<name>' -pr '<protocol>' -p '<port>' -i '<ip>'; fi\n",
                    self.banmesh.display(),
                    self.socket.display(),
                    self.data_dir.display()
                ),
            ),
            (
                dir.join("jail.d/shared.local"),
                format!(
                    "{MARKER}\n# Bans from the rest of the fleet, written to shared.log by the banmesh node.\n[shared]\nenabled = true\nfilter = shared\nlogpath = {}\nbanaction = ipset-allports-shared\nprotocol = all\nmaxretry = 1\nfindtime = 1d\nbantime = {}\n",
                    self.shared_log.display(),
                    self.bantime
                ),
            ),
        ]
    }

    /// Writes what is missing or changed; never touches a file without the
    /// marker. Returns what it did, or the first refusal.
    pub fn apply(&self) -> Result<Vec<Outcome>, SetupError> {
        let files = self.files();
        // Refuse before writing anything, so a refusal changes nothing.
        for (path, _) in &files {
            if let Ok(existing) = std::fs::read_to_string(path)
                && !existing.starts_with(MARKER)
            {
                return Err(SetupError::NotOurs(path.clone()));
            }
        }
        let mut out = Vec::new();
        for (path, content) in files {
            out.push(write_if_ours(&path, &content)?);
        }
        // shared.log: created empty if missing, never truncated.
        let log = &self.shared_log;
        if !log.exists() {
            write_file(log, "")?;
            out.push(Outcome::Written(log.clone()));
        } else {
            out.push(Outcome::Unchanged(log.clone()));
        }
        Ok(out)
    }

    /// Everything `apply` would write, as text.
    pub fn dry_run(&self) -> String {
        let mut s = String::new();
        for (path, content) in self.files() {
            s.push_str(&format!("==> {} <==\n{content}\n", path.display()));
        }
        s.push_str(&format!(
            "==> {} <==\n(created empty if missing)\n",
            self.shared_log.display()
        ));
        s
    }
}

fn write_file(path: &Path, content: &str) -> Result<(), SetupError> {
    let err = |source| SetupError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::write(path, content).map_err(err)
}

fn write_if_ours(path: &Path, content: &str) -> Result<Outcome, SetupError> {
    if std::fs::read_to_string(path).is_ok_and(|existing| existing == content) {
        return Ok(Outcome::Unchanged(path.to_path_buf()));
    }
    write_file(path, content)?;
    Ok(Outcome::Written(path.to_path_buf()))
}

/// What the operator still does by hand, printed after a run.
pub fn next_steps() -> &'static str {
    "Next: set `banaction = ipset-allports-banmesh` in every jail whose bans should reach the fleet\n\
     (or in [DEFAULT] of jail.local; the shared jail keeps its own), then reload fail2ban."
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(dir: &Path) -> Setup {
        Setup {
            config_dir: dir.join("fail2ban"),
            shared_log: dir.join("shared.log"),
            socket: "/run/banmesh/node.sock".into(),
            data_dir: "/var/lib/banmesh/node".into(),
            banmesh: "/usr/local/bin/banmesh".into(),
            bantime: "1d".into(),
            nat_forward: Some("ppp+".into()),
        }
    }

    #[test]
    fn second_run_changes_nothing_and_foreign_files_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = setup(dir.path());
        let first = s.apply().unwrap();
        assert!(first.iter().all(|o| matches!(o, Outcome::Written(_))));
        let second = s.apply().unwrap();
        assert!(
            second.iter().all(|o| matches!(o, Outcome::Unchanged(_))),
            "{second:?}"
        );

        let action = std::fs::read_to_string(
            dir.path()
                .join("fail2ban/action.d/ipset-allports-banmesh.local"),
        )
        .unwrap();
        assert!(action.contains("if [ '<restored>' = '0' ]; then /usr/local/bin/banmesh report --socket /run/banmesh/node.sock"));
        assert!(
            action.contains("-I FORWARD -i ppp+ -m set --match-set <ipmset> src -j <blocktype>")
        );

        let filter = dir.path().join("fail2ban/filter.d/shared.local");
        let ours = std::fs::read_to_string(&filter).unwrap();
        assert!(
            ours.contains(&format!("\nfailregex = {}\n", shared_log::failregex())),
            "{ours}"
        );
        std::fs::write(&filter, "[Definition]\nfailregex = mine\n").unwrap();
        let jail = dir.path().join("fail2ban/jail.d/shared.local");
        std::fs::remove_file(&jail).unwrap();
        assert!(matches!(s.apply(), Err(SetupError::NotOurs(p)) if p == filter));
        assert_eq!(
            std::fs::read_to_string(&filter).unwrap(),
            "[Definition]\nfailregex = mine\n"
        );
        assert!(!jail.exists(), "a refusal writes nothing");
    }
}
