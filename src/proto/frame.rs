//! Length-prefixed frames: a big-endian `u32` length, then that many bytes of MessagePack.
//!
//! This module owns the framing of both sockets (relay TCP and control Unix socket). It checks a
//! peer-sent length against the cap *before* allocating anything, and its decoder is a pure
//! function over `&[u8]` so the event loop, the blocking client and the fuzzers share it.

use std::io::{self, Read, Write};

/// The largest payload a frame may carry (DESIGN "Bounded everything": 1 MiB).
pub const MAX_FRAME: usize = 1 << 20;

/// Size of the length prefix.
pub const HEADER: usize = 4;

/// What the decoder found at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// Not a whole frame yet; read more bytes.
    NeedMore,
    /// One whole frame: its payload and how many bytes of the buffer it used.
    Frame {
        /// The MessagePack payload.
        payload: &'a [u8],
        /// Header plus payload length, to drop from the buffer.
        consumed: usize,
    },
}

/// Framing errors. Transport errors (`Io`) stay apart from protocol errors.
#[derive(Debug)]
pub enum FrameError {
    /// The peer announced a payload larger than the cap.
    TooLarge {
        /// Announced length.
        len: usize,
        /// The cap in force.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    Truncated,
    /// Reading or writing the underlying stream failed.
    Io(io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the {max}-byte limit")
            }
            FrameError::Truncated => write!(f, "connection closed in the middle of a frame"),
            FrameError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for FrameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FrameError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Decode the frame at the front of `buf`, refusing any announced length above `max`.
pub fn decode(buf: &[u8], max: usize) -> Result<Decoded<'_>, FrameError> {
    if buf.len() < HEADER {
        return Ok(Decoded::NeedMore);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if buf.len() - HEADER < len {
        return Ok(Decoded::NeedMore);
    }
    Ok(Decoded::Frame {
        payload: &buf[HEADER..HEADER + len],
        consumed: HEADER + len,
    })
}

/// Append one frame holding `payload` to `out`.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max: MAX_FRAME,
        });
    }
    out.reserve(HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Append one frame whose payload is `head` then `body` (a relay's `Deliver`: a fixed prefix,
/// then the routed item's bytes as they came), without joining them first.
pub fn encode_parts(head: &[u8], body: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    let len = head.len() + body.len();
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    out.reserve(HEADER + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.extend_from_slice(head);
    out.extend_from_slice(body);
    Ok(())
}

/// Blocking read of one frame. `Ok(None)` is a clean end of stream between frames.
pub fn read_from(r: &mut impl Read, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(Some(payload))
}

/// Blocking write of one frame.
pub fn write_to(w: &mut impl Write, payload: &[u8]) -> Result<(), FrameError> {
    let mut buf = Vec::new();
    encode(payload, &mut buf)?;
    w.write_all(&buf).map_err(FrameError::Io)?;
    w.flush().map_err(FrameError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_more_until_whole() {
        let mut buf = Vec::new();
        encode(b"hello", &mut buf).unwrap();
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut], MAX_FRAME).unwrap(), Decoded::NeedMore);
        }
        assert_eq!(
            decode(&buf, MAX_FRAME).unwrap(),
            Decoded::Frame {
                payload: b"hello",
                consumed: 9
            }
        );
    }

    #[test]
    fn big_endian_prefix() {
        let mut buf = Vec::new();
        encode(&[7u8; 258], &mut buf).unwrap();
        assert_eq!(&buf[..4], &[0, 0, 1, 2]);
    }

    #[test]
    fn over_cap_refused_before_payload_arrives() {
        let buf = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            decode(&buf, MAX_FRAME),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn blocking_roundtrip_and_truncation() {
        let mut buf = Vec::new();
        write_to(&mut buf, b"abc").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_from(&mut r, MAX_FRAME).unwrap().unwrap(), b"abc");
        assert!(read_from(&mut r, MAX_FRAME).unwrap().is_none());
        let mut short = &buf[..5];
        assert!(matches!(
            read_from(&mut short, MAX_FRAME),
            Err(FrameError::Truncated)
        ));
    }
}
