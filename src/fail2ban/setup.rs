//! `banmesh node setup-fail2ban`: writes the fail2ban configuration the
//! seed's README asks an operator to make by hand.
//!
//! - `filter.d/shared.local`: the `shared` filter, matching the lines the
//!   node writes ([`shared_log::failregex`]);
//! - `action.d/ipset-allports-shared.local`: the ipset all-ports action of
//!   the `shared` jail (it never reports: those bans came from the fleet);
//! - `action.d/ipset-allports-banmesh.local`: the same action whose
//!   `actionban` also runs `banmesh-report` (the small client beside the
//!   banmesh binary; `banmesh report` where it is missing), for every other
//!   jail, only for new bans (`<restored>` = 0), not those fail2ban
//!   restores at its start;
//! - `jail.d/shared.local`: the `shared` jail reading `shared.log`;
//! - `shared.log` itself (fail2ban refuses to start a jail whose log is
//!   missing).
//!
//! IPv6 needs nothing more: both actions include fail2ban's own
//! `iptables-ipset.conf`, whose `[Init?family=inet6]` section puts an IPv6
//! ban in a set of its own (`f2b-shared6`, `hash:ip family inet6`) behind
//! an `ip6tables` rule, created at the first IPv6 ban and removed at stop.
//! The NAT FORWARD rule is written with the action's `<iptables>` and
//! `<ipmset>` tags, so it exists once per family too (checked with fail2ban
//! 1.0.2; `tests/fail2ban_ipv6.rs` bans through both paths). Nothing here
//! may name `iptables` or `f2b-shared` literally: that would leave IPv6
//! out.
//!
//! What goes into these files is run by fail2ban as root, so every value
//! is checked or quoted for each reader on its way ([`Setup::check`]):
//! paths are single-quoted for the shell and `%` doubled for fail2ban's INI
//! interpolation; what neither can carry (control characters, fail2ban's
//! `<tag>` brackets, `;` after a blank, which starts an INI comment) is
//! refused, as are a `bantime` that is not a duration and a `nat_forward`
//! that is not an interface name. A refusal writes nothing.
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
    /// A value fail2ban could not carry intact ([`Setup::check`]).
    #[error("{what} {value:?} refused: {rule}; nothing was written")]
    Invalid {
        /// The flag it came from.
        what: &'static str,
        /// The value as given.
        value: String,
        /// What it must be instead.
        rule: &'static str,
    },
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
    /// fail2ban's `bantime` for the shared jail (`1d`, `25d`, seconds): the
    /// hub's ladder top, so that fail2ban never lifts a fleet ban before
    /// the node does at the fleet's end ([`crate::node::lifts`]).
    pub bantime: String,
    /// Interface of the seed's "NAT FORWARD" rule, for hosts that forward.
    pub nat_forward: Option<String>,
}

/// The small client fail2ban's action runs, installed beside `banmesh`.
const REPORT_BINARY: &str = "banmesh-report";

/// One file and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The file was created or its content replaced.
    Written(PathBuf),
    /// The file already had this content; a second run changes nothing.
    Unchanged(PathBuf),
}

impl Setup {
    /// The command fail2ban's `actionban` runs for each new ban: the small
    /// `banmesh-report` beside the banmesh binary when it is there (fail2ban
    /// waits for it on every ban, and it starts in a third of the time:
    /// README, Performance), else `banmesh report` (same flags and answers).
    fn reporter(&self) -> String {
        let small = self.banmesh.with_file_name(REPORT_BINARY);
        if small.is_file() {
            shell_arg(&small)
        } else {
            format!("{} report", shell_arg(&self.banmesh))
        }
    }

    /// Refuses any value that could not reach fail2ban intact: see the
    /// module doc.
    pub fn check(&self) -> Result<(), SetupError> {
        for (what, path) in [
            ("--socket", &self.socket),
            ("--data-dir", &self.data_dir),
            ("the banmesh binary's path (--banmesh)", &self.banmesh),
        ] {
            check_path(what, path, false)?;
        }
        check_path("--shared-log", &self.shared_log, true)?;
        if !valid_bantime(&self.bantime) {
            return Err(invalid(
                "--bantime",
                &self.bantime,
                "use seconds (86400), -1 for ever, or fail2ban's units (10m, 1h30m, 1d, 2w, 1mo, 1y)",
            ));
        }
        if let Some(iface) = &self.nat_forward
            && !valid_interface(iface)
        {
            return Err(invalid(
                "--nat-forward",
                iface,
                "use an interface name (1-15 letters, digits, '_', '-', '.', optionally ending in '+')",
            ));
        }
        Ok(())
    }

    /// The files, as (path, content). Call [`Setup::check`] first.
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
                    "{action_head}actionban = %(known/actionban)s\n            if [ '<restored>' = '0' ]; then {} --socket {} --data-dir {} -j '<name>' -pr '<protocol>' -p '<port>' -i '<ip>'; fi\n",
                    self.reporter(),
                    shell_arg(&self.socket),
                    shell_arg(&self.data_dir)
                ),
            ),
            (
                dir.join("jail.d/shared.local"),
                format!(
                    "{MARKER}\n# Bans from the rest of the fleet, written to shared.log by the banmesh node.\n[shared]\nenabled = true\nfilter = shared\nlogpath = {}\nbanaction = ipset-allports-shared\nprotocol = all\nmaxretry = 1\nfindtime = {}\nbantime = {}\n",
                    ini(&self.shared_log.to_string_lossy()),
                    self.findtime(),
                    self.bantime
                ),
            ),
        ]
    }

    /// The shared jail's `findtime`: as long as its bantime, since
    /// fail2ban's filter skips a line older than `findtime`, and a line
    /// replayed after an outage carries its ban's own time while the ban
    /// (up to the ladder's top) still runs. `1d` for a permanent bantime.
    fn findtime(&self) -> &str {
        if self.bantime == "-1" {
            "1d"
        } else {
            &self.bantime
        }
    }

    /// Writes what is missing or changed; never touches a file without the
    /// marker. Returns what it did, or the first refusal.
    pub fn apply(&self) -> Result<Vec<Outcome>, SetupError> {
        self.check()?;
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
    /// A refused value is printed instead.
    pub fn dry_run(&self) -> String {
        if let Err(e) = self.check() {
            return format!("{e}\n");
        }
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

fn invalid(what: &'static str, value: &str, rule: &'static str) -> SetupError {
    SetupError::Invalid {
        what,
        value: value.to_string(),
        rule,
    }
}

/// A path fail2ban can carry: UTF-8, no control character, no `<`/`>`
/// (fail2ban would substitute a `<tag>`), no `;` after a blank (an INI
/// comment). `logpath` (`log`) also splits on blanks and expands globs.
fn check_path(what: &'static str, path: &Path, log: bool) -> Result<(), SetupError> {
    let text = path
        .to_str()
        .ok_or_else(|| invalid(what, &path.to_string_lossy(), "the path is not UTF-8"))?;
    let refuse = |rule| Err(invalid(what, text, rule));
    if text.is_empty() {
        return refuse("the path is empty");
    }
    if text.chars().any(char::is_control) {
        return refuse("the path holds a control character (newline, tab, ...)");
    }
    if text.contains(['<', '>']) {
        return refuse("fail2ban would read <...> in the path as one of its tags");
    }
    if text
        .as_bytes()
        .windows(2)
        .any(|w| w[0].is_ascii_whitespace() && w[1] == b';')
    {
        return refuse("fail2ban's config reader takes ' ;' as the start of a comment");
    }
    if log && text.contains([' ', '*', '?', '[', ']']) {
        return refuse("fail2ban's logpath splits at blanks and expands *, ?, [ ]");
    }
    Ok(())
}

/// A path as one shell word, single-quoted, ready for fail2ban's INI
/// reader (`%` doubled).
fn shell_arg(path: &Path) -> String {
    let quoted = format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"));
    ini(&quoted)
}

/// Text as fail2ban's INI reader gives it back: `%` is interpolation.
fn ini(s: &str) -> String {
    s.replace('%', "%%")
}

/// fail2ban's `bantime`: seconds, -1 (for ever), or number+unit groups
/// (`1d`, `1h30m`; units y, mo, w, d, h, m, s).
fn valid_bantime(s: &str) -> bool {
    if s == "-1" || (!s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit())) {
        return true;
    }
    let mut rest = s;
    if rest.is_empty() || s.len() > 32 {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return false;
        }
        rest = &rest[digits..];
        let Some(unit) = ["mo", "y", "w", "d", "h", "m", "s"]
            .into_iter()
            .find(|u| rest.starts_with(u))
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

/// A Linux interface name as iptables `-i` takes it: at most 15 bytes,
/// `+` at the end matches every name with that prefix.
fn valid_interface(s: &str) -> bool {
    let name = s.strip_suffix('+').unwrap_or(s);
    (1..=15).contains(&s.len())
        && !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
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
    fn the_action_runs_the_small_client_when_it_is_installed_beside_banmesh() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(bin.join("banmesh"), "").unwrap();
        let mut s = setup(dir.path());
        s.banmesh = bin.join("banmesh");
        let action = |s: &Setup| {
            s.apply().unwrap();
            std::fs::read_to_string(
                dir.path()
                    .join("fail2ban/action.d/ipset-allports-banmesh.local"),
            )
            .unwrap()
        };
        let with_banmesh = format!("then '{}' report --socket", bin.join("banmesh").display());
        assert!(action(&s).contains(&with_banmesh));

        std::fs::write(bin.join("banmesh-report"), "").unwrap();
        let with_small = format!("then '{}' --socket", bin.join("banmesh-report").display());
        assert!(action(&s).contains(&with_small), "{}", action(&s));
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
        assert!(action.contains("if [ '<restored>' = '0' ]; then '/usr/local/bin/banmesh' report --socket '/run/banmesh/node.sock' --data-dir '/var/lib/banmesh/node' -j"));
        assert!(
            action.contains("-I FORWARD -i ppp+ -m set --match-set <ipmset> src -j <blocktype>")
        );

        let jail =
            std::fs::read_to_string(dir.path().join("fail2ban/jail.d/shared.local")).unwrap();
        assert!(jail.contains("\nfindtime = 1d\nbantime = 1d\n"), "{jail}");

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

    #[test]
    fn both_address_families_come_from_fail2ban_s_own_action() {
        let dir = tempfile::tempdir().unwrap();
        let files = setup(dir.path()).files();
        for (path, text) in &files[1..3] {
            assert!(
                text.contains("[INCLUDES]\nbefore = iptables-ipset.conf\n"),
                "{}: {text}",
                path.display()
            );
            // Tags, never names, so fail2ban's inet6 section applies.
            for literal in ["iptables ", "ip6tables", "f2b-"] {
                assert!(!text.contains(literal), "{literal:?} in {text}");
            }
            assert!(text.contains("<iptables> -I FORWARD -i ppp+ -m set --match-set <ipmset> src"));
        }
    }

    #[test]
    fn paths_are_one_shell_word_through_the_ini_reader() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = setup(dir.path());
        s.banmesh = "/opt/it's 100%;x/banmesh".into();
        s.shared_log = dir.path().join("100%.log");
        s.check().unwrap();
        let files = s.files();
        let action = &files[2].1;
        assert!(
            action.contains(r"then '/opt/it'\''s 100%%;x/banmesh' report"),
            "{action}"
        );
        assert!(files[3].1.contains("100%%.log\n"), "{}", files[3].1);
    }

    #[test]
    fn values_fail2ban_cannot_carry_are_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let refused = |change: &dyn Fn(&mut Setup), what: &str| {
            let mut s = setup(dir.path());
            change(&mut s);
            match s.apply() {
                Err(SetupError::Invalid { what: w, .. }) => assert!(w.contains(what), "{w}"),
                other => panic!("{what}: {other:?}"),
            }
            assert!(!dir.path().join("fail2ban").exists(), "nothing written");
        };
        refused(
            &|s| s.bantime = "1d\nignoreip = 0.0.0.0/0".into(),
            "--bantime",
        );
        refused(&|s| s.bantime = "1 day".into(), "--bantime");
        refused(&|s| s.bantime = "".into(), "--bantime");
        refused(
            &|s| s.nat_forward = Some("ppp+ -j ACCEPT".into()),
            "--nat-forward",
        );
        refused(&|s| s.nat_forward = Some("eth0\n".into()), "--nat-forward");
        refused(
            &|s| s.nat_forward = Some("a-very-long-interface".into()),
            "--nat-forward",
        );
        refused(&|s| s.socket = "/run/a\nb.sock".into(), "--socket");
        refused(&|s| s.data_dir = "/var/<ip>".into(), "--data-dir");
        refused(&|s| s.banmesh = "/opt/x ;y".into(), "--banmesh");
        refused(
            &|s| s.shared_log = "/var/log/a b.log".into(),
            "--shared-log",
        );
        refused(&|s| s.shared_log = "/var/log/*.log".into(), "--shared-log");
        for ok in ["1d", "25d", "86400", "-1", "1h30m", "2w", "1mo", "1y"] {
            assert!(valid_bantime(ok), "{ok}");
        }
        for ok in ["eth0", "ppp+", "br-lan.10", "wg_0"] {
            assert!(valid_interface(ok), "{ok}");
        }
    }
}
