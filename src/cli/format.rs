//! Output of `chatctl`: plain lines for eyes, JSON lines for scripts (DESIGN "The chatctl
//! contract": field names are a contract).
//!
//! Must never: print message text unescaped in plain output. Control characters, DEL, C1
//! controls and bidirectional overrides are shown as escapes, so a message can neither forge a
//! line nor move the cursor; `--json` keeps the exact text (JSON escapes what it must).

use std::collections::{HashMap, VecDeque};

use serde::Serialize;

use crate::proto::control::{
    Dir, KeyEvent, MsgState, PeerView, Record, RecordBody, Sent, StatusView,
};
use crate::proto::hex;

/// Escape text for a terminal: `\` becomes `\\`, `\n` `\r` `\t` their escapes, other control
/// characters `\xNN` or `\u{NNNN}`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            // C1 controls (0x9b is a one-byte CSI on some terminals) and bidi overrides that
            // could make a line read differently from what it is.
            c if (0x80..0xa0).contains(&(c as u32))
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c)
                || c == '\u{200e}'
                || c == '\u{200f}' =>
            {
                out.push_str(&format!("\\u{{{:04x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// RFC 3339 UTC with seconds, from milliseconds since the epoch.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[derive(Serialize)]
struct JsonMessage<'a> {
    kind: &'static str,
    seq: u64,
    id: String,
    time: String,
    from: &'a str,
    to: &'a str,
    dir: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct JsonPresence<'a> {
    kind: &'static str,
    seq: u64,
    time: String,
    user: &'a str,
    online: bool,
}

#[derive(Serialize)]
struct JsonReceipt<'a> {
    kind: &'static str,
    seq: u64,
    time: String,
    id: String,
    to: &'a str,
    state: &'static str,
    reason: Option<&'a str>,
}

#[derive(Serialize)]
struct JsonLink<'a> {
    kind: &'static str,
    seq: u64,
    time: String,
    up: bool,
    reason: Option<&'a str>,
    online: &'a [String],
    peers_online: u64,
}

#[derive(Serialize)]
struct JsonKey<'a> {
    kind: &'static str,
    seq: u64,
    time: String,
    user: &'a str,
    event: &'a str,
    fingerprint: &'a str,
    other: Option<&'a str>,
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// One tail record as a JSON line.
pub fn record_json(r: &Record) -> String {
    let time = rfc3339(r.time_ms);
    match &r.body {
        RecordBody::Message {
            id,
            from,
            to,
            dir,
            text,
        } => json(&JsonMessage {
            kind: "message",
            seq: r.seq,
            id: hex(id),
            time,
            from,
            to,
            dir: match dir {
                Dir::In => "in",
                Dir::Out => "out",
            },
            text,
        }),
        RecordBody::Presence { user, online } => json(&JsonPresence {
            kind: "presence",
            seq: r.seq,
            time,
            user,
            online: *online,
        }),
        RecordBody::Receipt {
            id,
            to,
            state,
            reason,
        } => json(&JsonReceipt {
            kind: "receipt",
            seq: r.seq,
            time,
            id: hex(id),
            to,
            state: state.as_str(),
            reason: reason.as_deref(),
        }),
        RecordBody::Link {
            up,
            reason,
            online,
            peers_online,
        } => json(&JsonLink {
            kind: "link",
            seq: r.seq,
            time,
            up: *up,
            reason: reason.as_deref(),
            online,
            peers_online: *peers_online,
        }),
        RecordBody::Key {
            user,
            event,
            fingerprint,
            other,
        } => json(&JsonKey {
            kind: "key",
            seq: r.seq,
            time,
            user,
            event: event.as_str(),
            fingerprint,
            other: other.as_deref(),
        }),
    }
}

/// What a `Link` record says, for people: `link up: 2 online: bob, carol` or `link down: why`
/// (not escaped: the caller escapes, as for any text).
pub fn link_text(up: bool, reason: Option<&str>, online: &[String], peers_online: u64) -> String {
    if !up {
        return format!("link down: {}", reason.unwrap_or("connection closed"));
    }
    if peers_online == 0 {
        return "link up: nobody else online".into();
    }
    let mut names = online.join(", ");
    let more = peers_online.saturating_sub(online.len() as u64);
    if more > 0 {
        names.push_str(&format!(" and {more} more"));
    }
    format!("link up: {peers_online} online: {names}")
}

/// One tail record as a plain line: time, seq, then what happened.
pub fn record_plain(r: &Record) -> String {
    let time = rfc3339(r.time_ms);
    match &r.body {
        RecordBody::Message {
            from,
            to,
            dir,
            text,
            ..
        } => {
            let arrow = match dir {
                Dir::In => "<-",
                Dir::Out => "->",
            };
            let (me, peer) = match dir {
                Dir::In => (to, from),
                Dir::Out => (from, to),
            };
            format!("{time} #{} {me} {arrow} {peer}: {}", r.seq, escape(text))
        }
        RecordBody::Presence { user, online } => format!(
            "{time} #{} * {} {}",
            r.seq,
            escape(user),
            if *online { "joined" } else { "left" }
        ),
        RecordBody::Receipt {
            id,
            to,
            state,
            reason,
        } => format!(
            "{time} #{} message {} to {}: {}{}",
            r.seq,
            &hex(id)[..12],
            escape(to),
            state.as_str(),
            reason
                .as_deref()
                .map(|w| format!(" ({})", escape(w)))
                .unwrap_or_default()
        ),
        RecordBody::Link {
            up,
            reason,
            online,
            peers_online,
        } => format!(
            "{time} #{} * {}",
            r.seq,
            escape(&link_text(*up, reason.as_deref(), online, *peers_online))
        ),
        RecordBody::Key {
            user,
            event,
            fingerprint,
            other,
        } => format!(
            "{time} #{} ! {}",
            r.seq,
            escape(&key_line(user, event, fingerprint, other.as_deref()))
        ),
    }
}

/// A message's lines: the first after `head`, every later line of a multi-line text indented
/// under it (so no line of a text can start where a record's time does), each escaped; `tag`
/// after the last.
fn message_lines(head: String, text: &str, tag: &str) -> Vec<String> {
    let indent = " ".repeat(head.chars().count());
    let parts: Vec<&str> = text.split('\n').collect();
    let last = parts.len() - 1;
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let lead = if i == 0 {
                head.as_str()
            } else {
                indent.as_str()
            };
            let tail = if i == last { tag } else { "" };
            format!("{lead}{}{tail}", escape(part))
        })
        .collect()
}

fn state_tag(state: MsgState, reason: Option<&str>) -> String {
    match (state, reason) {
        (MsgState::Failed, Some(why)) => format!("  [failed: {}]", escape(why)),
        (s, _) => format!("  [{}]", s.as_str()),
    }
}

/// How many own messages [`ChatLines`] remembers for the short state lines of `tail -f`.
const KNOWN_MAX: usize = 4096;

/// Plain `tail`, read like a chat: a sent message shows its latest state at the end of its own
/// line (`[delivered]`) instead of separate receipt lines; a state change that comes later (with
/// `-f`, or for a message older than the history printed) is one short line; a multi-line
/// message prints as indented continuation lines. Pure: records in, lines out.
#[derive(Default)]
pub struct ChatLines {
    /// Own messages seen in this run, newest last: id to recipient, for the short lines.
    known: HashMap<[u8; 16], String>,
    order: VecDeque<[u8; 16]>,
}

impl ChatLines {
    /// The lines of a batch of history: each sent message with the latest state the batch holds
    /// for it; receipts of the batch's own messages print nothing.
    pub fn history(&mut self, batch: &[Record]) -> Vec<String> {
        let mut latest: HashMap<[u8; 16], (MsgState, Option<&str>)> = HashMap::new();
        for r in batch {
            if let RecordBody::Receipt {
                id, state, reason, ..
            } = &r.body
            {
                let e = latest.entry(*id).or_insert((MsgState::Queued, None));
                if *state >= e.0 {
                    *e = (*state, reason.as_deref());
                }
            }
        }
        let mut lines = Vec::new();
        let mut shown: std::collections::HashSet<[u8; 16]> = std::collections::HashSet::new();
        for r in batch {
            match &r.body {
                RecordBody::Message {
                    id, dir: Dir::Out, ..
                } => {
                    let (state, why) = latest.get(id).copied().unwrap_or((MsgState::Queued, None));
                    shown.insert(*id);
                    self.remember(r);
                    lines.extend(self.message(r, Some((state, why))));
                }
                RecordBody::Receipt { id, .. } if shown.contains(id) => {}
                _ => lines.extend(self.live(r)),
            }
        }
        lines
    }

    /// The lines of one record as it arrives: a receipt is one short line.
    pub fn live(&mut self, r: &Record) -> Vec<String> {
        match &r.body {
            RecordBody::Message { dir, .. } => {
                self.remember(r);
                let state = (*dir == Dir::Out).then_some((MsgState::Queued, None));
                self.message(r, state)
            }
            RecordBody::Receipt {
                id,
                to,
                state,
                reason,
            } => {
                let time = rfc3339(r.time_ms);
                let known = if self.known.contains_key(id) {
                    ""
                } else {
                    " (an earlier message)"
                };
                vec![format!(
                    "{time} #{} -> {}: {}{} {}{known}",
                    r.seq,
                    escape(to),
                    state.as_str(),
                    reason
                        .as_deref()
                        .map(|w| format!(" ({})", escape(w)))
                        .unwrap_or_default(),
                    &hex(id)[..12]
                )]
            }
            _ => vec![record_plain(r)],
        }
    }

    fn remember(&mut self, r: &Record) {
        if let RecordBody::Message {
            id,
            to,
            dir: Dir::Out,
            ..
        } = &r.body
        {
            if self.known.insert(*id, to.clone()).is_none() {
                self.order.push_back(*id);
                if self.order.len() > KNOWN_MAX {
                    if let Some(old) = self.order.pop_front() {
                        self.known.remove(&old);
                    }
                }
            }
        }
    }

    fn message(&self, r: &Record, state: Option<(MsgState, Option<&str>)>) -> Vec<String> {
        let RecordBody::Message {
            id,
            from,
            to,
            dir,
            text,
        } = &r.body
        else {
            return vec![record_plain(r)];
        };
        let (me, arrow, peer) = match dir {
            Dir::In => (to, "<-", from),
            Dir::Out => (from, "->", to),
        };
        let head = format!("{} #{} {me} {arrow} {peer}: ", rfc3339(r.time_ms), r.seq);
        let tag = match state {
            Some((s, why)) => format!("{} {}", state_tag(s, why), &hex(id)[..12]),
            None => String::new(),
        };
        message_lines(head, text, &tag)
    }
}

/// What a key record says, in words.
pub fn key_line(user: &str, event: &KeyEvent, fp: &str, other: Option<&str>) -> String {
    let before = other.unwrap_or("an unknown key");
    match event {
        KeyEvent::Pinned => format!("pinned {user}'s key {fp} (first sight)"),
        KeyEvent::Changed => format!(
            "KEY CHANGED for {user}: the relay presents {fp}, pinned is {before}; check it, then chatctl trust {user} FINGERPRINT"
        ),
        KeyEvent::Returned => format!(
            "the relay presents {user}'s pinned key {fp} again (after {before}); {user} stays changed until chatctl trust"
        ),
        KeyEvent::Trusted => match other {
            None => format!("{user}'s key {fp} is trusted"),
            Some(old) => format!("{user}'s new key {fp} is trusted (replaces {old})"),
        },
        KeyEvent::Forgotten => format!("forgot {user}'s key {fp}"),
        KeyEvent::Other(e) => format!("key event {e} for {user}: {fp}"),
    }
}

#[derive(Serialize)]
struct JsonPeer<'a> {
    user: &'a str,
    online: bool,
    trust: &'a str,
    fingerprint: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    presented: Option<&'a str>,
}

/// `who` lines.
pub fn peers(list: &[PeerView], as_json: bool) -> Vec<String> {
    list.iter()
        .map(|p| {
            if as_json {
                json(&JsonPeer {
                    user: &p.user,
                    online: p.online,
                    trust: p.trust.as_str(),
                    fingerprint: &p.fingerprint,
                    presented: p.presented.as_deref(),
                })
            } else {
                let mut line = format!(
                    "{:<16} {:<7} {:<8} {}",
                    p.user,
                    if p.online { "online" } else { "offline" },
                    p.trust,
                    p.fingerprint
                );
                if let Some(new) = &p.presented {
                    line.push_str(&format!("  (relay now presents {new})"));
                }
                line
            }
        })
        .collect()
}

/// `status` output.
pub fn status(s: &StatusView, as_json: bool) -> Vec<String> {
    if as_json {
        return vec![json(s)];
    }
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let mut v = vec![
        format!("user:           {}", opt(&s.user)),
        format!("fingerprint:    {}", s.fingerprint),
        format!("roles:          {}", s.roles.join(", ")),
        format!("relay:          {}", opt(&s.relay)),
        format!("connected:      {}", s.connected),
    ];
    if let Some(k) = &s.relay_fingerprint {
        v.push(format!("relay key:      {k}"));
    }
    if let Some(e) = &s.relay_error {
        v.push(format!("relay error:    {}", escape(e)));
    }
    v.extend([
        format!("listen:         {}", opt(&s.listen)),
        format!("peers online:   {}", s.peers_online),
        format!("outbox pending: {}", s.outbox_pending),
        format!("uptime:         {} s", s.uptime_s),
        format!("version:        {}", s.version),
        format!("state dir:      {}", s.state_dir),
    ]);
    v
}

#[derive(Serialize)]
struct JsonSent<'a> {
    id: String,
    to: &'a str,
    state: &'static str,
}

/// `send` lines.
pub fn sent(list: &[Sent], as_json: bool) -> Vec<String> {
    list.iter()
        .map(|s| {
            if as_json {
                json(&JsonSent {
                    id: hex(&s.id),
                    to: &s.to,
                    state: s.state.as_str(),
                })
            } else {
                format!("{} {} {}", s.state.as_str(), s.to, hex(&s.id))
            }
        })
        .collect()
}

/// `fingerprint` output.
pub fn fingerprint(user: &str, fp: &str, as_json: bool) -> String {
    if as_json {
        serde_json::json!({ "user": user, "fingerprint": fp }).to_string()
    } else {
        fp.to_string()
    }
}

/// Output of a request that changed state (`trust`, `forget`).
pub fn done(message: &str, as_json: bool) -> String {
    if as_json {
        serde_json::json!({ "ok": true, "message": message }).to_string()
    } else {
        message.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::control::MsgState;

    #[test]
    fn escapes_terminal_controls() {
        assert_eq!(escape("a\x1b[2Jb"), "a\\x1b[2Jb");
        assert_eq!(escape("line\r\nforged"), "line\\r\\nforged");
        assert_eq!(escape("back\\slash"), "back\\\\slash");
        assert_eq!(escape("\u{9b}31m"), "\\u{009b}31m");
        assert_eq!(escape("\u{202e}txt"), "\\u{202e}txt");
        assert_eq!(escape("héllo wörld ✓"), "héllo wörld ✓");
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_348_800_123), "2026-11-22T12:00:00Z");
    }

    #[test]
    fn json_field_names_are_the_contract() {
        let r = Record {
            seq: 12,
            time_ms: 0,
            body: RecordBody::Message {
                id: [0xab; 16],
                from: "alice".into(),
                to: "bob".into(),
                dir: Dir::In,
                text: "hi\n\x1b".into(),
            },
        };
        assert_eq!(
            record_json(&r),
            format!(
                r#"{{"kind":"message","seq":12,"id":"{}","time":"1970-01-01T00:00:00Z","from":"alice","to":"bob","dir":"in","text":"hi\n\u001b"}}"#,
                "ab".repeat(16)
            )
        );
        let r = Record {
            seq: 14,
            time_ms: 0,
            body: RecordBody::Receipt {
                id: [1; 16],
                to: "bob".into(),
                state: MsgState::Delivered,
                reason: None,
            },
        };
        assert!(record_json(&r).ends_with(r#""to":"bob","state":"delivered","reason":null}"#));
        let r = Record {
            seq: 13,
            time_ms: 0,
            body: RecordBody::Presence {
                user: "carol".into(),
                online: false,
            },
        };
        assert_eq!(
            record_json(&r),
            r#"{"kind":"presence","seq":13,"time":"1970-01-01T00:00:00Z","user":"carol","online":false}"#
        );
    }

    fn out(seq: u64, id: u8, text: &str) -> Record {
        Record {
            seq,
            time_ms: 0,
            body: RecordBody::Message {
                id: [id; 16],
                from: "alice".into(),
                to: "bob".into(),
                dir: Dir::Out,
                text: text.into(),
            },
        }
    }

    fn receipt(seq: u64, id: u8, state: MsgState) -> Record {
        Record {
            seq,
            time_ms: 0,
            body: RecordBody::Receipt {
                id: [id; 16],
                to: "bob".into(),
                state,
                reason: (state == MsgState::Failed)
                    .then(|| "queue_full: bob's queue is full".into()),
            },
        }
    }

    #[test]
    fn plain_history_shows_each_message_with_its_latest_state() {
        let batch = [
            out(1, 1, "first"),
            out(2, 2, "second"),
            receipt(3, 1, MsgState::Relayed),
            receipt(4, 1, MsgState::Delivered),
            receipt(5, 2, MsgState::Failed),
            // A receipt for a message before this history: one short line.
            receipt(6, 9, MsgState::Delivered),
        ];
        let lines = ChatLines::default().history(&batch);
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(
            lines[0].ends_with("#1 alice -> bob: first  [delivered] 010101010101"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("second  [failed: queue_full: bob's queue is full]"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("#6 -> bob: delivered 090909090909 (an earlier message)"),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn plain_follow_prints_a_state_change_as_one_short_line() {
        let mut c = ChatLines::default();
        let l = c.live(&out(1, 1, "hi"));
        assert_eq!(l.len(), 1);
        assert!(l[0].ends_with("hi  [queued] 010101010101"), "{l:?}");
        let l = c.live(&receipt(2, 1, MsgState::Delivered));
        assert_eq!(
            l,
            ["1970-01-01T00:00:00Z #2 -> bob: delivered 010101010101"]
        );
    }

    #[test]
    fn multi_line_messages_continue_indented_and_escaped() {
        let lines = ChatLines::default().history(&[out(
            1,
            1,
            "one\n1970-01-01T00:00:00Z #9 forged\r\x1b[2K",
        )]);
        assert_eq!(lines.len(), 2, "{lines:#?}");
        let head = "1970-01-01T00:00:00Z #1 alice -> bob: ";
        assert_eq!(lines[0], format!("{head}one"));
        assert_eq!(
            lines[1],
            format!(
                "{}1970-01-01T00:00:00Z #9 forged\\r\\x1b[2K  [queued] 010101010101",
                " ".repeat(head.len())
            )
        );
    }

    #[test]
    fn plain_record_is_one_line() {
        let r = Record {
            seq: 1,
            time_ms: 0,
            body: RecordBody::Message {
                id: [0; 16],
                from: "mallory".into(),
                to: "bob".into(),
                dir: Dir::In,
                text: "x\n1970-01-01T00:00:00Z #2 bob <- alice: forged\r\x1b[1A".into(),
            },
        };
        let line = record_plain(&r);
        assert!(!line.contains('\n') && !line.contains('\r') && !line.contains('\x1b'));
    }
}
