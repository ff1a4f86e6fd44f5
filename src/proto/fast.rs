//! The frames of the message path, decoded without serde: a `Send` of a sealed message or of a
//! receipt, and an `Ack`, in the encoding [`to_payload`](super::to_payload) writes (its markers,
//! field names and field order, with 16-byte ids as `bin8`), taking any width of a string's,
//! a byte field's or an unsigned integer's length or value form.
//! Generic serde decoding was a third of a relay's instructions per message (matching each
//! field's name through visitors, twice per enum level); these frames are most of what a relay
//! reads.
//!
//! Owns no policy: a payload that differs from those encodings by anything (another field
//! order, an unknown field, a signed integer form, a string where bytes go) is not refused here
//! but handed back as `None`, and the serde decoder, which takes every valid encoding, decides.
//! Must never: give a value for a payload that serde decodes to another value or refuses
//! (tests/decoders.rs checks this on every message and on bytes bent from them, and the
//! `to_relay` fuzz target on whatever it finds).

use super::relay::{Envelope, ItemKey, KeyPacket, Kind, Receipt, Routed, ToRelay};

/// `Message(..)` up to the envelope's fields: a one-entry map from the variant's name to a map
/// of the envelope's eight fields.
const MESSAGE: &[u8] = b"\x81\xa7Message\x88";
/// `Receipt(..)` up to the receipt's six fields.
const RECEIPT: &[u8] = b"\x81\xa7Receipt\x86";
/// `Ack(..)` up to its two fields.
const ACK: &[u8] = b"\x81\xa3Ack\x82";

/// A [`ToRelay`] from `payload` if it is one of this module's encodings and nothing follows it;
/// `None` for anything else, which the caller decodes with serde.
pub fn to_relay(payload: &[u8]) -> Option<ToRelay> {
    let mut c = Cursor { buf: payload };
    let msg = if c.lit(super::SEND_PREFIX) {
        ToRelay::Send(routed_in(&mut c)?)
    } else if c.lit(ACK) {
        ToRelay::Ack(item_key(&mut c)?)
    } else {
        return None;
    };
    c.buf.is_empty().then_some(msg)
}

/// A [`Routed`] message or receipt from `payload` (a queued item as the relay stored it), on
/// the terms of [`to_relay`].
pub fn routed(payload: &[u8]) -> Option<Routed> {
    let mut c = Cursor { buf: payload };
    let r = routed_in(&mut c)?;
    c.buf.is_empty().then_some(r)
}

fn routed_in(c: &mut Cursor<'_>) -> Option<Routed> {
    if c.lit(MESSAGE) {
        Some(Routed::Message(envelope(c)?))
    } else if c.lit(RECEIPT) {
        Some(Routed::Receipt(receipt(c)?))
    } else {
        None
    }
}

fn envelope(c: &mut Cursor<'_>) -> Option<Envelope> {
    // Fields are evaluated in the order written, which is the order on the wire.
    Some(Envelope {
        id: c.field(b"\xa2id")?.id()?,
        from: c.field(b"\xa4from")?.string()?,
        to: c.field(b"\xa2to")?.string()?,
        time_ms: c.field(b"\xa7time_ms")?.uint()?,
        session: c.field(b"\xa7session")?.id()?,
        counter: c.field(b"\xa7counter")?.uint()?,
        key_packet: if c.field(b"\xaakey_packet")?.lit(b"\xc0") {
            None
        } else if c.lit(b"\x82") {
            Some(KeyPacket {
                wrapped: c.field(b"\xa7wrapped")?.bin()?.to_vec(),
                signature: c.field(b"\xa9signature")?.bin()?.to_vec(),
            })
        } else {
            return None;
        },
        ciphertext: c.field(b"\xaaciphertext")?.bin()?.to_vec(),
    })
}

fn receipt(c: &mut Cursor<'_>) -> Option<Receipt> {
    Some(Receipt {
        id: c.field(b"\xa2id")?.id()?,
        from: c.field(b"\xa4from")?.string()?,
        to: c.field(b"\xa2to")?.string()?,
        session: c.field(b"\xa7session")?.id()?,
        counter: c.field(b"\xa7counter")?.uint()?,
        tag: c.field(b"\xa3tag")?.id()?,
    })
}

fn item_key(c: &mut Cursor<'_>) -> Option<ItemKey> {
    // A unit variant is its name as a string.
    let c = c.field(b"\xa4kind")?;
    let kind = if c.lit(b"\xa7Message") {
        Kind::Message
    } else if c.lit(b"\xa7Receipt") {
        Kind::Receipt
    } else if c.lit(b"\xa5Rekey") {
        Kind::Rekey
    } else {
        return None;
    };
    let id = c.field(b"\xa2id")?.id()?;
    Some(ItemKey { kind, id })
}

/// What is left of the payload. Every step either consumes what it matched or fails; a failed
/// step may leave the cursor anywhere, since the whole decode is then abandoned.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Consume `bytes` if the rest starts with them.
    fn lit(&mut self, bytes: &[u8]) -> bool {
        match self.buf.strip_prefix(bytes) {
            Some(rest) => {
                self.buf = rest;
                true
            }
            None => false,
        }
    }

    /// Consume a field's key (its encoded name), for chaining the value's step.
    fn field(&mut self, key: &[u8]) -> Option<&mut Self> {
        self.lit(key).then_some(self)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    /// A big-endian length or integer of `n` bytes (`n` at most 8).
    fn be(&mut self, n: usize) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        )
    }

    fn len(&mut self, n: usize) -> Option<usize> {
        usize::try_from(self.be(n)?).ok()
    }

    /// An unsigned integer in any of MessagePack's unsigned forms (serde takes each for a
    /// `u64`); a signed form is left to serde.
    fn uint(&mut self) -> Option<u64> {
        let (&m, rest) = self.buf.split_first()?;
        self.buf = rest;
        match m {
            0x00..=0x7f => Some(u64::from(m)),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            _ => None,
        }
    }

    /// A `bin` of any length form.
    fn bin(&mut self) -> Option<&'a [u8]> {
        let (&m, rest) = self.buf.split_first()?;
        self.buf = rest;
        let n = match m {
            0xc4 => self.len(1)?,
            0xc5 => self.len(2)?,
            0xc6 => self.len(4)?,
            _ => return None,
        };
        self.take(n)
    }

    /// A 16-byte id: `bin` of exactly 16 bytes, in its one-byte length form.
    fn id(&mut self) -> Option<[u8; 16]> {
        if !self.lit(b"\xc4\x10") {
            return None;
        }
        self.take(16)?.try_into().ok()
    }

    /// A `str` of any length form holding UTF-8 (serde refuses a `String` that is not).
    fn string(&mut self) -> Option<String> {
        let (&m, rest) = self.buf.split_first()?;
        self.buf = rest;
        let n = match m {
            0xa0..=0xbf => usize::from(m & 0x1f),
            0xd9 => self.len(1)?,
            0xda => self.len(2)?,
            0xdb => self.len(4)?,
            _ => return None,
        };
        std::str::from_utf8(self.take(n)?).ok().map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{from_payload_whole, to_payload};

    fn envelope(key_packet: Option<KeyPacket>) -> Envelope {
        Envelope {
            id: [1; 16],
            from: "alice".into(),
            to: "bøb".into(),
            time_ms: 1_700_000_000_000,
            session: [2; 16],
            counter: 300,
            key_packet,
            ciphertext: vec![5; 40],
        }
    }

    fn messages() -> Vec<ToRelay> {
        vec![
            ToRelay::Send(Routed::Message(envelope(None))),
            ToRelay::Send(Routed::Message(envelope(Some(KeyPacket {
                wrapped: vec![3; 256],
                signature: vec![4; 70_000],
            })))),
            ToRelay::Send(Routed::Receipt(Receipt {
                id: [7; 16],
                from: "bob".into(),
                to: "alice".into(),
                session: [8; 16],
                counter: u64::MAX,
                tag: [9; 16],
            })),
            ToRelay::Ack(ItemKey {
                kind: Kind::Message,
                id: [6; 16],
            }),
            ToRelay::Ack(ItemKey {
                kind: Kind::Receipt,
                id: [6; 16],
            }),
            ToRelay::Ack(ItemKey {
                kind: Kind::Rekey,
                id: [6; 16],
            }),
        ]
    }

    /// What `to_payload` writes for the message path is decoded here, to what serde gives.
    #[test]
    fn the_message_paths_encodings_are_decoded_as_serde_decodes_them() {
        for m in messages() {
            let p = to_payload(&m).unwrap();
            assert_eq!(to_relay(&p).as_ref(), Some(&m), "{m:?}");
            assert_eq!(from_payload_whole::<ToRelay>(&p).unwrap(), m);
        }
    }

    /// Every cut of an encoding, and every encoding with a byte after it, goes to serde (which
    /// refuses them all); so does any other message.
    #[test]
    fn anything_else_is_left_to_serde() {
        for m in messages() {
            let p = to_payload(&m).unwrap();
            for n in 0..p.len() {
                assert_eq!(to_relay(&p[..n]), None, "{m:?} cut at {n}");
            }
            let mut longer = p.clone();
            longer.push(0xc0);
            assert_eq!(to_relay(&longer), None);
        }
        for other in [
            ToRelay::Ping,
            ToRelay::Lookup(vec!["bob".into()]),
            ToRelay::List {
                after: String::new(),
                prefix: "a".into(),
            },
        ] {
            assert_eq!(to_relay(&to_payload(&other).unwrap()), None);
        }
    }

    /// Forms serde takes but this module does not write are handed to serde, not refused or
    /// misread: a signed integer, fields in another order; and a name that is not UTF-8,
    /// which serde refuses.
    #[test]
    fn other_valid_forms_are_handed_to_serde() {
        let m = ToRelay::Send(Routed::Message(envelope(None)));
        let p = to_payload(&m).unwrap();
        // counter 300 is `cd 01 2c`; the same value as a signed 32-bit integer.
        let at = p.windows(3).position(|w| w == b"\xcd\x01\x2c").unwrap();
        let signed = [&p[..at], b"\xd2\x00\x00\x01\x2c", &p[at + 3..]].concat();
        assert_eq!(to_relay(&signed), None);
        assert_eq!(from_payload_whole::<ToRelay>(&signed).unwrap(), m);
        // "alice" as bytes that are not UTF-8: serde refuses, so must this module.
        let at = p.windows(6).position(|w| w == b"\xa5alice").unwrap();
        let bad = [&p[..at], b"\xa5al\xffce", &p[at + 6..]].concat();
        assert_eq!(to_relay(&bad), None);
        assert!(from_payload_whole::<ToRelay>(&bad).is_err());
        // An Ack with its id before its kind.
        let swapped = [
            &b"\x81\xa3Ack\x82\xa2id\xc4\x10"[..],
            &[6; 16],
            b"\xa4kind\xa7Receipt",
        ]
        .concat();
        assert_eq!(to_relay(&swapped), None);
        assert_eq!(
            from_payload_whole::<ToRelay>(&swapped).unwrap(),
            ToRelay::Ack(ItemKey {
                kind: Kind::Receipt,
                id: [6; 16]
            })
        );
    }

    /// Every byte of each encoding replaced by every value, and every byte dropped: wherever
    /// this module gives a value, serde gives the same (a marker or a length read wrongly
    /// shows here; `tests/decoders.rs` bends encodings further, and the fuzz target too).
    #[test]
    fn every_one_byte_change_decodes_as_serde_decodes_it_or_goes_to_serde() {
        // Each length form once, small enough to sweep: str8 and str16 names, bin8 and bin16
        // byte fields (the 32-bit forms are the next test's).
        let small = ToRelay::Send(Routed::Message(envelope(Some(KeyPacket {
            wrapped: vec![3; 3],
            signature: vec![4; 300],
        }))));
        let mut long_name = envelope(None);
        long_name.from = "a".repeat(300);
        let mut all = messages();
        all.retain(|m| to_payload(m).unwrap().len() < 1000);
        all.extend([small, ToRelay::Send(Routed::Message(long_name))]);
        for m in all {
            let p = to_payload(&m).unwrap();
            for at in 0..p.len() {
                sweep(&p, at);
            }
        }
    }

    /// The 32-bit length forms (a str32 name, a bin32 signature): decoded as serde decodes them,
    /// and every byte of their headers swept as above.
    #[test]
    fn the_32_bit_length_forms_decode_as_serde_decodes_them() {
        let mut long_name = envelope(None);
        long_name.from = "a".repeat(70_000);
        for (m, header) in [
            (
                ToRelay::Send(Routed::Message(long_name)),
                &b"\xdb\x00\x01\x11\x70"[..],
            ),
            (messages().swap_remove(1), b"\xc6\x00\x01\x11\x70"),
        ] {
            let p = to_payload(&m).unwrap();
            assert_eq!(to_relay(&p).as_ref(), Some(&m));
            let at = p.windows(5).position(|w| w == header).unwrap();
            for at in at..at + 5 {
                sweep(&p, at);
            }
        }
    }

    /// `p` with the byte at `at` replaced by every value, and dropped: wherever this module
    /// gives a value, serde gives the same.
    fn sweep(p: &[u8], at: usize) {
        let agree = |q: &[u8]| {
            if let Some(m) = to_relay(q) {
                assert_eq!(from_payload_whole::<ToRelay>(q).ok(), Some(m), "byte {at}");
            }
        };
        let mut q = p.to_vec();
        for b in 0..=255u8 {
            q[at] = b;
            agree(&q);
        }
        q.remove(at);
        agree(&q);
    }

    /// A receipt's counter in every integer form MessagePack has, with its bytes all set and
    /// all clear: where this module takes the form, it reads the value serde reads; signed
    /// forms (which serde takes when non-negative, refuses when negative) go to serde.
    #[test]
    fn every_integer_form_decodes_as_serde_decodes_it_or_goes_to_serde() {
        let m = ToRelay::Send(Routed::Receipt(Receipt {
            id: [7; 16],
            from: "bob".into(),
            to: "alice".into(),
            session: [8; 16],
            counter: 5,
            tag: [9; 16],
        }));
        let p = to_payload(&m).unwrap();
        let at = p.windows(8).position(|w| w == b"\xa7counter").unwrap() + 8;
        assert_eq!(p[at], 5, "the counter is a positive fixint");
        let forms = (0x00..=0x7fu8).chain(0xe0..=0xff).map(|b| vec![b]).chain(
            [(0xcc, 1), (0xcd, 2), (0xce, 4), (0xcf, 8)]
                .into_iter()
                .chain([(0xd0, 1), (0xd1, 2), (0xd2, 4), (0xd3, 8)])
                .flat_map(|(marker, n)| {
                    [0x00, 0x01, 0x7f, 0x80, 0xff].map(|b| [&[marker][..], &vec![b; n]].concat())
                }),
        );
        for form in forms {
            let q = [&p[..at], &form, &p[at + 1..]].concat();
            let serde = from_payload_whole::<ToRelay>(&q).ok();
            match to_relay(&q) {
                Some(fast) => assert_eq!(serde, Some(fast), "{form:02x?}"),
                None => assert!(
                    form[0] >= 0xd0 || serde.is_none(),
                    "{form:02x?} left to serde"
                ),
            }
        }
    }

    /// A queued item (a routed message or receipt, as stored) decodes as its `Send` does.
    #[test]
    fn a_stored_item_is_decoded_as_serde_decodes_it() {
        for m in messages() {
            let ToRelay::Send(r) = m else { continue };
            let p = to_payload(&r).unwrap();
            assert_eq!(routed(&p).as_ref(), Some(&r));
            assert_eq!(from_payload_whole::<Routed>(&p).unwrap(), r);
            assert_eq!(routed(&p[..p.len() - 1]), None);
        }
    }
}
