//! CPU time by each process's own accounting, so that a busy neighbour on
//! a shared machine does not inflate a cost per event (wall time would):
//! `/proc/PID/stat` utime+stime for the hub and MariaDB (clock ticks,
//! exited threads included), `getrusage` for this process (microseconds),
//! which runs the simulated nodes.

/// CPU time (user + system) of process `pid` so far, in microseconds;
/// `None` when it is gone or unreadable.
pub fn of_pid(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields count from after its ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at 3.
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1_000_000 / hz)
}

/// This process's CPU time so far, in microseconds (the in-process nodes
/// and the bench's own driving).
pub fn own() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let r = unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut r);
        r
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(r.ru_utime) + us(r.ru_stime)
}

/// The process id of the server listening on TCP `port` here (MariaDB for
/// the bench: several servers may run on one machine, only the one the
/// hub talks to counts), found from its listening socket's inode in
/// `/proc/net/tcp{,6}` and the process holding it.
pub fn listener_pid(port: u16) -> Option<u32> {
    let hex = format!(":{port:04X}");
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|t| {
        let text = std::fs::read_to_string(t).ok()?;
        text.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local_address, state 0A = LISTEN, inode
            (f.get(1)?.ends_with(&hex) && *f.get(3)? == "0A")
                .then(|| f.get(9).map(|s| s.to_string()))?
        })
    })?;
    let target = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
        let fds = std::fs::read_dir(e.path().join("fd")).ok()?;
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()))
            .then_some(pid)
    })
}

/// The port of a `mysql://user@host:port[/db]` URL (3306 when none).
pub fn mysql_port(url: &str) -> u16 {
    url.rsplit('@')
        .next()
        .and_then(|h| h.split('/').next())
        .and_then(|h| h.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(3306)
}

/// CPU time between two readings, per event, in microseconds (two decimals).
pub fn per_event(before: Option<u64>, after: Option<u64>, events: u64) -> Option<f64> {
    let spent = after?.checked_sub(before?)?;
    (events > 0).then(|| (spent as f64 / events as f64 * 100.0).round() / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_spent_cpu_by_both_accounts() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(own() > 0);
        assert!(of_pid(std::process::id()).is_some());
        assert_eq!(per_event(Some(100), Some(300), 4), Some(50.0));
        assert_eq!(per_event(None, Some(300), 4), None);
        assert_eq!(mysql_port("mysql://root@127.0.0.1:3307/x"), 3307);
        assert_eq!(mysql_port("mysql://root@localhost"), 3306);
    }
}
