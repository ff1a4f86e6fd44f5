//! chatd's settings: command-line flags, the `chatd.toml` file, environment, defaults.
//!
//! Owns the one definition of every chatd setting, `settings!`: its flag (clap derives `--help`
//! and the completions from it), its file key, default and check, and what SIGHUP does with it
//! ([`apply_reload`]); the man pages are checked against it and its table [`SETTINGS`]. Also the
//! rule "flags beat environment beat config file beat defaults". Must never: open sockets or the
//! database, or read key files.

use std::path::{Path, PathBuf};

use clap::builder::TypedValueParser;
use clap::Parser;
use serde::Deserialize;

use crate::crypto::Fingerprint;
use crate::relay::Limits;

/// Default relay port (DESIGN "chatd").
pub const DEFAULT_PORT: u16 = 9999;

#[macro_use]
mod settings;

settings! {
    /// chatd: end-to-end encrypted chat daemon (relay, member, or both).
    ///
    /// Roles: `--listen ADDR` alone is a relay; `--user NAME --connect HOST:PORT` is a member;
    /// `--user NAME --listen ADDR` is a host (relay plus a member in one process).
    flags {
        /// Your user name (1-32 of a-z 0-9 . _ -); makes this daemon a member
        user: String {
            flag: [value_name = "NAME"],
            env: [],
            default: [],
            check: [user_name],
            sighup: [restart(role)],
        }
        /// Relay to connect to as a member (port defaults to 9999); SHA256:...@HOST:PORT pins its key
        connect: String {
            flag: [value_name = "HOST:PORT"],
            env: [],
            default: [],
            check: [],
            sighup: [restart(role)],
        }
        /// Member: the relay's key fingerprint (SHA256:...); unset pins the key seen first
        relay_fingerprint: String {
            flag: [value_name = "SHA256:..."],
            env: [],
            default: [],
            check: [fingerprint_text],
            sighup: [restart(role)],
        }
        /// Address to serve the relay on (e.g. 0.0.0.0:9999; port 0 picks a free one)
        listen: String {
            flag: [value_name = "ADDR"],
            env: [],
            default: [],
            check: [],
            sighup: [restart(role)],
        }
        /// State directory for the identity key and database (mode 0700)
        state_dir: PathBuf {
            flag: [value_name = "DIR"],
            env: ["STATE_DIRECTORY"],
            default: [from default_state_dir()?],
            check: [],
            sighup: [restart(state_dir)],
        }
        /// Control socket path [default: $CHATD_SOCKET, else $RUNTIME_DIRECTORY/control.sock, else $XDG_RUNTIME_DIR/chatd/control.sock, else /run/chatd/control.sock for root, else /tmp/chatd-UID/control.sock]
        socket: PathBuf {
            flag: [value_name = "PATH"],
            env: ["CHATD_SOCKET", "RUNTIME_DIRECTORY" / "control.sock"],
            default: [from default_socket()],
            check: [],
            sighup: [restart(socket)],
        }
        /// RSA key size for a new identity
        key_bits: usize {
            flag: [
                value_name = "N",
                value_parser = clap::builder::PossibleValuesParser::new(["2048", "3072", "4096"])
                    .map(|s| s.parse::<usize>().unwrap_or(3072)),
            ],
            env: [],
            default: [3072],
            check: [rsa_size],
            // Read only when a key is generated, at start-up.
            sighup: [unused],
        }
        /// Relay: most simultaneous member connections
        max_connections: usize {
            flag: [value_name = "N"],
            env: [],
            default: [1024],
            check: [positive],
            sighup: [apply(4 max_connections = max_connections)],
        }
        /// Relay: most items queued per user before new ones are refused
        max_queue: usize {
            flag: [value_name = "N"],
            env: [],
            default: [Limits::default().max_queue],
            check: [positive],
            sighup: [apply(0 max_queue = limits.max_queue)],
        }
        /// Relay: most bytes queued per user before new items are refused
        max_queue_bytes: usize {
            flag: [value_name = "BYTES"],
            env: [],
            default: [Limits::default().max_queue_bytes],
            check: [positive],
            sighup: [apply(15 max_queue_bytes = limits.max_queue_bytes)],
        }
        /// Relay: most names one key may register
        max_names_per_key: usize {
            flag: [value_name = "N"],
            env: [],
            default: [Limits::default().max_names_per_key],
            check: [positive],
            sighup: [apply(8 max_names_per_key = limits.max_names_per_key)],
        }
        /// Relay: most new names registered per minute, by everyone together
        new_names_per_minute: usize {
            flag: [value_name = "N"],
            env: [],
            default: [Limits::default().new_names_per_minute],
            check: [positive],
            sighup: [apply(9 new_names_per_minute = limits.new_names_per_minute)],
        }
        /// Relay: up to this many names, every login gets the whole directory and every join and leave goes to everyone
        directory_push_max: usize {
            flag: [value_name = "N"],
            env: [],
            default: [Limits::default().directory_push_max],
            check: [positive],
            sighup: [apply(11 directory_push_max = limits.directory_push_max)],
        }
        /// Relay: most names one connection may follow for joins and leaves
        max_subscriptions: usize {
            flag: [value_name = "N"],
            env: [],
            default: [Limits::default().max_subscriptions],
            check: [positive],
            sighup: [apply(12 max_subscriptions = limits.max_subscriptions)],
        }
        /// Relay: seconds a new connection has to log in
        handshake_timeout: u64 {
            flag: [value_name = "SECS"],
            env: [],
            default: [Limits::default().handshake_timeout_ms / 1000],
            check: [positive],
            sighup: [apply(2 handshake_timeout_ms = limits.handshake_timeout_ms)],
        }
        /// Relay: seconds of silence before a connection is closed
        idle_timeout: u64 {
            flag: [value_name = "SECS"],
            env: [],
            default: [Limits::default().idle_timeout_ms / 1000],
            check: [positive],
            sighup: [apply(3 idle_timeout_ms = limits.idle_timeout_ms)],
        }
        /// Bytes queued for one connection before it is cut off as a slow reader
        max_write_buffer: usize {
            flag: [value_name = "BYTES"],
            env: [],
            default: [16 << 20],
            check: [positive],
            sighup: [apply(
                1 window_bytes = limits.window_bytes,
                5 max_write_buffer = max_write_buffer
            )],
        }
        /// Member: most peers `send --all` may reach; with more online it sends nothing
        max_fanout: usize {
            flag: [value_name = "N"],
            env: [],
            default: [crate::member::DEFAULT_MAX_FANOUT],
            check: [positive],
            sighup: [apply(10 max_fanout = max_fanout)],
        }
        /// Member: most messages held from one sender not introduced yet or whose key changed
        max_held_per_sender: u64 {
            flag: [value_name = "N"],
            env: [],
            default: [crate::member::HoldLimits::default().per_sender],
            check: [positive],
            sighup: [apply(11 max_held_per_sender = hold.per_sender)],
        }
        /// Member: most bytes held from one such sender
        max_held_bytes_per_sender: u64 {
            flag: [value_name = "BYTES"],
            env: [],
            default: [crate::member::HoldLimits::default().per_sender_bytes],
            check: [positive],
            sighup: [apply(12 max_held_bytes_per_sender = hold.per_sender_bytes)],
        }
        /// Member: most messages held from all such senders together
        max_held: u64 {
            flag: [value_name = "N"],
            env: [],
            default: [crate::member::HoldLimits::default().total],
            check: [positive],
            sighup: [apply(13 max_held = hold.total)],
        }
        /// Member: most bytes held from all such senders together
        max_held_bytes: u64 {
            flag: [value_name = "BYTES"],
            env: [],
            default: [crate::member::HoldLimits::default().total_bytes],
            check: [positive],
            sighup: [apply(14 max_held_bytes = hold.total_bytes)],
        }
        /// Seconds a control client may stay connected without a request (not while a tail follows or a send waits)
        control_idle_timeout: u64 {
            flag: [value_name = "SECS"],
            env: [],
            default: [60],
            check: [positive],
            sighup: [apply(16 control_idle_timeout_ms = control_idle_timeout_ms)],
        }
        /// Most simultaneous control-socket clients
        max_control_clients: usize {
            flag: [value_name = "N"],
            env: [],
            default: [64],
            check: [positive],
            sighup: [apply(6 max_control_clients = max_control_clients)],
        }
    }
    file_only {
        /// Log level: error, warn, info, debug, trace or off; unset is info (RUST_LOG wins)
        log_level: String {
            default: [],
            check: [log_level_name],
            sighup: [apply(7 log_level = log_level)],
        }
    }
}

/// One row of [`SETTINGS`]: what the documentation of a setting must say.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The `chatd.toml` key.
    pub key: &'static str,
    /// Whether it has a flag (`--key` with `-` for `_`).
    pub flag: bool,
    /// Environment variables that win over the file (the flag still wins over them).
    pub env: &'static [&'static str],
    help: &'static str,
    /// The default, when it is a plain value (path defaults depend on the environment).
    pub default: Option<fn() -> String>,
    /// What SIGHUP does with a change.
    pub sighup: Sighup,
}

impl Setting {
    /// The long flag without its dashes, if the setting has one.
    pub fn long(&self) -> Option<String> {
        self.flag.then(|| self.key.replace('_', "-"))
    }

    /// The help line `--help` shows.
    pub fn help(&self) -> &'static str {
        // Doc comments keep the space after `///`; clap trims it too.
        self.help.trim()
    }
}

/// What a SIGHUP reload does with a changed setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sighup {
    /// Applied at once, and the change logged.
    Apply,
    /// Takes effect at the next start; a reload warns and ignores it.
    Restart,
    /// Only read when something happens once (a key is generated); nothing to apply.
    Unused,
}

/// What [`apply_reload`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reload {
    /// `name old -> new` for each value applied, in the order the log line has always had.
    pub changes: Vec<String>,
    /// A restart-only setting (role, state_dir, socket) differs; it was left as it runs.
    pub restart_needed: bool,
    /// `log_level` changed; setting the logger is the caller's.
    pub log_level: bool,
}

/// A setting's layers, searched flag first, then environment, then file.
struct Layers<'a> {
    flags: &'a Flags,
    file: &'a File,
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
        /// The relay key the member insists on (`relay_fingerprint`, or the address's
        /// `SHA256:...@`); without one, the first key seen is pinned in `known_relays`.
        pin: Option<Fingerprint>,
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
    /// How long a control client may stay without a request, in ms.
    pub control_idle_timeout_ms: u64,
    /// Most peers `send --all` reaches.
    pub max_fanout: usize,
    /// Bounds on held envelopes (member).
    pub hold: crate::member::HoldLimits,
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

// The checks of the table: each gets the key, to name it in the error.

fn positive<T: PartialOrd + Default + std::fmt::Display>(
    name: &str,
    v: T,
) -> Result<T, ConfigError> {
    if v <= T::default() {
        return Err(ConfigError::Invalid(format!(
            "{name} must be greater than 0 (got {v})"
        )));
    }
    Ok(v)
}

fn user_name(_: &str, u: String) -> Result<String, ConfigError> {
    if !crate::proto::valid_user(&u) {
        return Err(ConfigError::Invalid(format!(
            "invalid user name {u:?}: use 1 to 32 of a-z 0-9 . _ - starting with a letter or digit"
        )));
    }
    Ok(u)
}

fn rsa_size(name: &str, bits: usize) -> Result<usize, ConfigError> {
    if ![2048, 3072, 4096].contains(&bits) {
        return Err(ConfigError::Invalid(format!(
            "{name} must be 2048, 3072 or 4096 (got {bits})"
        )));
    }
    Ok(bits)
}

fn fingerprint_text(name: &str, f: String) -> Result<String, ConfigError> {
    Fingerprint::parse(&f).map_err(|e| {
        ConfigError::Invalid(format!(
            "{name}: {e} (got {f:?}; the relay prints it with chatctl fingerprint)"
        ))
    })?;
    Ok(f)
}

fn log_level_name(name: &str, l: String) -> Result<String, ConfigError> {
    if !["error", "warn", "info", "debug", "trace", "off"]
        .contains(&l.to_ascii_lowercase().as_str())
    {
        return Err(ConfigError::Invalid(format!(
            "{name} must be one of error, warn, info, debug, trace, off (got {l:?})"
        )));
    }
    Ok(l)
}

fn default_state_dir() -> Result<PathBuf, ConfigError> {
    match env_path("XDG_STATE_HOME") {
        Some(x) => Ok(x.join("chatd")),
        None => Ok(home()
            .ok_or(ConfigError::NoHome("state directory"))?
            .join(".local/state/chatd")),
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
///
/// The settings are looked up in the order their errors have always been reported, so that
/// of two mistakes the same one is named first.
pub fn resolve_with(
    flags: &Flags,
    file: &File,
    file_path: Option<PathBuf>,
) -> Result<Config, ConfigError> {
    let s = Layers { flags, file };
    let role = role(s.user()?, s.connect()?, s.listen()?, s.relay_fingerprint()?)?;
    let state_dir = s.state_dir()?;
    let socket = s.socket()?;
    let key_bits = s.key_bits()?;
    let log_level = s.log_level()?;
    let max_queue = s.max_queue()?;
    let max_names_per_key = s.max_names_per_key()?;
    let new_names_per_minute = s.new_names_per_minute()?;
    let handshake_timeout_ms = s.handshake_timeout()?.saturating_mul(1000);
    let idle_timeout_ms = s.idle_timeout()?.saturating_mul(1000);
    let max_write_buffer = s.max_write_buffer()?;
    Ok(Config {
        role,
        state_dir,
        socket,
        key_bits,
        limits: Limits {
            max_queue,
            max_queue_bytes: s.max_queue_bytes()?,
            handshake_timeout_ms,
            idle_timeout_ms,
            window_bytes: max_write_buffer / 2,
            max_names_per_key,
            new_names_per_minute,
            directory_push_max: s.directory_push_max()?,
            max_subscriptions: s.max_subscriptions()?,
        },
        max_connections: s.max_connections()?,
        max_write_buffer,
        max_control_clients: s.max_control_clients()?,
        control_idle_timeout_ms: s.control_idle_timeout()?.saturating_mul(1000),
        max_fanout: s.max_fanout()?,
        hold: crate::member::HoldLimits {
            per_sender: s.max_held_per_sender()?,
            per_sender_bytes: s.max_held_bytes_per_sender()?,
            total: s.max_held()?,
            total_bytes: s.max_held_bytes()?,
        },
        file_path,
        log_level,
    })
}

/// The role that `user`, `connect` and `listen` together choose.
fn role(
    user: Option<String>,
    connect: Option<String>,
    listen: Option<String>,
    fingerprint: Option<String>,
) -> Result<Role, ConfigError> {
    let with_port = |a: String| {
        if a.rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            a
        } else {
            format!("{a}:{DEFAULT_PORT}")
        }
    };
    if fingerprint.is_some() && connect.is_none() {
        return Err(ConfigError::Conflict(
            "relay_fingerprint is the key of the relay a member connects to: it needs --connect"
                .into(),
        ));
    }
    match (user, connect, listen) {
        (None, None, Some(l)) => Ok(Role::Relay {
            listen: with_port(l),
        }),
        (Some(u), Some(c), None) => {
            let (pin, c) = split_pin(&c, fingerprint.as_deref())?;
            Ok(Role::Member {
                user: u,
                connect: with_port(c),
                pin,
            })
        }
        (Some(u), None, Some(l)) => Ok(Role::Host {
            user: u,
            listen: with_port(l),
        }),
        (_, Some(_), Some(_)) => Err(ConfigError::Conflict(
            "give either --connect (member) or --listen (relay or host), not both".into(),
        )),
        (None, Some(_), None) => Err(ConfigError::Conflict(
            "--connect needs --user NAME: the name to chat as".into(),
        )),
        (Some(_), None, None) => Err(ConfigError::Conflict(
            "--user needs --connect HOST:PORT (member) or --listen ADDR (host)".into(),
        )),
        (None, None, None) => Err(ConfigError::NoRole),
    }
}

/// Split `SHA256:...@HOST:PORT` into its pin and address; the pin must agree with
/// `relay_fingerprint` when both are given.
fn split_pin(
    connect: &str,
    fingerprint: Option<&str>,
) -> Result<(Option<Fingerprint>, String), ConfigError> {
    let (in_addr, addr) = match connect.split_once('@') {
        Some((fp, addr)) => (Some(fingerprint_text("connect", fp.to_string())?), addr),
        None => (None, connect),
    };
    let flag = fingerprint
        .map(|f| fingerprint_text("relay_fingerprint", f.to_string()))
        .transpose()?;
    let parse = |f: &str| Fingerprint::parse(f).ok();
    match (
        in_addr.as_deref().and_then(parse),
        flag.as_deref().and_then(parse),
    ) {
        (Some(a), Some(b)) if a != b => Err(ConfigError::Conflict(format!(
            "the relay address pins {a} but relay_fingerprint is {b}: give one"
        ))),
        (a, b) => Ok((a.or(b), addr.to_string())),
    }
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
                connect: "example.org:9999".into(),
                pin: None,
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

    fn relay(file: &str) -> Config {
        let f = flags(&[
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            "/x",
            "--socket",
            "/s",
        ]);
        let file = parse_file(Path::new("t.toml"), file).unwrap();
        resolve_with(&f, &file, None).unwrap()
    }

    #[test]
    fn reload_applies_the_limits_and_lists_them_as_the_log_always_has() {
        let mut running = relay("");
        let new = relay(
            "max_connections = 2\nmax_queue = 1\nhandshake_timeout = 5\nidle_timeout = 7\n\
             max_write_buffer = 1000\nmax_control_clients = 3\nlog_level = \"debug\"\n",
        );
        let done = apply_reload(&mut running, &new);
        assert_eq!(
            done.changes,
            [
                "max_queue 10000 -> 1",
                "window_bytes 8388608 -> 500",
                "handshake_timeout_ms 10000 -> 5000",
                "idle_timeout_ms 120000 -> 7000",
                "max_connections 1024 -> 2",
                "max_write_buffer 16777216 -> 1000",
                "max_control_clients 64 -> 3",
                "log_level None -> Some(\"debug\")",
            ]
        );
        assert!(done.log_level && !done.restart_needed);
        assert_eq!(format!("{:?}", running.limits), format!("{:?}", new.limits));
        assert_eq!(
            (
                running.max_connections,
                running.max_write_buffer,
                running.max_control_clients,
                running.log_level.as_deref()
            ),
            (2, 1000, 3, Some("debug"))
        );
        assert_eq!(apply_reload(&mut running, &new), Reload::default());
    }

    #[test]
    fn reload_leaves_restart_only_settings_and_key_bits_as_they_run() {
        let mut running = relay("");
        let mut new = relay("key_bits = 4096\nmax_queue = 9\n");
        new.role = Role::Relay {
            listen: "127.0.0.1:1".into(),
        };
        new.state_dir = "/y".into();
        new.socket = "/t".into();
        let done = apply_reload(&mut running, &new);
        assert_eq!(done.changes, ["max_queue 10000 -> 9"]);
        assert!(done.restart_needed && !done.log_level);
        assert_eq!(
            (
                &running.role,
                running.state_dir.as_path(),
                running.socket.as_path()
            ),
            (
                &Role::Relay {
                    listen: "127.0.0.1:0".into()
                },
                Path::new("/x"),
                Path::new("/s")
            )
        );
        assert_eq!(running.key_bits, 3072, "only read when a key is generated");

        let mut running = relay("");
        let new = relay("key_bits = 4096\n");
        let done = apply_reload(&mut running, &new);
        assert_eq!(
            done,
            Reload::default(),
            "a key_bits change needs no restart"
        );
    }

    #[test]
    fn every_flag_and_key_is_a_row_of_the_table() {
        let cmd = <Flags as clap::CommandFactory>::command();
        let longs: Vec<&str> = cmd
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| *l != "config")
            .collect();
        let rows: Vec<String> = SETTINGS.iter().filter_map(Setting::long).collect();
        assert_eq!(longs, rows);
        for row in SETTINGS.iter().filter(|r| r.flag) {
            let long = row.long().unwrap_or_default();
            let arg = cmd.get_arguments().find(|a| a.get_long() == Some(&long));
            let help = arg.and_then(|a| a.get_help()).map(|h| h.to_string());
            assert_eq!(help.as_deref(), Some(row.help()), "--{long}");
        }
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

    /// The relay's pin comes from `relay_fingerprint` or from the address; two that disagree,
    /// a malformed one, or one without `--connect` are errors that say so.
    #[test]
    fn relay_pin_from_flag_or_address() {
        let fp = Fingerprint([5; 32]).to_string();
        let other = Fingerprint([6; 32]).to_string();
        let role =
            |args: &[&str]| resolve_with(&flags(args), &File::default(), None).map(|c| c.role);
        let base = ["--user", "bob", "--state-dir", "/x", "--connect"];
        let at = format!("{fp}@example.org:7");
        let want = Role::Member {
            user: "bob".into(),
            connect: "example.org:7".into(),
            pin: Some(Fingerprint([5; 32])),
        };
        assert_eq!(role(&[&base[..], &[at.as_str()]].concat()).unwrap(), want);
        let flag = [&base[..], &["example.org:7", "--relay-fingerprint", &fp]].concat();
        assert_eq!(role(&flag).unwrap(), want);
        let same = [&base[..], &[at.as_str(), "--relay-fingerprint", &fp]].concat();
        assert_eq!(role(&same).unwrap(), want);
        let clash = [&base[..], &[at.as_str(), "--relay-fingerprint", &other]].concat();
        let e = role(&clash).unwrap_err().to_string();
        assert!(e.contains(&fp) && e.contains(&other), "{e}");
        let bad = [&base[..], &["SHA256:short@example.org:7"]].concat();
        assert!(role(&bad).unwrap_err().to_string().contains("connect"));
        let relay = [
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            "/x",
            "--relay-fingerprint",
            &fp,
        ];
        assert!(role(&relay)
            .unwrap_err()
            .to_string()
            .contains("needs --connect"));
    }
}
