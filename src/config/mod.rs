//! Settings for the daemons from a file, the environment and flags.
//!
//! Contract:
//! - Every flag of `banmesh hub` and `banmesh node` is also a key of their
//!   file (`/etc/banmesh/hub.toml`, `/etc/banmesh/node.toml`, or
//!   `--config PATH`) and a `BANMESH_*` environment variable. Both are
//!   derived from the `clap` definition, so a new flag has them at once.
//! - Precedence: default < file < environment < flag.
//! - A file with an unknown key, a wrong type or a bad value is refused
//!   before anything starts, naming the file, the line and the key; the
//!   value is judged by the flag's own parser, so the file accepts exactly
//!   what the command line does.
//!
//! How: argv is parsed once; every file key whose flag came from neither
//! the command line nor the environment is appended as `--key=value`, and
//! argv is parsed again. The result is the same `Cli` a long command line
//! would give.
//!
//! # Layout
//! - [`file`]: reading and checking a file against a daemon's command.
//! - [`show`]: `banmesh config show`: effective settings and their sources.
//! - [`command`]: `banmesh config check|show`.
//! - [`reload`]: what `SIGHUP` re-reads and applies.
pub mod command;
pub mod file;
pub mod reload;
pub mod show;

use std::{ffi::OsString, path::PathBuf};

use clap::{ArgMatches, Command, CommandFactory, FromArgMatches, parser::ValueSource};

pub use file::{ConfigFile, FileError};

use crate::cli::Cli;

/// Directory of the default config files.
pub const DEFAULT_DIR: &str = "/etc/banmesh";

/// A daemon with a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Daemon {
    /// `banmesh hub`, `/etc/banmesh/hub.toml`.
    Hub,
    /// `banmesh node`, `/etc/banmesh/node.toml`.
    Node,
}

impl Daemon {
    /// Both daemons.
    pub const ALL: [Daemon; 2] = [Daemon::Hub, Daemon::Node];

    /// Its subcommand's name.
    pub fn name(self) -> &'static str {
        match self {
            Daemon::Hub => "hub",
            Daemon::Node => "node",
        }
    }

    /// Its config file when `--config` is not given.
    pub fn default_file(self) -> PathBuf {
        PathBuf::from(DEFAULT_DIR).join(format!("{}.toml", self.name()))
    }

    /// The daemon a file is for, from its name (`hub.toml`, `node.toml`).
    pub fn from_file_name(path: &std::path::Path) -> Option<Daemon> {
        let stem = path.file_stem()?.to_str()?;
        Daemon::ALL.into_iter().find(|d| stem.ends_with(d.name()))
    }
}

/// Where a setting's value came from, lowest precedence first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Not set anywhere and no default.
    Unset,
    /// The flag's default.
    Default,
    /// The config file, at this line.
    File(usize),
    /// This environment variable.
    Env(String),
    /// The command line.
    Flag,
}

/// Why a daemon's settings could not be put together.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file was refused.
    #[error(transparent)]
    File(#[from] FileError),
    /// `--config` names a file that does not exist.
    #[error("config file {0} does not exist (pass --config PATH, or create it)")]
    Missing(PathBuf),
    /// Flags, environment and file together do not parse (e.g. a flag and
    /// a file key that exclude each other).
    #[error("{0}")]
    Combined(String),
}

/// The environment variable of a flag: `BANMESH_` and its long name, upper case.
pub fn env_name(long: &str) -> String {
    format!("BANMESH_{}", long.to_uppercase().replace('-', "_"))
}

/// The `banmesh` command, built (help flags added), with a `BANMESH_*`
/// variable on every daemon flag that does not name one already (`--db`
/// keeps `BANMESH_DB`).
pub fn command() -> Command {
    let mut cmd = definition();
    cmd.build();
    cmd
}

/// [`command`] before clap builds it: what the man pages are made from
/// (without a page for each `help` subcommand).
pub fn definition() -> Command {
    let mut cmd = Cli::command();
    for daemon in Daemon::ALL {
        cmd = cmd.mut_subcommand(daemon.name(), |sub| {
            sub.mut_args(|arg| {
                if arg.get_env().is_some() || arg.is_positional() {
                    return arg;
                }
                match arg.get_long().map(env_name) {
                    // Built once per process: leaking the few names is
                    // cheaper than the `string` feature of clap.
                    Some(name) => arg.env(&*Box::leak(name.into_boxed_str())),
                    None => arg,
                }
            })
        });
    }
    cmd
}

/// The daemon's subcommand within `command()`.
pub fn daemon_command(cmd: &Command, daemon: Daemon) -> &Command {
    cmd.find_subcommand(daemon.name())
        .expect("hub and node are subcommands")
}

/// Settings of a daemon and where each came from.
#[derive(Debug, Clone)]
pub struct Effective {
    /// The daemon.
    pub daemon: Daemon,
    /// The file read, if any.
    pub file: Option<PathBuf>,
    /// The final matches of the daemon's subcommand.
    pub matches: ArgMatches,
    /// Per flag id: its source.
    pub sources: Vec<(String, Source)>,
}

/// The parsed command line, and for a daemon its effective settings.
#[derive(Debug)]
pub struct Loaded {
    /// The command line with the file merged in.
    pub cli: Cli,
    /// For `banmesh hub` and `banmesh node` without an action.
    pub effective: Option<Effective>,
}

/// Which daemon `matches` runs, if it runs one (no action given).
fn running(matches: &ArgMatches) -> Option<(Daemon, &ArgMatches)> {
    let (name, sub) = matches.subcommand()?;
    let daemon = Daemon::ALL.into_iter().find(|d| d.name() == name)?;
    sub.subcommand().is_none().then_some((daemon, sub))
}

/// Parses argv; for a daemon, merges its config file in. A clap error
/// (bad flag, `--help`) is returned as is, for the caller to print and exit.
pub fn load(argv: Vec<OsString>) -> Result<Result<Loaded, ConfigError>, clap::Error> {
    let cmd = command();
    let first = cmd.clone().try_get_matches_from(&argv)?;
    let Some((daemon, sub)) = running(&first) else {
        return Ok(Ok(Loaded {
            cli: Cli::from_arg_matches(&first)?,
            effective: None,
        }));
    };
    let file = match sub.get_one::<PathBuf>("config") {
        Some(path) if !path.exists() => {
            return Ok(Err(ConfigError::Missing(path.clone())));
        }
        Some(path) => Some(path.clone()),
        None => Some(daemon.default_file()).filter(|p| p.exists()),
    };
    let file = match file {
        Some(path) => match ConfigFile::load(&path, daemon_command(&cmd, daemon)) {
            Ok(f) => Some(f),
            Err(e) => return Ok(Err(e.into())),
        },
        None => None,
    };
    let mut merged = argv.clone();
    let mut from_file = Vec::new();
    for setting in file.iter().flat_map(|f| &f.settings) {
        let explicit = matches!(
            sub.value_source(&setting.id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if !explicit {
            merged.extend(setting.args.iter().map(OsString::from));
            from_file.push((setting.id.clone(), setting.line));
        }
    }
    let matches = match cmd.clone().try_get_matches_from(&merged) {
        Ok(m) => m,
        Err(e) => {
            return Ok(Err(ConfigError::Combined(format!(
                "{}{}",
                file::clap_message(&e),
                file.as_ref()
                    .map(|f| format!(" (with {})", f.path.display()))
                    .unwrap_or_default()
            ))));
        }
    };
    let cli = Cli::from_arg_matches(&matches)?;
    let (_, sub) = running(&matches).expect("the same daemon as before");
    let sources = daemon_command(&cmd, daemon)
        .get_arguments()
        .filter(|a| !file::NOT_KEYS.contains(&a.get_id().as_str()))
        .map(|arg| {
            let id = arg.get_id().to_string();
            let source = match from_file.iter().find(|(f, _)| *f == id) {
                Some((_, line)) => Source::File(*line),
                None => match sub.value_source(&id) {
                    Some(ValueSource::CommandLine) => Source::Flag,
                    Some(ValueSource::EnvVariable) => Source::Env(
                        arg.get_env()
                            .map(|e| e.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    ),
                    Some(ValueSource::DefaultValue) => Source::Default,
                    _ => Source::Unset,
                },
            };
            (id, source)
        })
        .collect();
    Ok(Ok(Loaded {
        cli,
        effective: Some(Effective {
            daemon,
            file: file.map(|f| f.path),
            matches: sub.clone(),
            sources,
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several `--db` addresses: the flag repeated, or a file's array.
    #[test]
    fn db_takes_several_addresses_from_flags_and_file() {
        let hub_db = |argv: &[&str]| {
            let loaded = load(argv.iter().map(OsString::from).collect())
                .unwrap()
                .unwrap();
            match loaded.cli.command {
                crate::cli::Command::Hub(h) => h.run.db,
                _ => panic!("not the hub"),
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hub.toml");
        std::fs::write(
            &file,
            "db = [\"mysql://g1/banmesh\", \"mysql://g2/banmesh\"]\n",
        )
        .unwrap();
        let config = file.to_str().unwrap();
        assert_eq!(
            hub_db(&["banmesh", "hub", "--config", config]),
            ["mysql://g1/banmesh", "mysql://g2/banmesh"]
        );
        // Flags win over the file, repeated as often as needed.
        assert_eq!(
            hub_db(&[
                "banmesh",
                "hub",
                "--config",
                config,
                "--db",
                "mysql://g3/b",
                "--db",
                "mysql://g1/b",
            ]),
            ["mysql://g3/b", "mysql://g1/b"]
        );
    }
}
