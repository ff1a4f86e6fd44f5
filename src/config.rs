//! chatd's settings: command-line flags, the `chatd.toml` file, environment, defaults.
//!
//! Owns the one definition of every chatd flag (clap derives `--help` from it, the man page and
//! completions are checked against it) and the rule "flags beat environment beat config file beat
//! defaults". Must never: open sockets or the database, or read key files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::Parser;
use serde::Deserialize;

use crate::relay::Limits;

/// Default relay port (DESIGN "chatd").
pub const DEFAULT_PORT: u16 = 9999;

/// chatd: end-to-end encrypted chat daemon (relay, member, or both).
///
/// Roles: `--listen ADDR` alone is a relay; `--user NAME --connect HOST:PORT` is a member;
/// `--user NAME --listen ADDR` is a host (relay plus a member in one process).
#[derive(Parser, Debug, Clone, Default)]
#[command(name = "chatd", version, long_about = None)]
pub struct Flags {
    /// Config file (default: $CONFIGURATION_DIRECTORY/chatd.toml, else
    /// $XDG_CONFIG_HOME/chatd/chatd.toml, else ~/.config/chatd/chatd.toml)
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Your user name (1-32 of a-z 0-9 . _ -); makes this daemon a member
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// Relay to connect to as a member (port defaults to 9999)
    #[arg(long, value_name = "HOST:PORT")]
    pub connect: Option<String>,
    /// Address to serve the relay on (e.g. 0.0.0.0:9999; port 0 picks a free one)
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// State directory for the identity key and database (mode 0700)
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Control socket path
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// RSA key size for a new identity
    #[arg(long, value_name = "N", value_parser = clap::builder::PossibleValuesParser::new(["2048", "3072", "4096"]).map(|s| s.parse::<usize>().unwrap_or(3072)))]
    pub key_bits: Option<usize>,
    /// Relay: most simultaneous member connections
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Relay: most items queued per user before new ones are refused
    #[arg(long, value_name = "N")]
    pub max_queue: Option<usize>,
    /// Relay: seconds a new connection has to log in
    #[arg(long, value_name = "SECS")]
    pub handshake_timeout: Option<u64>,
    /// Relay: seconds of silence before a connection is closed
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,
    /// Bytes queued for one connection before it is cut off as a slow reader
    #[arg(long, value_name = "BYTES")]
    pub max_write_buffer: Option<usize>,
    /// Most simultaneous control-socket clients
    #[arg(long, value_name = "N")]
    pub max_control_clients: Option<usize>,
}

/// The config file: every flag has a key of the same name with `_` for `-`.
#[derive(Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// `user`
    pub user: Option<String>,
    /// `connect`
    pub connect: Option<String>,
    /// `listen`
    pub listen: Option<String>,
    /// `state_dir`
    pub state_dir: Option<PathBuf>,
    /// `socket`
    pub socket: Option<PathBuf>,
    /// `key_bits`
    pub key_bits: Option<usize>,
    /// `max_connections`
    pub max_connections: Option<usize>,
    /// `max_queue`
    pub max_queue: Option<usize>,
    /// `handshake_timeout`
    pub handshake_timeout: Option<u64>,
    /// `idle_timeout`
    pub idle_timeout: Option<u64>,
    /// `max_write_buffer`
    pub max_write_buffer: Option<usize>,
    /// `max_control_clients`
    pub max_control_clients: Option<usize>,
    /// `log_level`: error, warn, info, debug, trace (RUST_LOG, when set, wins)
    pub log_level: Option<String>,
}

/// Configuration errors: each names what to fix.
#[derive(Debug)]
pub enum ConfigError {
    /// No role could be chosen.
    NoRole,
    /// `--connect` and `--listen` without `--user`... or other contradictions.
    Conflict(String),
    /// A value is out of range or malformed.
    Invalid(String),
    /// The config file could not be read.
    Read(PathBuf, std::io::Error),
    /// The config file is not valid (the message names line and key).
    Parse(PathBuf, String),
    /// No home directory to derive a default path from.
    NoHome(&'static str),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::NoRole => write!(
                f,
                "nothing to do: give --listen ADDR (relay), --user NAME --connect HOST:PORT (member), \
                 or --user NAME --listen ADDR (host)"
            ),
            ConfigError::Conflict(m) | ConfigError::Invalid(m) => write!(f, "{m}"),
            ConfigError::Read(p, e) => write!(f, "cannot read config file {}: {e}", p.display()),
            ConfigError::Parse(p, e) => write!(f, "{}: {e}", p.display()),
            ConfigError::NoHome(what) => write!(
                f,
                "cannot find a default {what}: HOME is not set; give it explicitly"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// What this daemon does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Relay only.
    Relay {
        /// Listen address.
        listen: String,
    },
    /// Member connecting to a relay.
    Member {
        /// User name.
        user: String,
        /// Relay address.
        connect: String,
    },
    /// Relay plus a member in one process.
    Host {
        /// User name.
        user: String,
        /// Listen address.
        listen: String,
    },
}

/// Everything the daemon needs, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// The role.
    pub role: Role,
    /// State directory.
    pub state_dir: PathBuf,
    /// Control socket.
    pub socket: PathBuf,
    /// Key size for a new identity.
    pub key_bits: usize,
    /// Relay limits.
    pub limits: Limits,
    /// Most relay connections.
    pub max_connections: usize,
    /// Write buffer cap per connection.
    pub max_write_buffer: usize,
    /// Most control clients.
    pub max_control_clients: usize,
    /// The config file in use, if any (reloaded on SIGHUP).
    pub file_path: Option<PathBuf>,
    /// Log level from the file.
    pub log_level: Option<String>,
}

/// Read and check a config file.
pub fn read_file(path: &Path) -> Result<File, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
    parse_file(path, &text)
}

/// Parse config text; errors name the line and key (toml's messages do).
pub fn parse_file(path: &Path, text: &str) -> Result<File, ConfigError> {
    toml::from_str::<File>(text)
        .map_err(|e| ConfigError::Parse(path.into(), e.to_string().trim_end().replace('\n', " ")))
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        // systemd may list several directories separated by ':'; the first is ours.
        .map(|v| {
            let s = v.to_string_lossy().to_string();
            PathBuf::from(s.split(':').next().unwrap_or(&s))
        })
}

fn home() -> Option<PathBuf> {
    env_path("HOME")
}

/// The default config file, if it exists.
fn default_config_file() -> Option<PathBuf> {
    let p = if let Some(d) = env_path("CONFIGURATION_DIRECTORY") {
        d.join("chatd.toml")
    } else if let Some(x) = env_path("XDG_CONFIG_HOME") {
        x.join("chatd/chatd.toml")
    } else {
        home()?.join(".config/chatd/chatd.toml")
    };
    // Present but unreadable (e.g. a 0700 directory of another user) must not be mistaken for
    // absent: `resolve` then reports why it cannot be read instead of running without it.
    match std::fs::metadata(&p) {
        Ok(_) => Some(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(_) => Some(p),
    }
}

fn positive<T: PartialOrd + Default + std::fmt::Display>(
    name: &str,
    v: Option<T>,
) -> Result<Option<T>, ConfigError> {
    match v {
        Some(x) if x <= T::default() => Err(ConfigError::Invalid(format!(
            "{name} must be greater than 0 (got {x})"
        ))),
        other => Ok(other),
    }
}

/// Resolve flags, environment and file into a `Config`.
pub fn resolve(flags: &Flags) -> Result<Config, ConfigError> {
    let file_path = match &flags.config {
        Some(p) => Some(p.clone()),
        None => default_config_file(),
    };
    let file = match &file_path {
        Some(p) => read_file(p)?,
        None => File::default(),
    };
    resolve_with(flags, &file, file_path)
}

/// Resolve with an already-read file (SIGHUP reload uses this).
pub fn resolve_with(
    flags: &Flags,
    file: &File,
    file_path: Option<PathBuf>,
) -> Result<Config, ConfigError> {
    let user = flags.user.clone().or_else(|| file.user.clone());
    let connect = flags.connect.clone().or_else(|| file.connect.clone());
    let listen = flags.listen.clone().or_else(|| file.listen.clone());
    if let Some(u) = &user {
        if !crate::proto::valid_user(u) {
            return Err(ConfigError::Invalid(format!(
                "invalid user name {u:?}: use 1 to 32 of a-z 0-9 . _ - starting with a letter or digit"
            )));
        }
    }
    let with_port = |a: String| {
        if a.rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            a
        } else {
            format!("{a}:{DEFAULT_PORT}")
        }
    };
    let role = match (user, connect, listen) {
        (None, None, Some(l)) => Role::Relay {
            listen: with_port(l),
        },
        (Some(u), Some(c), None) => Role::Member {
            user: u,
            connect: with_port(c),
        },
        (Some(u), None, Some(l)) => Role::Host {
            user: u,
            listen: with_port(l),
        },
        (_, Some(_), Some(_)) => {
            return Err(ConfigError::Conflict(
                "give either --connect (member) or --listen (relay or host), not both".into(),
            ))
        }
        (None, Some(_), None) => {
            return Err(ConfigError::Conflict(
                "--connect needs --user NAME: the name to chat as".into(),
            ))
        }
        (Some(_), None, None) => {
            return Err(ConfigError::Conflict(
                "--user needs --connect HOST:PORT (member) or --listen ADDR (host)".into(),
            ))
        }
        (None, None, None) => return Err(ConfigError::NoRole),
    };
    let state_dir = match flags
        .state_dir
        .clone()
        .or_else(|| env_path("STATE_DIRECTORY"))
        .or_else(|| file.state_dir.clone())
    {
        Some(p) => p,
        None => match env_path("XDG_STATE_HOME") {
            Some(x) => x.join("chatd"),
            None => home()
                .ok_or(ConfigError::NoHome("state directory"))?
                .join(".local/state/chatd"),
        },
    };
    let socket = match flags
        .socket
        .clone()
        .or_else(|| env_path("CHATD_SOCKET"))
        .or_else(|| env_path("RUNTIME_DIRECTORY").map(|d| d.join("control.sock")))
        .or_else(|| file.socket.clone())
    {
        Some(p) => p,
        None => default_socket(),
    };
    let key_bits = flags.key_bits.or(file.key_bits).unwrap_or(3072);
    if ![2048, 3072, 4096].contains(&key_bits) {
        return Err(ConfigError::Invalid(format!(
            "key_bits must be 2048, 3072 or 4096 (got {key_bits})"
        )));
    }
    if let Some(l) = &file.log_level {
        if !["error", "warn", "info", "debug", "trace", "off"]
            .contains(&l.to_ascii_lowercase().as_str())
        {
            return Err(ConfigError::Invalid(format!(
                "log_level must be one of error, warn, info, debug, trace, off (got {l:?})"
            )));
        }
    }
    let d = Limits::default();
    let secs = |name: &str, v: Option<u64>| -> Result<Option<u64>, ConfigError> {
        positive(name, v).map(|o| o.map(|s| s.saturating_mul(1000)))
    };
    let limits = Limits {
        max_queue: positive("max_queue", flags.max_queue.or(file.max_queue))?
            .unwrap_or(d.max_queue),
        handshake_timeout_ms: secs(
            "handshake_timeout",
            flags.handshake_timeout.or(file.handshake_timeout),
        )?
        .unwrap_or(d.handshake_timeout_ms),
        idle_timeout_ms: secs("idle_timeout", flags.idle_timeout.or(file.idle_timeout))?
            .unwrap_or(d.idle_timeout_ms),
        window_bytes: d.window_bytes,
    };
    let max_write_buffer = positive(
        "max_write_buffer",
        flags.max_write_buffer.or(file.max_write_buffer),
    )?
    .unwrap_or(16 << 20);
    let limits = Limits {
        window_bytes: max_write_buffer / 2,
        ..limits
    };
    Ok(Config {
        role,
        state_dir,
        socket,
        key_bits,
        limits,
        max_connections: positive(
            "max_connections",
            flags.max_connections.or(file.max_connections),
        )?
        .unwrap_or(1024),
        max_write_buffer,
        max_control_clients: positive(
            "max_control_clients",
            flags.max_control_clients.or(file.max_control_clients),
        )?
        .unwrap_or(64),
        file_path,
        log_level: file.log_level.clone(),
    })
}

/// The control socket `chatctl` looks for when not told (DESIGN "The chatctl contract").
///
/// `$XDG_RUNTIME_DIR/chatd/control.sock`, else `/run/chatd/control.sock` for root, else
/// `/tmp/chatd-UID/control.sock` (as tmux does; chatd creates that directory 0700 and refuses it
/// if anyone else owns it or can enter it).
pub fn default_socket() -> PathBuf {
    match env_path("XDG_RUNTIME_DIR") {
        Some(d) => d.join("chatd/control.sock"),
        None => {
            // SAFETY: geteuid has no preconditions.
            let uid = unsafe { libc::geteuid() };
            if uid == 0 {
                PathBuf::from("/run/chatd/control.sock")
            } else {
                PathBuf::from(format!("/tmp/chatd-{uid}/control.sock"))
            }
        }
    }
}

/// A tick of the event loop's timers.
pub const TICK: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut v = vec!["chatd"];
        v.extend_from_slice(args);
        Flags::try_parse_from(v).unwrap()
    }

    #[test]
    fn roles() {
        let f = flags(&[
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            "/x",
            "--socket",
            "/s",
        ]);
        let c = resolve_with(&f, &File::default(), None).unwrap();
        assert_eq!(
            c.role,
            Role::Relay {
                listen: "127.0.0.1:0".into()
            }
        );
        let f = flags(&[
            "--user",
            "bob",
            "--connect",
            "example.org",
            "--state-dir",
            "/x",
        ]);
        let c = resolve_with(&f, &File::default(), None).unwrap();
        assert_eq!(
            c.role,
            Role::Member {
                user: "bob".into(),
                connect: "example.org:9999".into()
            }
        );
        assert_eq!(c.key_bits, 3072, "RSA-3072 unless --key-bits");
        let f = flags(&["--state-dir", "/x"]);
        assert!(matches!(
            resolve_with(&f, &File::default(), None),
            Err(ConfigError::NoRole)
        ));
    }

    #[test]
    fn flags_beat_file() {
        let file = parse_file(
            Path::new("t.toml"),
            "user = \"alice\"\nlisten = \"0.0.0.0:1\"\n",
        )
        .unwrap();
        let f = flags(&["--user", "bob", "--state-dir", "/x"]);
        let c = resolve_with(&f, &file, None).unwrap();
        assert_eq!(
            c.role,
            Role::Host {
                user: "bob".into(),
                listen: "0.0.0.0:1".into()
            }
        );
    }

    #[test]
    fn unknown_key_and_bad_value_name_line_and_key() {
        let e = parse_file(Path::new("c.toml"), "user = \"a\"\nbogus = 1\n").unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("c.toml") && m.contains("line 2") && m.contains("bogus"),
            "{m}"
        );
        let e = parse_file(Path::new("c.toml"), "max_queue = \"lots\"\n").unwrap_err();
        let m = e.to_string();
        assert!(m.contains("line 1") && m.contains("max_queue"), "{m}");
    }
}
