//! Control-socket requests: turns a `CtlRequest` into calls on the cores and a `CtlResponse`,
//! keeps `tail -f` followers and `send --wait` waiters.
//!
//! Must never: write a reply directly to a socket (replies go into the connection's buffer and
//! leave after the turn commits), or print message text anywhere but into a reply.

use std::collections::HashMap;

use log::warn;
use mio::Token;

use super::{Daemon, Entry, Kind};
use crate::member::MemberError;
use crate::proto::control::{
    CtlRequest, CtlResponse, ErrorKind, MsgState, Record, RecordBody, Sent, StatusView, Wait,
};
use crate::proto::{encode_frame, from_payload, hex, valid_user};
use crate::store::StoreError;

/// Per control connection.
#[derive(Default)]
pub struct Ctl {
    /// A `tail` still sending history, page by page as the client reads.
    cursor: Option<Cursor>,
    follow: Option<Follow>,
    /// Sent a request this turn (gets an error if the turn fails to commit).
    asked: bool,
}

struct Cursor {
    after: u64,
    with: Option<String>,
    follow: bool,
}

/// Records read from the database at a time for a `tail`.
const PAGE: u64 = 64;

/// Whether some `tail` can send more now, given the output `limit` per client.
pub fn tails_ready(conns: &HashMap<Token, Entry>, limit: usize) -> bool {
    conns.values().any(|e| {
        matches!(
            &e.kind,
            Kind::Control(Ctl {
                cursor: Some(_),
                ..
            })
        ) && e.conn.pending() < limit
    })
}

/// Send more history to every `tail` in progress, record by record, while less than `limit`
/// bytes wait to be written to it (half the write-buffer cap: a long history costs bounded
/// memory, and a client that reads is never cut off as slow). Finish a `tail` (with `End`, or
/// by turning it into a follower) when its history is sent.
pub fn pump_tails(conns: &mut HashMap<Token, Entry>, store: &crate::store::Store, limit: usize) {
    for e in conns.values_mut() {
        let Kind::Control(c) = &mut e.kind else {
            continue;
        };
        let Some(cur) = c.cursor.as_mut() else {
            continue;
        };
        'pages: while e.conn.pending() < limit {
            let page = match store.page(cur.after, cur.with.as_deref(), PAGE) {
                Ok(p) => p,
                Err(err) => {
                    let mut buf = Vec::new();
                    if encode_frame(&failed(format!("cannot read history: {err}")), &mut buf)
                        .is_ok()
                    {
                        e.conn.queue(&buf);
                    }
                    c.cursor = None;
                    break;
                }
            };
            if page.is_empty() {
                // No record can be appended between this read and the switch below: the loop
                // is single-threaded. So a follower misses nothing and sees nothing twice.
                if let Some(cur) = c.cursor.take() {
                    if cur.follow {
                        c.follow = Some(Follow {
                            with: cur.with,
                            last_seq: cur.after,
                        });
                    } else {
                        let mut buf = Vec::new();
                        if encode_frame(&CtlResponse::End, &mut buf).is_ok() {
                            e.conn.queue(&buf);
                        }
                    }
                }
                break;
            }
            for r in page {
                if e.conn.pending() >= limit {
                    break 'pages;
                }
                cur.after = r.seq;
                let mut buf = Vec::new();
                if encode_frame(&CtlResponse::Record(r), &mut buf).is_ok() {
                    e.conn.queue(&buf);
                }
            }
        }
    }
}

struct Follow {
    with: Option<String>,
    last_seq: u64,
}

/// A `send --wait` in progress.
pub struct Waiter {
    /// The client.
    pub token: Token,
    sent: Vec<Sent>,
    target: MsgState,
    deadline: u64,
    timeout_ms: u64,
    fresh: bool,
}

fn reply(conns: &mut HashMap<Token, Entry>, token: Token, resp: &CtlResponse) {
    if let Some(e) = conns.get_mut(&token) {
        let mut buf = Vec::new();
        match encode_frame(resp, &mut buf) {
            Ok(()) => e.conn.queue(&buf),
            Err(err) => {
                warn!("cannot encode control reply: {err}");
                let fallback = CtlResponse::Error {
                    kind: ErrorKind::Failed,
                    message: format!("reply too large: {err}"),
                    sent: Vec::new(),
                };
                buf.clear();
                if encode_frame(&fallback, &mut buf).is_ok() {
                    e.conn.queue(&buf);
                }
            }
        }
    }
}

fn failed(message: impl Into<String>) -> CtlResponse {
    CtlResponse::Error {
        kind: ErrorKind::Failed,
        message: message.into(),
        sent: Vec::new(),
    }
}

/// Start of a turn: nothing asked yet; waiters from earlier turns are durable.
pub fn begin_turn(conns: &mut HashMap<Token, Entry>, waiters: &mut [Waiter]) {
    for e in conns.values_mut() {
        if let Kind::Control(c) = &mut e.kind {
            c.asked = false;
        }
    }
    for w in waiters {
        w.fresh = false;
    }
}

/// The turn's commit failed: every client that asked something this turn hears why.
pub fn fail_turn(conns: &mut HashMap<Token, Entry>, waiters: &mut Vec<Waiter>, e: &StoreError) {
    waiters.retain(|w| !w.fresh);
    let asked: Vec<Token> = conns
        .iter()
        .filter(|(_, e)| matches!(&e.kind, Kind::Control(c) if c.asked))
        .map(|(t, _)| *t)
        .collect();
    for t in asked {
        reply(
            conns,
            t,
            &failed(format!(
                "chatd could not write its database ({e}); nothing from this request was stored"
            )),
        );
    }
}

fn record_peer(r: &Record) -> &str {
    match &r.body {
        RecordBody::Message { from, to, dir, .. } => match dir {
            crate::proto::control::Dir::In => from,
            crate::proto::control::Dir::Out => to,
        },
        RecordBody::Presence { user, .. } => user,
        RecordBody::Receipt { to, .. } => to,
    }
}

/// A new history record: send it to every follower that wants it.
pub fn publish(conns: &mut HashMap<Token, Entry>, rec: &Record) {
    let mut buf = Vec::new();
    if encode_frame(&CtlResponse::Record(rec.clone()), &mut buf).is_err() {
        return;
    }
    for e in conns.values_mut() {
        if let Kind::Control(Ctl {
            follow: Some(f), ..
        }) = &mut e.kind
        {
            if rec.seq <= f.last_seq {
                continue;
            }
            if f.with.as_deref().is_some_and(|w| w != record_peer(rec)) {
                continue;
            }
            f.last_seq = rec.seq;
            e.conn.queue(&buf);
        }
    }
}

fn done(w: &Waiter) -> Option<CtlResponse> {
    if let Some(f) = w.sent.iter().find(|s| s.state == MsgState::Failed) {
        return Some(failed(format!(
            "the relay refused the message to {} (id {})",
            f.to,
            hex(&f.id)
        )));
    }
    w.sent
        .iter()
        .all(|s| s.state >= w.target)
        .then(|| CtlResponse::Sent(w.sent.clone()))
}

/// A sent message changed state: advance the waiters that hold it.
pub fn advance(
    waiters: &mut Vec<Waiter>,
    conns: &mut HashMap<Token, Entry>,
    id: [u8; 16],
    state: MsgState,
    why: Option<String>,
) {
    let mut i = 0;
    while i < waiters.len() {
        let w = &mut waiters[i];
        let mut touched = false;
        for s in w.sent.iter_mut().filter(|s| s.id == id) {
            if state > s.state {
                s.state = state;
                touched = true;
            }
        }
        if touched {
            if let Some(mut resp) = done(w) {
                if let (CtlResponse::Error { message, .. }, Some(why)) = (&mut resp, &why) {
                    message.push_str(": ");
                    message.push_str(why);
                }
                let token = w.token;
                waiters.remove(i);
                reply(conns, token, &resp);
                continue;
            }
        }
        i += 1;
    }
}

/// Answer the waiters whose time is up.
pub fn expire(waiters: &mut Vec<Waiter>, conns: &mut HashMap<Token, Entry>, now: u64) {
    let mut i = 0;
    while i < waiters.len() {
        if now >= waiters[i].deadline {
            let w = waiters.remove(i);
            let want = w.target.as_str();
            let resp = CtlResponse::Error {
                kind: ErrorKind::Timeout,
                message: format!(
                    "timed out after {} s waiting for {want}; the message stays queued and will \
                     still be delivered (do not send it again)",
                    w.timeout_ms / 1000
                ),
                sent: w.sent,
            };
            reply(conns, w.token, &resp);
        } else {
            i += 1;
        }
    }
}

/// Handle one request frame from a control client.
pub(super) fn request(d: &mut Daemon, token: Token, payload: &[u8], now: u64) {
    let req = match from_payload::<CtlRequest>(payload) {
        Ok(r) => r,
        Err(e) => {
            warn!(
                "control client {}: malformed request ({e}); closing",
                token.0
            );
            reply(
                &mut d.conns,
                token,
                &failed(format!("malformed request: {e}")),
            );
            if let Some(e) = d.conns.get_mut(&token) {
                e.conn.closing = true;
            }
            return;
        }
    };
    if let Some(Entry {
        kind: Kind::Control(c),
        ..
    }) = d.conns.get_mut(&token)
    {
        if c.follow.is_some() || c.cursor.is_some() {
            // A tail only reads; ignore anything else it sends.
            return;
        }
        c.asked = true;
    }
    let resp = match req {
        CtlRequest::Send {
            to,
            all,
            text,
            wait,
            timeout_ms,
        } => send(d, token, &to, all, &text, wait, timeout_ms, now),
        CtlRequest::Tail {
            last,
            since,
            with,
            follow,
        } => tail(d, token, last, since, with, follow),
        CtlRequest::Who => Some(match (&d.member, &d.relay) {
            (Some(m), _) => CtlResponse::Peers(m.who()),
            (None, Some(r)) => CtlResponse::Peers(r.directory()),
            (None, None) => CtlResponse::Peers(Vec::new()),
        }),
        CtlRequest::Status => Some(CtlResponse::Status(status(d))),
        CtlRequest::Fingerprint { user } => Some(fingerprint(d, user)),
        CtlRequest::Trust { user, fingerprint } => Some(match d.member.as_mut() {
            None => failed("this chatd is a relay only; trust is for members"),
            Some(m) => match m.trust(&user, &fingerprint, now, &mut d.store) {
                Ok(msg) => CtlResponse::Done(msg),
                Err(e) => failed(e.to_string()),
            },
        }),
        CtlRequest::Forget { user } => Some(match d.relay.as_mut() {
            None => failed("forget works on a relay; this chatd is a member only"),
            Some(r) => {
                if !valid_user(&user) {
                    failed(format!("invalid user name {user:?}"))
                } else {
                    match r.forget(&user, &mut d.store) {
                        Ok(true) => CtlResponse::Done(format!(
                            "forgot {user}: the name and its queue are gone; the next key to log in as {user} claims it"
                        )),
                        Ok(false) => failed(format!("no user named {user} is registered on this relay")),
                        Err(e) => failed(format!("cannot forget {user}: {e}")),
                    }
                }
            }
        }),
    };
    if let Some(resp) = resp {
        reply(&mut d.conns, token, &resp);
    }
}

#[allow(clippy::too_many_arguments)]
fn send(
    d: &mut Daemon,
    token: Token,
    to: &[String],
    all: bool,
    text: &str,
    wait: Wait,
    timeout_ms: u64,
    now: u64,
) -> Option<CtlResponse> {
    let Some(m) = d.member.as_mut() else {
        return Some(failed(
            "this chatd is a relay only; start it with --user NAME to send messages",
        ));
    };
    match m.send(to, all, text, now, &mut d.store) {
        Ok(sent) => {
            let target = match wait {
                Wait::None => return Some(CtlResponse::Sent(sent)),
                Wait::Relay => MsgState::Relayed,
                Wait::Delivered => MsgState::Delivered,
            };
            d.waiters.push(Waiter {
                token,
                sent,
                target,
                deadline: now.saturating_add(timeout_ms),
                timeout_ms,
                fresh: true,
            });
            None
        }
        Err(e) => Some(CtlResponse::Error {
            kind: if matches!(e, MemberError::KeyChanged { .. }) {
                ErrorKind::KeyChanged
            } else {
                ErrorKind::Failed
            },
            message: e.to_string(),
            sent: Vec::new(),
        }),
    }
}

fn tail(
    d: &mut Daemon,
    token: Token,
    last: Option<u64>,
    since: Option<u64>,
    with: Option<String>,
    follow: bool,
) -> Option<CtlResponse> {
    if d.member.is_none() {
        return Some(failed(
            "this chatd is a relay only: it keeps no message history (relays only see envelopes)",
        ));
    }
    if let Some(w) = &with {
        if !valid_user(w) {
            return Some(failed(format!("invalid user name {w:?}")));
        }
    }
    let since = since.unwrap_or(0);
    let after = match last {
        Some(n) => d.store.start_of_last(since, with.as_deref(), n),
        None => Ok(since),
    };
    let after = match after {
        Ok(a) => a,
        Err(e) => return Some(failed(format!("cannot read history: {e}"))),
    };
    if let Some(Entry {
        kind: Kind::Control(c),
        ..
    }) = d.conns.get_mut(&token)
    {
        c.cursor = Some(Cursor {
            after,
            with,
            follow,
        });
    }
    None
}

fn status(d: &Daemon) -> StatusView {
    let (user, connected, relay_error, peers_online) = match &d.member {
        Some(m) => (
            Some(m.user().to_string()),
            m.connected(),
            if m.connected() {
                None
            } else {
                m.relay_error().map(str::to_string)
            },
            m.peers_online() as u64,
        ),
        None => (
            None,
            false,
            None,
            d.relay
                .as_ref()
                .map(|r| r.online_count() as u64)
                .unwrap_or(0),
        ),
    };
    StatusView {
        user,
        fingerprint: d.fingerprint.to_string(),
        roles: d.roles(),
        relay: d.uplink.as_ref().map(|u| u.addr.clone()),
        connected,
        relay_error,
        listen: d.listen_addr.map(|a| a.to_string()),
        peers_online,
        outbox_pending: d.store.outbox_messages().unwrap_or(0),
        uptime_s: d.started.elapsed().as_secs(),
        version: crate::VERSION.to_string(),
        state_dir: d.cfg.state_dir.display().to_string(),
    }
}

fn fingerprint(d: &Daemon, user: Option<String>) -> CtlResponse {
    match user {
        None => CtlResponse::Fingerprint {
            user: d
                .member
                .as_ref()
                .map(|m| m.user().to_string())
                .unwrap_or_else(|| "relay".into()),
            fingerprint: d.fingerprint.to_string(),
        },
        Some(u) => {
            let fp = match (&d.member, &d.relay) {
                (Some(m), _) => m.pinned(&u).map(|f| f.to_string()),
                (None, Some(r)) => r
                    .directory()
                    .into_iter()
                    .find(|p| p.user == u)
                    .map(|p| p.fingerprint),
                _ => None,
            };
            match fp {
                Some(fingerprint) => CtlResponse::Fingerprint {
                    user: u,
                    fingerprint,
                },
                None => failed(format!("unknown user {u}: no key is pinned for that name")),
            }
        }
    }
}
