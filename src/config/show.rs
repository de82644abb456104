//! `banmesh config show`: a daemon's effective settings, one TOML line each
//! with where the value came from, secrets redacted. The output is itself
//! a valid config file.
use std::fmt::Write;

use clap::{ArgAction, Command};

use super::{Effective, Source, daemon_command, file::NOT_KEYS};

/// What a secret's value is shown as.
pub const REDACTED: &str = "<redacted>";

/// A secret as it may be shown: a URL keeps all but its password
/// (`mysql://user:<redacted>@db/banmesh`); anything else is hidden whole.
pub fn redact(value: &str) -> String {
    // Several `--db` addresses in one value (`BANMESH_DB=a,b`): each,
    // unless a piece is no URL (a bare comma in a password): then all.
    if value.contains(',') && value.contains("://") {
        let pieces: Vec<&str> = value.split(',').collect();
        if pieces.iter().all(|p| p.starts_with("mysql://")) {
            return pieces.into_iter().map(redact).collect::<Vec<_>>().join(",");
        }
        return REDACTED.to_string();
    }
    if value.starts_with("sqlite:") {
        return value.to_string();
    }
    if let Some((scheme, rest)) = value.split_once("://") {
        let (auth, host) = match rest.rsplit_once('@') {
            Some(parts) => parts,
            None => return value.to_string(),
        };
        let user = auth.split_once(':').map_or(auth, |(u, _)| u);
        if auth.contains(':') {
            return format!("{scheme}://{user}:{REDACTED}@{host}");
        }
        return value.to_string();
    }
    REDACTED.to_string()
}

fn quote(s: &str) -> String {
    toml_edit::Value::from(s).to_string().trim().to_string()
}

fn describe(source: &Source) -> String {
    match source {
        Source::Unset => "unset".into(),
        Source::Default => "default".into(),
        Source::File(line) => format!("file, line {line}"),
        Source::Env(var) => format!("env {var}"),
        Source::Flag => "flag".into(),
    }
}

/// The settings as TOML, each line commented with its source.
pub fn render(cmd: &Command, effective: &Effective) -> String {
    let daemon = daemon_command(cmd, effective.daemon);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# banmesh {}: effective settings (file: {})",
        effective.daemon.name(),
        effective
            .file
            .as_ref()
            .map_or("none".to_string(), |p| p.display().to_string())
    );
    for arg in daemon.get_arguments() {
        let id = arg.get_id().as_str();
        if NOT_KEYS.contains(&id) {
            continue;
        }
        let Some(key) = arg.get_long() else { continue };
        let source = effective
            .sources
            .iter()
            .find(|(i, _)| i == id)
            .map_or(Source::Unset, |(_, s)| s.clone());
        let values: Vec<String> = effective
            .matches
            .get_raw(id)
            .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let secret = arg.is_hide_env_values_set();
        let shown: Vec<String> = values
            .iter()
            .map(|v| if secret { redact(v) } else { v.clone() })
            .collect();
        let line = match (arg.get_action(), shown.as_slice()) {
            (_, []) => format!("# {key} ="),
            (ArgAction::SetTrue | ArgAction::SetFalse, [v]) => format!("{key} = {v}"),
            (ArgAction::Append, vs) => format!(
                "{key} = [{}]",
                vs.iter().map(|v| quote(v)).collect::<Vec<_>>().join(", ")
            ),
            (_, [v, ..]) if super::file::is_numeric(arg) => format!("{key} = {v}"),
            (_, [v, ..]) => format!("{key} = {}", quote(v)),
        };
        let _ = writeln!(out, "{line:<60} # {}", describe(&source));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(
            redact("mysql://banmesh:s3cret@db:3306/banmesh"),
            "mysql://banmesh:<redacted>@db:3306/banmesh"
        );
        assert_eq!(
            redact("mysql://u:s3cret@g1/banmesh,mysql://u:s3cret@g2/banmesh"),
            "mysql://u:<redacted>@g1/banmesh,mysql://u:<redacted>@g2/banmesh"
        );
        // A piece that is no URL (a password with a bare comma) is hidden whole.
        assert_eq!(redact("mysql://u:s3,cret@g1/banmesh"), REDACTED);
        assert_eq!(redact("mysql://db/banmesh"), "mysql://db/banmesh");
        assert_eq!(redact("abcdef-token"), REDACTED);
    }
}
