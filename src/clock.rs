//! The fleet's clock: milliseconds since the Unix epoch, as stored in
//! events, statuses and outbox records. One definition, shared by the hub
//! and the node, so both sides of a ban agree on what a timestamp means.

/// Milliseconds since the epoch (0 if the system clock is before 1970,
/// which only a badly broken host shows; never panics).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
