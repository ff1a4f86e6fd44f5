//! `chatctl`: commands and their output (plain and JSON), over the control socket.
//!
//! Owns the one definition of every chatctl flag (clap derives `--help`; man page and completions
//! are checked against it) and the exit codes of the contract: 0 done, 1 failed, 2 bad usage,
//! 3 chatd not reachable, 4 `--wait` timed out, 5 recipient key changed. Must never: read a key
//! file, or print diagnostics on stdout.

mod chat;
pub mod format;
mod tui;

use std::ffi::OsString;
use std::io::{self, BufRead, IsTerminal, Write};
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum, ValueHint};

use crate::client::{Client, ClientError};
use crate::proto::control::{
    CtlRequest, CtlResponse, ErrorKind, PeerView, RecordKind, TrustState, Wait,
};
use crate::proto::MAX_TEXT;

/// chatctl: send and read end-to-end encrypted messages through chatd.
#[derive(Parser, Debug)]
#[command(name = "chatctl", version, long_about = None)]
pub struct Args {
    /// Control socket of chatd [default: $CHATD_SOCKET, else $XDG_RUNTIME_DIR/chatd/control.sock,
    /// else /run/chatd/control.sock for root, else /tmp/chatd-UID/control.sock]
    #[arg(long, global = true, value_name = "PATH", env = "CHATD_SOCKET")]
    pub socket: Option<PathBuf>,
    /// One JSON object per line on stdout
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do
    #[command(subcommand)]
    pub command: Command,
}

/// How long `send` waits.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitArg {
    /// Until sealed and stored in the outbox
    None,
    /// Until the relay has taken custody
    Relay,
    /// Until the recipient's daemon has stored it
    Delivered,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Send a message: `send USER [TEXT...]`, `send USER... -- [TEXT...]`, `send --all [TEXT...]`;
    /// without TEXT every line of stdin is one message, one result printed per line in order (lines
    /// already waiting go out together, up to 256, without waiting for each answer; on a terminal,
    /// one line on stderr says what send waits for first)
    Send {
        /// Send to every peer online now
        #[arg(long)]
        all: bool,
        /// Wait for this state before exiting
        #[arg(long, value_enum, default_value = "none", value_name = "STATE")]
        wait: WaitArg,
        /// Seconds to wait at most with --wait
        #[arg(long, default_value_t = 30, value_name = "SECS")]
        timeout: u64,
        /// Recipients (then the text, unless `--` separates them)
        #[arg(value_name = "USER", num_args = 0.., value_hint = ValueHint::Username)]
        words: Vec<OsString>,
        /// The text, after `--`
        #[arg(last = true, value_name = "TEXT")]
        text: Vec<OsString>,
    },
    /// Print history (last N records), then with -f new records as they come
    Tail {
        /// How many of the last records to print [default: 10; all newer than SEQ with --since]
        #[arg(short = 'n', long = "lines", value_name = "N")]
        lines: Option<u64>,
        /// Keep printing new records until interrupted
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only records with a larger seq
        #[arg(long, value_name = "SEQ")]
        since: Option<u64>,
        /// Only records to or from USER (and USER's presence)
        #[arg(long, value_name = "USER", value_hint = ValueHint::Username)]
        with: Option<String>,
        /// Only records of these kinds (comma-separated: message,presence,receipt,key)
        #[arg(long = "kind", value_name = "KINDS", value_delimiter = ',', value_parser = kind_parser())]
        kinds: Vec<String>,
    },
    /// Converse: full-screen on a terminal; with stdin or stdout not a terminal, line mode (stdin
    /// lines sent to USER, USER's messages printed); with --json, one two-way JSON-lines stream
    /// (requests with an "id" in, replies and every new record out). Keys and commands of the
    /// full-screen chat: chatctl chat --help, or /help inside it
    #[command(after_long_help = tui::HELP)]
    Chat {
        /// The peer (line mode: required; full screen: the first conversation; --json: only
        /// records to or from USER)
        #[arg(value_name = "USER", value_hint = ValueHint::Username)]
        user: Option<String>,
        /// History records to show first [default: 100 on the full screen, else 0: only new ones]
        #[arg(short = 'n', long = "lines", value_name = "N")]
        lines: Option<u64>,
        /// Start after this seq (line mode and --json: print the records after SEQ first)
        #[arg(long, value_name = "SEQ")]
        since: Option<u64>,
    },
    /// List your contacts: name, online, trust (trusted|pinned|changed), fingerprint; with
    /// --all, every name on the relay (a page at a time); on a relay, its registrations
    Who {
        /// Every name on the relay, not only your contacts (names you have not pinned show
        /// trust `bound`)
        #[arg(long)]
        all: bool,
        /// With --all: only names that start with P
        #[arg(long, value_name = "P", requires = "all")]
        prefix: Option<String>,
    },
    /// Show own name and fingerprint, roles, relay, connection, outbox, uptime, version
    Status,
    /// Print own fingerprint, or USER's pinned one
    Fingerprint {
        /// The peer
        #[arg(value_name = "USER", value_hint = ValueHint::Username)]
        user: Option<String>,
    },
    /// Accept USER's current key after checking FINGERPRINT out of band
    Trust {
        /// The peer
        #[arg(value_name = "USER", value_hint = ValueHint::Username)]
        user: String,
        /// SHA256:... as `chatctl fingerprint` prints it on USER's machine
        #[arg(value_name = "FINGERPRINT")]
        fingerprint: String,
    },
    /// Relay: drop USER's name binding and queue; member: drop USER's pin and held messages
    Forget {
        /// The name
        #[arg(value_name = "USER")]
        user: String,
    },
}

/// Exit codes of the contract.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// The request failed.
    pub const FAILED: u8 = 1;
    /// Bad usage.
    pub const USAGE: u8 = 2;
    /// chatd not reachable.
    pub const UNREACHABLE: u8 = 3;
    /// `--wait` timed out.
    pub const TIMEOUT: u8 = 4;
    /// A recipient's key changed.
    pub const KEY_CHANGED: u8 = 5;
}

/// A failure with its exit code and one line for stderr.
#[derive(Debug)]
pub struct Failure {
    /// Exit code.
    pub code: u8,
    /// The line (without the `chatctl: ` prefix).
    pub message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        // A reply we cannot read is a failed request, not an unreachable daemon.
        let code = match e {
            ClientError::Proto(_) => exit::FAILED,
            _ => exit::UNREACHABLE,
        };
        fail(code, e.to_string())
    }
}

/// Where output goes; a closed stdout (e.g. `| head`) ends the command quietly with exit 0.
struct Out {
    stdout: io::Stdout,
}

#[derive(Debug)]
struct PipeClosed;

impl Out {
    fn stdout() -> Out {
        Out {
            stdout: io::stdout(),
        }
    }

    fn line(&mut self, s: &str) -> Result<(), PipeClosed> {
        let mut lock = self.stdout.lock();
        writeln!(lock, "{s}")
            .and_then(|_| lock.flush())
            .map_err(|_| PipeClosed)
    }
}

/// Run chatctl with these arguments; returns the exit code.
pub fn run(argv: Vec<OsString>) -> u8 {
    let args = match Args::try_parse_from(&argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
        }
    };
    // `--` matters for send: it separates several recipients from the text.
    let dashdash = argv.iter().any(|a| a == "--");
    match execute(args, dashdash) {
        Ok(()) => exit::OK,
        Err(f) => {
            let _ = writeln!(io::stderr(), "chatctl: {}", f.message);
            f.code
        }
    }
}

fn socket_path(args: &Args) -> PathBuf {
    args.socket
        .clone()
        .unwrap_or_else(crate::config::default_socket)
}

fn to_string(s: OsString, what: &str) -> Result<String, Failure> {
    s.into_string().map_err(|_| {
        fail(
            exit::FAILED,
            format!("{what} is not valid UTF-8; nothing was sent"),
        )
    })
}

fn execute(args: Args, dashdash: bool) -> Result<(), Failure> {
    let path = socket_path(&args);
    let as_json = args.json;
    let mut out = Out {
        stdout: io::stdout(),
    };
    let result = match args.command {
        Command::Send {
            all,
            wait,
            timeout,
            words,
            text,
        } => {
            let (users, text) = split_send(all, dashdash, words, text)?;
            send(&path, as_json, &mut out, users, all, text, wait, timeout)
        }
        Command::Tail {
            lines,
            follow,
            since,
            with,
            kinds,
        } => {
            let kinds = kinds.iter().map(|k| RecordKind::from(k.as_str())).collect();
            let last = match (lines, since) {
                (Some(n), _) => Some(n),
                (None, Some(_)) => None,
                (None, None) => Some(10),
            };
            tail(
                &path,
                as_json,
                &mut out,
                Tail {
                    last,
                    since,
                    with,
                    kinds,
                    follow,
                },
            )
        }
        Command::Chat { user, lines, since } => {
            let terminal = io::stdin().is_terminal() && io::stdout().is_terminal();
            if as_json {
                chat::json_mode(&path, &mut out, user, lines, since)
            } else if terminal {
                tui::run(&path, user, lines.unwrap_or(100), since)
            } else {
                match user {
                    None => Err(fail(
                        exit::USAGE,
                        "chat without a terminal is line mode and needs a peer: chatctl chat USER \
                         (or chatctl --json chat for the JSON stream)",
                    )
                    .into()),
                    Some(u) => {
                        check_name(&u)?;
                        chat::line_mode(&path, &mut out, u, lines, since)
                    }
                }
            }
        }
        Command::Who { all, prefix } => {
            let req = if all {
                CtlRequest::Directory { prefix }
            } else {
                CtlRequest::Who
            };
            who(&path, &req, as_json, &mut out)
        }
        Command::Status => simple(&path, as_json, &mut out, CtlRequest::Status),
        Command::Fingerprint { user } => {
            simple(&path, as_json, &mut out, CtlRequest::Fingerprint { user })
        }
        Command::Trust { user, fingerprint } => simple(
            &path,
            as_json,
            &mut out,
            CtlRequest::Trust { user, fingerprint },
        ),
        Command::Forget { user } => simple(&path, as_json, &mut out, CtlRequest::Forget { user }),
    };
    match result {
        Err(Step::Pipe) => Ok(()),
        Err(Step::Fail(f)) => Err(f),
        Ok(()) => Ok(()),
    }
}

enum Step {
    Fail(Failure),
    Pipe,
}

impl From<Failure> for Step {
    fn from(f: Failure) -> Self {
        Step::Fail(f)
    }
}

impl From<ClientError> for Step {
    fn from(e: ClientError) -> Self {
        Step::Fail(e.into())
    }
}

impl From<PipeClosed> for Step {
    fn from(_: PipeClosed) -> Self {
        Step::Pipe
    }
}

/// `send USER [TEXT...]` / `send USER... -- [TEXT...]` / `send --all [TEXT...]`.
fn split_send(
    all: bool,
    dashdash: bool,
    words: Vec<OsString>,
    text: Vec<OsString>,
) -> Result<(Vec<String>, Option<String>), Failure> {
    let words: Vec<String> = words
        .into_iter()
        .map(|w| to_string(w, "an argument"))
        .collect::<Result<_, _>>()?;
    let text: Vec<String> = text
        .into_iter()
        .map(|w| to_string(w, "the message text"))
        .collect::<Result<_, _>>()?;
    let (users, text_words) = if all {
        if dashdash && !words.is_empty() {
            return Err(fail(
                exit::USAGE,
                "send --all takes no recipients; put the text after --all",
            ));
        }
        (Vec::new(), if dashdash { text } else { words })
    } else if dashdash {
        (words, text)
    } else {
        let mut it = words.into_iter();
        let first: Vec<String> = it.next().into_iter().collect();
        (first, it.collect())
    };
    if !all && users.is_empty() {
        return Err(fail(
            exit::USAGE,
            "send needs a recipient: chatctl send USER [TEXT...] (or --all)",
        ));
    }
    let text = (!text_words.is_empty()).then(|| text_words.join(" "));
    Ok((users, text))
}

/// A user name chatctl will ask about, checked before anything is sent.
fn check_name(u: &str) -> Result<(), Failure> {
    if crate::proto::valid_user(u) {
        Ok(())
    } else {
        Err(fail(
            exit::FAILED,
            format!(
                "invalid user name {u:?}: names are 1 to 32 of a-z 0-9 . _ - starting with a letter or digit; nothing was sent"
            ),
        ))
    }
}

/// The `Send` request for one text, after the checks chatctl makes before anything is sent
/// (shared by `send`, `chat` and the JSON stream, so they refuse the same things alike).
fn send_request(
    users: Vec<String>,
    all: bool,
    text: String,
    wait: Wait,
    timeout_ms: u64,
) -> Result<CtlRequest, Failure> {
    if users.len() > crate::proto::MAX_RECIPIENTS {
        return Err(fail(
            exit::FAILED,
            format!(
                "{} recipients; one send takes at most {}; nothing was sent",
                users.len(),
                crate::proto::MAX_RECIPIENTS
            ),
        ));
    }
    for u in &users {
        check_name(u)?;
    }
    if text.len() > MAX_TEXT {
        return Err(fail(
            exit::FAILED,
            format!(
                "message text is {} bytes; the limit is {MAX_TEXT} bytes; nothing was sent",
                text.len()
            ),
        ));
    }
    Ok(CtlRequest::Send {
        to: users,
        all,
        text,
        wait,
        timeout_ms,
    })
}

#[allow(clippy::too_many_arguments)]
fn send(
    path: &std::path::Path,
    as_json: bool,
    out: &mut Out,
    users: Vec<String>,
    all: bool,
    text: Option<String>,
    wait: WaitArg,
    timeout: u64,
) -> Result<(), Step> {
    // Refuse bad names and too many recipients before connecting.
    send_request(users.clone(), all, String::new(), Wait::None, 0)?;
    let wait = match wait {
        WaitArg::None => Wait::None,
        WaitArg::Relay => Wait::Relay,
        WaitArg::Delivered => Wait::Delivered,
    };
    let mut client = Client::connect(path)?;
    let one = |client: &mut Client, text: String, out: &mut Out| -> Result<(), Step> {
        let req = send_request(users.clone(), all, text, wait, timeout.saturating_mul(1000))?;
        let spinner = (wait != Wait::None && io::stderr().is_terminal()).then(|| {
            crate::progress::Spinner::start(match wait {
                Wait::Relay => "waiting for the relay",
                _ => "waiting for delivery",
            })
        });
        let resp = client.request(&req);
        if let Some(s) = spinner {
            s.stop();
        }
        match resp? {
            CtlResponse::Sent(list) => {
                for l in format::sent(&list, as_json) {
                    out.line(&l)?;
                }
                Ok(())
            }
            other => Err(error_of(other, as_json, out)),
        }
    };
    match text {
        Some(t) => one(&mut client, t, out),
        None => {
            // Check the recipients before waiting on stdin, so a typo fails at once even when
            // no line ever comes.
            check_recipients(path, &mut client, &users)?;
            // Not held while stdin is read: it would hold a control-client slot for nothing.
            drop(client);
            let mut held: Option<(Client, std::time::Instant)> = None;
            let stdin = io::stdin();
            if stdin.is_terminal() {
                // A person at a terminal would otherwise see a command that seems to hang.
                let _ = writeln!(io::stderr(), "{}", waiting_line(&users, all));
            }
            // Lines that are already there (a pipe, a file) go out together, up to a window,
            // without waiting for each answer: the daemon seals and stores them in one turn
            // and answers in order. A line that comes alone (a person, a slow producer) is
            // answered before the next one is read, so its result shows at once.
            let mut reader = io::BufReader::with_capacity(64 * 1024, stdin);
            let mut buf = Vec::new();
            loop {
                let mut burst = Vec::new();
                let mut eof = false;
                // A bad line ends the command as before, once the lines before it are sent.
                let mut bad: Option<Step> = None;
                // With a wait, the daemon runs the lines one after another anyway (each
                // waits for the one before it): one at a time keeps --timeout per line and
                // ends the command at the first line that times out, as without pipelining.
                let window = if wait == Wait::None { SEND_WINDOW } else { 1 };
                while burst.len() < window {
                    buf.clear();
                    let n = match reader.read_until(b'\n', &mut buf) {
                        Ok(n) => n,
                        Err(e) => {
                            bad =
                                Some(fail(exit::FAILED, format!("cannot read stdin: {e}")).into());
                            break;
                        }
                    };
                    if n == 0 {
                        eof = true;
                        break;
                    }
                    let req = chat::line_text(std::mem::take(&mut buf)).and_then(|line| {
                        line.map(|text| {
                            send_request(
                                users.clone(),
                                all,
                                text,
                                wait,
                                timeout.saturating_mul(1000),
                            )
                        })
                        .transpose()
                    });
                    match req {
                        Ok(Some(r)) => burst.push(r),
                        Ok(None) => {}
                        Err(e) => {
                            bad = Some(e.into());
                            break;
                        }
                    }
                    if !line_ready(&mut reader) {
                        break;
                    }
                }
                if !burst.is_empty() {
                    // A new connection after a pause: chatd closes a control connection idle
                    // for control_idle_timeout, which is at least 1 s, and the client cannot
                    // know it.
                    let fresh = held.as_ref().map_or(true, |(_, at)| {
                        at.elapsed() > std::time::Duration::from_millis(500)
                    });
                    if fresh {
                        held = Some((Client::connect(path)?, std::time::Instant::now()));
                    }
                    if let Some((client, at)) = held.as_mut() {
                        send_burst(client, &burst, wait, as_json, out)?;
                        *at = std::time::Instant::now();
                    }
                }
                if let Some(e) = bad {
                    return Err(e);
                }
                if eof {
                    return Ok(());
                }
            }
        }
    }
}

/// Lines of stdin sent before their answers are read.
const SEND_WINDOW: usize = 256;

/// Whether a whole line (or the end) of stdin can be read without blocking: the burst goes on
/// only then, so complete lines never wait behind half a line from a slow producer.
fn line_ready(reader: &mut io::BufReader<io::Stdin>) -> bool {
    if reader.buffer().is_empty() {
        if !stdin_ready() {
            return false;
        }
        // Readable: this read does not block (at the end it gives nothing, which
        // `read_until` then sees as the end).
        match reader.fill_buf() {
            Ok([]) => return true,
            Ok(_) => {}
            Err(_) => return true,
        }
    }
    reader.buffer().contains(&b'\n')
}

/// Whether stdin can be read without blocking (more of a pipe's lines are there).
fn stdin_ready() -> bool {
    let mut fd = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents & libc::POLLIN != 0
}

/// Send a burst of stdin lines and report each answer, in order. A failed line ends the
/// command, but only after the answers of the lines already sent with it are reported: those
/// were sent, and a script must hear so.
fn send_burst(
    client: &mut Client,
    burst: &[CtlRequest],
    wait: Wait,
    as_json: bool,
    out: &mut Out,
) -> Result<(), Step> {
    let spinner = (wait != Wait::None && io::stderr().is_terminal()).then(|| {
        crate::progress::Spinner::start(match wait {
            Wait::Relay => "waiting for the relay",
            _ => "waiting for delivery",
        })
    });
    // As `request`: a daemon that refuses us answers before it reads, so a failed write may
    // still leave its reason to read.
    let sent = client.send_all(burst);
    let mut answers = Vec::with_capacity(burst.len());
    let mut lost = None;
    while answers.len() < burst.len() {
        match client.recv() {
            Ok(r) => answers.push(r),
            Err(e) => {
                lost = Some(e);
                break;
            }
        }
    }
    // The spinner goes before anything is printed, so no result line starts with it.
    if let Some(s) = spinner {
        s.stop();
    }
    let got = answers.len();
    let mut first: Option<Step> = None;
    for resp in answers {
        match resp {
            CtlResponse::Sent(list) => {
                for l in format::sent(&list, as_json) {
                    out.line(&l)?;
                }
            }
            other => {
                let e = error_of(other, as_json, out);
                match (&first, &e) {
                    (None, _) => first = Some(e),
                    // The first failure gives the exit status; later ones are said as they
                    // come, one line each, so none is silent.
                    (Some(_), Step::Fail(f)) => {
                        let _ = writeln!(io::stderr(), "chatctl: {}", f.message);
                    }
                    (Some(_), Step::Pipe) => {}
                }
            }
        }
    }
    if let Some(e) = first {
        return Err(e);
    }
    match (lost, sent) {
        (None, _) => Ok(()),
        (Some(_), Err(e)) if got == 0 => Err(e.into()),
        (Some(e), _) => Err(e.into()),
    }
}

/// What `send` without text says on a terminal before it reads stdin.
fn waiting_line(users: &[String], all: bool) -> String {
    let to = if all {
        "everyone online".to_string()
    } else {
        users.join(", ")
    };
    format!("chatctl: type messages for {to}, one per line; Ctrl-D ends (Ctrl-C aborts)")
}

/// Ask `who` and hand each `Peers` frame to `each` as it comes, until `End`: the list is
/// streamed in chunks, so it can be longer than any one frame.
fn who_stream(
    client: &mut Client,
    req: &CtlRequest,
    mut each: impl FnMut(Vec<PeerView>) -> Result<(), Step>,
) -> Result<(), Step> {
    // `request` reads the first answer even if the send failed: a daemon at its client limit
    // answers (saying so) and closes before it reads.
    let mut next = client.request(req)?;
    loop {
        let resp = std::mem::replace(&mut next, CtlResponse::End);
        match resp {
            CtlResponse::Peers(p) => {
                each(p)?;
                next = client.recv()?;
            }
            CtlResponse::End => return Ok(()),
            CtlResponse::Error { message, .. } => return Err(fail(exit::FAILED, message).into()),
            other => {
                return Err(fail(
                    exit::FAILED,
                    format!("unexpected reply from chatd: {}", reply_name(&other)),
                )
                .into())
            }
        }
    }
}

/// `who`: one line per peer, printed as the chunks arrive.
fn who(path: &std::path::Path, req: &CtlRequest, as_json: bool, out: &mut Out) -> Result<(), Step> {
    let mut client = Client::connect(path)?;
    who_stream(&mut client, req, |list| {
        for l in format::peers(&list, as_json) {
            out.line(&l)?;
        }
        Ok(())
    })
}

/// Fail as `send` would for an unknown recipient or one whose key changed.
fn check_recipients(
    path: &std::path::Path,
    client: &mut Client,
    users: &[String],
) -> Result<(), Step> {
    let mut peers = Vec::new();
    who_stream(client, &CtlRequest::Who, |chunk| {
        // Keep only the entries asked about: the contacts may be far more than `users`.
        peers.extend(chunk.into_iter().filter(|p| users.contains(&p.user)));
        Ok(())
    })?;
    for u in users {
        match peers.iter().find(|p| &p.user == u) {
            None => relay_knows(path, u)?,
            Some(p) if p.trust == TrustState::Changed => {
                let new = p.presented.as_deref().unwrap_or("?");
                return Err(fail(
                    exit::KEY_CHANGED,
                    format!(
                        "{u}'s key changed: pinned {}, relay presents {new}; nothing was sent. \
                         Check the new fingerprint with {u} out of band, then run: chatctl trust {u} {new}",
                        p.fingerprint
                    ),
                )
                .into());
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Ask the relay, through the daemon, whether `user` (not a contact yet) is bound: the first
/// entry of a listing with `user` as its prefix is `user` itself if it is. On a connection of
/// its own, dropped after the first page.
fn relay_knows(path: &std::path::Path, user: &str) -> Result<(), Step> {
    let mut client = Client::connect(path)?;
    let req = CtlRequest::Directory {
        prefix: Some(user.to_string()),
    };
    match client.request(&req)? {
        CtlResponse::Peers(p) if p.first().is_some_and(|p| p.user == user) => Ok(()),
        CtlResponse::Peers(_) | CtlResponse::End => Err(fail(
            exit::FAILED,
            format!("unknown user {user}: the relay has no such name; nothing was sent"),
        )
        .into()),
        CtlResponse::Error { message, .. } => Err(fail(
            exit::FAILED,
            format!("cannot check {user} on the relay: {message}; nothing was sent"),
        )
        .into()),
        other => Err(fail(
            exit::FAILED,
            format!("unexpected reply from chatd: {}", reply_name(&other)),
        )
        .into()),
    }
}

fn error_of(resp: CtlResponse, as_json: bool, out: &mut Out) -> Step {
    match resp {
        CtlResponse::Error {
            kind,
            message,
            sent,
        } => {
            // A timed-out wait still says where each message got to, on stdout.
            for l in format::sent(&sent, as_json) {
                if out.line(&l).is_err() {
                    break;
                }
            }
            let code = match kind {
                ErrorKind::Failed => exit::FAILED,
                ErrorKind::Timeout => exit::TIMEOUT,
                ErrorKind::KeyChanged => exit::KEY_CHANGED,
            };
            Step::Fail(fail(code, message))
        }
        other => Step::Fail(fail(
            exit::FAILED,
            format!("unexpected reply from chatd: {}", reply_name(&other)),
        )),
    }
}

fn reply_name(r: &CtlResponse) -> &'static str {
    match r {
        CtlResponse::Sent(_) => "Sent",
        CtlResponse::Record(_) => "Record",
        CtlResponse::End => "End",
        CtlResponse::Peers(_) => "Peers",
        CtlResponse::Status(_) => "Status",
        CtlResponse::Fingerprint { .. } => "Fingerprint",
        CtlResponse::Done(_) => "Done",
        CtlResponse::Error { .. } => "Error",
    }
}

/// The kinds `--kind` accepts: every kind this version knows (so completions list them).
fn kind_parser() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(RecordKind::KNOWN.iter().map(RecordKind::as_str))
}

/// What `tail` asks for.
struct Tail {
    last: Option<u64>,
    since: Option<u64>,
    with: Option<String>,
    kinds: Vec<RecordKind>,
    follow: bool,
}

fn tail(path: &std::path::Path, as_json: bool, out: &mut Out, t: Tail) -> Result<(), Step> {
    let follow = t.follow;
    let mut client = Client::connect(path)?;
    if !as_json {
        return tail_plain(&mut client, out, t);
    }
    client.send(&CtlRequest::Tail {
        last: t.last,
        since: t.since,
        with: t.with,
        follow: t.follow,
        kinds: t.kinds,
    })?;
    loop {
        match next_record(&mut client, follow)? {
            CtlResponse::Record(r) => out.line(&format::record_json(&r))?,
            CtlResponse::End => return Ok(()),
            other => return Err(error_of(other, as_json, out)),
        }
    }
}

fn next_record(client: &mut Client, follow: bool) -> Result<CtlResponse, Step> {
    match client.recv() {
        Ok(r) => Ok(r),
        Err(ClientError::Closed) if follow => {
            Err(fail(exit::UNREACHABLE, "chatd went away").into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Records of history that plain `tail` holds at most before it prints them: within a batch a
/// sent message shows its latest state; a later receipt becomes a short line. Bounds memory
/// whatever `--since` asks for.
const PLAIN_BATCH: usize = 1024;

/// Plain `tail`, read like a chat ([`format::ChatLines`]). The history is asked for without
/// `follow` (so its end is known and each message can be printed with its latest state), then,
/// with `-f`, a follower starts after the newest record that existed before the history was
/// read or that it printed, so nothing is missed or printed twice.
fn tail_plain(client: &mut Client, out: &mut Out, t: Tail) -> Result<(), Step> {
    let Tail {
        last,
        since,
        with,
        kinds,
        follow,
    } = t;
    let mut start = if follow { chat::end_seq(client)? } else { 0 };
    client.send(&CtlRequest::Tail {
        last,
        since,
        with: with.clone(),
        follow: false,
        kinds: kinds.clone(),
    })?;
    let mut lines = format::ChatLines::default();
    let mut batch = Vec::new();
    loop {
        match next_record(client, false)? {
            CtlResponse::Record(r) => {
                start = start.max(r.seq);
                batch.push(r);
                if batch.len() >= PLAIN_BATCH {
                    for l in lines.history(&batch) {
                        out.line(&l)?;
                    }
                    batch.clear();
                }
            }
            CtlResponse::End => break,
            other => return Err(error_of(other, false, out)),
        }
    }
    for l in lines.history(&batch) {
        out.line(&l)?;
    }
    if !follow {
        return Ok(());
    }
    client.send(&CtlRequest::Tail {
        last: None,
        since: Some(start.max(since.unwrap_or(0))),
        with,
        follow: true,
        kinds,
    })?;
    loop {
        match next_record(client, true)? {
            CtlResponse::Record(r) => {
                for l in lines.live(&r) {
                    out.line(&l)?;
                }
            }
            other => return Err(error_of(other, false, out)),
        }
    }
}

fn simple(
    path: &std::path::Path,
    as_json: bool,
    out: &mut Out,
    req: CtlRequest,
) -> Result<(), Step> {
    let mut client = Client::connect(path)?;
    match client.request(&req)? {
        CtlResponse::Peers(list) => {
            for l in format::peers(&list, as_json) {
                out.line(&l)?;
            }
        }
        CtlResponse::Status(s) => {
            for l in format::status(&s, as_json) {
                out.line(&l)?;
            }
        }
        CtlResponse::Fingerprint { user, fingerprint } => {
            out.line(&format::fingerprint(&user, &fingerprint, as_json))?
        }
        CtlResponse::Done(m) => out.line(&format::done(&m, as_json))?,
        other => return Err(error_of(other, as_json, out)),
    }
    Ok(())
}
