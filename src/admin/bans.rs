//! `banmesh unban` and `banmesh bans`: lifting a ban on every host, and
//! the bans with each host's status in the seed's `ip_table` shape.
use std::fmt;

use super::{AdminError, client, utc};
use crate::{proto, tls::TlsFiles};

/// `banmesh unban IP [--forget]`: the hub's answer.
///
/// The address goes in the fleet's spelling ([`crate::ban::parse_ip`]:
/// `::ffff:1.2.3.4` is `1.2.3.4`), so either spelling lifts the ban;
/// anything else goes as given, for the hub to refuse. With `forget`, the
/// address's ladder history is cleared too (its next ban starts on the
/// first rung), even when no ban of it is active.
pub async fn unban(
    hub: &str,
    tls: &TlsFiles,
    ip: &str,
    forget: bool,
) -> Result<Unbanned, AdminError> {
    let ip = crate::ban::parse_ip(ip).map_or_else(|| ip.to_string(), |a| a.to_string());
    let mut c = client(hub, tls).await?;
    let r = c
        .unban(proto::UnbanRequest {
            ip: ip.clone(),
            forget,
        })
        .await?
        .into_inner();
    Ok(Unbanned {
        ip,
        event_id: r.event_id,
        lifted: r.lifted,
        forgot: forget,
    })
}

/// An unban the hub committed.
#[derive(Debug, Clone)]
pub struct Unbanned {
    /// The address lifted.
    pub ip: String,
    /// The unban's event, as every node receives it.
    pub event_id: u64,
    /// Active bans of the address it lifted.
    pub lifted: u32,
    /// The address's ladder history was cleared (`--forget`).
    pub forgot: bool,
}

impl fmt::Display for Unbanned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.event_id > 0 {
            writeln!(
                f,
                "unbanned {} (event {}, {} ban(s) lifted)",
                self.ip, self.event_id, self.lifted
            )?;
        } else {
            writeln!(f, "{} had no active ban", self.ip)?;
        }
        if self.forgot {
            writeln!(
                f,
                "forgot the history of {}: its next ban starts on the ladder's first rung",
                self.ip
            )?;
        }
        Ok(())
    }
}

/// `banmesh hub policy`: the ladder (and signal thresholds) in force.
pub async fn policy(hub: &str, tls: &TlsFiles) -> Result<Policy, AdminError> {
    let mut c = client(hub, tls).await?;
    Ok(Policy(
        c.policy(proto::PolicyRequest {}).await?.into_inner(),
    ))
}

/// The hub's fleet policy, shown for people.
#[derive(Debug, Clone)]
pub struct Policy(pub proto::PolicyResponse);

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::hub::ladder::format_duration as d;
        let p = &self.0;
        let secs = |s: u64| d(std::time::Duration::from_secs(s));
        let rungs: Vec<String> = p.ladder_s.iter().map(|s| secs(*s)).collect();
        if rungs.is_empty() {
            writeln!(f, "ladder         off (no fleet terms, no coalescing)")?;
        } else {
            writeln!(f, "ladder         {}", rungs.join(", "))?;
            writeln!(f, "ladder window  {}", secs(p.ladder_window_s))?;
        }
        if p.fleet_maxretry > 0 {
            writeln!(
                f,
                "fleet ban      {} failures in {} on at least {} hosts",
                p.fleet_maxretry,
                secs(p.fleet_findtime_s),
                p.fleet_min_hosts
            )?;
        }
        if p.probe_ports > 0 {
            writeln!(
                f,
                "probe ban      {} closed ports in {}",
                p.probe_ports,
                secs(p.probe_findtime_s)
            )?;
        }
        if p.dry_run {
            writeln!(f, "dry run        thresholds are logged, not acted on")?;
        }
        if p.max_tracked_addresses > 0 {
            writeln!(
                f,
                "signal windows {} of at most {} addresses, {} dropped (oldest first)",
                p.tracked_addresses, p.max_tracked_addresses, p.dropped_addresses
            )?;
        }
        Ok(())
    }
}

/// `banmesh bans`: at most `limit` bans (0: the hub's default), of `ip`
/// only when given; none is an error (the command exits non-zero). The hub
/// answers a large fleet a few bans at a time; this follows its cursor
/// until `limit` bans are in.
pub async fn list(
    hub: &str,
    tls: &TlsFiles,
    ip: Option<String>,
    limit: u32,
) -> Result<Bans, AdminError> {
    let mut c = client(hub, tls).await?;
    let mut bans = Vec::new();
    let mut after = 0;
    loop {
        let r = c
            .list_bans(proto::ListBansRequest {
                ip: ip.clone().unwrap_or_default(),
                limit: limit.saturating_sub(bans.len() as u32),
                after_event_id: after,
                ..Default::default()
            })
            .await?
            .into_inner();
        bans.extend(r.bans);
        if r.next_after_event_id == 0 || limit == 0 || bans.len() >= limit as usize {
            break;
        }
        after = r.next_after_event_id;
    }
    if bans.is_empty() {
        return Err(AdminError::NoBans);
    }
    Ok(Bans(bans))
}

/// Bans, shown as the seed's table ([`seed_table`]).
#[derive(Debug, Clone)]
pub struct Bans(pub Vec<proto::BanRecord>);

impl fmt::Display for Bans {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&seed_table(&self.0))?;
        let omitted = self.0.iter().map(|b| b.statuses_omitted).max().unwrap_or(0);
        if omitted > 0 {
            writeln!(f, "(the statuses of {omitted} more hosts are not shown)")?;
        }
        Ok(())
    }
}

/// A ban's fleet state: `active`, `ended` (its fleet end passed),
/// `lifted` (an unban), with `,forgotten` after an `unban --forget`.
fn state(b: &proto::BanRecord, e: &proto::Event, now_ms: i64) -> String {
    let s = if b.lifted {
        "lifted"
    } else if e.ends_ms > 0 && e.ends_ms <= now_ms {
        "ended"
    } else {
        "active"
    };
    if b.forgotten {
        format!("{s},forgotten")
    } else {
        s.to_string()
    }
}

/// Who reported a ban, one word: `web-1,web-2*3` (3 reports from web-2).
fn reporters(b: &proto::BanRecord) -> String {
    if b.reporters.is_empty() {
        return "-".into();
    }
    b.reporters
        .iter()
        .map(|r| match r.count {
            0 | 1 => r.host.clone(),
            n => format!("{}*{n}", r.host),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A time as one word, `2026-11-26T10:15Z`, so every cell of a row stays
/// one word apart from `created`.
fn utc_word(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    format!("{}Z", utc(ms, false).replace(' ', "T"))
}

/// Renders bans as the seed's table (its columns first), then each ban's
/// ladder term (`rung`, fleet `ends`, `state`, `reporters`), then one
/// status column per host.
pub fn seed_table(bans: &[proto::BanRecord]) -> String {
    let now = crate::clock::now_ms();
    let hosts: Vec<String> = bans
        .first()
        .map(|b| b.statuses.iter().map(|s| s.host.clone()).collect())
        .unwrap_or_default();
    let mut rows = vec![{
        let mut h: Vec<String> = [
            "id",
            "added_by",
            "created",
            "jailname",
            "protocol",
            "port",
            "ip",
            "rung",
            "ends",
            "state",
            "reporters",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        h.extend(hosts.iter().map(|n| crate::ban::seed_column(n)));
        h
    }];
    for b in bans {
        let e = b.event.clone().unwrap_or_default();
        let ban = e.ban.clone().unwrap_or_default();
        let created = utc(e.created_ms, true);
        let rung = match (e.rung, e.extends_event_id) {
            (0, _) => "-".to_string(),
            (r, 0) => r.to_string(),
            (r, x) => format!("{r}(extends:{x})"),
        };
        let mut r = vec![
            e.id.to_string(),
            e.added_by.clone(),
            created,
            ban.jail,
            ban.protocol,
            ban.port,
            ban.ip,
            rung,
            utc_word(e.ends_ms),
            state(b, &e, now),
            reporters(b),
        ];
        r.extend(b.statuses.iter().map(|s| s.status.to_string()));
        rows.push(r);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
