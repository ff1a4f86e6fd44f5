//! A buffered non-blocking connection: TCP (relay peers, the member's uplink) or Unix (control).
//!
//! Owns reading until `WouldBlock`, writing until `WouldBlock` (partial writes kept), and the
//! per-turn watermark that lets the loop take back output produced by a turn whose database
//! transaction failed to commit.

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

/// One connection and its buffers.
pub struct Conn {
    /// The socket.
    pub stream: Stream,
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
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            mark: 0,
            writable: false,
            closing: false,
        }
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
        };
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

    fn take_frames(&mut self, max: usize, frames: &mut Vec<Vec<u8>>) -> Result<(), FrameError> {
        let mut start = 0;
        while let Decoded::Frame { payload, consumed } = frame::decode(&self.inbuf[start..], max)? {
            frames.push(payload.to_vec());
            start += consumed;
        }
        self.inbuf.drain(..start);
        shrink_if_drained(&mut self.inbuf);
        Ok(())
    }

    /// Queue bytes for writing.
    pub fn queue(&mut self, bytes: &[u8]) {
        self.outbuf.extend_from_slice(bytes);
    }

    /// Output bytes not yet written.
    pub fn pending(&self) -> usize {
        self.outbuf.len()
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
        while written < self.outbuf.len() {
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
        let want = !self.outbuf.is_empty();
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
