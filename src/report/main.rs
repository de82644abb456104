//! `banmesh-report`: `banmesh report` as its own small binary, for
//! fail2ban's `actionban`, which waits for it on every ban (issue 19).
//!
//! Same flags, same answers and exit codes as `banmesh report` (0: the
//! node has the ban on disk, or it is spooled; 2: a bad argument; 1: the
//! node cannot take it). It shares the call's code ([`wire`]) with the
//! big binary, but links nothing else: no async runtime, TLS, database or
//! command tree to map and relocate at every start. The node checks the
//! ban's fields exactly as for any other client (`InvalidArgument`,
//! nothing stored) and answers only once the ban is in its outbox, fsynced.
//!
//! When no node answers, it hands over to `banmesh report` (the `banmesh`
//! binary beside it, else on `PATH`), which checks the ban and spools it:
//! that rare path keeps one implementation of the spool.
#[path = "hpack.rs"]
mod hpack;
#[path = "wire.rs"]
mod wire;

use std::{
    ffi::OsString,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::PathBuf,
    process::ExitCode,
};

/// The node's socket when `--socket` is not given (`node::DEFAULT_SOCKET`).
const DEFAULT_SOCKET: &str = "/run/banmesh/node.sock";

const USAGE: &str = "Usage: banmesh-report [report] -j JAIL -pr PROTOCOL -p PORT -i IP \
[--socket PATH] [--data-dir DIR]

Hand a ban to the local node (what fail2ban's actionban runs); when the node
is not running, `banmesh report` spools it in --data-dir.";

/// The flags `banmesh report` takes, as given.
#[derive(Default)]
struct Args {
    socket: Option<OsString>,
    jail: Option<String>,
    protocol: Option<String>,
    port: Option<String>,
    ip: Option<String>,
}

enum Parsed {
    Run(Args),
    Exit(ExitCode),
}

fn parse(argv: &[OsString]) -> Result<Parsed, String> {
    let mut args = Args::default();
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let text = arg.to_string_lossy();
        let (flag, inline) = match text.split_once('=') {
            Some((f, v)) if f.starts_with("--") || f == "-pr" => (f.to_string(), Some(v)),
            _ => (text.to_string(), None),
        };
        let mut value = |name: &str| -> Result<OsString, String> {
            match inline {
                Some(v) => Ok(v.into()),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value")),
            }
        };
        let string = |v: OsString| v.to_string_lossy().into_owned();
        match flag.as_str() {
            "--socket" => args.socket = Some(value("--socket")?),
            // The spool is `banmesh report`'s business (see the module doc).
            "--data-dir" => drop(value("--data-dir")?),
            "-j" | "--jail" => args.jail = Some(string(value("--jail")?)),
            "-pr" | "--pr" | "--protocol" => args.protocol = Some(string(value("--protocol")?)),
            "-p" | "--port" => args.port = Some(string(value("--port")?)),
            "-i" | "--ip" => args.ip = Some(string(value("--ip")?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(Parsed::Exit(ExitCode::SUCCESS));
            }
            "-V" | "--version" => {
                println!("banmesh-report {}", env!("CARGO_PKG_VERSION"));
                return Ok(Parsed::Exit(ExitCode::SUCCESS));
            }
            other => return Err(format!("unexpected argument '{other}'")),
        }
    }
    Ok(Parsed::Run(args))
}

fn main() -> ExitCode {
    let all: Vec<OsString> = std::env::args_os().skip(1).collect();
    let argv = match all.first() {
        Some(word) if word.as_bytes() == b"report" => &all[1..],
        _ => &all[..],
    };
    let args = match parse(argv) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Exit(code)) => return code,
        Err(e) => {
            eprintln!("banmesh report: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let (Some(jail), Some(protocol), Some(port), Some(ip)) =
        (&args.jail, &args.protocol, &args.port, &args.ip)
    else {
        eprintln!("banmesh report: -j, -pr, -p and -i are required\n\n{USAGE}");
        return ExitCode::from(2);
    };
    let socket = PathBuf::from(args.socket.unwrap_or_else(|| DEFAULT_SOCKET.into()));
    let ban = wire::BanFields {
        jail,
        protocol,
        port,
        ip,
    };
    match wire::report(&socket, ban) {
        Ok(_) => ExitCode::SUCCESS,
        Err(wire::WireError::Connect(_) | wire::WireError::NotTaken(_)) => spool(argv),
        Err(
            e @ (wire::WireError::TooLarge(_)
            | wire::WireError::Status {
                code: wire::INVALID_ARGUMENT,
                ..
            }),
        ) => {
            eprintln!("banmesh report: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("banmesh report: node refused the report: {e}");
            ExitCode::FAILURE
        }
    }
}

/// No node answers: `banmesh report` with the same flags spools the ban.
fn spool(argv: &[OsString]) -> ExitCode {
    let beside = std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("banmesh"))
        .filter(|p| p.is_file());
    let exe = beside.unwrap_or_else(|| "banmesh".into());
    let err = std::process::Command::new(&exe)
        .arg("report")
        .args(argv)
        .exec();
    eprintln!(
        "banmesh report: the node is not running and `{} report` could not be run to spool the ban: {err}",
        exe.display()
    );
    ExitCode::FAILURE
}
