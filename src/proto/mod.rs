//! Wire formats, with no I/O: the frame codec and the messages of both sockets.
//!
//! Owns: how bytes become typed messages and back. Every message is MessagePack as written by
//! `rmp_serde::to_vec_named` (structs are maps keyed by field name; enums are externally tagged:
//! a unit variant is its name as a string, any other variant a one-entry map from its name to its
//! content; byte fields are MessagePack `bin`). `docs/PROTOCOL.md` is the prose version and the
//! golden-byte tests below pin it. Must never: open a socket, read a file, or allocate a length a
//! peer sent without checking it against a cap first.

pub mod codes;
pub mod control;
pub mod fast;
pub mod frame;
pub mod relay;

use serde::{de::DeserializeOwned, Serialize};

/// Errors turning a payload into a typed message.
#[derive(Debug)]
pub enum ProtoError {
    /// The payload is not a valid MessagePack encoding of the expected message.
    Decode(rmp_serde::decode::Error),
    /// A message could not be encoded (a bug, not a peer's fault).
    Encode(rmp_serde::encode::Error),
    /// The encoded message would exceed the frame cap.
    TooLarge(usize),
    /// Bytes follow the message in its payload.
    Trailing(usize),
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtoError::Decode(e) => write!(f, "malformed message: {e}"),
            ProtoError::Encode(e) => write!(f, "cannot encode message: {e}"),
            ProtoError::TooLarge(n) => write!(f, "message of {n} bytes exceeds the frame limit"),
            ProtoError::Trailing(n) => write!(f, "malformed message: {n} bytes after its end"),
        }
    }
}

impl std::error::Error for ProtoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProtoError::Decode(e) => Some(e),
            ProtoError::Encode(e) => Some(e),
            ProtoError::TooLarge(_) | ProtoError::Trailing(_) => None,
        }
    }
}

/// Encode a message as a MessagePack payload (without the frame header).
pub fn to_payload<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    // Room for a chat message's envelope or history record at once: grown from empty, the
    // vector was reallocated about seven times per payload, several payloads per message.
    // Payloads are short-lived (bound into a statement, or framed), so the slack costs nothing.
    let mut v = Vec::with_capacity(512);
    rmp_serde::encode::write_named(&mut v, msg).map_err(ProtoError::Encode)?;
    if v.len() > frame::MAX_FRAME {
        return Err(ProtoError::TooLarge(v.len()));
    }
    Ok(v)
}

/// Encode a message and append it as one frame to `out`: encoded in place after a length
/// placeholder (no payload vector to allocate and copy, on every frame a relay sends); on an
/// error `out` is left as it was.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let start = out.len();
    out.extend_from_slice(&[0; frame::HEADER]);
    if let Err(e) = rmp_serde::encode::write_named(out, msg) {
        out.truncate(start);
        return Err(ProtoError::Encode(e));
    }
    let len = out.len() - start - frame::HEADER;
    if len > frame::MAX_FRAME {
        out.truncate(start);
        return Err(ProtoError::TooLarge(len));
    }
    out[start..start + frame::HEADER].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Decode a payload into a message.
pub fn from_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtoError> {
    rmp_serde::from_slice(payload).map_err(ProtoError::Decode)
}

/// Decode a payload that must hold exactly one message and nothing after it (the relay forwards
/// the bytes of what it routes, so they must be exactly the item). Decoded from the slice (the
/// reader-based decoder copies every string and byte field through `read_to_end` first, a
/// tenth of a relay's CPU per message); its end is found by [`value_len`].
pub fn from_payload_whole<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtoError> {
    let msg: T = rmp_serde::from_slice(payload).map_err(ProtoError::Decode)?;
    match value_len(payload) {
        Some(n) if n == payload.len() => Ok(msg),
        Some(n) => Err(ProtoError::Trailing(payload.len() - n)),
        // The decoder took it, so this cannot happen; refuse rather than forward it.
        None => Err(ProtoError::Decode(rmp_serde::decode::Error::Syntax(
            "not one MessagePack value".into(),
        ))),
    }
}

/// The length of the MessagePack value at the start of `buf`, `None` if it is cut short or
/// uses the reserved marker. Walks markers without recursion (a count of values still to
/// skip), so nesting costs no stack, and every step consumes a byte, so it ends.
pub fn value_len(buf: &[u8]) -> Option<usize> {
    let mut pos = 0usize;
    let mut pending: usize = 1;
    let int = |at: usize, n: usize| -> Option<usize> {
        let b = buf.get(at..at.checked_add(n)?)?;
        Some(b.iter().fold(0usize, |acc, &x| (acc << 8) | usize::from(x)))
    };
    while pending > 0 {
        pending -= 1;
        let m = *buf.get(pos)?;
        pos += 1;
        // (bytes to skip, values to add, length field size and how it counts)
        let (skip, more) = match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * usize::from(m & 0x0f)),
            0x90..=0x9f => (0, usize::from(m & 0x0f)),
            0xa0..=0xbf => (usize::from(m & 0x1f), 0),
            0xc1 => return None,
            // Checked: a 32-bit length plus its header overflows a 32-bit usize.
            0xc4 | 0xd9 => (int(pos, 1)?.checked_add(1)?, 0),
            0xc5 | 0xda => (int(pos, 2)?.checked_add(2)?, 0),
            0xc6 | 0xdb => (int(pos, 4)?.checked_add(4)?, 0),
            0xc7 => (int(pos, 1)?.checked_add(2)?, 0),
            0xc8 => (int(pos, 2)?.checked_add(3)?, 0),
            0xc9 => (int(pos, 4)?.checked_add(5)?, 0),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (2, int(pos, 2)?),
            0xdd => (4, int(pos, 4)?),
            0xde => (2, int(pos, 2)?.checked_mul(2)?),
            0xdf => (4, int(pos, 4)?.checked_mul(2)?),
        };
        pos = pos.checked_add(skip)?;
        if pos > buf.len() {
            return None;
        }
        pending = pending.checked_add(more)?;
        // Each value takes at least a byte: more pending than bytes left is cut short.
        if pending > buf.len() - pos {
            return None;
        }
    }
    Some(pos)
}

/// The first bytes of every canonical `ToRelay::Send` payload (a map of one entry, the variant
/// name as a fixstr): what follows is the routed item's own encoding.
pub const SEND_PREFIX: &[u8] = b"\x81\xa4Send";

/// The first bytes of a `FromRelay::Deliver` payload, before the routed item's encoding.
pub const DELIVER_PREFIX: &[u8] = b"\x81\xa7Deliver";

/// Decode a list of at most `MAX` entries. A list entry can take far more memory than its bytes
/// on the wire (an empty `Peer` is 5 bytes of MessagePack and 56 in memory), so the frame cap
/// alone does not bound what decoding a list allocates; a count cap does.
pub fn bounded_vec<'de, D, T, const MAX: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    struct Bounded<T, const MAX: usize>(std::marker::PhantomData<T>);
    impl<'de, T: serde::Deserialize<'de>, const MAX: usize> serde::de::Visitor<'de>
        for Bounded<T, MAX>
    {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a list of at most {MAX} entries")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX).min(64));
            while let Some(x) = seq.next_element()? {
                if v.len() == MAX {
                    return Err(serde::de::Error::invalid_length(MAX + 1, &self));
                }
                v.push(x);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(Bounded::<T, MAX>(std::marker::PhantomData))
}

/// Most recipients of one `send`.
pub const MAX_RECIPIENTS: usize = 256;

/// Most directory entries in one `Welcome`, `Directory` or `Listing` frame (512 entries with
/// 8192-bit keys, about 1.1 KB each, stay well under the 1 MiB frame cap).
pub const DIRECTORY_CHUNK: usize = 512;

/// Most names in one `Lookup`, and most entries in each list of its `Keys` answer.
pub const LOOKUP_CHUNK: usize = 512;

/// Bytes shown as lowercase hex when formatted, for a log line that may never be written: the
/// message path names every id in its warnings, and formatting one up front cost a message
/// about 460 instructions.
pub struct Hex<'a>(pub &'a [u8]);

impl std::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for b in self.0 {
            use std::fmt::Write;
            f.write_char(DIGITS[(b >> 4) as usize] as char)?;
            f.write_char(DIGITS[(b & 15) as usize] as char)?;
        }
        Ok(())
    }
}

/// Random 16-byte identifiers (message ids, session ids) are shown as 32 lowercase hex digits.
pub fn hex(bytes: &[u8]) -> String {
    Hex(bytes).to_string()
}

/// Parse 32 hex digits into a 16-byte id.
pub fn parse_id(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hi = (chunk[0] as char).to_digit(16)?;
        let lo = (chunk[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// User names: 1 to 32 of `a-z 0-9 . _ -`, starting with a letter or digit (DESIGN, chatctl contract).
pub fn valid_user(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

/// The largest message text, in bytes of UTF-8 (DESIGN: "at most 64 KiB").
pub const MAX_TEXT: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        for ok in ["a", "alice", "0day", "a.b_c-d", &"x".repeat(32)] {
            assert!(valid_user(ok), "{ok}");
        }
        for bad in ["", "Alice", ".a", "-a", "a b", "a/b", "é", &"x".repeat(33)] {
            assert!(!valid_user(bad), "{bad}");
        }
    }

    /// `value_len` finds the end of every kind of value (as `rmp_serde` writes them and in the
    /// wider forms a peer may use), and refuses cut-short input, so `from_payload_whole` can
    /// neither forward trailing bytes nor refuse a valid payload.
    #[test]
    fn value_len_finds_the_end_of_any_value() {
        use relay::{Envelope, KeyPacket, Routed, ToRelay};
        let env = Envelope {
            id: [1; 16],
            from: "alice".into(),
            to: "bob".into(),
            time_ms: u64::MAX,
            session: [2; 16],
            counter: 70_000,
            key_packet: Some(KeyPacket {
                wrapped: vec![3; 300],
                signature: vec![4; 70_000],
            }),
            ciphertext: vec![5; 40],
        };
        let mut values = vec![
            to_payload(&ToRelay::Send(Routed::Message(env))).unwrap(),
            to_payload(&ToRelay::Ping).unwrap(),
            to_payload(&(-1i8, -200i16, -70_000i32, i64::MIN, 1.5f32, 2.5f64)).unwrap(),
            to_payload(&vec![(); 20]).unwrap(),
            to_payload(&"s".repeat(300)).unwrap(),
            to_payload(&"t".repeat(70_000)).unwrap(),
            to_payload(
                &(0..20)
                    .map(|i| (i, i))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )
            .unwrap(),
        ];
        // Forms rmp_serde does not write: array16/32, map16/32, ext of each size, true/false.
        values.push(vec![0xdc, 0, 2, 0xc3, 0xc2]);
        values.push(vec![0xdd, 0, 0, 0, 1, 0x01]);
        values.push(vec![0xde, 0, 1, 0xa1, b'k', 0xc0]);
        values.push(vec![0xdf, 0, 0, 0, 1, 0x01, 0x02]);
        values.push(vec![0xd4, 1, 9]);
        values.push(vec![0xd8, 1].into_iter().chain([0; 16]).collect());
        values.push(vec![0xc7, 2, 1, 7, 7]);
        values.push(vec![0xc8, 0, 1, 1, 7]);
        values.push(vec![0xc9, 0, 0, 0, 1, 1, 7]);
        for v in &values {
            assert_eq!(value_len(v), Some(v.len()), "{:02x?}", &v[..v.len().min(8)]);
            let mut longer = v.clone();
            longer.extend_from_slice(&[0xc0, 0xc0]);
            assert_eq!(value_len(&longer), Some(v.len()));
            for cut in 0..v.len() {
                assert_eq!(value_len(&v[..cut]), None, "cut at {cut}");
            }
        }
        assert_eq!(value_len(&[0xc1]), None, "the reserved marker");
        // A count far beyond the bytes present fails at once.
        assert_eq!(value_len(&[0xdd, 0xff, 0xff, 0xff, 0xff]), None);

        let ping = to_payload(&ToRelay::Ping).unwrap();
        assert!(from_payload_whole::<ToRelay>(&ping).is_ok());
        let mut trailing = ping.clone();
        trailing.push(0);
        assert!(matches!(
            from_payload_whole::<ToRelay>(&trailing),
            Err(ProtoError::Trailing(1))
        ));
    }

    #[test]
    fn hex_roundtrip() {
        let id = [0xab; 16];
        assert_eq!(parse_id(&hex(&id)), Some(id));
        assert_eq!(hex(&[0x01, 0xfe, 0x00]), "01fe00");
        assert_eq!(format!("[{}]", Hex(&[0x0a, 0xb0])), "[0ab0]");
        assert_eq!(parse_id("zz"), None);
        assert_eq!(parse_id(&"g".repeat(32)), None);
    }
}
