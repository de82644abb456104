//! The kernel's NFLOG packets, read over a raw netlink socket (no
//! libnetfilter_log, no subprocess): an iptables `NFLOG --nflog-group N`
//! rule hands matching packets to whoever bound group N in the same
//! network namespace.
//!
//! The protocol (`linux/netfilter/nfnetlink_log.h`): a `NFULNL_MSG_CONFIG`
//! request binds the group (`NFULNL_CFG_CMD_BIND`) and asks for the
//! packet's first bytes (`NFULA_CFG_MODE`, `NFULNL_COPY_PACKET`); each
//! logged packet then arrives as a `NFULNL_MSG_PACKET` message whose
//! attributes carry the rule's prefix (`NFULA_PREFIX`) and the packet from
//! its network header on (`NFULA_PAYLOAD`). The kernel batches packets
//! per group and flushes a batch when it is full or after a timeout; the
//! node sets that timeout to 10 ms (the default, 1 s, would hold a lone
//! probe that long). A group has one listener per
//! namespace: binding one another socket holds fails with EPERM.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::io::unix::AsyncFd;

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_TIMEOUT: u16 = 4;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
/// Attribute type bits that are flags, not the type.
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;
/// Bytes of each packet asked for: an IPv6 header, an ICMPv6 header, the
/// quoted IPv6 header and its UDP header fit in 96; IPv4 options in 128.
pub const COPY_RANGE: u32 = 128;
/// Packets the kernel gathers into one message batch at most (its default
/// is 100) ...
const QTHRESH: u32 = 64;
/// ... and how long it holds a batch, in 1/100 s (its default is a whole
/// second, which would delay a lone probe by as much).
const FLUSH_TIMEOUT: u32 = 1;
/// The socket's receive buffer: room for a burst while the reader is busy.
const RCVBUF: libc::c_int = 4 << 20;

/// A packet the kernel logged to the group.
#[derive(Debug, PartialEq, Eq)]
pub struct Logged<'a> {
    /// The rule's `--nflog-prefix` (empty without one).
    pub prefix: &'a [u8],
    /// The packet from its network header on (cut at [`COPY_RANGE`]).
    pub payload: &'a [u8],
}

/// A netlink socket bound to one NFLOG group.
pub struct NflogSocket {
    fd: AsyncFd<OwnedFd>,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn kernel() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr
}

/// A `NFULNL_MSG_CONFIG` request for `group` with one attribute.
fn config_request(seq: u32, group: u16, attr_type: u16, attr: &[u8]) -> Vec<u8> {
    let attr_len = 4 + attr.len();
    let padded = (attr_len + 3) & !3;
    let len = NLMSG_HDRLEN + 4 + padded;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family AF_UNSPEC, version 0, the group (big-endian).
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    m.extend_from_slice(&group.to_be_bytes());
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&attr_type.to_ne_bytes());
    m.extend_from_slice(attr);
    m.resize(len, 0);
    m
}

impl NflogSocket {
    /// Binds `group` in this network namespace and asks for the first
    /// [`COPY_RANGE`] bytes of each packet. Fails with EPERM without
    /// CAP_NET_ADMIN or when another socket holds the group, and
    /// EPROTONOSUPPORT/ENOENT without the kernel's nfnetlink_log.
    pub fn bind(group: u16) -> io::Result<NflogSocket> {
        // SAFETY: plain socket(2); the fd is owned right after.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        })?;
        // SAFETY: `raw` is a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = kernel();
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        // Past the rmem_max cap where allowed (CAP_NET_ADMIN, which binding
        // needs anyway); a burst then waits in the socket instead of being
        // dropped by the kernel.
        set_opt(&fd, libc::SO_RCVBUFFORCE, RCVBUF)
            .or_else(|_| set_opt(&fd, libc::SO_RCVBUF, RCVBUF))?;
        // Config answers are waited for (briefly) before going async.
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: a valid timeval for SO_RCVTIMEO.
        cvt(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        request(
            &fd,
            &config_request(1, group, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]),
        )?;
        let mut mode = COPY_RANGE.to_be_bytes().to_vec();
        mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
        request(&fd, &config_request(2, group, NFULA_CFG_MODE, &mode))?;
        request(
            &fd,
            &config_request(3, group, NFULA_CFG_QTHRESH, &QTHRESH.to_be_bytes()),
        )?;
        request(
            &fd,
            &config_request(4, group, NFULA_CFG_TIMEOUT, &FLUSH_TIMEOUT.to_be_bytes()),
        )?;
        // SAFETY: fcntl on an fd we own.
        let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
        // SAFETY: the OwnedFd keeps the same descriptor for as long as the
        // AsyncFd owns it, and nothing else closes it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(NflogSocket { fd })
    }

    /// Waits for the next datagram of packet messages. ENOBUFS means the
    /// kernel dropped packets because the reader fell behind.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                // SAFETY: buf is valid for writes of its length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

fn set_opt(fd: &OwnedFd, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid int option.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// Sends a config request and waits for the kernel's ack.
fn request(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    let addr = kernel();
    // SAFETY: msg and addr are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let seq = u32::from_ne_bytes(msg[8..12].try_into().expect("4 bytes"));
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for (ty, msg_seq, body) in messages(&buf[..n as usize]) {
            if ty == NLMSG_ERROR && msg_seq == seq && body.len() >= 4 {
                let code = i32::from_ne_bytes(body[..4].try_into().expect("4 bytes"));
                return match code {
                    0 => Ok(()),
                    e => Err(io::Error::from_raw_os_error(-e)),
                };
            }
        }
    }
}

/// The netlink messages in a datagram: (type, seq, body after the header).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(rest[..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return None;
        }
        let ty = u16::from_ne_bytes(rest[4..6].try_into().ok()?);
        let seq = u32::from_ne_bytes(rest[8..12].try_into().ok()?);
        let body = &rest[NLMSG_HDRLEN..len];
        rest = &rest[((len + 3) & !3).min(rest.len())..];
        Some((ty, seq, body))
    })
}

/// The logged packets in a datagram from the socket; anything malformed
/// is skipped, never trusted.
pub fn packets(buf: &[u8]) -> impl Iterator<Item = Logged<'_>> {
    messages(buf).filter_map(|(ty, _, body)| {
        if ty != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET || body.len() < 4 {
            return None;
        }
        let mut logged = Logged {
            prefix: &[],
            payload: &[],
        };
        let mut attrs = &body[4..];
        while attrs.len() >= 4 {
            let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
            let ty = u16::from_ne_bytes([attrs[2], attrs[3]]) & NLA_TYPE_MASK;
            if len < 4 || len > attrs.len() {
                break;
            }
            let value = &attrs[4..len];
            match ty {
                NFULA_PAYLOAD => logged.payload = value,
                NFULA_PREFIX => logged.prefix = value.split(|&b| b == 0).next().unwrap_or_default(),
                _ => {}
            }
            attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
        }
        (!logged.payload.is_empty()).then_some(logged)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut a = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize((a.len() + 3) & !3, 0);
        a
    }

    fn packet_msg(attrs: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = [vec![2, 0, 0, 5]]
            .into_iter()
            .chain(attrs.iter().cloned())
            .flatten()
            .collect();
        let len = NLMSG_HDRLEN + body.len();
        let mut m = (len as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&(NFNL_SUBSYS_ULOG << 8).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn reads_prefix_and_payload_of_each_message() {
        let one = packet_msg(&[
            attr(1, &[8, 0, 3, 0]),
            attr(NFULA_PREFIX, b"banmesh-probe\0"),
            attr(NFULA_PAYLOAD | 0x4000, &[0x45, 1, 2]),
        ]);
        let two = packet_msg(&[attr(NFULA_PAYLOAD, &[0x60])]);
        let buf = [one, two].concat();
        let got: Vec<_> = packets(&buf).collect();
        assert_eq!(
            got,
            [
                Logged {
                    prefix: b"banmesh-probe",
                    payload: &[0x45, 1, 2]
                },
                Logged {
                    prefix: b"",
                    payload: &[0x60]
                }
            ]
        );
    }

    #[test]
    fn malformed_datagrams_yield_nothing_and_never_panic() {
        let good = packet_msg(&[attr(NFULA_PAYLOAD, &[0x45; 40])]);
        for cut in 0..good.len() {
            let _ = packets(&good[..cut]).count();
        }
        let mut bad_attr = good.clone();
        bad_attr[NLMSG_HDRLEN + 4] = 0xff;
        assert_eq!(packets(&bad_attr).count(), 0);
        assert_eq!(packets(&[0xff; 64]).count(), 0);
    }

    #[test]
    fn config_requests_are_padded_netlink_messages() {
        let m = config_request(7, 5, NFULA_CFG_MODE, &[0, 0, 0, 128, 2, 0]);
        assert_eq!(m.len(), 16 + 4 + 12);
        assert_eq!(u32::from_ne_bytes(m[..4].try_into().unwrap()), 32);
        assert_eq!(&m[18..20], &5u16.to_be_bytes());
    }
}
