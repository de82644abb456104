//! This host's own addresses, for `ignoreself`.
//!
//! fail2ban's `ignoreself` ignores what `localhost`, the host name and the
//! fully qualified name resolve to (`DNSUtils.getSelfIPs`), which on many
//! hosts is only 127.0.0.1, 127.0.1.1 and ::1. banmesh ignores those names'
//! addresses too ([`names`], resolved by the refresher) and, besides, the
//! address of every interface ([`interfaces`]): a host must never drop its
//! own public address because another host reported it.
use std::{
    ffi::CStr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::ban::canonical_ip;

/// The names whose addresses fail2ban's `ignoreself` covers: `localhost`
/// and this host's name (its fully qualified name resolves to the same
/// addresses wherever `/etc/hosts` or DNS is consistent).
pub fn names() -> Vec<String> {
    let mut names = vec!["localhost".to_string()];
    if let Some(h) = host_name()
        && !names.contains(&h)
    {
        names.push(h);
    }
    names
}

fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length, and gethostname writes at
    // most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let name = CStr::from_bytes_until_nul(&buf).ok()?.to_str().ok()?;
    (!name.is_empty()).then(|| name.to_string())
}

/// The address of every interface of this host (of the network namespace
/// the node runs in), IPv4 and IPv6, up or down.
pub fn interfaces() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet
        // freed; `ifa_addr` is null or points to a sockaddr of the family it
        // names, so the casts read structures of the right type.
        unsafe {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null() {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                        let a = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                        out.push(IpAddr::V4(a));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                        let a = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                        out.push(canonical_ip(IpAddr::V6(a)));
                    }
                    _ => {}
                }
            }
            cur = ifa.ifa_next;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_among_the_interfaces() {
        let own = interfaces().unwrap();
        assert!(own.contains(&"127.0.0.1".parse().unwrap()), "{own:?}");
        assert!(names().contains(&"localhost".to_string()));
        assert!(names().len() >= 2, "the host name too: {:?}", names());
    }
}
