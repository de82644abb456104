//! fail2ban's control socket, spoken natively (no `fail2ban-client`
//! process): a pickled list of strings ended by `<F2B_END_COMMAND>`; the
//! answer is a pickled `(code, result)` ended the same way. One connection
//! serves many requests; a broken one is reopened once per request. A
//! socket that cannot be connected to (no file, nobody listening) is tried
//! again only after [`RETRY_AFTER`]: requests before that fail at once with
//! the same reason, without a syscall.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use thiserror::Error;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};

use super::pickle::{self, Value};

const END: &[u8] = b"<F2B_END_COMMAND>";
const CLOSE: &[u8] = b"<F2B_CLOSE_COMMAND>";
/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/var/run/fail2ban/fail2ban.sock";
/// A request that takes longer than this is abandoned (and the connection
/// with it): a stuck fail2ban must not stall the node.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes accepted in one answer (a jail with 100,000 bans is ~6 MB).
const MAX_ANSWER: usize = 64 << 20;
/// How long after a failed connect (no socket file, nobody listening) the
/// socket is left untried: a node applying bans one at a time without
/// fail2ban paid three `socket`/`connect`/`close` rounds and an error
/// message per ban (~45 us of its ~300 us, measured:
/// docs/perf/apply-steady.txt). Short, so fail2ban coming back is seen
/// within a fraction of a second: a request in the window fails as if
/// fail2ban were still down, which every caller already handles (a ban
/// goes through the log alone, an unban is status 3 and its lift retried).
pub const RETRY_AFTER: Duration = Duration::from_millis(250);

/// Why a request to fail2ban's control socket failed.
#[derive(Debug, Error)]
pub enum Fail2banError {
    /// The socket could not be connected to, written or read (fail2ban
    /// not running, a wrong path, no permission, or no answer in time).
    #[error(
        "fail2ban is not reachable on {path}: {reason} (is fail2ban-server running with this socket?)"
    )]
    Unreachable {
        /// The control socket's path.
        path: PathBuf,
        /// The I/O error or timeout.
        reason: String,
    },
    /// fail2ban answered with an error (an unknown jail, an invalid
    /// address, a command its version does not know).
    #[error("fail2ban refused {command:?}: {reason}")]
    Refused {
        /// The command sent, as its words joined by spaces.
        command: String,
        /// fail2ban's exception, as it sent it.
        reason: String,
    },
    /// The answer could not be decoded, or did not have the shape the command returns.
    #[error("fail2ban sent an answer banmesh cannot read: {0}")]
    Protocol(String),
}

/// A ban fail2ban holds: when it ends and how long it was.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BanTime {
    /// Seconds; negative means permanent.
    pub bantime: i64,
    /// When the ban ends.
    pub end: SystemTime,
}

impl BanTime {
    /// Share of the ban's time still to run, 0.0..=1.0 (1.0 if permanent).
    pub fn fraction_left(&self, now: SystemTime) -> f64 {
        if self.bantime < 0 {
            return 1.0;
        }
        let left = self
            .end
            .duration_since(now)
            .unwrap_or_default()
            .as_secs_f64();
        (left / (self.bantime.max(1) as f64)).clamp(0.0, 1.0)
    }
}

/// Parses one line of `get JAIL banip --with-time`:
/// `IP \tYYYY-MM-DD HH:MM:SS + BANTIME = YYYY-MM-DD HH:MM:SS` (fail2ban's
/// local time).
pub fn parse_ban_line(line: &str) -> Option<(String, BanTime)> {
    let (ip, rest) = line.split_once(" \t")?;
    let (_start, rest) = rest.split_once(" + ")?;
    let (bantime, end) = rest.split_once(" = ")?;
    let bantime: i64 = bantime.trim().parse().ok()?;
    let end = chrono::NaiveDateTime::parse_from_str(end.trim(), "%Y-%m-%d %H:%M:%S").ok()?;
    let end = end.and_local_timezone(chrono::Local).earliest()?;
    Some((
        ip.trim().to_string(),
        BanTime {
            bantime,
            end: end.into(),
        },
    ))
}

/// A string in an answer: fail2ban 1.0.2 pickles its address objects
/// (`IPAddr`) as `builtins.str(TEXT)`, plain strings as themselves.
fn text(v: &Value) -> Option<&str> {
    match v {
        Value::Str(s) => Some(s),
        Value::Object(class, args) if class == "builtins.str" => match args.as_slice() {
            [Value::Str(s)] => Some(s),
            _ => None,
        },
        _ => None,
    }
}

/// The entries of a `get JAIL ignoreip` answer.
fn ignore_entries(v: &Value) -> Result<Vec<String>, Fail2banError> {
    let bad = || Fail2banError::Protocol(v.to_string());
    v.as_list()
        .ok_or_else(bad)?
        .iter()
        .map(|e| text(e).map(str::to_string).ok_or_else(bad))
        .collect()
}

/// A client of one fail2ban server.
pub struct Fail2ban {
    path: PathBuf,
    conn: Option<UnixStream>,
    /// Why the last connect failed, and until when it is not tried again.
    down: Option<(Instant, String)>,
    /// How long a failed connect is trusted ([`RETRY_AFTER`]; tests set it).
    retry_after: Duration,
}

impl Fail2ban {
    /// A client of the server on the socket at `path`; it connects on the first request.
    pub fn new(path: &Path) -> Self {
        Fail2ban {
            path: path.to_path_buf(),
            conn: None,
            down: None,
            retry_after: RETRY_AFTER,
        }
    }

    /// The control socket this client talks to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn unreachable(&self, reason: impl ToString) -> Fail2banError {
        Fail2banError::Unreachable {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    /// Sends one command and returns fail2ban's result (code 0), or why it
    /// refused (code 1).
    pub async fn request(&mut self, command: &[&str]) -> Result<Value, Fail2banError> {
        if let Some((until, reason)) = &self.down {
            if Instant::now() < *until {
                return Err(self.unreachable(reason));
            }
            self.down = None;
        }
        let _timer = crate::metrics::node::RoundTrip::start();
        let frame = [pickle::encode_str_list(command), END.to_vec()].concat();
        let mut answer = None;
        // A kept-alive connection may have died since the last request
        // (fail2ban restarted): try once more on a fresh one.
        for _ in 0..2 {
            match tokio::time::timeout(TIMEOUT, self.exchange(&frame)).await {
                Ok(Ok(bytes)) => {
                    answer = Some(bytes);
                    break;
                }
                Ok(Err(e)) => {
                    self.conn = None;
                    answer = None;
                    if e.kind() == std::io::ErrorKind::NotFound
                        || e.kind() == std::io::ErrorKind::ConnectionRefused
                    {
                        let reason = e.to_string();
                        self.down = Some((Instant::now() + self.retry_after, reason.clone()));
                        return Err(self.unreachable(reason));
                    }
                    tracing::debug!(error = %e, "fail2ban connection lost; reconnecting");
                }
                Err(_) => {
                    self.conn = None;
                    return Err(self.unreachable(format!("no answer within {TIMEOUT:?}")));
                }
            }
        }
        let bytes = answer.ok_or_else(|| self.unreachable("connection closed"))?;
        let value = pickle::decode(&bytes).map_err(|e| Fail2banError::Protocol(e.to_string()))?;
        match value.as_list() {
            Some([code, result]) if code.as_int() == Some(0) => Ok(result.clone()),
            Some([_, reason]) => Err(Fail2banError::Refused {
                command: command.join(" "),
                reason: reason.to_string(),
            }),
            // The server answers a request it cannot unpickle with a bare string.
            _ => Err(Fail2banError::Protocol(value.to_string())),
        }
    }

    async fn exchange(&mut self, frame: &[u8]) -> std::io::Result<Vec<u8>> {
        if self.conn.is_none() {
            self.conn = Some(UnixStream::connect(&self.path).await?);
        }
        let conn = self.conn.as_mut().expect("connected above");
        conn.write_all(frame).await?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::ConnectionReset.into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.ends_with(END) {
                buf.truncate(buf.len() - END.len());
                return Ok(buf);
            }
            if buf.len() > MAX_ANSWER {
                return Err(std::io::Error::other("answer too large"));
            }
        }
    }

    /// Closes the connection the way fail2ban-client does.
    pub async fn close(&mut self) {
        if let Some(mut c) = self.conn.take() {
            let _ = c.write_all(&[CLOSE, END].concat()).await;
        }
    }

    /// Checks that fail2ban answers at all (`ping`).
    pub async fn ping(&mut self) -> Result<(), Fail2banError> {
        self.request(&["ping"]).await.map(|_| ())
    }

    /// The jails that ban each IP (`banned IP...`), in order.
    pub async fn banned(&mut self, ips: &[&str]) -> Result<Vec<Vec<String>>, Fail2banError> {
        if ips.is_empty() {
            return Ok(vec![]);
        }
        let mut cmd = vec!["banned"];
        cmd.extend_from_slice(ips);
        let v = self.request(&cmd).await?;
        let lists = v
            .as_list()
            .ok_or_else(|| Fail2banError::Protocol(v.to_string()))?;
        if lists.len() != ips.len() {
            return Err(Fail2banError::Protocol(format!(
                "{} answers for {} IPs",
                lists.len(),
                ips.len()
            )));
        }
        Ok(lists
            .iter()
            .map(|jails| {
                jails
                    .as_list()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|j| j.as_str().map(str::to_string))
                    .collect()
            })
            .collect())
    }

    /// Every ban a jail holds, with its times.
    pub async fn jail_bans(
        &mut self,
        jail: &str,
    ) -> Result<HashMap<String, BanTime>, Fail2banError> {
        let v = self.request(&["get", jail, "banip", "--with-time"]).await?;
        let lines = v
            .as_list()
            .ok_or_else(|| Fail2banError::Protocol(v.to_string()))?;
        Ok(lines
            .iter()
            .filter_map(|l| l.as_str().and_then(parse_ban_line))
            .collect())
    }

    /// A jail's `bantime` in seconds.
    pub async fn bantime(&mut self, jail: &str) -> Result<i64, Fail2banError> {
        let v = self.request(&["get", jail, "bantime"]).await?;
        v.as_int()
            .ok_or_else(|| Fail2banError::Protocol(v.to_string()))
    }

    /// A jail's ignore list (`get JAIL ignoreip`), each entry as fail2ban
    /// prints it: an address (`203.0.113.9`, `2001:db8::7`), a network with
    /// its host bits cleared (`198.51.100.0/24`, a mask already turned into
    /// a prefix length), or a DNS name it resolves when it checks.
    pub async fn ignore_ip(&mut self, jail: &str) -> Result<Vec<String>, Fail2banError> {
        let v = self.request(&["get", jail, "ignoreip"]).await?;
        ignore_entries(&v)
    }

    /// Whether a jail ignores the host's own addresses (`get JAIL ignoreself`).
    pub async fn ignore_self(&mut self, jail: &str) -> Result<bool, Fail2banError> {
        let v = self.request(&["get", jail, "ignoreself"]).await?;
        match v {
            Value::Bool(b) => Ok(b),
            other => Err(Fail2banError::Protocol(other.to_string())),
        }
    }

    /// A jail's `ignorecommand`; empty when it has none.
    pub async fn ignore_command(&mut self, jail: &str) -> Result<String, Fail2banError> {
        let v = self.request(&["get", jail, "ignorecommand"]).await?;
        text(&v)
            .map(str::to_string)
            .ok_or_else(|| Fail2banError::Protocol(v.to_string()))
    }

    /// Where fail2ban writes its own log (`get logtarget`): a file path, or
    /// `SYSLOG`, `STDOUT`, `STDERR`, `SYSTEMD-JOURNAL`. The node follows
    /// that file for the failures fail2ban's filters find.
    pub async fn log_target(&mut self) -> Result<String, Fail2banError> {
        let v = self.request(&["get", "logtarget"]).await?;
        text(&v)
            .map(str::to_string)
            .ok_or_else(|| Fail2banError::Protocol(v.to_string()))
    }

    /// Bans IPs in a jail at once; returns how many were newly banned.
    pub async fn ban(&mut self, jail: &str, ips: &[&str]) -> Result<i64, Fail2banError> {
        let mut cmd = vec!["set", jail, "banip"];
        cmd.extend_from_slice(ips);
        let v = self.request(&cmd).await?;
        Ok(v.as_int().unwrap_or(0))
    }

    /// Lifts an IP in one jail only; returns how many bans were lifted (0
    /// for an address that jail does not ban: fail2ban 1.0.2 answers
    /// `(0, 0)`, measured).
    pub async fn unban_in(&mut self, jail: &str, ip: &str) -> Result<i64, Fail2banError> {
        let v = self.request(&["set", jail, "unbanip", ip]).await?;
        Ok(v.as_int().unwrap_or(0))
    }

    /// Lifts an IP in every jail; returns how many bans were lifted.
    pub async fn unban(&mut self, ip: &str) -> Result<i64, Fail2banError> {
        let v = self.request(&["unban", ip]).await?;
        Ok(v.as_int().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_connect_is_not_retried_before_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f2b.sock");
        let mut f2b = Fail2ban::new(&path);
        // No timing in the test: the window is an hour, then none.
        f2b.retry_after = Duration::from_secs(3600);
        let first = f2b.ping().await.unwrap_err();
        assert!(
            matches!(first, Fail2banError::Unreachable { .. }),
            "{first}"
        );
        // fail2ban comes up within the window: not tried (nothing connects).
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let again = f2b.ping().await.unwrap_err();
        assert_eq!(again.to_string(), first.to_string(), "the same reason");
        assert_eq!(
            listener.accept().unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "no connect inside the window"
        );
        // Past the window the socket is tried again.
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        f2b.down = f2b.down.map(|(_, why)| (Instant::now(), why));
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut c, _) = listener.accept().unwrap();
            tx.send(()).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.ends_with(END) {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "closed before a whole request");
                got.extend_from_slice(&buf[..n]);
            }
            // `(0, "pong")` pickled, then the end marker.
            let answer =
                b"\x80\x05\x95\x0c\x00\x00\x00\x00\x00\x00\x00K\x00\x8c\x04pong\x94\x86\x94.";
            c.write_all(&[answer.as_slice(), END].concat()).unwrap();
        });
        f2b.ping().await.unwrap();
        rx.recv().unwrap();
        server.join().unwrap();
        assert!(f2b.down.is_none(), "a success clears the failure");
    }

    #[test]
    fn parses_ban_times() {
        let (ip, t) =
            parse_ban_line("192.0.2.8 \t2026-11-25 12:35:28 + 3600 = 2026-11-25 13:35:28").unwrap();
        assert_eq!(ip, "192.0.2.8");
        assert_eq!(t.bantime, 3600);
        let half = t.end - Duration::from_secs(1800);
        assert!((t.fraction_left(half) - 0.5).abs() < 1e-9);
        assert_eq!(t.fraction_left(t.end + Duration::from_secs(5)), 0.0);
        assert!(parse_ban_line("garbage").is_none());
    }

    #[test]
    fn reads_ignore_lists_as_fail2ban_pickles_them() {
        // `get shared ignoreip` as fail2ban 1.0.2 answers it: each entry an
        // `IPAddr` reduced to `builtins.str(TEXT)`, the class memoized.
        let answer = b"\x80\x05\x95[\x00\x00\x00\x00\x00\x00\x00K\x00]\x94(\x8c\x08builtins\x94\x8c\x03str\x94\x93\x94\x8c\x0f198.51.100.0/24\x94\x85\x94R\x94h\x03\x8c\x0chost.example\x94\x85\x94R\x94h\x03\x8c\x0b2001:db8::7\x94\x85\x94R\x94e\x86\x94.";
        let v = pickle::decode(answer).unwrap();
        let [code, result] = v.as_list().unwrap() else {
            panic!("{v}")
        };
        assert_eq!(code.as_int(), Some(0));
        assert_eq!(
            ignore_entries(result).unwrap(),
            ["198.51.100.0/24", "host.example", "2001:db8::7"]
        );
        assert_eq!(
            ignore_entries(&Value::List(vec![])).unwrap(),
            Vec::<String>::new()
        );
        assert!(ignore_entries(&Value::List(vec![Value::Int(1)])).is_err());
        assert!(ignore_entries(&Value::Int(1)).is_err());
    }
}
