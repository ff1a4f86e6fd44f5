//! A buffered non-blocking connection: TLS over TCP (relay peers, the member's uplink) or plain
//! Unix (control).
//!
//! Owns reading until `WouldBlock`, writing until `WouldBlock` (partial writes kept), the
//! per-turn watermark that lets the loop take back output produced by a turn whose database
//! transaction failed to commit, and driving a rustls connection the way rustls's
//! `tlsserver-mio` does: socket bytes go through `read_tls`/`process_new_packets`, and only
//! plaintext reaches the frame decoder; queued frames stay plaintext in `outbuf` (so a rewind
//! still takes back exactly the turn's frames) until `flush` hands them to TLS. Must never:
//! hand a frame of a TLS connection to anyone before its handshake completed.

use std::io::{self, Read, Write};

use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};

use crate::proto::frame::{self, Decoded, FrameError};

/// Either kind of stream.
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain.
    Unix(UnixStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What one read pass found.
pub struct ReadResult {
    /// Whole frames, in order (also those before an error).
    pub frames: Vec<Vec<u8>>,
    /// The peer closed its end.
    pub eof: bool,
    /// The stream failed or sent a bad frame; close after handling `frames`.
    pub error: Option<FrameError>,
    /// The read budget ran out before `WouldBlock`: read again next turn (readiness is
    /// edge-triggered, so no new event will say so).
    pub more: bool,
    /// The TLS handshake completed in this read: the session's login exporter value
    /// (PROTOCOL.md "Connecting"). Frames of a TLS connection only come with or after it.
    pub secured: Option<Vec<u8>>,
}

/// Bytes read from one connection per turn. Bounds the memory and time one fast peer can take
/// from everyone else before the loop writes, runs timers and serves other connections.
pub const READ_BUDGET: usize = 256 * 1024;

/// A drained buffer keeps its allocation up to this size, so a busy connection does not
/// allocate every turn; a larger one is freed. Idle connections are the relay's bulk (thousands
/// of members doing nothing), and a buffer that once held a burst must not stay that big.
pub const KEEP_BUFFER: usize = 1024;

/// Free `buf`'s allocation if it is empty and bigger than [`KEEP_BUFFER`].
fn shrink_if_drained(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > KEEP_BUFFER {
        *buf = Vec::new();
    }
}

/// Take every whole frame (each capped at `max`) off the front of `inbuf`.
fn take_frames(
    inbuf: &mut Vec<u8>,
    max: usize,
    frames: &mut Vec<Vec<u8>>,
) -> Result<(), FrameError> {
    let mut start = 0;
    while let Decoded::Frame { payload, consumed } = frame::decode(&inbuf[start..], max)? {
        frames.push(payload.to_vec());
        start += consumed;
    }
    inbuf.drain(..start);
    shrink_if_drained(inbuf);
    Ok(())
}

/// One connection and its buffers.
pub struct Conn {
    /// The socket.
    pub stream: Stream,
    /// The TLS session on `stream`, if it is a TLS connection.
    tls: Option<Box<rustls::Connection>>,
    /// The handshake completed and [`ReadResult::secured`] said so.
    secured: bool,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    mark: usize,
    writable: bool,
    /// Close once the output is written.
    pub closing: bool,
}

impl Conn {
    /// Wrap a registered-for-reading stream.
    pub fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            tls: None,
            secured: false,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            mark: 0,
            writable: false,
            closing: false,
        }
    }

    /// Wrap a stream that speaks TLS through `tls`.
    pub fn with_tls(stream: Stream, tls: rustls::Connection) -> Conn {
        let mut c = Conn::new(stream);
        c.tls = Some(Box::new(tls));
        c
    }

    /// Register for reading.
    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(self.stream.source(), token, Interest::READABLE)
    }

    /// Deregister before dropping.
    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(self.stream.source());
    }

    /// Read what is available, up to [`READ_BUDGET`] bytes, and return the whole frames in it
    /// (each capped at `max`).
    pub fn read_frames(&mut self, max: usize) -> ReadResult {
        let mut chunk = [0u8; 16 * 1024];
        let mut r = ReadResult {
            frames: Vec::new(),
            eof: false,
            error: None,
            more: false,
            secured: None,
        };
        if self.tls.is_some() {
            self.read_tls(max, &mut r);
            return r;
        }
        let mut budget = READ_BUDGET;
        loop {
            if budget == 0 {
                r.more = true;
                break;
            }
            let want = chunk.len().min(budget);
            match self.stream.read(&mut chunk[..want]) {
                Ok(0) => {
                    r.eof = true;
                    break;
                }
                Ok(n) => {
                    budget -= n;
                    self.inbuf.extend_from_slice(&chunk[..n]);
                    // Decode as we go so a peer cannot make us buffer more than one frame.
                    if let Err(e) = self.take_frames(max, &mut r.frames) {
                        r.error = Some(e);
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    r.error = Some(FrameError::Io(e));
                    break;
                }
            }
        }
        if r.eof && r.error.is_none() && !self.inbuf.is_empty() {
            r.error = Some(FrameError::Truncated);
        }
        r
    }

    /// [`Conn::read_frames`] through TLS: the budget counts socket bytes.
    fn read_tls(&mut self, max: usize, r: &mut ReadResult) {
        let mut chunk = [0u8; 16 * 1024];
        let mut budget = READ_BUDGET;
        let Some(tls) = self.tls.as_deref_mut() else {
            return;
        };
        loop {
            if budget == 0 {
                r.more = true;
                break;
            }
            let n = match tls.read_tls(&mut self.stream) {
                Ok(0) => {
                    r.eof = true;
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    r.error = Some(FrameError::Io(e));
                    break;
                }
            };
            budget = budget.saturating_sub(n);
            let state = match tls.process_new_packets() {
                Ok(s) => s,
                Err(e) => {
                    // Last gasp: tell the peer why (the alert), then close.
                    let _ = tls.write_tls(&mut self.stream);
                    r.error = Some(FrameError::Io(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("TLS: {e}"),
                    )));
                    break;
                }
            };
            if !self.secured && !tls.is_handshaking() {
                self.secured = true;
                match super::tls::exporter(tls) {
                    Some(v) => r.secured = Some(v),
                    None => {
                        r.error = Some(FrameError::Io(io::Error::other(
                            "TLS: no exporter value after the handshake",
                        )));
                        break;
                    }
                }
            }
            let mut plain = state.plaintext_bytes_to_read();
            while plain > 0 {
                let want = plain.min(chunk.len());
                match tls.reader().read(&mut chunk[..want]) {
                    Ok(0) => break,
                    Ok(k) => {
                        plain -= k;
                        self.inbuf.extend_from_slice(&chunk[..k]);
                    }
                    Err(_) => break,
                }
            }
            // Decode as we go so a peer cannot make us buffer more than one frame.
            if let Err(e) = take_frames(&mut self.inbuf, max, &mut r.frames) {
                r.error = Some(e);
                break;
            }
            if state.peer_has_closed() {
                r.eof = true;
                break;
            }
        }
        if r.eof && r.error.is_none() && !self.inbuf.is_empty() {
            r.error = Some(FrameError::Truncated);
        }
    }

    fn take_frames(&mut self, max: usize, frames: &mut Vec<Vec<u8>>) -> Result<(), FrameError> {
        take_frames(&mut self.inbuf, max, frames)
    }

    /// Queue bytes for writing.
    pub fn queue(&mut self, bytes: &[u8]) {
        self.outbuf.extend_from_slice(bytes);
    }

    /// Output bytes not yet written: the frames queued, plus one while TLS holds records it has
    /// not written yet (rustls caps what it holds at its 64 KiB buffer limit, so this undercounts
    /// by at most that much).
    pub fn pending(&self) -> usize {
        self.outbuf.len() + usize::from(self.tls.as_ref().is_some_and(|t| t.wants_write()))
    }

    /// Remember where this turn's output starts.
    pub fn mark(&mut self) {
        self.mark = self.outbuf.len();
    }

    /// Take back this turn's output.
    pub fn rewind(&mut self) {
        self.outbuf.truncate(self.mark);
    }

    /// Write until done or `WouldBlock`; then read interest, plus write interest while output
    /// remains.
    pub fn flush(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let mut written = 0;
        if let Some(tls) = self.tls.as_deref_mut() {
            loop {
                let mut progress = false;
                if written < self.outbuf.len() {
                    let n = tls.writer().write(&self.outbuf[written..])?;
                    written += n;
                    progress |= n > 0;
                }
                if tls.wants_write() {
                    match tls.write_tls(&mut self.stream) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(_) => progress = true,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                }
                if !progress {
                    break;
                }
            }
        }
        while self.tls.is_none() && written < self.outbuf.len() {
            match self.stream.write(&self.outbuf[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.outbuf.drain(..written);
        shrink_if_drained(&mut self.outbuf);
        self.mark = self.outbuf.len();
        let want = !self.outbuf.is_empty() || self.tls.as_ref().is_some_and(|t| t.wants_write());
        if want != self.writable {
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            registry.reregister(self.stream.source(), token, interest)?;
            self.writable = want;
        }
        Ok(())
    }

    /// Bytes allocated for both buffers (for tests of memory use).
    #[cfg(test)]
    pub fn buffer_capacity(&self) -> usize {
        self.inbuf.capacity() + self.outbuf.capacity()
    }

    /// Register for both directions (an outgoing TCP connect reports completion as writable).
    pub fn want_write(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        self.writable = true;
        registry.reregister(
            self.stream.source(),
            token,
            Interest::READABLE | Interest::WRITABLE,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::Poll;

    /// A burst through a connection leaves no burst-sized buffers behind once it is written and
    /// read: idle connections cost no more than a fresh one.
    #[test]
    fn buffers_shrink_after_they_drain() {
        let poll = Poll::new().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Conn::new(Stream::Unix(a)), Conn::new(Stream::Unix(b)));
        a.register(poll.registry(), Token(1)).unwrap();
        b.register(poll.registry(), Token(2)).unwrap();
        let payload = vec![7u8; 40_000];
        let mut framed = Vec::new();
        frame::encode(&payload, &mut framed).unwrap();
        let mut got = Vec::new();
        for _ in 0..1000 {
            if a.pending() == 0 && got.is_empty() {
                a.queue(&framed);
            }
            a.flush(poll.registry(), Token(1)).unwrap();
            got.extend(b.read_frames(1 << 20).frames);
            if a.pending() == 0 && !got.is_empty() {
                break;
            }
        }
        assert_eq!(got, [payload], "the frame went through");
        assert_eq!(a.pending(), 0);
        assert!(
            a.buffer_capacity() <= 2 * KEEP_BUFFER,
            "sender kept {}",
            a.buffer_capacity()
        );
        assert!(
            b.buffer_capacity() <= 2 * KEEP_BUFFER,
            "receiver kept {}",
            b.buffer_capacity()
        );
    }
}
