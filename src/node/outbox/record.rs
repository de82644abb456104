//! The record format of the outbox and of the spool: `magic "BMR1" | len
//! u32 LE | crc32 u32 LE | payload`, the payload a protobuf `Report`.
//!
//! Contract: [`decode_records`] never panics on any bytes (they may be a
//! torn write or another process's damage); it returns every intact record
//! and how many bytes it skipped, resynchronising on the next magic.
use prost::Message;

use crate::proto;

pub(super) const MAGIC: &[u8; 4] = b"BMR1";
pub(super) const HEADER: usize = 12;
/// No record is near this big; a larger length is corruption.
const MAX_RECORD: usize = 4096;

/// Decodes every intact record in `bytes`, skipping damage.
pub fn decode_records(bytes: &[u8]) -> (Vec<proto::Report>, usize) {
    let mut out = Vec::new();
    let (mut pos, mut skipped) = (0, 0);
    while pos < bytes.len() {
        if let Some((report, len)) = decode_one(&bytes[pos..]) {
            out.push(report);
            pos += len;
        } else {
            // Resynchronise on the next magic.
            let next = bytes[pos + 1..]
                .windows(MAGIC.len())
                .position(|w| w == MAGIC)
                .map_or(bytes.len(), |i| pos + 1 + i);
            skipped += next - pos;
            pos = next;
        }
    }
    (out, skipped)
}

fn decode_one(b: &[u8]) -> Option<(proto::Report, usize)> {
    if b.len() < HEADER || &b[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(b[4..8].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(b[8..12].try_into().ok()?);
    if len > MAX_RECORD || b.len() < HEADER + len {
        return None;
    }
    let payload = &b[HEADER..HEADER + len];
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let report = proto::Report::decode(payload).ok()?;
    Some((report, HEADER + len))
}

/// One record in the outbox's format (also the spool's).
pub fn encode(report: &proto::Report) -> Vec<u8> {
    let payload = report.encode_to_vec();
    let mut rec = Vec::with_capacity(HEADER + payload.len());
    rec.extend_from_slice(MAGIC);
    rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    rec.extend_from_slice(&payload);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x2545F4914F6CDD1Du64;
        for _ in 0..2000 {
            let len = (seed % 300) as usize;
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push(if seed.is_multiple_of(7) {
                    MAGIC[(seed % 4) as usize]
                } else {
                    seed as u8
                });
            }
            let (records, skipped) = decode_records(&bytes);
            assert!(records.is_empty() || skipped < bytes.len());
        }
    }
}
