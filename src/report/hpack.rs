//! Just enough HPACK (RFC 7541) decoding to read a gRPC answer's headers
//! and trailers: `:status`, `grpc-status`, `grpc-message`. Part of the
//! small `report` client ([`super::wire`]), which has no HTTP/2 library, so
//! the `banmesh-report` binary stays small and starts fast.
//!
//! Contract: [`Decoder::decode`] never panics on any bytes (they come from
//! another process); a malformed block is an [`HpackError`]. The dynamic
//! table is kept across blocks of one connection, as the peer's encoder
//! expects.
use std::collections::VecDeque;

use thiserror::Error;

/// Why a header block could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HpackError {
    /// The block ended inside a field.
    #[error("header block truncated")]
    Truncated,
    /// A field referred to an index neither table holds.
    #[error("header index {0} out of range")]
    Index(usize),
    /// An integer or a string length too large for any sane header.
    #[error("header field too large")]
    TooLarge,
    /// A Huffman-coded string was not valid.
    #[error("bad Huffman code in a header")]
    Huffman,
}

/// Largest header string accepted: the node's answers are tiny.
const MAX_STRING: usize = 16 * 1024;

/// The static table, RFC 7541 Appendix A (index 1 first).
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The Huffman code of each byte, RFC 7541 Appendix B (code, length in bits).
const HUFFMAN: [(u32, u8); 256] = [
    (0x1ff8, 13),
    (0x7fffd8, 23),
    (0xfffffe2, 28),
    (0xfffffe3, 28),
    (0xfffffe4, 28),
    (0xfffffe5, 28),
    (0xfffffe6, 28),
    (0xfffffe7, 28),
    (0xfffffe8, 28),
    (0xffffea, 24),
    (0x3ffffffc, 30),
    (0xfffffe9, 28),
    (0xfffffea, 28),
    (0x3ffffffd, 30),
    (0xfffffeb, 28),
    (0xfffffec, 28),
    (0xfffffed, 28),
    (0xfffffee, 28),
    (0xfffffef, 28),
    (0xffffff0, 28),
    (0xffffff1, 28),
    (0xffffff2, 28),
    (0x3ffffffe, 30),
    (0xffffff3, 28),
    (0xffffff4, 28),
    (0xffffff5, 28),
    (0xffffff6, 28),
    (0xffffff7, 28),
    (0xffffff8, 28),
    (0xffffff9, 28),
    (0xffffffa, 28),
    (0xffffffb, 28),
    (0x14, 6),
    (0x3f8, 10),
    (0x3f9, 10),
    (0xffa, 12),
    (0x1ff9, 13),
    (0x15, 6),
    (0xf8, 8),
    (0x7fa, 11),
    (0x3fa, 10),
    (0x3fb, 10),
    (0xf9, 8),
    (0x7fb, 11),
    (0xfa, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6),
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6),
    (0x1a, 6),
    (0x1b, 6),
    (0x1c, 6),
    (0x1d, 6),
    (0x1e, 6),
    (0x1f, 6),
    (0x5c, 7),
    (0xfb, 8),
    (0x7ffc, 15),
    (0x20, 6),
    (0xffb, 12),
    (0x3fc, 10),
    (0x1ffa, 13),
    (0x21, 6),
    (0x5d, 7),
    (0x5e, 7),
    (0x5f, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7),
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7),
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6a, 7),
    (0x6b, 7),
    (0x6c, 7),
    (0x6d, 7),
    (0x6e, 7),
    (0x6f, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7),
    (0xfc, 8),
    (0x73, 7),
    (0xfd, 8),
    (0x1ffb, 13),
    (0x7fff0, 19),
    (0x1ffc, 13),
    (0x3ffc, 14),
    (0x22, 6),
    (0x7ffd, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5),
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6),
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7),
    (0x28, 6),
    (0x29, 6),
    (0x2a, 6),
    (0x7, 5),
    (0x2b, 6),
    (0x76, 7),
    (0x2c, 6),
    (0x8, 5),
    (0x9, 5),
    (0x2d, 6),
    (0x77, 7),
    (0x78, 7),
    (0x79, 7),
    (0x7a, 7),
    (0x7b, 7),
    (0x7ffe, 15),
    (0x7fc, 11),
    (0x3ffd, 14),
    (0x1ffd, 13),
    (0xffffffc, 28),
    (0xfffe6, 20),
    (0x3fffd2, 22),
    (0xfffe7, 20),
    (0xfffe8, 20),
    (0x3fffd3, 22),
    (0x3fffd4, 22),
    (0x3fffd5, 22),
    (0x7fffd9, 23),
    (0x3fffd6, 22),
    (0x7fffda, 23),
    (0x7fffdb, 23),
    (0x7fffdc, 23),
    (0x7fffdd, 23),
    (0x7fffde, 23),
    (0xffffeb, 24),
    (0x7fffdf, 23),
    (0xffffec, 24),
    (0xffffed, 24),
    (0x3fffd7, 22),
    (0x7fffe0, 23),
    (0xffffee, 24),
    (0x7fffe1, 23),
    (0x7fffe2, 23),
    (0x7fffe3, 23),
    (0x7fffe4, 23),
    (0x1fffdc, 21),
    (0x3fffd8, 22),
    (0x7fffe5, 23),
    (0x3fffd9, 22),
    (0x7fffe6, 23),
    (0x7fffe7, 23),
    (0xffffef, 24),
    (0x3fffda, 22),
    (0x1fffdd, 21),
    (0xfffe9, 20),
    (0x3fffdb, 22),
    (0x3fffdc, 22),
    (0x7fffe8, 23),
    (0x7fffe9, 23),
    (0x1fffde, 21),
    (0x7fffea, 23),
    (0x3fffdd, 22),
    (0x3fffde, 22),
    (0xfffff0, 24),
    (0x1fffdf, 21),
    (0x3fffdf, 22),
    (0x7fffeb, 23),
    (0x7fffec, 23),
    (0x1fffe0, 21),
    (0x1fffe1, 21),
    (0x3fffe0, 22),
    (0x1fffe2, 21),
    (0x7fffed, 23),
    (0x3fffe1, 22),
    (0x7fffee, 23),
    (0x7fffef, 23),
    (0xfffea, 20),
    (0x3fffe2, 22),
    (0x3fffe3, 22),
    (0x3fffe4, 22),
    (0x7ffff0, 23),
    (0x3fffe5, 22),
    (0x3fffe6, 22),
    (0x7ffff1, 23),
    (0x3ffffe0, 26),
    (0x3ffffe1, 26),
    (0xfffeb, 20),
    (0x7fff1, 19),
    (0x3fffe7, 22),
    (0x7ffff2, 23),
    (0x3fffe8, 22),
    (0x1ffffec, 25),
    (0x3ffffe2, 26),
    (0x3ffffe3, 26),
    (0x3ffffe4, 26),
    (0x7ffffde, 27),
    (0x7ffffdf, 27),
    (0x3ffffe5, 26),
    (0xfffff1, 24),
    (0x1ffffed, 25),
    (0x7fff2, 19),
    (0x1fffe3, 21),
    (0x3ffffe6, 26),
    (0x7ffffe0, 27),
    (0x7ffffe1, 27),
    (0x3ffffe7, 26),
    (0x7ffffe2, 27),
    (0xfffff2, 24),
    (0x1fffe4, 21),
    (0x1fffe5, 21),
    (0x3ffffe8, 26),
    (0x3ffffe9, 26),
    (0xffffffd, 28),
    (0x7ffffe3, 27),
    (0x7ffffe4, 27),
    (0x7ffffe5, 27),
    (0xfffec, 20),
    (0xfffff3, 24),
    (0xfffed, 20),
    (0x1fffe6, 21),
    (0x3fffe9, 22),
    (0x1fffe7, 21),
    (0x1fffe8, 21),
    (0x7ffff3, 23),
    (0x3fffea, 22),
    (0x3fffeb, 22),
    (0x1ffffee, 25),
    (0x1ffffef, 25),
    (0xfffff4, 24),
    (0xfffff5, 24),
    (0x3ffffea, 26),
    (0x7ffff4, 23),
    (0x3ffffeb, 26),
    (0x7ffffe6, 27),
    (0x3ffffec, 26),
    (0x3ffffed, 26),
    (0x7ffffe7, 27),
    (0x7ffffe8, 27),
    (0x7ffffe9, 27),
    (0x7ffffea, 27),
    (0x7ffffeb, 27),
    (0xffffffe, 28),
    (0x7ffffec, 27),
    (0x7ffffed, 27),
    (0x7ffffee, 27),
    (0x7ffffef, 27),
    (0x7fffff0, 27),
    (0x3ffffee, 26),
];

/// One decoded header: (name, value).
pub type Field = (String, String);

/// The decoding side of one connection's HPACK context.
pub struct Decoder {
    /// Newest entry first, as HPACK indexes them.
    dynamic: VecDeque<Field>,
    size: usize,
    max_size: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            dynamic: VecDeque::new(),
            size: 0,
            // SETTINGS_HEADER_TABLE_SIZE's default; the client never changes it.
            max_size: 4096,
        }
    }
}

impl Decoder {
    /// Decodes one complete header block (HEADERS plus its CONTINUATIONs).
    pub fn decode(&mut self, mut b: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut out = Vec::new();
        while let Some(&first) = b.first() {
            if first & 0x80 != 0 {
                // Indexed field.
                let index = integer(&mut b, 7)?;
                out.push(self.entry(index)?);
            } else if first & 0x40 != 0 {
                // Literal with incremental indexing.
                let field = self.literal(&mut b, 6)?;
                self.insert(field.clone());
                out.push(field);
            } else if first & 0x20 != 0 {
                // Dynamic table size update (the peer may only shrink it).
                self.max_size = integer(&mut b, 5)?.min(4096);
                self.evict();
            } else {
                // Literal without indexing (0000) or never indexed (0001).
                out.push(self.literal(&mut b, 4)?);
            }
        }
        Ok(out)
    }

    fn entry(&self, index: usize) -> Result<Field, HpackError> {
        match index {
            1..=61 => {
                let (n, v) = STATIC[index - 1];
                Ok((n.to_string(), v.to_string()))
            }
            _ => index
                .checked_sub(62)
                .and_then(|i| self.dynamic.get(i))
                .cloned()
                .ok_or(HpackError::Index(index)),
        }
    }

    fn literal(&self, b: &mut &[u8], prefix: u8) -> Result<Field, HpackError> {
        let index = integer(b, prefix)?;
        let name = if index == 0 {
            string(b)?
        } else {
            self.entry(index)?.0
        };
        Ok((name, string(b)?))
    }

    fn insert(&mut self, field: Field) {
        self.size += field.0.len() + field.1.len() + 32;
        self.dynamic.push_front(field);
        self.evict();
    }

    fn evict(&mut self) {
        while self.size > self.max_size {
            match self.dynamic.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => self.size = 0,
            }
        }
    }
}

/// An HPACK integer with an N-bit prefix (RFC 7541 5.1).
fn integer(b: &mut &[u8], prefix: u8) -> Result<usize, HpackError> {
    let (&first, rest) = b.split_first().ok_or(HpackError::Truncated)?;
    *b = rest;
    let max = (1usize << prefix) - 1;
    let mut value = first as usize & max;
    if value < max {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let (&byte, rest) = b.split_first().ok_or(HpackError::Truncated)?;
        *b = rest;
        value += ((byte & 0x7f) as usize) << shift;
        if value > MAX_STRING * 4 {
            return Err(HpackError::TooLarge);
        }
        if byte & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
        if shift > 28 {
            return Err(HpackError::TooLarge);
        }
    }
}

/// An HPACK string literal, Huffman-coded or not (RFC 7541 5.2).
fn string(b: &mut &[u8]) -> Result<String, HpackError> {
    let huffman = b.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(b, 7)?;
    if len > MAX_STRING {
        return Err(HpackError::TooLarge);
    }
    if b.len() < len {
        return Err(HpackError::Truncated);
    }
    let (raw, rest) = b.split_at(len);
    *b = rest;
    let bytes = if huffman {
        huffman_decode(raw)?
    } else {
        raw.to_vec()
    };
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Decodes a Huffman-coded string bit by bit. Slow per byte, but the
/// strings here are a few dozen bytes and only on the answer's path.
fn huffman_decode(raw: &[u8]) -> Result<Vec<u8>, HpackError> {
    let mut out = Vec::with_capacity(raw.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0u8);
    for &byte in raw {
        for bit in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> bit) & 1);
            len += 1;
            if len >= 5 {
                if let Some(sym) = HUFFMAN.iter().position(|&(c, l)| l == len && c == code) {
                    out.push(sym as u8);
                    (code, len) = (0, 0);
                } else if len >= 30 {
                    // Longer than any code but EOS, which must not appear.
                    return Err(HpackError::Huffman);
                }
            }
        }
    }
    // Padding: fewer than 8 bits, all ones (the start of EOS).
    if len > 7 || code != (1 << len) - 1 {
        return Err(HpackError::Huffman);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7541 C.4.1: a request with Huffman-coded strings.
    #[test]
    fn decodes_the_rfc_example() {
        let block = [
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
            0x90, 0xf4, 0xff,
        ];
        let mut d = Decoder::default();
        let fields = d.decode(&block).unwrap();
        let want = [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ];
        assert_eq!(fields.len(), want.len());
        for ((n, v), (wn, wv)) in fields.iter().zip(want) {
            assert_eq!((n.as_str(), v.as_str()), (wn, wv));
        }
        // The literal went into the dynamic table: index 62 now names it.
        assert_eq!(d.decode(&[0xbe]).unwrap()[0].1, "www.example.com");
    }

    #[test]
    fn malformed_blocks_are_errors_never_panics() {
        let mut seed = 0x9E3779B97F4A7C15u64;
        for _ in 0..5000 {
            let len = (seed % 40) as usize;
            let mut block = Vec::with_capacity(len);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                block.push(seed as u8);
            }
            let _ = Decoder::default().decode(&block);
        }
        assert_eq!(
            Decoder::default().decode(&[0xff, 0x80]),
            Err(HpackError::Truncated)
        );
        assert_eq!(
            Decoder::default().decode(&[0xbe]),
            Err(HpackError::Index(62))
        );
    }
}
