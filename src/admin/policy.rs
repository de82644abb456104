//! `banmesh hub policy`: the fleet policy in force at the hub, so an
//! operator can see what bans an address without reading the hub's flags:
//! the signal thresholds (and whether they only log), the signal windows'
//! fill, and the escalation ladder when the hub has one.
use std::{fmt, time::Duration};

use super::{AdminError, client};
use crate::{proto, tls::TlsFiles};

/// Asks the hub for its policy (any fleet certificate may).
pub async fn policy(hub: &str, tls: &TlsFiles) -> Result<Policy, AdminError> {
    let r = client(hub, tls)
        .await?
        .policy(proto::PolicyRequest {})
        .await?
        .into_inner();
    Ok(Policy(r))
}

/// The policy, shown as `name: value` lines.
#[derive(Debug, Clone)]
pub struct Policy(pub proto::PolicyResponse);

fn secs(s: u64) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(s))
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.0;
        if p.fleet_maxretry == 0 {
            writeln!(f, "failures:  off")?;
        } else {
            writeln!(
                f,
                "failures:  {} within {}, seen by at least {} hosts -> jail banmesh-fleet",
                p.fleet_maxretry,
                secs(p.fleet_findtime_s),
                p.fleet_min_hosts
            )?;
        }
        if p.probe_ports == 0 {
            writeln!(f, "probes:    off")?;
        } else {
            writeln!(
                f,
                "probes:    {} distinct closed ports within {}, on any hosts -> jail banmesh-portscan",
                p.probe_ports,
                secs(p.probe_findtime_s)
            )?;
        }
        writeln!(
            f,
            "mode:      {}",
            if p.dry_run {
                "dry run (verdicts are logged, nothing is banned)"
            } else {
                "enforcing"
            }
        )?;
        writeln!(
            f,
            "windows:   {} of at most {} addresses; {} dropped (oldest first)",
            p.tracked_addresses, p.max_tracked_addresses, p.dropped_addresses
        )?;
        if !p.ladder_s.is_empty() {
            let rungs: Vec<String> = p.ladder_s.iter().map(|s| secs(*s).to_string()).collect();
            writeln!(
                f,
                "ladder:    {} (history kept {})",
                rungs.join(", "),
                secs(p.ladder_window_s)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_reads_as_sentences() {
        let p = Policy(proto::PolicyResponse {
            fleet_maxretry: 10,
            fleet_findtime_s: 600,
            fleet_min_hosts: 2,
            probe_ports: 0,
            probe_findtime_s: 60,
            dry_run: true,
            tracked_addresses: 3,
            max_tracked_addresses: 1_000_000,
            dropped_addresses: 0,
            ..Default::default()
        });
        let text = p.to_string();
        assert!(
            text.contains("failures:  10 within 10m, seen by at least 2 hosts"),
            "{text}"
        );
        assert!(text.contains("probes:    off"), "{text}");
        assert!(text.contains("dry run"), "{text}");
        assert!(text.contains("3 of at most 1000000 addresses"), "{text}");
        assert!(!text.contains("ladder"), "{text}");
    }
}
