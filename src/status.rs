//! `banmesh status`: the local node's health for a person, and an exit
//! code for a monitoring check (0 fine, 1 something is wrong, 2 the node
//! does not answer).
use std::{fmt::Write, time::Duration};

use crate::proto::NodeStatusResponse;

/// What the check calls wrong, and what to look at.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// Events received but not applied beyond this are a problem.
    pub max_lag: u64,
    /// A certificate closer than this to expiry is a problem (renewal
    /// should have replaced it long before).
    pub cert_warn: Duration,
}

/// The report: lines for a person, and the problems found (empty: fine).
pub fn assess(s: &NodeStatusResponse, now_ms: i64, t: Thresholds) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut problems = Vec::new();
    let lag = s.received_event_id.saturating_sub(s.last_applied_event_id);
    let _ = writeln!(out, "node         {}", s.name);
    let (in_use, order) = hubs(&s.hubs);
    let _ = writeln!(
        out,
        "hub          {in_use} ({}){order}",
        if s.hub_connected {
            "connected"
        } else {
            "NOT connected"
        }
    );
    if !s.hub_connected {
        problems.push("not connected to the hub".to_string());
    }
    let _ = writeln!(
        out,
        "lag          {lag} events (applied {}, received {})",
        s.last_applied_event_id, s.received_event_id
    );
    if lag > t.max_lag {
        problems.push(format!("{lag} events received but not applied"));
    }
    let _ = writeln!(out, "outbox       {} reports waiting", s.outbox_pending);
    if s.outbox_pending > 0 && !s.hub_connected {
        problems.push(format!(
            "{} reports wait for the hub in the outbox",
            s.outbox_pending
        ));
    }
    let _ = writeln!(
        out,
        "fast path    {}",
        if s.fast_path { "on" } else { "off" }
    );
    let fail2ban = match (s.fail2ban_socket_used, s.fail2ban_reachable) {
        (false, _) => "not used (--no-fail2ban-socket): bans go through shared.log",
        (true, true) => "reachable",
        (true, false) => {
            problems.push("fail2ban does not answer on its socket".to_string());
            "NOT reachable"
        }
    };
    let _ = writeln!(out, "fail2ban     {fail2ban}");
    if s.cert_expires_ms == 0 {
        problems.push("cannot read this host's certificate".to_string());
        let _ = writeln!(out, "certificate  unreadable");
    } else {
        let left_ms = s.cert_expires_ms - now_ms;
        let days = left_ms.div_euclid(86_400_000);
        let _ = writeln!(
            out,
            "certificate  expires {} UTC ({days} days)",
            crate::admin::utc(s.cert_expires_ms, false)
        );
        if left_ms < t.cert_warn.as_millis() as i64 {
            problems.push(format!("certificate expires in {days} days"));
        }
    }
    if s.last_error_ms == 0 {
        let _ = writeln!(out, "last error   none");
    } else {
        let _ = writeln!(
            out,
            "last error   {} UTC: {}",
            crate::admin::utc(s.last_error_ms, false),
            s.last_error
        );
    }
    if problems.is_empty() {
        let _ = writeln!(out, "status       OK");
    } else {
        for p in &problems {
            let _ = writeln!(out, "PROBLEM      {p}");
        }
    }
    (out, problems)
}

/// The hub in use and, with several, `; order A B C` (this host's order
/// of preference), from `NodeStatusResponse.hubs`: the node marks the hub
/// in use with a leading `*` (a node before failover listed its `--hub`
/// values unmarked: shown as they are).
fn hubs(text: &str) -> (String, String) {
    let all: Vec<&str> = text.split_whitespace().collect();
    let Some(in_use) = all.iter().find_map(|h| h.strip_prefix('*')) else {
        return (
            if text.is_empty() { "?" } else { text }.to_string(),
            String::new(),
        );
    };
    let order = match all.len() {
        1 => String::new(),
        n => format!(
            "; {} of {n} in this host's order: {}",
            ordinal(all.iter().position(|h| h.starts_with('*')).unwrap_or(0)),
            all.iter()
                .map(|h| h.trim_start_matches('*'))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    };
    (in_use.to_string(), order)
}

/// "1st", "2nd", ... for index `i` (0-based).
fn ordinal(i: usize) -> String {
    let n = i + 1;
    let suffix = match (n % 10, n % 100) {
        (1, 11) | (2, 12) | (3, 13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn healthy() -> NodeStatusResponse {
        NodeStatusResponse {
            name: "n1".into(),
            hub_connected: true,
            hubs: "*https://hub:7443".into(),
            last_applied_event_id: 10,
            received_event_id: 10,
            fail2ban_socket_used: true,
            fail2ban_reachable: true,
            fast_path: true,
            cert_expires_ms: 60 * DAY,
            ..Default::default()
        }
    }

    const T: Thresholds = Thresholds {
        max_lag: 1000,
        cert_warn: Duration::from_secs(14 * 86_400),
    };

    #[test]
    fn a_healthy_node_is_ok() {
        let (text, problems) = assess(&healthy(), 0, T);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(
            text.contains("hub          https://hub:7443 (connected)"),
            "{text}"
        );
        assert!(text.contains("(60 days)"), "{text}");
        assert!(text.ends_with("status       OK\n"), "{text}");
    }

    #[test]
    fn the_hub_in_use_is_named_with_the_order() {
        let mut s = healthy();
        s.hubs = "https://a:1 *https://b:2 https://c:3".into();
        let (text, _) = assess(&s, 0, T);
        assert!(
            text.contains(
                "hub          https://b:2 (connected); 2nd of 3 in this host's order: https://a:1 https://b:2 https://c:3\n"
            ),
            "{text}"
        );
        // An older node's unmarked list is shown as it is.
        s.hubs = "https://a:1 https://b:2".into();
        let (text, _) = assess(&s, 0, T);
        assert!(
            text.contains("hub          https://a:1 https://b:2 (connected)\n"),
            "{text}"
        );
    }

    #[test]
    fn each_problem_is_named() {
        let mut s = healthy();
        s.hub_connected = false;
        s.outbox_pending = 3;
        s.fail2ban_reachable = false;
        s.received_event_id = 2000;
        s.cert_expires_ms = 3 * DAY;
        let (text, problems) = assess(&s, 0, T);
        assert_eq!(problems.len(), 5, "{text}");
        assert!(
            text.contains("PROBLEM      certificate expires in 3 days"),
            "{text}"
        );
        assert!(text.contains("PROBLEM      1990 events received but not applied"));
    }
}
