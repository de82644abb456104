//! Operator commands against the hub over mTLS: unban, list bans, hosts.
use tonic::transport::Channel;

use crate::{
    node::link,
    proto::{self, hub_client::HubClient},
    tls::TlsFiles,
};

/// A client for the hub's read and admin RPCs.
pub async fn client(hub: &str, tls: &TlsFiles) -> anyhow::Result<HubClient<Channel>> {
    let channel = link::channel(&[hub.to_string()], tls)?;
    Ok(HubClient::new(channel))
}

/// `banmesh unban IP`. The address goes in the fleet's spelling
/// ([`crate::ban::parse_ip`]: `::ffff:1.2.3.4` is `1.2.3.4`), so either
/// spelling lifts the ban; anything else goes as given, for the hub to refuse.
pub async fn unban(hub: &str, tls: &TlsFiles, ip: &str) -> anyhow::Result<proto::UnbanResponse> {
    let mut c = client(hub, tls).await?;
    let ip = crate::ban::parse_ip(ip).map_or_else(|| ip.to_string(), |a| a.to_string());
    Ok(c.unban(proto::UnbanRequest { ip })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner())
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

/// A unix-millisecond time as `YYYY-MM-DD HH:MM[:SS]` UTC ("-" for none).
pub fn utc(ms: i64, seconds: bool) -> String {
    if ms <= 0 {
        return "-".into();
    }
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .map(|t| {
            let minutes = format!(
                "{:04}-{:02}-{:02} {:02}:{:02}",
                t.year(),
                t.month() as u8,
                t.day(),
                t.hour(),
                t.minute()
            );
            if seconds {
                format!("{minutes}:{:02}", t.second())
            } else {
                minutes
            }
        })
        .unwrap_or_default()
}
