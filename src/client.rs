//! A blocking control-socket client, used by `chatctl`, the tests and the benches.
//!
//! Owns connecting to a daemon's control socket (a filesystem Unix socket via `interprocess`)
//! and the request/response exchange. Must never: read key files, or hide which failure was a
//! connection failure (`chatctl` maps those to exit 3).

use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use interprocess::local_socket::prelude::*;
use interprocess::local_socket::{GenericFilePath, Stream};

use crate::proto::control::{CtlRequest, CtlResponse};
use crate::proto::frame::{self, FrameError, MAX_FRAME};
use crate::proto::{from_payload, to_payload, ProtoError};

/// Client failures.
#[derive(Debug)]
pub enum ClientError {
    /// The daemon is not reachable at this path.
    Connect(PathBuf, std::io::Error),
    /// The connection broke, or the daemon went away mid-answer.
    Lost(FrameError),
    /// The daemon closed the connection.
    Closed,
    /// A frame could not be encoded or decoded.
    Proto(ProtoError),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect(p, e) => {
                write!(
                    f,
                    "chatd is not reachable at {}: {e} (is it running?)",
                    p.display()
                )
            }
            ClientError::Lost(e) => write!(f, "lost the connection to chatd: {e}"),
            ClientError::Closed => write!(f, "chatd closed the connection"),
            ClientError::Proto(e) => write!(f, "bad reply from chatd: {e}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// A connection to one daemon.
pub struct Client {
    reader: BufReader<Stream>,
    writer: BufWriter<Stream>,
}

impl Client {
    /// Connect to the control socket at `path`.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let err = |e| ClientError::Connect(path.to_path_buf(), e);
        let name = path.to_fs_name::<GenericFilePath>().map_err(err)?;
        let stream = Stream::connect(name).map_err(err)?;
        // Two handles on one socket, so reads and writes are buffered apart.
        let writer = dup(&stream).map_err(err)?;
        Ok(Client {
            reader: BufReader::new(stream),
            writer: BufWriter::new(writer),
        })
    }

    /// Send one request.
    pub fn send(&mut self, req: &CtlRequest) -> Result<(), ClientError> {
        let payload = to_payload(req).map_err(ClientError::Proto)?;
        frame::write_to(&mut self.writer, &payload).map_err(ClientError::Lost)?;
        self.writer
            .flush()
            .map_err(|e| ClientError::Lost(FrameError::Io(e)))
    }

    /// Send several requests in one write, without waiting for any answer (the daemon answers
    /// a client's requests in the order they came).
    pub fn send_all(&mut self, reqs: &[CtlRequest]) -> Result<(), ClientError> {
        for req in reqs {
            let payload = to_payload(req).map_err(ClientError::Proto)?;
            frame::write_to(&mut self.writer, &payload).map_err(ClientError::Lost)?;
        }
        self.writer
            .flush()
            .map_err(|e| ClientError::Lost(FrameError::Io(e)))
    }

    /// Read one response.
    pub fn recv(&mut self) -> Result<CtlResponse, ClientError> {
        match frame::read_from(&mut self.reader, MAX_FRAME) {
            Ok(Some(p)) => from_payload(&p).map_err(ClientError::Proto),
            Ok(None) => Err(ClientError::Closed),
            Err(e) => Err(ClientError::Lost(e)),
        }
    }

    /// Send a request and read its (first) response.
    pub fn request(&mut self, req: &CtlRequest) -> Result<CtlResponse, ClientError> {
        // A daemon that refuses us (too many clients) answers and closes before reading, so a
        // failed send may still leave its reason to read.
        let sent = self.send(req);
        match (sent, self.recv()) {
            (_, Ok(resp)) => Ok(resp),
            (Err(e), Err(_)) | (Ok(()), Err(e)) => Err(e),
        }
    }
}

/// Duplicate a stream handle (the same socket, a second file descriptor).
fn dup(s: &Stream) -> std::io::Result<Stream> {
    use std::os::fd::{AsFd, OwnedFd};
    let fd: OwnedFd = match s {
        Stream::UdSocket(u) => u.as_fd().try_clone_to_owned()?,
    };
    Ok(Stream::UdSocket(
        interprocess::os::unix::uds_local_socket::Stream::from(fd),
    ))
}
