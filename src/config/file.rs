//! A daemon's TOML file, read against its `clap` definition: every key is
//! the long name of one of the daemon's flags, so a flag added to the CLI
//! has a file key without a line here. Each value is checked by the flag's
//! own value parser, and any refusal names the file, the line and the key.
use std::path::{Path, PathBuf};

use clap::{ArgAction, Command};
use thiserror::Error;

/// Flags that are not settings: they choose the file, or print and exit.
pub const NOT_KEYS: &[&str] = &["config", "help", "version"];

/// Why a config file was refused; nothing starts with a file like it.
#[derive(Debug, Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path}:{line}: not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// What the TOML parser said.
        message: String,
    },
    /// A key, its type or its value is wrong.
    #[error("{path}:{line}: key `{key}`: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// 1-based line of the key.
        line: usize,
        /// The key.
        key: String,
        /// What is wrong and what would be right.
        message: String,
    },
    /// Keys that are each fine but cannot go together (e.g. `db` and `db-file`).
    #[error("{path}: {message}")]
    Together {
        /// The file.
        path: PathBuf,
        /// What clap said of the combination.
        message: String,
    },
}

/// One key of a config file, as the flag arguments it stands for.
#[derive(Debug, Clone)]
pub struct FileSetting {
    /// The flag's id in the `clap` definition (what `ArgMatches` knows it by).
    pub id: String,
    /// The key, which is the flag's long name.
    pub key: String,
    /// 1-based line of the key.
    pub line: usize,
    /// `--key=value` arguments (one per value; `--key` alone for a flag set to true).
    pub args: Vec<String>,
}

/// A config file checked against a daemon's command: its settings in file order.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its keys.
    pub settings: Vec<FileSetting>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// The first line of clap's message, without its `error: ` prefix.
pub fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or("").trim();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// Whether the flag's value parser makes a number (so the file may give
/// it as a TOML number; any flag takes a string).
pub fn is_numeric(arg: &clap::Arg) -> bool {
    use std::any::TypeId;
    let t = arg.get_value_parser().type_id();
    [
        TypeId::of::<u8>(),
        TypeId::of::<u16>(),
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
        TypeId::of::<usize>(),
        TypeId::of::<i32>(),
        TypeId::of::<i64>(),
        TypeId::of::<f64>(),
    ]
    .into_iter()
    .any(|id| t == id)
}

/// A value as the flag's argument text: a string, or a number for a numeric flag.
fn scalar(value: &toml_edit::Value, numeric: bool) -> Option<String> {
    match value {
        toml_edit::Value::String(s) => Some(s.value().clone()),
        toml_edit::Value::Integer(i) if numeric => Some(i.value().to_string()),
        toml_edit::Value::Float(f) if numeric => Some(f.value().to_string()),
        _ => None,
    }
}

fn type_name(item: &toml_edit::Item) -> &'static str {
    match item {
        toml_edit::Item::Value(toml_edit::Value::Boolean(_)) => "a boolean",
        toml_edit::Item::Value(toml_edit::Value::Array(_)) => "an array",
        toml_edit::Item::Value(toml_edit::Value::Datetime(_)) => "a date",
        toml_edit::Item::Value(toml_edit::Value::InlineTable(_)) | toml_edit::Item::Table(_) => {
            "a table"
        }
        toml_edit::Item::ArrayOfTables(_) => "an array of tables",
        toml_edit::Item::Value(toml_edit::Value::String(_)) => "a string",
        toml_edit::Item::Value(_) => "a number",
        toml_edit::Item::None => "nothing",
    }
}

impl ConfigFile {
    /// Reads `path` and checks it against `daemon`, the daemon's subcommand
    /// (`banmesh hub` or `banmesh node`) from the built `Cli` command.
    pub fn load(path: &Path, daemon: &Command) -> Result<ConfigFile, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text, daemon)
    }

    /// Checks `text` (the content of `path`) against `daemon`.
    pub fn parse(path: &Path, text: &str, daemon: &Command) -> Result<ConfigFile, FileError> {
        let doc = toml_edit::Document::parse(text).map_err(|e| FileError::Syntax {
            path: path.to_path_buf(),
            line: e.span().map_or(1, |s| line_of(text, s.start)),
            message: e.message().trim().to_string(),
        })?;
        let table = doc.as_table();
        let mut settings = Vec::new();
        for (key, item) in table.iter() {
            let line = table
                .key(key)
                .and_then(|k| k.span())
                .map_or(1, |s| line_of(text, s.start));
            let refuse = |message: String| FileError::Key {
                path: path.to_path_buf(),
                line,
                key: key.to_string(),
                message,
            };
            let arg = daemon
                .get_arguments()
                .filter(|a| !NOT_KEYS.contains(&a.get_id().as_str()))
                .find(|a| a.get_long() == Some(key))
                .ok_or_else(|| {
                    refuse(format!(
                        "unknown key: `banmesh {}` has no flag --{key} (see `banmesh {} --help`; \
                         a key is a flag's long name, at the top level of the file)",
                        daemon.get_name(),
                        daemon.get_name()
                    ))
                })?;
            let numeric = is_numeric(arg);
            let wanted = if numeric { "a number" } else { "a string" };
            let args = match (arg.get_action(), item) {
                (ArgAction::SetTrue | ArgAction::SetFalse, toml_edit::Item::Value(v)) => {
                    match v.as_bool() {
                        Some(true) => vec![format!("--{key}")],
                        Some(false) => Vec::new(),
                        None => {
                            return Err(refuse(format!(
                                "expects true or false, not {}",
                                type_name(item)
                            )));
                        }
                    }
                }
                (ArgAction::Append, toml_edit::Item::Value(toml_edit::Value::Array(values))) => {
                    let mut args = Vec::new();
                    for v in values.iter() {
                        let Some(s) = scalar(v, numeric) else {
                            return Err(refuse(format!("expects an array, each {wanted}")));
                        };
                        args.push(format!("--{key}={s}"));
                    }
                    args
                }
                (_, toml_edit::Item::Value(v)) if scalar(v, numeric).is_some() => {
                    vec![format!(
                        "--{key}={}",
                        scalar(v, numeric).unwrap_or_default()
                    )]
                }
                (ArgAction::Append, _) => {
                    return Err(refuse(format!(
                        "expects {wanted} or an array of them, not {}",
                        type_name(item)
                    )));
                }
                _ => {
                    return Err(refuse(format!("expects {wanted}, not {}", type_name(item))));
                }
            };
            // The flag's own value parser judges the value, alone.
            let mut alone = vec![daemon.get_name().to_string()];
            alone.extend(args.iter().cloned());
            if let Err(e) = daemon.clone().try_get_matches_from(&alone) {
                return Err(refuse(clap_message(&e)));
            }
            settings.push(FileSetting {
                id: arg.get_id().to_string(),
                key: key.to_string(),
                line,
                args,
            });
        }
        let file = ConfigFile {
            path: path.to_path_buf(),
            settings,
        };
        // Keys fine alone may still exclude each other.
        let mut all = vec![daemon.get_name().to_string()];
        all.extend(file.args());
        if let Err(e) = daemon.clone().try_get_matches_from(&all) {
            return Err(FileError::Together {
                path: path.to_path_buf(),
                message: clap_message(&e),
            });
        }
        Ok(file)
    }

    /// Every key's flag arguments, in file order.
    pub fn args(&self) -> Vec<String> {
        self.settings
            .iter()
            .flat_map(|s| s.args.iter().cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn daemon() -> Command {
        Command::new("hub")
            .arg(Arg::new("listen").long("listen").default_value("0.0.0.0:1"))
            .arg(
                Arg::new("port")
                    .long("port")
                    .value_parser(clap::value_parser!(u16)),
            )
            .arg(Arg::new("quiet").long("quiet").action(ArgAction::SetTrue))
            .arg(Arg::new("hubs").long("hub").action(ArgAction::Append))
    }

    fn parse(text: &str) -> Result<ConfigFile, FileError> {
        ConfigFile::parse(Path::new("/x/hub.toml"), text, &daemon())
    }

    #[test]
    fn keys_become_flag_arguments() {
        let f = parse("listen = \"1.2.3.4:5\"\nport = 7\nquiet = true\nhub = [\"a\", \"b\"]\n")
            .unwrap();
        assert_eq!(
            f.args(),
            [
                "--listen=1.2.3.4:5",
                "--port=7",
                "--quiet",
                "--hub=a",
                "--hub=b"
            ]
        );
        assert_eq!(f.settings[2].line, 3);
    }

    #[test]
    fn refusals_name_file_line_and_key() {
        let e = parse("# c\nlisten = \"x\"\nlisten2 = 1\n").unwrap_err();
        assert_eq!(
            e.to_string().split(": unknown").next(),
            Some("/x/hub.toml:3: key `listen2`")
        );
        let e = parse("\n\nport = 70000\n").unwrap_err().to_string();
        assert!(
            e.starts_with("/x/hub.toml:3: key `port`: invalid value '70000'"),
            "{e}"
        );
        let e = parse("quiet = \"yes\"\n").unwrap_err().to_string();
        assert!(e.contains(":1: key `quiet`: expects true or false"), "{e}");
        let e = parse("port = [1]\n").unwrap_err().to_string();
        assert!(e.contains("expects a number, not an array"), "{e}");
        let e = parse("listen = 7\n").unwrap_err().to_string();
        assert!(
            e.contains("key `listen`: expects a string, not a number"),
            "{e}"
        );
        let e = parse("a = \n").unwrap_err().to_string();
        assert!(e.starts_with("/x/hub.toml:1: not valid TOML"), "{e}");
    }
}
