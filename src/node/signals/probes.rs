//! Probes of closed ports, from the kernel's own answers to them.
//!
//! A SYN to a port nothing listens on is answered by the kernel with a
//! reset (RST+ACK, sequence number 0: `tcp_v4_send_reset` for a segment
//! without ACK); a UDP datagram to one, by an ICMP (ICMPv6)
//! port-unreachable quoting the datagram's headers. Both answers leave
//! through OUTPUT, where `banmesh node setup-probes` installs a rule that
//! hands them to an NFLOG group with the prefix [`PREFIX`]; this module
//! reads them ([`super::nflog`]) and turns each into a
//! [`Signal::Probe`]: the probed address is the answer's destination, the
//! port is the reset's source port or the quoted UDP header's destination
//! port.
//!
//! Why answers rather than a rule on INPUT for "ports nothing listens
//! on": the kernel already knows which ports are closed, at the moment of
//! the packet, in this namespace; an INPUT rule would need the list of
//! open ports kept in step with every service that starts or stops. And a
//! connection to an open port never produces either answer, so it never
//! counts. A reset the host sends to abort an established connection
//! carries a non-zero sequence number and is not taken for a probe.
use std::{collections::HashSet, net::IpAddr};

use tracing::{debug, info, warn};

use super::{Protocol, Signal, Signals, nflog};
use crate::{ban::canonical_ip, shutdown::Shutdown};

/// The `--nflog-prefix` of banmesh's rules: packets logged to the group by
/// any other rule are not taken for probes.
pub const PREFIX: &str = "banmesh-probe";

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// What a probe touched: who, over what, which port.
pub type Probe = (IpAddr, Protocol, u16);

/// The probe an outgoing packet answers, if it is the kernel's answer to
/// a closed port; `None` for anything else (never panics on bytes).
pub fn probe_of(packet: &[u8]) -> Option<Probe> {
    let (ip, protocol, port) = match packet.first()? >> 4 {
        4 => v4(packet)?,
        6 => v6(packet)?,
        _ => return None,
    };
    let ip = canonical_ip(ip);
    let local = ip.is_loopback() || ip.is_unspecified() || ip.is_multicast();
    (!local).then_some((ip, protocol, port))
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn addr4(b: &[u8], at: usize) -> Option<IpAddr> {
    let a: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(IpAddr::from(a))
}

fn addr6(b: &[u8], at: usize) -> Option<IpAddr> {
    let a: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
    Some(IpAddr::from(a))
}

/// The closed port a reset answers: RST+ACK with sequence number 0 is the
/// kernel's answer to a SYN (or any segment without ACK) to a closed port.
fn reset_port(tcp: &[u8]) -> Option<u16> {
    let flags = *tcp.get(13)? & (TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK);
    let seq = tcp.get(4..8)?;
    (flags == TCP_RST | TCP_ACK && seq == [0; 4]).then(|| be16(tcp, 0))?
}

fn v4(p: &[u8]) -> Option<Probe> {
    let ihl = usize::from(p.first()? & 0x0f) * 4;
    if ihl < 20 || *p.get(6)? & 0x1f != 0 || *p.get(7)? != 0 {
        // A fragment other than the first carries no transport header.
        return None;
    }
    let dst = addr4(p, 16)?;
    let l4 = p.get(ihl..)?;
    match *p.get(9)? {
        TCP => Some((dst, Protocol::Tcp, reset_port(l4)?)),
        ICMP if l4.get(..2)? == [3, 3] => {
            // The quoted datagram: the probe as the host received it.
            let quoted = l4.get(8..)?;
            let qihl = usize::from(quoted.first()? & 0x0f) * 4;
            if quoted.first()? >> 4 != 4 || qihl < 20 || *quoted.get(9)? != UDP {
                return None;
            }
            let from = addr4(quoted, 12)?;
            Some((from, Protocol::Udp, be16(quoted, qihl + 2)?))
        }
        _ => None,
    }
}

fn v6(p: &[u8]) -> Option<Probe> {
    let dst = addr6(p, 24)?;
    let l4 = p.get(40..)?;
    match *p.get(6)? {
        TCP => Some((dst, Protocol::Tcp, reset_port(l4)?)),
        ICMPV6 if l4.get(..2)? == [1, 4] => {
            let quoted = l4.get(8..)?;
            if quoted.first()? >> 4 != 6 || *quoted.get(6)? != UDP {
                return None;
            }
            let from = addr6(quoted, 8)?;
            Some((from, Protocol::Udp, be16(quoted, 42)?))
        }
        _ => None,
    }
}

/// This host's ephemeral port range (`net.ipv4.ip_local_port_range`,
/// which also serves IPv6), where its own client sockets live.
///
/// A UDP answer that arrives after the client closed its socket (the
/// second resolver's reply to a parallel lookup, a duplicate DNS answer,
/// late NTP or QUIC packets) draws an ICMP port-unreachable that looks
/// exactly like the answer to a probe, at a random port of this range: a
/// host's own upstream servers would be banned fleet-wide within minutes.
/// So a UDP "probe" of a port in this range is never counted; scanners
/// probe services, which live below it.
fn ephemeral_ports() -> std::ops::RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| parse_port_range(&s))
        .unwrap_or(32768..=60999)
}

fn parse_port_range(s: &str) -> Option<std::ops::RangeInclusive<u16>> {
    let mut it = s.split_whitespace().map(|p| p.parse::<u16>());
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Some(lo..=hi),
        _ => None,
    }
}

/// Reads the NFLOG `group` and offers a probe signal per answer to a
/// closed port not in `ignore_ports`, until `shutdown`. Where the group
/// cannot be bound (no CAP_NET_ADMIN, no nfnetlink_log, another listener:
/// EPERM for both of the first and the last)
/// it logs one warning and returns: failures still flow.
pub async fn run(group: u16, ignore_ports: HashSet<u16>, signals: Signals, mut shutdown: Shutdown) {
    let ephemeral = ephemeral_ports();
    let socket = match nflog::NflogSocket::bind(group) {
        Ok(s) => s,
        Err(e) => {
            warn!(group, error = %e,
                "cannot read NFLOG group: probe signals are off (failure signals still flow); run as root with nfnetlink_log available, with a group no other process reads (permission denied: also another reader), and `banmesh node setup-probes --nflog-group N`");
            return;
        }
    };
    info!(group, "reading closed-port answers from NFLOG");
    let mut buf = vec![0u8; 256 * 1024];
    let mut overruns = 0u64;
    loop {
        let n = tokio::select! {
            _ = shutdown.recv() => break,
            r = socket.recv(&mut buf) => match r {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    overruns += 1;
                    if overruns.is_power_of_two() {
                        warn!(overruns, "NFLOG reader fell behind; the kernel dropped some answers (probes are hints)");
                    }
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "NFLOG socket failed; probe signals are off");
                    break;
                }
            },
        };
        for logged in nflog::packets(&buf[..n]) {
            if logged.prefix != PREFIX.as_bytes() {
                continue;
            }
            if let Some((ip, protocol, port)) = probe_of(logged.payload)
                && !ignore_ports.contains(&port)
                && !(protocol == Protocol::Udp && ephemeral.contains(&port))
            {
                signals.offer(&Signal::Probe {
                    ip,
                    protocol,
                    port,
                    at_ms: crate::clock::now_ms(),
                });
            }
        }
    }
    debug!("probe reader stopped");
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_ephemeral_range_is_read_as_the_kernel_writes_it() {
        assert_eq!(
            super::parse_port_range("32768\t60999\n"),
            Some(32768..=60999)
        );
        assert_eq!(super::parse_port_range("1024 65535"), Some(1024..=65535));
        assert_eq!(super::parse_port_range("60999 32768"), None);
        assert_eq!(super::parse_port_range("x"), None);
    }

    use super::*;

    /// An IPv4 header from `src` to `dst` carrying `proto`, then `rest`.
    fn ip4(src: [u8; 4], dst: [u8; 4], proto: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(rest);
        p
    }

    fn tcp(sport: u16, dport: u16, seq: u32, flags: u8) -> Vec<u8> {
        let mut t = sport.to_be_bytes().to_vec();
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&seq.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 1, 0x50, flags, 0, 0, 0, 0, 0, 0]);
        t
    }

    fn udp(sport: u16, dport: u16) -> Vec<u8> {
        [sport.to_be_bytes(), dport.to_be_bytes(), [0, 8], [0, 0]].concat()
    }

    const HOST: [u8; 4] = [10, 0, 0, 1];
    const ATTACKER: [u8; 4] = [203, 0, 113, 7];

    #[test]
    fn a_reset_to_a_syn_is_a_tcp_probe() {
        let rst = ip4(HOST, ATTACKER, TCP, &tcp(2222, 51000, 0, TCP_RST | TCP_ACK));
        assert_eq!(
            probe_of(&rst),
            Some(("203.0.113.7".parse().unwrap(), Protocol::Tcp, 2222))
        );
    }

    #[test]
    fn resets_of_open_connections_are_not_probes() {
        // An abort of an established connection: RST+ACK at snd_nxt.
        let abort = ip4(
            HOST,
            ATTACKER,
            TCP,
            &tcp(22, 51000, 12345, TCP_RST | TCP_ACK),
        );
        // A reset answering a stray ACK: RST alone.
        let stray = ip4(HOST, ATTACKER, TCP, &tcp(22, 51000, 0, TCP_RST));
        let synack = ip4(HOST, ATTACKER, TCP, &tcp(22, 51000, 0, TCP_SYN | TCP_ACK));
        for p in [abort, stray, synack] {
            assert_eq!(probe_of(&p), None);
        }
    }

    #[test]
    fn a_port_unreachable_is_a_udp_probe() {
        let quoted = ip4(ATTACKER, HOST, UDP, &udp(40000, 161));
        let icmp = [&[3u8, 3, 0, 0, 0, 0, 0, 0][..], &quoted].concat();
        let answer = ip4(HOST, ATTACKER, ICMP, &icmp);
        assert_eq!(
            probe_of(&answer),
            Some(("203.0.113.7".parse().unwrap(), Protocol::Udp, 161))
        );
        // Host unreachable (3/1) is not an answer to a closed port.
        let mut other = answer.clone();
        other[21] = 1;
        assert_eq!(probe_of(&other), None);
    }

    #[test]
    fn v6_answers() {
        let host: [u8; 16] = "2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let att: [u8; 16] = "2001:db8::66"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let ip6 = |src: [u8; 16], dst: [u8; 16], nh: u8, rest: &[u8]| {
            let mut p = vec![0x60, 0, 0, 0, 0, rest.len() as u8, nh, 64];
            p.extend_from_slice(&src);
            p.extend_from_slice(&dst);
            p.extend_from_slice(rest);
            p
        };
        let rst = ip6(host, att, TCP, &tcp(8080, 50000, 0, TCP_RST | TCP_ACK));
        assert_eq!(
            probe_of(&rst),
            Some(("2001:db8::66".parse().unwrap(), Protocol::Tcp, 8080))
        );
        let quoted = ip6(att, host, UDP, &udp(50000, 53));
        let icmp = [&[1u8, 4, 0, 0, 0, 0, 0, 0][..], &quoted].concat();
        assert_eq!(
            probe_of(&ip6(host, att, ICMPV6, &icmp)),
            Some(("2001:db8::66".parse().unwrap(), Protocol::Udp, 53))
        );
    }

    #[test]
    fn loopback_and_garbage_are_not_probes() {
        let rst = ip4(HOST, [127, 0, 0, 1], TCP, &tcp(1, 2, 0, TCP_RST | TCP_ACK));
        assert_eq!(probe_of(&rst), None);
        let good = ip4(HOST, ATTACKER, TCP, &tcp(2222, 51000, 0, TCP_RST | TCP_ACK));
        for cut in 0..good.len() {
            let _ = probe_of(&good[..cut]);
        }
        assert_eq!(probe_of(&[]), None);
        assert_eq!(probe_of(&[0x4f; 3]), None);
    }
}
