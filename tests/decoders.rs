//! Decoders of bytes from elsewhere never panic: protobuf messages from the
//! wire (and their conversion into domain types), outbox records, and
//! fail2ban's pickles. Random and mutated inputs, many thousands of them.
use banmesh::{ban, fail2ban::pickle, node::outbox, proto};
use prost::Message;

/// A small deterministic generator, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (self.next() % max as u64) as usize;
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// A valid encoding with a few bytes flipped, cut or inserted.
    fn mutate(&mut self, mut b: Vec<u8>) -> Vec<u8> {
        for _ in 0..(self.next() % 4 + 1) {
            match self.next() % 3 {
                0 if !b.is_empty() => {
                    let i = (self.next() as usize) % b.len();
                    b[i] ^= 1 << (self.next() % 8);
                }
                1 if !b.is_empty() => {
                    let keep = (self.next() as usize) % b.len();
                    b.truncate(keep);
                }
                _ => {
                    let i = if b.is_empty() {
                        0
                    } else {
                        (self.next() as usize) % b.len()
                    };
                    b.insert(i, self.next() as u8);
                }
            }
        }
        b
    }
}

fn sample_event() -> proto::Event {
    proto::Event {
        id: 42,
        kind: proto::EventKind::Ban as i32,
        ban: Some(proto::Ban {
            jail: "sshd".into(),
            protocol: "tcp".into(),
            port: "22".into(),
            ip: "192.0.2.1".into(),
        }),
        added_by: "web-1".into(),
        created_ms: 1_764_000_000_000,
        lifts_event_id: 0,
        ends_ms: 1_764_000_900_000,
        rung: 1,
        extends_event_id: 0,
        reason: String::new(),
    }
}

#[test]
fn wire_messages_never_panic() {
    let mut rng = Rng(0x9E3779B97F4A7C15);
    let event = sample_event().encode_to_vec();
    let report = proto::Report {
        seq: 7,
        ban: sample_event().ban,
        reported_at_ms: 1,
        spool: String::new(),
    }
    .encode_to_vec();
    for round in 0..20_000 {
        let input = match round % 3 {
            0 => rng.bytes(256),
            1 => rng.mutate(event.clone()),
            _ => rng.mutate(report.clone()),
        };
        if let Ok(e) = proto::Event::decode(input.as_slice()) {
            // Whatever decodes is checked like any input, without panicking.
            let _ = ban::Event::from_proto(&e);
        }
        if let Ok(r) = proto::Report::decode(input.as_slice()) {
            let _ = ban::Ban::from_proto(r.ban.as_ref());
        }
        let _ = proto::StatusBatch::decode(input.as_slice());
        let _ = proto::EnrollRequest::decode(input.as_slice());
    }
}

#[test]
fn outbox_records_never_panic() {
    let mut rng = Rng(0xD1B54A32D192ED03);
    let good = outbox::encode(&proto::Report {
        seq: 1,
        ban: sample_event().ban,
        reported_at_ms: 2,
        spool: "x.ban".into(),
    });
    for round in 0..20_000 {
        let input = if round % 2 == 0 {
            rng.bytes(512)
        } else {
            rng.mutate([good.clone(), good.clone()].concat())
        };
        let (records, skipped) = outbox::decode_records(&input);
        // Every byte is either in a record or counted as skipped.
        let kept: usize = records.iter().map(|r| outbox::encode(r).len()).sum();
        assert_eq!(kept + skipped, input.len());
    }
}

#[test]
fn fail2ban_answers_never_panic() {
    let mut rng = Rng(0x94D049BB133111EB);
    let answer = b"\x80\x05\x95\x17\x00\x00\x00\x00\x00\x00\x00K\x00]\x94(]\x94]\x94\x8c\x06shared\x94ae\x86\x94.".to_vec();
    for round in 0..20_000 {
        let input = if round % 2 == 0 {
            rng.bytes(128)
        } else {
            rng.mutate(answer.clone())
        };
        let _ = pickle::decode(&input);
    }
}
