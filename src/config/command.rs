//! `banmesh config check` and `banmesh config show`.
use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use super::{ConfigFile, Daemon, daemon_command};
use crate::cli::ConfigCommand;

/// Runs a `banmesh config` subcommand: exit 0 when every file checked is
/// good, 1 when one is refused (the reason on stderr), 2 for bad usage.
pub fn run(cmd: ConfigCommand) -> ExitCode {
    match cmd {
        ConfigCommand::Check { daemon, config } => check(daemon, config),
        ConfigCommand::Show { daemon, args } => show(daemon, args),
    }
}

fn check(daemon: Option<Daemon>, config: Option<PathBuf>) -> ExitCode {
    let files: Vec<(Daemon, PathBuf)> = match (daemon, config) {
        (Some(d), Some(path)) => vec![(d, path)],
        (None, Some(path)) => match Daemon::from_file_name(&path) {
            Some(d) => vec![(d, path)],
            None => {
                eprintln!(
                    "banmesh config check: cannot tell from its name whose file {} is: \
                     say `banmesh config check hub` or `node`",
                    path.display()
                );
                return ExitCode::from(2);
            }
        },
        (Some(d), None) => vec![(d, d.default_file())],
        (None, None) => Daemon::ALL
            .into_iter()
            .map(|d| (d, d.default_file()))
            .filter(|(_, p)| p.exists())
            .collect(),
    };
    if files.is_empty() {
        eprintln!(
            "banmesh config check: no config file: neither {} nor {} exists (pass --config PATH)",
            Daemon::Hub.default_file().display(),
            Daemon::Node.default_file().display()
        );
        return ExitCode::FAILURE;
    }
    let cmd = super::command();
    let mut ok = true;
    for (daemon, path) in files {
        match ConfigFile::load(&path, daemon_command(&cmd, daemon)) {
            Ok(file) => println!(
                "{}: ok ({} settings for banmesh {})",
                path.display(),
                file.settings.len(),
                daemon.name()
            ),
            Err(e) => {
                eprintln!("{e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn show(daemon: Daemon, args: Vec<OsString>) -> ExitCode {
    let mut argv: Vec<OsString> = vec!["banmesh".into(), daemon.name().into()];
    argv.extend(args);
    match super::load(argv) {
        Ok(Ok(super::Loaded {
            effective: Some(effective),
            ..
        })) => {
            print!("{}", super::show::render(&super::command(), &effective));
            ExitCode::SUCCESS
        }
        Ok(Ok(_)) => {
            eprintln!("banmesh config show: give the daemon's flags, not an action");
            ExitCode::from(2)
        }
        Ok(Err(e)) => {
            eprintln!("banmesh config show: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("banmesh config show: {}", super::file::clap_message(&e));
            ExitCode::from(2)
        }
    }
}
