//! `banmesh allow add|list|remove` and `banmesh bans --refused`: the fleet
//! allow-list, and the reports the hub refused because of it.
//!
//! The network is checked here first ([`crate::allow::Network`]: a /0,
//! host bits set, or a non-network is refused with the reason before the
//! hub is called), and again by the hub, which is the authority.
use std::fmt;

use super::{AdminError, client, utc};
use crate::{allow::Network, proto, tls::TlsFiles};

fn network(given: &str) -> Result<Network, AdminError> {
    given
        .parse()
        .map_err(|e: crate::allow::InvalidNetwork| AdminError::Hub {
            code: tonic::Code::InvalidArgument,
            message: e.to_string(),
        })
}

/// `banmesh allow add CIDR [--note TEXT]`.
pub async fn add(hub: &str, tls: &TlsFiles, net: &str, note: &str) -> Result<Added, AdminError> {
    let net = network(net)?;
    let r = client(hub, tls)
        .await?
        .allow_add(proto::AllowAddRequest {
            network: net.to_string(),
            note: note.to_string(),
        })
        .await?
        .into_inner();
    Ok(Added {
        network: net,
        event_id: r.event_id,
        lifted: r.lifted,
    })
}

/// An entry the hub added.
#[derive(Debug, Clone)]
pub struct Added {
    /// The network, canonical.
    pub network: Network,
    /// The allow-add event.
    pub event_id: u64,
    /// Active bans inside it that were lifted on every host.
    pub lifted: u32,
}

impl fmt::Display for Added {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "allowed {} (event {}); {} active ban(s) inside it lifted on every host",
            self.network, self.event_id, self.lifted
        )
    }
}

/// `banmesh allow remove CIDR`.
pub async fn remove(hub: &str, tls: &TlsFiles, net: &str) -> Result<Removed, AdminError> {
    let net = network(net)?;
    let r = client(hub, tls)
        .await?
        .allow_remove(proto::AllowRemoveRequest {
            network: net.to_string(),
        })
        .await?
        .into_inner();
    Ok(Removed {
        network: net,
        event_id: r.event_id,
    })
}

/// An entry the hub removed.
#[derive(Debug, Clone)]
pub struct Removed {
    /// The network.
    pub network: Network,
    /// The allow-remove event.
    pub event_id: u64,
}

impl fmt::Display for Removed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "removed {} from the allow-list (event {}); bans of it are shared again from now on",
            self.network, self.event_id
        )
    }
}

/// `banmesh allow list`: the hub's answer.
pub async fn list(hub: &str, tls: &TlsFiles) -> Result<Listed, AdminError> {
    Ok(Listed(
        client(hub, tls)
            .await?
            .allow_list(proto::AllowListRequest {})
            .await?
            .into_inner(),
    ))
}

/// The allow-list, printed as a table: entries, then the built-ins and the
/// fleet's addresses.
#[derive(Debug, Clone)]
pub struct Listed(pub proto::AllowListResponse);

impl fmt::Display for Listed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<43} {:<16} {:<20} note",
            "network", "added by", "added (UTC)"
        )?;
        let rows = [
            ("", &self.0.entries),
            ("built-in", &self.0.builtin),
            ("fleet", &self.0.fleet),
        ];
        for (_, entries) in rows {
            for e in entries {
                writeln!(
                    f,
                    "{:<43} {:<16} {:<20} {}",
                    e.network,
                    e.added_by,
                    utc(e.added_ms, false),
                    e.note
                )?;
            }
        }
        Ok(())
    }
}

/// `banmesh bans --refused`: reports refused by the allow-list.
pub async fn refused(hub: &str, tls: &TlsFiles, limit: u32) -> Result<Refused, AdminError> {
    let r = client(hub, tls)
        .await?
        .list_refused(proto::ListRefusedRequest { after_id: 0, limit })
        .await?
        .into_inner();
    Ok(Refused(r.refused))
}

/// Refused reports, one line each.
#[derive(Debug, Clone)]
pub struct Refused(pub Vec<proto::RefusedReport>);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<39} {:<20} {:<20} {:<12} allowed by",
            "ip", "reported by", "refused (UTC)", "jail"
        )?;
        for r in &self.0 {
            let ban = r.ban.clone().unwrap_or_default();
            writeln!(
                f,
                "{:<39} {:<20} {:<20} {:<12} {}",
                ban.ip,
                r.host,
                utc(r.created_ms, true),
                ban.jail,
                r.allowed_by
            )?;
        }
        Ok(())
    }
}
