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

/// The payloads of the whole frames one read pass found, in order, end to end in one buffer
/// (one allocation per pass, not one per frame).
#[derive(Debug, Default)]
pub struct Frames {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Frames {
    fn push(&mut self, payload: &[u8]) {
        self.bytes.extend_from_slice(payload);
        self.ends.push(self.bytes.len());
    }

    /// Each payload, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter())
            .map(|(a, &b)| &self.bytes[a..b])
    }
}

/// What one read pass found.
pub struct ReadResult {
    /// Whole frames, in order (also those before an error).
    pub frames: Frames,
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

/// How far one read pass goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadUntil {
    /// Until the socket says `WouldBlock` (or the budget runs out): for a connection read
    /// without a fresh event (budget carried over, a queue that ran out, backpressure lifted)
    /// or whose event says the peer hung up, where only EOF itself ends the pass.
    WouldBlock,
    /// Also stop after a read that returned less than it asked for: the kernel had no more
    /// queued (TCP and Unix stream sockets copy until the queue is empty), and readiness is
    /// edge-triggered, so anything that arrives after that read raises a new event. Saves the
    /// `recv` that would only say `EAGAIN`, one of four syscalls per message in a ping-pong.
    /// Only for a readiness event that is not read-closed: a FIN that came before the event
    /// raises no new one, so such an event reads on until EOF (nginx's `EPOLLRDHUP` rule).
    ShortRead,
}

impl ReadUntil {
    /// How far to read a connection that `ev` says is ready. Short reads end a pass on Linux
    /// only, where mio is epoll (DECISIONS.md; mio's other backends need `WouldBlock`).
    pub fn for_event(ev: &mio::event::Event) -> ReadUntil {
        if ev.is_read_closed() || ev.is_error() || !cfg!(target_os = "linux") {
            ReadUntil::WouldBlock
        } else {
            ReadUntil::ShortRead
        }
    }
}

/// A reader that notes whether its last read came back short (or at EOF).
struct Probe<'a, R: Read> {
    inner: &'a mut R,
    short: bool,
}

impl<R: Read> Read for Probe<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.short = n < buf.len();
        Ok(n)
    }
}

/// Bytes read from one connection per turn. Bounds the memory and time one fast peer can take
/// from everyone else before the loop writes, runs timers and serves other connections.
pub const READ_BUDGET: usize = 256 * 1024;

/// Most bytes asked of a plain socket per read.
const CHUNK: usize = 16 * 1024;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; CHUNK]);
}

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
fn take_frames(inbuf: &mut Vec<u8>, max: usize, frames: &mut Frames) -> Result<(), FrameError> {
    let mut start = 0;
    while let Decoded::Frame { payload, consumed } = frame::decode(&inbuf[start..], max)? {
        frames.push(payload);
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
    pub fn read_frames(&mut self, max: usize, until: ReadUntil) -> ReadResult {
        let mut r = ReadResult {
            frames: Frames::default(),
            eof: false,
            error: None,
            more: false,
            secured: None,
        };
        if self.tls.is_some() {
            self.read_tls(max, until, &mut r);
            return r;
        }
        let mut budget = READ_BUDGET;
        loop {
            if budget == 0 {
                r.more = true;
                break;
            }
            let want = CHUNK.min(budget);
            let stream = &mut self.stream;
            let inbuf = &mut self.inbuf;
            // Through one buffer per thread, zeroed once: a chunk on the stack would be zeroed
            // on every pass, and a connection's own would stay allocated while it idles.
            let got = SCRATCH.with_borrow_mut(|chunk| {
                let n = stream.read(&mut chunk[..want])?;
                inbuf.extend_from_slice(&chunk[..n]);
                Ok::<usize, io::Error>(n)
            });
            match got {
                Ok(0) => {
                    r.eof = true;
                    break;
                }
                Ok(n) => {
                    budget -= n;
                    // Decode as we go so a peer cannot make us buffer more than one frame.
                    if let Err(e) = self.take_frames(max, &mut r.frames) {
                        r.error = Some(e);
                        break;
                    }
                    if n < want && until == ReadUntil::ShortRead {
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
    fn read_tls(&mut self, max: usize, until: ReadUntil, r: &mut ReadResult) {
        let mut budget = READ_BUDGET;
        let Some(tls) = self.tls.as_deref_mut() else {
            return;
        };
        loop {
            if budget == 0 {
                r.more = true;
                break;
            }
            let mut probe = Probe {
                inner: &mut self.stream,
                short: false,
            };
            let got = tls.read_tls(&mut probe);
            let short = probe.short;
            let n = match got {
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
                let start = self.inbuf.len();
                self.inbuf.resize(start + plain, 0);
                let got = tls.reader().read(&mut self.inbuf[start..]);
                let k = *got.as_ref().unwrap_or(&0);
                self.inbuf.truncate(start + k);
                if k == 0 {
                    break;
                }
                plain -= k;
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
            if short && until == ReadUntil::ShortRead {
                break;
            }
        }
        if r.eof && r.error.is_none() && !self.inbuf.is_empty() {
            r.error = Some(FrameError::Truncated);
        }
    }

    fn take_frames(&mut self, max: usize, frames: &mut Frames) -> Result<(), FrameError> {
        take_frames(&mut self.inbuf, max, frames)
    }

    /// Queue bytes for writing.
    pub fn queue(&mut self, bytes: &[u8]) {
        self.outbuf.extend_from_slice(bytes);
    }

    /// The output buffer, to encode a frame straight into (as [`Conn::queue`] appends).
    pub fn out(&mut self) -> &mut Vec<u8> {
        &mut self.outbuf
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
            got.extend(
                b.read_frames(1 << 20, ReadUntil::WouldBlock)
                    .frames
                    .iter()
                    .map(<[u8]>::to_vec),
            );
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

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame::encode(payload, &mut out).unwrap();
        out
    }

    /// Poll until `token` is reported; how far to read it, by the daemon's rule.
    fn until_event(poll: &mut Poll, token: Token) -> ReadUntil {
        let mut events = mio::Events::with_capacity(8);
        for _ in 0..100 {
            poll.poll(&mut events, Some(std::time::Duration::from_millis(100)))
                .unwrap();
            if let Some(ev) = events.iter().find(|e| e.token() == token) {
                return ReadUntil::for_event(ev);
            }
        }
        panic!("no event for {token:?} within 10 s");
    }

    /// The short-read rule loses nothing: a frame and the peer's close that both came before
    /// the event are read in one pass (the event says read-closed, so the pass reads to EOF;
    /// no second event would come for them), and a frame that comes after a short read raises
    /// an event of its own.
    #[test]
    fn stopping_at_a_short_read_misses_neither_data_nor_eof() {
        let mut poll = Poll::new().unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut a = Conn::new(Stream::Unix(UnixStream::from_std(a)));
        a.register(poll.registry(), Token(1)).unwrap();

        b.write_all(&framed(b"one")).unwrap();
        assert_eq!(until_event(&mut poll, Token(1)), ReadUntil::ShortRead);
        let r = a.read_frames(1 << 20, ReadUntil::ShortRead);
        assert_eq!(r.frames.iter().collect::<Vec<_>>(), [&b"one"[..]]);
        assert!(!r.eof && r.error.is_none());

        // After the short read: new data is a new edge.
        b.write_all(&framed(b"two")).unwrap();
        assert_eq!(until_event(&mut poll, Token(1)), ReadUntil::ShortRead);
        let r = a.read_frames(1 << 20, ReadUntil::ShortRead);
        assert_eq!(r.frames.iter().collect::<Vec<_>>(), [&b"two"[..]]);

        // Data and the close before the event: one pass must see both.
        b.write_all(&framed(b"three")).unwrap();
        b.shutdown(std::net::Shutdown::Write).unwrap();
        let until = until_event(&mut poll, Token(1));
        assert_eq!(until, ReadUntil::WouldBlock, "the event says read-closed");
        let r = a.read_frames(1 << 20, until);
        assert_eq!(r.frames.iter().collect::<Vec<_>>(), [&b"three"[..]]);
        assert!(r.eof, "the close was read in the same pass");
    }
}
