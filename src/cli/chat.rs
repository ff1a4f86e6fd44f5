//! `chatctl chat`: a conversation in one process. Line mode (stdin lines to one peer, the peer's
//! messages out) and the two-way JSON-lines stream live here; the full-screen chat is
//! [`super::tui`], built on the same pieces.
//!
//! Every mode talks to chatd over the control socket like any other chatctl command, on two
//! connections: a `tail -f` that streams new records, and one that carries requests. (A control
//! connection that follows a tail only reads, and a reply carries no request id, so one daemon
//! connection cannot carry both without a new control frame; DECISIONS.md, issue 11.) What the
//! user or script sees is one stream in and one stream out.
//!
//! Must never: read a key file, print diagnostics on stdout, or let message text reach the
//! terminal unescaped in plain output.

use std::io::{self, BufRead, Read};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{check_recipients, error_of, exit, fail, format, send_request, who_stream, Failure};
use super::{Out, Step};
use crate::client::{Client, ClientError};
use crate::proto::control::{CtlRequest, CtlResponse, Dir, ErrorKind, Record, RecordBody, Wait};

/// What reaches the loop of a chat: from the daemon, from the user, from the request worker.
pub(crate) enum Event {
    /// A new history record (from the `tail -f` connection).
    Record(Record),
    /// The `tail -f` connection ended: why, as chatctl's failure.
    Lost(Failure),
    /// One line of stdin (with its newline, if it had one).
    Line(Vec<u8>),
    /// A line of stdin longer than [`LINE_MAX`]; it was skipped.
    TooLong,
    /// Stdin ended.
    Eof,
    /// Stdin could not be read.
    StdinError(String),
    /// A request of the JSON stream was answered: the reply line.
    Reply(String),
    /// A key, paste or resize on the terminal (full-screen mode).
    Term(ratatui::crossterm::event::Event),
    /// SIGTERM, SIGINT or SIGHUP (full-screen mode).
    Signal,
    /// A request of the full-screen chat was answered.
    Answer(super::tui::Answer),
}

/// The seq of the newest record in the history (0 when there is none), so a follower can start
/// exactly after it: a record that arrives while chatctl starts up is then never missed.
pub(crate) fn end_seq(client: &mut Client) -> Result<u64, Step> {
    client.send(&CtlRequest::Tail {
        last: Some(1),
        since: None,
        with: None,
        follow: false,
        kinds: Vec::new(),
    })?;
    let mut seq = 0;
    loop {
        match client.recv()? {
            CtlResponse::Record(r) => seq = seq.max(r.seq),
            CtlResponse::End => return Ok(seq),
            other => return Err(error_of(other, false, &mut Out::stdout())),
        }
    }
}

/// Start a `tail -f` (history chosen by `last`/`since`, as `tail` takes them) whose records go
/// to `tx` from a thread. Connects before returning, so an unreachable daemon fails at once.
pub(crate) fn follow(
    path: &Path,
    last: Option<u64>,
    since: Option<u64>,
    with: Option<String>,
    tx: Sender<Event>,
) -> Result<(), Step> {
    let mut client = Client::connect(path)?;
    client.send(&CtlRequest::Tail {
        last,
        since,
        with,
        follow: true,
        kinds: Vec::new(),
    })?;
    thread::spawn(move || loop {
        let ev = match client.recv() {
            Ok(CtlResponse::Record(r)) => Event::Record(r),
            Ok(CtlResponse::Error { message, .. }) => Event::Lost(fail(exit::FAILED, message)),
            Ok(_) => Event::Lost(fail(exit::FAILED, "unexpected reply from chatd to a tail")),
            Err(ClientError::Proto(e)) => {
                Event::Lost(fail(exit::FAILED, format!("bad reply from chatd: {e}")))
            }
            Err(_) => Event::Lost(fail(exit::UNREACHABLE, "chatd went away")),
        };
        let end = matches!(ev, Event::Lost(_));
        if tx.send(ev).is_err() || end {
            return;
        }
    });
    Ok(())
}

/// The longest stdin line a chat reads (a frame's worth: the longest text, JSON-escaped, fits);
/// a longer one is skipped, so no input can make chatctl hold unbounded memory.
pub(crate) const LINE_MAX: usize = crate::proto::frame::MAX_FRAME;

/// Read stdin line by line in a thread, each line to `tx`, then `Eof`.
pub(crate) fn read_stdin(tx: Sender<Event>) {
    thread::spawn(move || {
        let stdin = io::stdin();
        let mut lock = stdin.lock();
        loop {
            let ev = match read_line(&mut lock) {
                Ok(None) => Event::Eof,
                Ok(Some(Some(buf))) => Event::Line(buf),
                Ok(Some(None)) => Event::TooLong,
                Err(e) => Event::StdinError(format!("cannot read stdin: {e}")),
            };
            let end = !matches!(ev, Event::Line(_) | Event::TooLong);
            if tx.send(ev).is_err() || end {
                return;
            }
        }
    });
}

/// One line of at most [`LINE_MAX`] bytes: `None` at the end of input, `Some(None)` for a
/// longer line (read to its end and dropped).
fn read_line(r: &mut impl BufRead) -> io::Result<Option<Option<Vec<u8>>>> {
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(LINE_MAX as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() <= LINE_MAX || (buf.last() == Some(&b'\n') && buf.len() == LINE_MAX + 1) {
        return Ok(Some(Some(buf)));
    }
    // Skip the rest of the line without keeping it.
    loop {
        let (done, used) = {
            let chunk = r.fill_buf()?;
            match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (true, i + 1),
                None => (chunk.is_empty(), chunk.len()),
            }
        };
        r.consume(used);
        if done {
            return Ok(Some(None));
        }
    }
}

/// A line of stdin as text: its newline (and a CR before it) cut; `None` for an empty line.
pub(crate) fn line_text(mut buf: Vec<u8>) -> Result<Option<String>, Failure> {
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    if buf.is_empty() {
        return Ok(None);
    }
    String::from_utf8(buf).map(Some).map_err(|_| {
        fail(
            exit::FAILED,
            "a line of stdin is not valid UTF-8; it and the lines after it were not sent",
        )
    })
}

/// `chatctl chat USER` without a terminal: every stdin line goes to USER; USER's messages are
/// printed, one per line, escaped as plain `tail` escapes them; nothing else is printed. Ends
/// at the end of stdin (exit 0), when chatd goes away (exit 3) or when a send fails (its exit).
pub(crate) fn line_mode(
    path: &Path,
    out: &mut Out,
    user: String,
    last: Option<u64>,
    since: Option<u64>,
) -> Result<(), Step> {
    let mut client = Client::connect(path)?;
    check_recipients(path, &mut client, std::slice::from_ref(&user))?;
    let since = match (last, since) {
        (None, None) => Some(end_seq(&mut client)?),
        (_, s) => s,
    };
    let (tx, rx) = mpsc::channel();
    follow(path, last, since, Some(user.clone()), tx.clone())?;
    read_stdin(tx);
    for ev in rx {
        match ev {
            Event::Record(r) => {
                if let RecordBody::Message {
                    from,
                    dir: Dir::In,
                    text,
                    ..
                } = &r.body
                {
                    if *from == user {
                        out.line(&format::escape(text))?;
                    }
                }
            }
            Event::Line(buf) => {
                let Some(text) = line_text(buf)? else {
                    continue;
                };
                let req = send_request(vec![user.clone()], false, text, Wait::None, 0)?;
                match client.request(&req)? {
                    CtlResponse::Sent(_) => {}
                    other => return Err(error_of(other, false, out)),
                }
            }
            Event::TooLong => {
                return Err(fail(
                    exit::FAILED,
                    format!(
                        "a line of stdin is longer than {LINE_MAX} bytes; it and the lines after \
                         it were not sent"
                    ),
                )
                .into())
            }
            Event::Eof => return Ok(()),
            Event::StdinError(e) => return Err(fail(exit::FAILED, e).into()),
            Event::Lost(f) => return Err(f.into()),
            _ => {}
        }
    }
    Ok(())
}

/// `to` of a JSON `send`: one name or a list.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum To {
    One(String),
    Many(Vec<String>),
}

/// `wait` of a JSON `send`.
#[derive(Deserialize, Debug, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum JsonWait {
    None,
    Relay,
    Delivered,
}

/// A request of the JSON stream (besides its `id`), named by `op`.
#[derive(Deserialize, Debug)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum Op {
    Send {
        #[serde(default)]
        to: Option<To>,
        #[serde(default)]
        all: bool,
        text: String,
        #[serde(default)]
        wait: Option<JsonWait>,
        /// Seconds, for `wait` (default 30, as `send --timeout`).
        #[serde(default)]
        timeout: Option<u64>,
    },
    Who {
        /// Every name on the relay, a page at a time (as `who --all`), not only the contacts.
        #[serde(default)]
        all: bool,
        /// With `all`: only names that start with this.
        #[serde(default)]
        prefix: Option<String>,
    },
    Status,
    Fingerprint {
        #[serde(default)]
        user: Option<String>,
    },
    Trust {
        user: String,
        fingerprint: String,
    },
}

/// One request line parsed: its id (any JSON value, echoed back) and what it asks, or why it
/// cannot be read.
fn parse_request(line: &str) -> (Value, Result<Op, String>) {
    let mut obj = match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(o)) => o,
        Ok(_) => return (Value::Null, Err("a request is a JSON object".into())),
        Err(e) => return (Value::Null, Err(format!("not JSON: {e}"))),
    };
    let Some(id) = obj.remove("id") else {
        return (
            Value::Null,
            Err("a request needs an \"id\" (echoed in its reply)".into()),
        );
    };
    let op = serde_json::from_value::<Op>(Value::Object(obj)).map_err(|e| e.to_string());
    (id, op)
}

fn reply_ok(id: &Value, fields: Value) -> String {
    let mut v = json!({"kind": "reply", "id": id, "ok": true});
    if let (Value::Object(o), Value::Object(f)) = (&mut v, fields) {
        o.extend(f);
    }
    v.to_string()
}

fn reply_err(id: &Value, code: u8, error: &str, message: &str, sent: Vec<Value>) -> String {
    let mut v = json!({
        "kind": "reply", "id": id, "ok": false, "error": error, "exit": code, "message": message,
    });
    if !sent.is_empty() {
        v["sent"] = Value::Array(sent);
    }
    v.to_string()
}

/// Lines of `format`'s JSON output as values (one definition of the field names).
fn values(lines: Vec<String>) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn error_word(code: u8) -> &'static str {
    match code {
        exit::TIMEOUT => "timeout",
        exit::KEY_CHANGED => "key_changed",
        exit::UNREACHABLE => "unreachable",
        exit::USAGE => "bad_request",
        _ => "failed",
    }
}

/// Answer one request of the JSON stream on the request connection: the reply line.
fn answer(client: &mut Client, id: &Value, op: Op) -> String {
    let from_failure = |f: Failure| reply_err(id, f.code, error_word(f.code), &f.message, vec![]);
    let req = match op {
        Op::Send {
            to,
            all,
            text,
            wait,
            timeout,
        } => {
            let users = match to {
                None => vec![],
                Some(To::One(u)) => vec![u],
                Some(To::Many(v)) => v,
            };
            if !all && users.is_empty() {
                return reply_err(
                    id,
                    exit::USAGE,
                    "bad_request",
                    "send needs \"to\" (a name or a list of names) or \"all\": true",
                    vec![],
                );
            }
            if all && !users.is_empty() {
                return reply_err(
                    id,
                    exit::USAGE,
                    "bad_request",
                    "send takes \"to\" or \"all\": true, not both",
                    vec![],
                );
            }
            let wait = match wait.unwrap_or(JsonWait::None) {
                JsonWait::None => Wait::None,
                JsonWait::Relay => Wait::Relay,
                JsonWait::Delivered => Wait::Delivered,
            };
            let timeout_ms = timeout.unwrap_or(30).saturating_mul(1000);
            match send_request(users, all, text, wait, timeout_ms) {
                Ok(r) => r,
                Err(f) => return from_failure(f),
            }
        }
        Op::Who { all, prefix } => {
            let req = match (all, prefix) {
                (true, prefix) => CtlRequest::Directory { prefix },
                (false, None) => CtlRequest::Who,
                (false, Some(_)) => {
                    return reply_err(
                        id,
                        exit::USAGE,
                        "bad_request",
                        "who takes \"prefix\" only with \"all\": true",
                        vec![],
                    )
                }
            };
            let mut peers = Vec::new();
            return match who_stream(client, &req, |chunk| {
                peers.extend(values(format::peers(&chunk, true)));
                Ok(())
            }) {
                Ok(()) => reply_ok(id, json!({ "peers": peers })),
                Err(Step::Fail(f)) => from_failure(f),
                Err(Step::Pipe) => from_failure(fail(exit::FAILED, "stdout closed")),
            };
        }
        Op::Status => CtlRequest::Status,
        Op::Fingerprint { user } => CtlRequest::Fingerprint { user },
        Op::Trust { user, fingerprint } => CtlRequest::Trust { user, fingerprint },
    };
    match client.request(&req) {
        Err(e) => from_failure(e.into()),
        Ok(CtlResponse::Sent(list)) => {
            reply_ok(id, json!({ "sent": values(format::sent(&list, true)) }))
        }
        Ok(CtlResponse::Status(s)) => {
            let status = values(format::status(&s, true));
            reply_ok(id, json!({ "status": status.into_iter().next() }))
        }
        Ok(CtlResponse::Fingerprint { user, fingerprint }) => {
            reply_ok(id, json!({ "user": user, "fingerprint": fingerprint }))
        }
        Ok(CtlResponse::Done(m)) => reply_ok(id, json!({ "message": m })),
        Ok(CtlResponse::Error {
            kind,
            message,
            sent,
        }) => {
            let code = match kind {
                ErrorKind::Failed => exit::FAILED,
                ErrorKind::Timeout => exit::TIMEOUT,
                ErrorKind::KeyChanged => exit::KEY_CHANGED,
            };
            reply_err(
                id,
                code,
                error_word(code),
                &message,
                values(format::sent(&sent, true)),
            )
        }
        Ok(other) => from_failure(fail(
            exit::FAILED,
            format!("unexpected reply from chatd: {}", super::reply_name(&other)),
        )),
    }
}

/// A request for the worker: parsed, or the reason it could not be.
struct Job {
    id: Value,
    op: Result<Op, String>,
}

/// `chatctl --json chat [USER]`: requests in on stdin, replies (same `id`) and every new record
/// out on stdout, one JSON object a line. Requests are answered in order, one at a time, on
/// their own connection, so a `send` that waits never holds up the records. Ends when stdin
/// ends and every request is answered (exit 0), or when chatd goes away (exit 3).
pub(crate) fn json_mode(
    path: &Path,
    out: &mut Out,
    with: Option<String>,
    last: Option<u64>,
    since: Option<u64>,
) -> Result<(), Step> {
    if let Some(u) = &with {
        super::check_name(u)?;
    }
    let mut client = Client::connect(path)?;
    let since = match (last, since) {
        (None, None) => Some(end_seq(&mut client)?),
        (_, s) => s,
    };
    let (tx, rx) = mpsc::channel();
    follow(path, last, since, with, tx.clone())?;
    let jobs = spawn_worker(client, tx.clone());
    read_stdin(tx);
    let mut pending = 0usize;
    let mut eof = false;
    for ev in rx {
        match ev {
            Event::Record(r) => out.line(&format::record_json(&r))?,
            Event::Reply(line) => {
                out.line(&line)?;
                pending = pending.saturating_sub(1);
            }
            Event::Line(buf) => {
                let text = String::from_utf8_lossy(&buf);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                let (id, op) = parse_request(text);
                pending += 1;
                if jobs.send(Job { id, op }).is_err() {
                    return Err(fail(exit::FAILED, "the request worker stopped").into());
                }
            }
            Event::TooLong => {
                pending += 1;
                let op = Err(format!("a request line is longer than {LINE_MAX} bytes"));
                if jobs
                    .send(Job {
                        id: Value::Null,
                        op,
                    })
                    .is_err()
                {
                    return Err(fail(exit::FAILED, "the request worker stopped").into());
                }
            }
            Event::Eof => eof = true,
            Event::StdinError(e) => return Err(fail(exit::FAILED, e).into()),
            Event::Lost(f) => return Err(f.into()),
            _ => {}
        }
        if eof && pending == 0 {
            return Ok(());
        }
    }
    Ok(())
}

fn spawn_worker(mut client: Client, tx: Sender<Event>) -> Sender<Job> {
    let (jobs, rx): (Sender<Job>, Receiver<Job>) = mpsc::channel();
    thread::spawn(move || {
        for job in rx {
            let line = match job.op {
                Ok(op) => answer(&mut client, &job.id, op),
                Err(why) => reply_err(&job.id, exit::USAGE, "bad_request", &why, vec![]),
            };
            if tx.send(Event::Reply(line)).is_err() {
                return;
            }
        }
    });
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_their_id() {
        let (id, op) = parse_request(r#"{"id":7,"op":"send","to":"bob","text":"hi"}"#);
        assert_eq!(id, json!(7));
        assert!(matches!(op, Ok(Op::Send { to: Some(To::One(u)), .. }) if u == "bob"));
        let (id, op) =
            parse_request(r#"{"id":"a","op":"send","to":["b","c"],"text":"x","wait":"delivered"}"#);
        assert_eq!(id, json!("a"));
        assert!(
            matches!(op, Ok(Op::Send { to: Some(To::Many(v)), wait: Some(JsonWait::Delivered), .. }) if v.len() == 2)
        );
        assert!(matches!(
            parse_request(r#"{"id":1,"op":"who"}"#).1,
            Ok(Op::Who {
                all: false,
                prefix: None
            })
        ));
        assert!(matches!(
            parse_request(r#"{"id":1,"op":"who","all":true,"prefix":"a"}"#).1,
            Ok(Op::Who { all: true, prefix: Some(p) }) if p == "a"
        ));
    }

    #[test]
    fn bad_requests_say_why() {
        assert!(parse_request("nope").1.unwrap_err().starts_with("not JSON"));
        assert!(parse_request("[1]").1.is_err());
        let (id, op) = parse_request(r#"{"op":"who"}"#);
        assert_eq!(id, Value::Null);
        assert!(op.unwrap_err().contains("\"id\""));
        // A misspelt field is refused, not ignored (a `wiat` would silently not wait).
        let e = parse_request(r#"{"id":1,"op":"send","to":"b","text":"x","wiat":"relay"}"#)
            .1
            .unwrap_err();
        assert!(e.contains("wiat"), "{e}");
        assert!(parse_request(r#"{"id":1,"op":"launch"}"#).1.is_err());
    }

    #[test]
    fn replies_carry_id_kind_and_exit() {
        let r: Value = serde_json::from_str(&reply_err(&json!(3), 5, "key_changed", "m", vec![]))
            .expect("json");
        assert_eq!(r["kind"], "reply");
        assert_eq!(r["id"], 3);
        assert_eq!(r["ok"], false);
        assert_eq!(r["exit"], 5);
        let r: Value =
            serde_json::from_str(&reply_ok(&json!("x"), json!({"message": "done"}))).expect("json");
        assert_eq!(
            (r["id"].as_str(), r["ok"].as_bool()),
            (Some("x"), Some(true))
        );
        assert_eq!(r["message"], "done");
    }

    #[test]
    fn stdin_lines_are_capped() {
        let mut long = vec![b'x'; LINE_MAX + 10];
        long.extend_from_slice(b"\nnext\n");
        let mut r = io::Cursor::new(long);
        assert!(
            matches!(read_line(&mut r), Ok(Some(None))),
            "the long line is dropped"
        );
        assert_eq!(
            read_line(&mut r).ok().flatten().flatten().as_deref(),
            Some(&b"next\n"[..])
        );
        assert!(matches!(read_line(&mut r), Ok(None)));
        let mut exact = vec![b'y'; LINE_MAX];
        exact.push(b'\n');
        let mut r = io::Cursor::new(exact);
        assert_eq!(
            read_line(&mut r).ok().flatten().flatten().map(|b| b.len()),
            Some(LINE_MAX + 1)
        );
    }

    #[test]
    fn stdin_lines_lose_their_line_end() {
        assert_eq!(
            line_text(b"hi\r\n".to_vec()).ok().flatten().as_deref(),
            Some("hi")
        );
        assert_eq!(line_text(b"\n".to_vec()).ok().flatten(), None);
        assert!(line_text(vec![0xff, b'\n']).is_err());
    }
}
