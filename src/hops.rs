//! Per-hop timestamps of a ban's path for `banmesh bench`: debug lines
//! under the target `banmesh::hops` in the hub's log, off unless that
//! target is enabled (a disabled `debug!` costs one cached check and
//! reads no clock). The bench reads them back and joins them with its
//! own clocks on the nodes' side (both sides read the same machine's
//! wall clock). Fields are `hop_*` so that span fields (`host`) never
//! collide with them.

/// The tracing target of the hop lines.
pub const TARGET: &str = "banmesh::hops";

/// The wall clock in microseconds since the epoch: comparable between the
/// hub's process and the bench's on one machine.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One hop line parsed back: its hop name and `hop_*` fields.
#[derive(Debug, Default, PartialEq)]
pub struct Line {
    /// `recv`, `commit` or `sent`.
    pub hop: String,
    /// The address (recv, commit).
    pub ip: String,
    /// The event id (commit, sent).
    pub id: u64,
    /// The subscriber's host (sent).
    pub host: String,
    /// When, [`now_us`].
    pub us: u64,
}

/// Parses a hop line of the hub's text log; `None` for any other line.
pub fn parse(line: &str) -> Option<Line> {
    let (_, rest) = line.split_once("banmesh::hops:")?;
    let mut out = Line::default();
    for token in rest.split_whitespace() {
        let Some((k, v)) = token.split_once('=') else {
            continue;
        };
        let v = v.trim_matches('"');
        match k {
            "hop" => out.hop = v.to_string(),
            "hop_ip" => out.ip = v.to_string(),
            "hop_id" => out.id = v.parse().ok()?,
            "hop_host" => out.host = v.to_string(),
            "hop_us" => out.us = v.parse().ok()?,
            _ => {}
        }
    }
    (!out.hop.is_empty() && out.us > 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_sent_line_and_ignores_span_fields() {
        let l = "2026-11-26T11:00:00.000001Z DEBUG subscribe{host=x}: banmesh::hops: hop=\"sent\" hop_id=7 hop_host=bench-3 hop_us=123";
        let got = parse(l).unwrap();
        assert_eq!(
            (got.hop.as_str(), got.id, got.host.as_str(), got.us),
            ("sent", 7, "bench-3", 123)
        );
        assert_eq!(parse("INFO banmesh::hub: hub listening addr=1"), None);
    }
}
