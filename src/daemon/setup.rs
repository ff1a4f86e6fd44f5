//! Start-up chores that touch the file system: the state directory, the identity key, the
//! control socket's directory and stale socket files, binding (or taking over from systemd) the
//! listening sockets, and process hardening.
//!
//! Refuses, as ssh does, to use a key or directory that others can read.

use std::fs;
use std::io::{self, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use log::{info, warn};
use mio::net::{TcpListener, UnixListener};
use mio::{Interest, Registry, Token};

use super::error::DaemonError;
use crate::crypto::Identity;

/// Create `dir` (0700) if missing; refuse it if group or others have any access.
pub fn private_dir(dir: &Path, what: &str) -> Result<(), DaemonError> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                DaemonError::Setup(format!("cannot create {what} {}: {e}", dir.display()))
            })?;
        // `recursive` applies the mode only to the last component when umask allows; be sure.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| {
            DaemonError::Setup(format!("cannot chmod {what} {}: {e}", dir.display()))
        })?;
    }
    let meta = fs::metadata(dir)
        .map_err(|e| DaemonError::Setup(format!("cannot read {what} {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(DaemonError::Setup(format!(
            "{what} {} is not a directory",
            dir.display()
        )));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(DaemonError::Setup(format!(
            "{what} {} is accessible by group or others (mode {mode:03o}); fix it with: chmod 700 {}",
            dir.display(),
            dir.display()
        )));
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(DaemonError::Setup(format!(
            "{what} {} belongs to uid {}, not to this process (uid {euid})",
            dir.display(),
            meta.uid()
        )));
    }
    Ok(())
}

/// Load `identity.pem`, or make one on first start.
pub fn identity(state_dir: &Path, bits: usize) -> Result<Identity, DaemonError> {
    let path = state_dir.join("identity.pem");
    if path.exists() {
        let meta = fs::metadata(&path)
            .map_err(|e| DaemonError::Setup(format!("cannot read {}: {e}", path.display())))?;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(DaemonError::Setup(format!(
                "identity key {} is accessible by group or others (mode {mode:03o}); \
                 fix it with: chmod 600 {}",
                path.display(),
                path.display()
            )));
        }
        let pem = zeroize::Zeroizing::new(
            fs::read_to_string(&path)
                .map_err(|e| DaemonError::Setup(format!("cannot read {}: {e}", path.display())))?,
        );
        let id = Identity::from_pem(&pem)
            .map_err(|e| DaemonError::Setup(format!("identity key {}: {e}", path.display())))?;
        info!(
            "loaded identity {} ({} bits)",
            id.public().fingerprint(),
            id.public().bits()
        );
        return Ok(id);
    }
    info!("generating a new RSA-{bits} identity key (this takes a few seconds)");
    let spinner = crate::progress::Spinner::start(&format!("generating RSA-{bits} identity key"));
    let id = Identity::generate(&mut rand::rngs::OsRng, bits);
    spinner.stop();
    let id = id.map_err(|e| DaemonError::Setup(e.to_string()))?;
    let pem = id.to_pem().map_err(|e| DaemonError::Setup(e.to_string()))?;
    // Write to a temporary name and rename, so a crash never leaves a half-written key.
    let tmp = state_dir.join("identity.pem.tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| DaemonError::Setup(format!("cannot create {}: {e}", tmp.display())))?;
    f.write_all(pem.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| DaemonError::Setup(format!("cannot write {}: {e}", tmp.display())))?;
    fs::rename(&tmp, &path)
        .map_err(|e| DaemonError::Setup(format!("cannot create {}: {e}", path.display())))?;
    info!(
        "created identity {} in {}",
        id.public().fingerprint(),
        path.display()
    );
    Ok(id)
}

/// Prepare the control socket path: its directory must be private; a stale socket file from a
/// crash is removed; a live daemon on it is an error.
pub fn socket_path(path: &Path) -> Result<(), DaemonError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    private_dir(dir, "control socket directory")?;
    if fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::Setup(format!(
                "another chatd is already serving {}; stop it first or give another --socket",
                path.display()
            )));
        }
        fs::remove_file(path).map_err(|e| {
            DaemonError::Setup(format!(
                "cannot remove stale socket {}: {e}",
                path.display()
            ))
        })?;
        info!("removed stale control socket {}", path.display());
    }
    Ok(())
}

/// Keep private keys out of core dumps and away from ptrace by other processes of our uid.
pub fn harden() {
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integers; umask has no preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::umask(0o077);
    }
}

/// The uid of the process at the other end of a Unix socket.
pub fn peer_uid(fd: std::os::fd::RawFd) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// Hold an exclusive lock on `state_dir/chatd.lock` for the life of the process, so two daemons
/// never share one identity and database. The kernel drops it when the process dies, so a crash
/// never leaves a stale lock.
pub fn lock_state_dir(state_dir: &Path) -> Result<fs::File, DaemonError> {
    use std::os::fd::AsRawFd;
    let path = state_dir.join("chatd.lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| DaemonError::Setup(format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: flock takes a valid open descriptor and flags.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(DaemonError::Setup(format!(
            "another chatd is already using the state directory {}; stop it first or give another --state-dir",
            state_dir.display()
        )));
    }
    Ok(f)
}

/// The relay listener on `listen` (or the one systemd passed), registered as `token`; `None`
/// when this daemon is no relay (a socket systemd passed anyway is closed).
pub fn listener(
    listen: Option<&str>,
    activated: Option<std::net::TcpListener>,
    registry: &Registry,
    token: Token,
) -> Result<Option<(TcpListener, SocketAddr)>, DaemonError> {
    let Some(l) = listen else {
        if activated.is_some() {
            warn!(
                "closed the relay socket passed by systemd: this daemon is no relay (no --listen)"
            );
        }
        return Ok(None);
    };
    let mut lst = match activated {
        Some(std_lst) => {
            let what = "the relay socket passed by systemd".to_string();
            std_lst
                .set_nonblocking(true)
                .map_err(|e| DaemonError::Bind(what.clone(), e))?;
            info!("using the relay socket passed by systemd instead of binding {l}");
            TcpListener::from_std(std_lst)
        }
        None => {
            let addr = l
                .to_socket_addrs()
                .map_err(|e| DaemonError::Bind(l.to_string(), e))?
                .next()
                .ok_or_else(|| DaemonError::Bind(l.to_string(), io::ErrorKind::NotFound.into()))?;
            TcpListener::bind(addr).map_err(|e| DaemonError::Bind(l.to_string(), e))?
        }
    };
    let addr = lst
        .local_addr()
        .map_err(|e| DaemonError::Bind(l.to_string(), e))?;
    registry
        .register(&mut lst, token, Interest::READABLE)
        .map_err(DaemonError::Poll)?;
    Ok(Some((lst, addr)))
}

/// The control socket at `path` (or the one systemd passed, with its own path), registered as
/// `token`.
pub fn control_socket(
    path: &Path,
    activated: Option<std::os::unix::net::UnixListener>,
    registry: &Registry,
    token: Token,
) -> Result<(UnixListener, PathBuf), DaemonError> {
    let mut control_path = path.to_path_buf();
    let mut control = match activated {
        Some(std_lst) => {
            let what = "the control socket passed by systemd".to_string();
            std_lst
                .set_nonblocking(true)
                .map_err(|e| DaemonError::Bind(what, e))?;
            if let Some(p) = std_lst
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Into::into))
            {
                control_path = p;
            }
            UnixListener::from_std(std_lst)
        }
        None => UnixListener::bind(path)
            .map_err(|e| DaemonError::Bind(path.display().to_string(), e))?,
    };
    registry
        .register(&mut control, token, Interest::READABLE)
        .map_err(DaemonError::Poll)?;
    Ok((control, control_path))
}
