//! The `Node/Report` gRPC call over the node's unix socket, spoken by hand:
//! HTTP/2 with prior knowledge, one stream, blocking std I/O.
//!
//! Why not tonic: fail2ban's action thread waits for `banmesh report` on
//! every ban, and most of that wait was the client's own start-up (a tokio
//! runtime, tower/hyper/h2 set up, five round trips of writes and reads
//! before the request left). This client writes the connection preface,
//! its SETTINGS, the request's HEADERS and DATA in one `write`, and reads
//! the answer; it needs no library beyond std (and `thiserror`), so the
//! small `banmesh-report` binary can use it without linking the rest.
//!
//! The node is unchanged: it serves this call with the same gRPC service
//! as any other client, so its checks (a bad IP or an oversized field is
//! `InvalidArgument` and changes nothing) and its promise (the answer
//! comes only after the outbox fsync) are the ones it always gave.
//!
//! Success is a `grpc-status: 0` in the trailers with the answer's message
//! before them; anything else is an error naming what the node said.
use std::{
    io::{BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use thiserror::Error;

use super::hpack::{Decoder, HpackError};

/// The call's gRPC path.
const PATH: &str = "/banmesh.v1.Node/Report";
/// The HTTP/2 client connection preface (RFC 9113 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// SETTINGS_MAX_FRAME_SIZE's default: neither side raises it here.
const MAX_FRAME: usize = 16_384;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// HTTP/2's REFUSED_STREAM: the stream was not processed at all (RFC 9113 8.7).
const REFUSED_STREAM: u32 = 0x7;

/// Longest wait for the node to take the request or answer: its answer
/// follows one fsync, so a node this slow is hung (stopped, or its disk
/// is); fail2ban's action thread waits for this call and would otherwise
/// wait until fail2ban's own action timeout (60 s).
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// gRPC's `INVALID_ARGUMENT`: the node refused the ban's fields.
pub const INVALID_ARGUMENT: u32 = 3;

/// A ban's four fields as `banmesh report` got them (checked by the node).
#[derive(Debug, Clone, Copy)]
pub struct BanFields<'a> {
    /// fail2ban's jail name.
    pub jail: &'a str,
    /// fail2ban's protocol.
    pub protocol: &'a str,
    /// fail2ban's port or ports.
    pub port: &'a str,
    /// The banned address.
    pub ip: &'a str,
}

/// Why the call failed.
#[derive(Debug, Error)]
pub enum WireError {
    /// No connection could be made: nothing was sent, so the node surely
    /// does not have the ban (the caller may spool it).
    #[error("{0}")]
    Connect(std::io::Error),
    /// The node closed the connection or refused the stream before taking
    /// the request (HTTP/2 GOAWAY naming no stream, or REFUSED_STREAM: it
    /// was stopping): it surely does not have the ban, so the caller may
    /// spool it, as when no connection could be made.
    #[error("the node did not take the request: {0}")]
    NotTaken(String),
    /// The ban's fields do not fit one HTTP/2 frame; nothing was sent.
    #[error("the ban's fields are too long ({0} bytes)")]
    TooLarge(usize),
    /// Reading or writing the socket failed after connecting: the node may
    /// or may not have stored the ban.
    #[error("{0}")]
    Io(std::io::Error),
    /// The node answered with a gRPC error.
    #[error("{message}")]
    Status {
        /// The gRPC status code (3: invalid argument, 8: outbox full).
        code: u32,
        /// The node's message.
        message: String,
    },
    /// The node's answer was not valid HTTP/2 or gRPC.
    #[error("bad answer from the node: {0}")]
    Protocol(String),
}

impl From<HpackError> for WireError {
    fn from(e: HpackError) -> Self {
        WireError::Protocol(e.to_string())
    }
}

/// Hands `ban` to the node on `socket`; returns its outbox sequence number
/// once the node has it on disk.
pub fn report(socket: &Path, ban: BanFields<'_>) -> Result<u64, WireError> {
    let request = request(ban)?;
    let stream = UnixStream::connect(socket).map_err(WireError::Connect)?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_read_timeout(Some(TIMEOUT)))
        .map_err(WireError::Connect)?;
    (&stream).write_all(&request).map_err(WireError::Io)?;
    read_answer(&stream)
}

/// The whole request: preface, empty SETTINGS, HEADERS, DATA (END_STREAM).
pub fn request(ban: BanFields<'_>) -> Result<Vec<u8>, WireError> {
    let mut message = Vec::with_capacity(64);
    for (field, value) in [(1, ban.jail), (2, ban.protocol), (3, ban.port), (4, ban.ip)] {
        if !value.is_empty() {
            message.push((field << 3) | 2);
            varint(&mut message, value.len() as u64);
            message.extend_from_slice(value.as_bytes());
        }
    }
    // The gRPC length-prefixed message: uncompressed, then its length.
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLarge(message.len()));
    }
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (static)
    literal(&mut block, 4, PATH); // :path
    literal(&mut block, 1, "localhost"); // :authority
    literal(&mut block, 31, "application/grpc"); // content-type
    block.extend_from_slice(&[0x00, 2, b't', b'e', 8]); // te: trailers
    block.extend_from_slice(b"trailers");

    let mut out = Vec::with_capacity(PREFACE.len() + 27 + block.len() + body.len());
    out.extend_from_slice(PREFACE);
    frame(&mut out, SETTINGS, 0, 0, &[]);
    frame(&mut out, HEADERS, END_HEADERS, 1, &block);
    frame(&mut out, DATA, END_STREAM, 1, &body);
    Ok(out)
}

/// A literal header without indexing, its name from the static table.
fn literal(block: &mut Vec<u8>, name_index: u8, value: &str) {
    if name_index < 15 {
        block.push(name_index);
    } else {
        block.extend_from_slice(&[0x0f, name_index - 15]);
    }
    // Short values only (< 127 bytes): one length byte, no Huffman.
    block.push(value.len() as u8);
    block.extend_from_slice(value.as_bytes());
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// What stream 1 carried: its header blocks' fields and its body.
#[derive(Default)]
struct Answer {
    status: Option<String>,
    grpc_status: Option<String>,
    grpc_message: Option<String>,
    body: Vec<u8>,
}

/// One call's reading side, fed frame by frame by a blocking
/// ([`report`]) or an async (`report::report`) reader.
#[derive(Default)]
pub struct Call {
    hpack: Decoder,
    answer: Answer,
    block: Vec<u8>,
}

/// What the reader does after a frame.
#[derive(Debug)]
pub enum Step {
    /// Read on; first write these bytes (a SETTINGS or PING ack) if any.
    More(Option<Vec<u8>>),
    /// Stream 1 ended: the node's answer, as its sequence number or error.
    Done(Result<u64, WireError>),
}

impl Call {
    /// Takes one frame (its type, flags, stream and payload).
    pub fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        id: u32,
        payload: &[u8],
    ) -> Result<Step, WireError> {
        let mut reply = None;
        match (kind, id) {
            (SETTINGS, 0) if flags & ACK == 0 => {
                let mut ack = Vec::with_capacity(9);
                frame(&mut ack, SETTINGS, ACK, 0, &[]);
                reply = Some(ack);
            }
            (PING, 0) if flags & ACK == 0 => {
                let mut pong = Vec::with_capacity(17);
                frame(&mut pong, PING, ACK, 0, payload);
                reply = Some(pong);
            }
            (GOAWAY, 0) => {
                let last = payload.get(..4).map_or(0, |b| {
                    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff
                });
                if last < 1 {
                    return Err(WireError::NotTaken(format!(
                        "it closed the connection ({})",
                        String::from_utf8_lossy(payload.get(8..).unwrap_or_default())
                    )));
                }
            }
            (PUSH_PROMISE, _) => return Err(WireError::Protocol("unexpected push".into())),
            (RST_STREAM, 1) => {
                let code = payload
                    .get(..4)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                if code == REFUSED_STREAM {
                    return Err(WireError::NotTaken("it refused the stream".into()));
                }
                return Err(WireError::Protocol(format!(
                    "the node reset the call (HTTP/2 error {code})"
                )));
            }
            (HEADERS, 1) | (CONTINUATION, 1) => {
                let fragment = if kind == HEADERS {
                    self.block.clear();
                    unpad(flags, payload, true)?
                } else {
                    payload
                };
                self.block.extend_from_slice(fragment);
                if flags & END_HEADERS != 0 {
                    for (name, value) in self.hpack.decode(&self.block)? {
                        let answer = &mut self.answer;
                        match name.as_str() {
                            ":status" => answer.status = Some(value),
                            "grpc-status" => answer.grpc_status = Some(value),
                            "grpc-message" => answer.grpc_message = Some(percent_decode(&value)),
                            _ => {}
                        }
                    }
                }
            }
            (DATA, 1) => self
                .answer
                .body
                .extend_from_slice(unpad(flags, payload, false)?),
            _ => {} // WINDOW_UPDATE, acks, other streams: nothing to do.
        }
        // END_STREAM on HEADERS counts once the block is complete; a block
        // with `grpc-status` is the trailers, the stream's last (which
        // covers a CONTINUATION whose HEADERS frame carried END_STREAM).
        let ended = match kind {
            DATA => flags & END_STREAM != 0,
            HEADERS | CONTINUATION => {
                flags & END_HEADERS != 0
                    && (flags & END_STREAM != 0 || self.answer.grpc_status.is_some())
            }
            _ => false,
        };
        Ok(if id == 1 && ended {
            Step::Done(decode_seq(&self.answer))
        } else {
            Step::More(reply)
        })
    }
}

/// Reads frames until stream 1 ends, answering the connection's SETTINGS
/// and PINGs on the way.
fn read_answer(stream: &UnixStream) -> Result<u64, WireError> {
    let mut reader = BufReader::with_capacity(MAX_FRAME + 9, stream);
    let mut call = Call::default();
    loop {
        let mut head = [0u8; 9];
        reader.read_exact(&mut head).map_err(eof)?;
        let (kind, flags, id, len) = frame_head(&head)?;
        let mut payload = vec![0u8; len];
        reader.read_exact(&mut payload).map_err(WireError::Io)?;
        match call.frame(kind, flags, id, &payload)? {
            Step::More(Some(reply)) => (&*stream).write_all(&reply).map_err(WireError::Io)?,
            Step::More(None) => {}
            Step::Done(result) => return result,
        }
    }
}

/// A read error; the node closing before its answer is named as such.
pub fn eof(e: std::io::Error) -> WireError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        WireError::Protocol("the node closed the connection before answering".into())
    } else {
        WireError::Io(e)
    }
}

/// A frame header: (type, flags, stream, payload length).
pub fn frame_head(head: &[u8; 9]) -> Result<(u8, u8, u32, usize), WireError> {
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    if len > MAX_FRAME {
        return Err(WireError::Protocol(format!("frame of {len} bytes")));
    }
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Ok((head[3], head[4], id, len))
}

/// A HEADERS or DATA payload without its padding (and priority fields).
fn unpad(flags: u8, payload: &[u8], headers: bool) -> Result<&[u8], WireError> {
    let bad = || WireError::Protocol("bad padding".into());
    let (pad, mut start) = if flags & PADDED != 0 {
        (*payload.first().ok_or_else(bad)? as usize, 1)
    } else {
        (0, 0)
    };
    if headers && flags & PRIORITY != 0 {
        start += 5;
    }
    let end = payload.len().checked_sub(pad).ok_or_else(bad)?;
    payload.get(start..end).ok_or_else(bad)
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2, "Responses").
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| {
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        });
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The sequence number from a successful answer, or the node's error.
fn decode_seq(answer: &Answer) -> Result<u64, WireError> {
    if answer.status.as_deref() != Some("200") {
        return Err(WireError::Protocol(format!(
            "HTTP status {}",
            answer.status.as_deref().unwrap_or("missing")
        )));
    }
    let code: u32 = match answer.grpc_status.as_deref().map(str::parse) {
        Some(Ok(code)) => code,
        _ => return Err(WireError::Protocol("no grpc-status".into())),
    };
    if code != 0 {
        return Err(WireError::Status {
            code,
            message: answer.grpc_message.clone().unwrap_or_default(),
        });
    }
    let bad = |what: &str| WireError::Protocol(what.to_string());
    let message = match answer.body.split_first() {
        Some((0, rest)) if rest.len() >= 4 => {
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            rest.get(4..4 + len).ok_or_else(|| bad("short message"))?
        }
        _ => return Err(bad("no answer message")),
    };
    // LocalReportResponse { uint64 seq = 1; }: skip anything else.
    let mut b = message;
    let mut seq = 0;
    while !b.is_empty() {
        let key = read_varint(&mut b).ok_or_else(|| bad("bad message"))?;
        match (key >> 3, key & 7) {
            (1, 0) => seq = read_varint(&mut b).ok_or_else(|| bad("bad message"))?,
            (_, 0) => drop(read_varint(&mut b).ok_or_else(|| bad("bad message"))?),
            (_, 1) => b = b.get(8..).ok_or_else(|| bad("bad message"))?,
            (_, 5) => b = b.get(4..).ok_or_else(|| bad("bad message"))?,
            (_, 2) => {
                let len = read_varint(&mut b).ok_or_else(|| bad("bad message"))? as usize;
                b = b.get(len..).ok_or_else(|| bad("bad message"))?;
            }
            _ => return Err(bad("bad message")),
        }
    }
    Ok(seq)
}

fn read_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_parts_decode() {
        let mut a = Answer {
            status: Some("200".into()),
            grpc_status: Some("0".into()),
            ..Default::default()
        };
        a.body = vec![0, 0, 0, 0, 2, 0x08, 0x2a];
        assert_eq!(decode_seq(&a).unwrap(), 42);
        a.grpc_status = Some("8".into());
        a.grpc_message = Some(percent_decode("outbox is full%3B is the hub reachable%3F"));
        match decode_seq(&a) {
            Err(WireError::Status { code, message }) => {
                assert_eq!(code, 8);
                assert_eq!(message, "outbox is full; is the hub reachable?");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A node stopping says it never took the request (GOAWAY naming no
    /// stream, or REFUSED_STREAM): the ban may then be spooled. Any other
    /// reset may come after the node stored it.
    #[test]
    fn goaway_before_the_stream_and_refused_stream_mean_not_taken() {
        let goaway = [0, 0, 0, 0, 0, 0, 0, 0, b'b', b'y', b'e'];
        let r = Call::default().frame(GOAWAY, 0, 0, &goaway);
        assert!(matches!(r, Err(WireError::NotTaken(_))), "{r:?}");
        let after = [0, 0, 0, 1, 0, 0, 0, 0];
        assert!(matches!(
            Call::default().frame(GOAWAY, 0, 0, &after),
            Ok(Step::More(None))
        ));
        let refused = REFUSED_STREAM.to_be_bytes();
        let r = Call::default().frame(RST_STREAM, 0, 1, &refused);
        assert!(matches!(r, Err(WireError::NotTaken(_))), "{r:?}");
        let internal = 2u32.to_be_bytes();
        let r = Call::default().frame(RST_STREAM, 0, 1, &internal);
        assert!(matches!(r, Err(WireError::Protocol(_))), "{r:?}");
    }

    #[test]
    fn an_oversized_ban_is_refused_before_connecting() {
        let long = "1".repeat(MAX_FRAME);
        let ban = BanFields {
            jail: "sshd",
            protocol: "tcp",
            port: &long,
            ip: "192.0.2.1",
        };
        assert!(matches!(
            report(Path::new("/nonexistent/sock"), ban),
            Err(WireError::TooLarge(_))
        ));
    }
}
