//! `banmesh unban` and `banmesh bans`: lifting a ban on every host, and
//! the bans with each host's status in the seed's `ip_table` shape.
use std::fmt;

use super::{AdminError, client, utc};
use crate::{proto, tls::TlsFiles};

/// `banmesh unban IP`: the hub's answer.
///
/// The address goes in the fleet's spelling ([`crate::ban::parse_ip`]:
/// `::ffff:1.2.3.4` is `1.2.3.4`), so either spelling lifts the ban;
/// anything else goes as given, for the hub to refuse.
pub async fn unban(hub: &str, tls: &TlsFiles, ip: &str) -> Result<Unbanned, AdminError> {
    let ip = crate::ban::parse_ip(ip).map_or_else(|| ip.to_string(), |a| a.to_string());
    let mut c = client(hub, tls).await?;
    let r = c
        .unban(proto::UnbanRequest {
            ip: ip.clone(),
            forget: false,
        })
        .await?
        .into_inner();
    Ok(Unbanned {
        ip,
        event_id: r.event_id,
        lifted: r.lifted,
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
}

impl fmt::Display for Unbanned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "unbanned {} (event {}, {} ban(s) lifted)",
            self.ip, self.event_id, self.lifted
        )
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

/// Renders bans as the seed's table: one status column per host.
pub fn seed_table(bans: &[proto::BanRecord]) -> String {
    let hosts: Vec<String> = bans
        .first()
        .map(|b| b.statuses.iter().map(|s| s.host.clone()).collect())
        .unwrap_or_default();
    let mut rows = vec![{
        let mut h: Vec<String> = [
            "id", "added_by", "created", "jailname", "protocol", "port", "ip",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        h.extend(hosts.iter().map(|n| crate::ban::seed_column(n)));
        h
    }];
    for b in bans {
        let e = b.event.clone().unwrap_or_default();
        let ban = e.ban.unwrap_or_default();
        let created = utc(e.created_ms, true);
        let mut r = vec![
            e.id.to_string(),
            e.added_by,
            created,
            ban.jail,
            ban.protocol,
            ban.port,
            ban.ip,
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
