//! Who is in the fleet: `banmesh hub token create` (a one-time enrolment
//! token), `banmesh hub revoke` and `banmesh hub hosts`.
use std::{fmt, time::Duration};

use super::{AdminError, client, utc};
use crate::{proto, tls::TlsFiles};

/// A time as the tables print it: minutes, UTC.
fn when(ms: i64) -> String {
    utc(ms, false)
}

/// Asks the hub for a token that enrols one server within `ttl` (only as
/// `name`; `None` lets its holder pick any free name, which the CLI asks
/// for explicitly with `--any-name`) for a certificate valid `cert_ttl`.
pub async fn create_token(
    hub: &str,
    tls: &TlsFiles,
    ttl: Duration,
    name: Option<String>,
    cert_ttl: Duration,
) -> Result<Token, AdminError> {
    let r = client(hub, tls)
        .await?
        .create_token(proto::CreateTokenRequest {
            ttl_s: ttl.as_secs(),
            any_name: name.is_none(),
            name: name.unwrap_or_default(),
            cert_ttl_s: cert_ttl.as_secs(),
        })
        .await?
        .into_inner();
    Ok(Token {
        hub: hub.trim_start_matches("https://").to_string(),
        token: r.token,
        ca_sha256: r.ca_sha256,
        expires_ms: r.expires_ms,
    })
}

/// A new token, shown with the `banmesh enroll` line to run on the server.
#[derive(Debug, Clone)]
pub struct Token {
    /// The hub, HOST:PORT, as `banmesh enroll --hub` takes it.
    pub hub: String,
    /// The one-time token, for `banmesh enroll --token`.
    pub token: String,
    /// The CA's SHA-256, which `enroll` pins before sending the token.
    pub ca_sha256: String,
    /// When the token stops being accepted, Unix ms.
    pub expires_ms: i64,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "token:      {}", self.token)?;
        writeln!(f, "ca-sha256:  {}", self.ca_sha256)?;
        writeln!(f, "expires:    {} UTC", when(self.expires_ms))?;
        writeln!(
            f,
            "\nOn the new server:\n  banmesh enroll --hub {} --token {} --ca-sha256 {}",
            self.hub, self.token, self.ca_sha256
        )
    }
}

/// Refuses the certificates of `name` (a host's or an admin's, in any
/// letter case, connected yet or not) from now on; the hub ends its open
/// streams.
pub async fn revoke(hub: &str, tls: &TlsFiles, name: &str) -> Result<Revoked, AdminError> {
    let r = client(hub, tls)
        .await?
        .revoke(proto::RevokeRequest {
            name: name.to_string(),
        })
        .await?
        .into_inner();
    Ok(Revoked {
        name: name.to_string(),
        streams_closed: r.streams_closed,
        unknown_name: r.unknown_name,
        admin: r.admin,
    })
}

/// A revoked name.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// The name as given.
    pub name: String,
    /// Its Subscribe streams the hub ended.
    pub streams_closed: u32,
    /// Nothing had connected under the name yet.
    pub unknown_name: bool,
    /// An admin certificate had called under the name.
    pub admin: bool,
}

impl fmt::Display for Revoked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unknown_name {
            return writeln!(
                f,
                "revoked {}: no host had connected under that name; its certificates are refused from now on",
                self.name
            );
        }
        let what = if self.admin { "admin " } else { "" };
        writeln!(
            f,
            "revoked {what}{}: the hub refuses it from now on",
            self.name
        )
    }
}

/// Every host the hub knows, with its enrolment, last contact, certificate
/// expiry, subscription lag, and whether its report rate limit holds it
/// back (with its backlog).
pub async fn hosts(hub: &str, tls: &TlsFiles) -> Result<Hosts, AdminError> {
    let r = client(hub, tls)
        .await?
        .hosts(proto::HostsRequest {})
        .await?
        .into_inner();
    Ok(Hosts(r.hosts))
}

/// The hosts list, shown as a table with one line per host.
///
/// `HUB` is the hub each host is subscribed through, whichever hub
/// answered: hubs sharing a database record it when a host's stream opens
/// and clear it when the stream ends. The state says since when, and how
/// long ago. A hub killed with -9 cannot clear its claims; they read
/// `offline (stale ...)`: the answering hub's own claims when it holds no
/// stream of the host, another hub's once that hub has been silent for
/// `hub::presence::SILENT` (it records that it is alive every few seconds).
#[derive(Debug, Clone)]
pub struct Hosts(pub Vec<proto::HostInfo>);

/// Whether a hub last heard from at `seen_ms` (0: never) has fallen
/// silent at `now_ms` (see `hub::presence`).
fn silent(seen_ms: i64, now_ms: i64) -> bool {
    crate::hub::presence::silent((seen_ms > 0).then_some(seen_ms), now_ms)
}

/// How long ago `ms` was, to the second (`3m 4s`).
fn ago(ms: i64, now_ms: i64) -> String {
    let secs = (now_ms - ms).max(0) / 1000;
    humantime::format_duration(Duration::from_secs(secs as u64)).to_string()
}

impl Hosts {
    /// The table as of `now_ms` (ages are counted from it).
    pub fn render(&self, now_ms: i64) -> String {
        let mut out = format!(
            "{:<24} {:<17} {:<17} {:<17} {:>10}  {:<16} STATE\n",
            "HOST", "ENROLLED", "LAST SEEN", "CERT EXPIRES", "LAG", "HUB"
        );
        for h in &self.0 {
            let since = if h.hub_since_ms > 0 {
                format!(
                    " since {} ({} ago)",
                    utc(h.hub_since_ms, true),
                    ago(h.hub_since_ms, now_ms)
                )
            } else {
                String::new()
            };
            let mut state = match (h.revoked, h.subscribed, h.hub.is_empty(), h.stale_hub) {
                (true, ..) => "revoked".to_string(),
                (false, true, ..) => format!("subscribed{since}"),
                (false, false, false, false) => format!("subscribed to another hub{since}"),
                (false, false, false, true) if silent(h.hub_seen_ms, now_ms) => format!(
                    "offline (stale: claimed{since}; {} silent {})",
                    h.hub,
                    match h.hub_seen_ms {
                        0 => "ever since".to_string(),
                        seen => format!("for {}", ago(seen, now_ms)),
                    }
                ),
                (false, false, false, true) => {
                    format!("offline (stale: claimed{since} by an earlier run of this hub)")
                }
                (false, false, true, _) => "offline".to_string(),
            };
            if h.throttled {
                // Past --report-rate: its reports wait in its outbox.
                state += &format!(
                    ", throttled since {} (backlog {})",
                    utc(h.throttled_since_ms, true),
                    h.backlog
                );
            }
            out += &format!(
                "{:<24} {:<17} {:<17} {:<17} {:>10}  {:<16} {state}\n",
                h.name,
                when(h.enrolled_ms),
                when(h.last_seen_ms),
                when(h.cert_expires_ms),
                // Known for this hub's own streams only.
                if h.subscribed {
                    h.lag_events.to_string()
                } else {
                    "-".into()
                },
                if h.hub.is_empty() { "-" } else { &h.hub },
            );
        }
        out
    }
}

impl fmt::Display for Hosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(crate::clock::now_ms()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, hub: &str, since: i64) -> proto::HostInfo {
        proto::HostInfo {
            name: name.into(),
            hub: hub.into(),
            hub_since_ms: since,
            ..Default::default()
        }
    }

    /// Each host's hub and since when, whichever hub answered; a stale
    /// claim of the answering hub says so.
    #[test]
    fn the_table_names_each_hosts_hub() {
        let t0 = 1_764_158_467_000; // 2025-11-26 12:01:07 UTC
        let here = proto::HostInfo {
            subscribed: true,
            ..host("web-1", "hub1", t0)
        };
        let stale = proto::HostInfo {
            stale_hub: true,
            ..host("web-3", "hub1", t0)
        };
        let alive = proto::HostInfo {
            hub_seen_ms: t0 + 183_000,
            ..host("web-2", "hub2", t0)
        };
        let dead = proto::HostInfo {
            stale_hub: true,
            hub_seen_ms: t0 + 64_000,
            ..host("web-5", "hub3", t0)
        };
        let text = Hosts(vec![here, alive, stale, host("web-4", "", 0), dead]).render(t0 + 184_000);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with("HUB              STATE"), "{text}");
        assert!(
            lines[1]
                .ends_with(" hub1             subscribed since 2025-11-26 12:01:07 (3m 4s ago)"),
            "{text}"
        );
        assert!(
            lines[2].ends_with(
                " hub2             subscribed to another hub since 2025-11-26 12:01:07 (3m 4s ago)"
            ),
            "{text}"
        );
        assert!(
            lines[3].contains(" hub1             offline (stale: claimed since"),
            "{text}"
        );
        assert!(lines[4].ends_with(" -                offline"), "{text}");
        assert!(
            lines[5].ends_with(" hub3             offline (stale: claimed since 2025-11-26 12:01:07 (3m 4s ago); hub3 silent for 2m)"),
            "{text}"
        );
    }
}
