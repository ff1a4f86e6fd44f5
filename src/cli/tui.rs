//! The full-screen `chatctl chat [USER]`, in the style of irssi and weechat: one conversation per
//! peer with its scrollback from the history, an input line with editing and input history, a
//! status line, and the own messages' state updated in place.
//!
//! Drawing is ratatui's (it diffs frames, so a redraw costs only what changed) on its crossterm
//! backend (raw mode, alternate screen, key and resize events). The state ([`Chat`]) is plain
//! data with narrow methods: records, answers and keys go in, a frame comes out, so the parts a
//! person relies on (the input line survives incoming messages, a state changes in place) are
//! unit-tested without a terminal. Like every chatctl command it talks to chatd over the control
//! socket only, through [`super::chat`]'s follower and a request thread.
//!
//! Must never: leave the terminal in raw mode or on the alternate screen (normal exit, Ctrl-C,
//! SIGTERM, chatd going away and a panic all restore it), or let message text reach the terminal
//! unescaped.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;
use std::sync::mpsc::{self, Sender};
use std::thread;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{
    self, Event as TermEvent, KeyCode, KeyEvent, KeyEventKind, KeyModifiers,
};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use ratatui::Frame;
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

use super::chat::{end_seq, follow, Event};
use super::{exit, fail, format, send_request, who_stream, Failure, Step};
use crate::client::Client;
use crate::proto::control::{
    CtlRequest, CtlResponse, Dir, ErrorKind, MsgState, PeerView, Record, RecordBody, StatusView,
    TrustState, Wait,
};

/// Keys and commands, for `chatctl chat --help` and `/help` (man/chatctl.1 says the same;
/// tests/docs.rs checks that every key and command here is in it).
pub const HELP: &str = "\
Full-screen chat (stdin and stdout a terminal, no --json). Keys:
  Enter                      send the input line, or run the command it holds
  Left, Right                move in the input line
  Home, Ctrl-A, End, Ctrl-E  to the start or end of the input line
  Backspace, Delete          delete the character before or under the cursor
  Ctrl-W                     delete the word before the cursor
  Ctrl-U, Ctrl-K             delete to the start, or to the end, of the input line
  Up, Down                   earlier and later input lines (input history)
  PageUp, PageDown           scroll the conversation (End on an empty line: the newest)
  Ctrl-N, Ctrl-P             next and previous conversation
  Alt-1..Alt-9               conversation 1 to 9
  Ctrl-L                     redraw the screen
  Ctrl-C, Ctrl-D             quit (Ctrl-D only on an empty input line)
Commands:
  /msg USER [TEXT]           open (or switch to) the conversation with USER, send TEXT
  /who                       list the contacts with online state and trust
  /trust USER FINGERPRINT    accept USER's current key after checking it out of band
  /help                      list the keys and commands
  /quit                      leave the chat
Conversation 1 is chatd's own window: presence, key changes, link up and down, /who.
Own messages show their state: [queued], [relayed], [delivered], [failed: why].";

/// A request the chat's worker thread sends to chatd.
enum Job {
    Send {
        to: String,
        text: String,
    },
    /// `show`: print the list (for /who); else only learn online state and trust.
    Who {
        show: bool,
    },
    Trust {
        user: String,
        fingerprint: String,
    },
    Status,
    /// The last records with this peer, for its conversation's scrollback.
    History {
        peer: String,
    },
}

/// What a request got back.
pub(crate) enum Answer {
    /// A send to this peer failed before anything was queued: the reason, and whether it is
    /// exit 5's "key changed".
    SendFailed(String, String, bool),
    /// The contacts, and whether to print them.
    Who(Vec<PeerView>, bool),
    /// `/trust` succeeded: what chatd said.
    Done(String),
    /// Daemon status.
    Status(StatusView),
    /// A peer's own history (oldest first).
    History(String, Vec<Record>),
    /// A request failed (not a send).
    Failed(String),
    /// The request connection broke.
    Lost(Failure),
}

/// One line of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    /// A message; `state` is `Some` for our own.
    Msg {
        id: [u8; 16],
        time_ms: u64,
        from: String,
        text: String,
        state: Option<(MsgState, Option<String>)>,
    },
    /// Presence, key changes, link up/down, command output.
    Info { time_ms: u64, text: String },
}

/// One conversation: a peer's, or chatd's own window (`peer` empty).
#[derive(Debug, Default)]
struct Conv {
    peer: String,
    items: Vec<Item>,
    unread: usize,
    /// Rows scrolled up from the newest.
    scroll: usize,
    /// The seqs of the records shown here: the peer's own history and the first records of
    /// the stream overlap, and whichever comes first, each record is shown once.
    seqs: std::collections::HashSet<u64>,
    /// This peer's own history was asked for (once, when the conversation is first shown).
    loaded: bool,
}

/// Items a conversation keeps; older ones are dropped (the history still has them).
const SCROLLBACK: usize = 5000;

/// Records of a peer's own history shown when its conversation is first opened.
const PEER_HISTORY: u64 = 100;

/// The whole chat: conversations, the input line, what the status line shows.
pub(crate) struct Chat {
    me: String,
    convs: Vec<Conv>,
    current: usize,
    /// Message id to the conversation holding it, for a receipt to update it in place.
    by_id: HashMap<[u8; 16], usize>,
    peers: HashMap<String, PeerView>,
    status: Option<StatusView>,
    /// Records up to this seq are history: they never count as unread.
    history_until: u64,
    input: Vec<char>,
    cursor: usize,
    sent_lines: Vec<String>,
    /// Where Up/Down is in `sent_lines` (None: editing a new line).
    recall: Option<usize>,
    /// The line being edited when Up was first pressed.
    draft: Vec<char>,
    color: bool,
    quit: bool,
    /// "online now" was said (once, at start).
    said_online: bool,
}

/// What a key asks of the loop besides changing the state.
#[derive(Debug, PartialEq, Eq)]
enum Act {
    None,
    Job(JobSpec),
    Redraw,
}

/// A [`Job`] as plain data (so key handling stays testable).
#[derive(Debug, PartialEq, Eq)]
enum JobSpec {
    Send(String, String),
    Who,
    Trust(String, String),
}

impl Chat {
    fn new(me: String, color: bool) -> Chat {
        Chat {
            me,
            convs: vec![Conv::default()],
            current: 0,
            by_id: HashMap::new(),
            peers: HashMap::new(),
            status: None,
            history_until: 0,
            input: Vec::new(),
            cursor: 0,
            sent_lines: Vec::new(),
            recall: None,
            draft: Vec::new(),
            color,
            quit: false,
            said_online: false,
        }
    }

    /// The conversation with `peer`, opened if there is none yet.
    fn conv(&mut self, peer: &str) -> usize {
        if let Some(i) = self.convs.iter().position(|c| c.peer == peer) {
            return i;
        }
        self.convs.push(Conv {
            peer: peer.to_string(),
            ..Conv::default()
        });
        self.convs.len() - 1
    }

    fn push(&mut self, at: usize, item: Item, live: bool) {
        let c = &mut self.convs[at];
        c.items.push(item);
        if c.items.len() > SCROLLBACK {
            c.items.drain(..c.items.len() - SCROLLBACK);
        }
        if at != self.current && live {
            c.unread += 1;
        }
        if c.scroll > 0 {
            // Keep the rows the reader is looking at where they are.
            c.scroll += 1;
        }
    }

    /// The peer whose conversation is shown but whose own history was not asked for yet.
    fn history_wanted(&mut self) -> Option<String> {
        let c = &mut self.convs[self.current];
        if c.peer.is_empty() || c.loaded {
            return None;
        }
        c.loaded = true;
        Some(c.peer.clone())
    }

    /// A peer's own history: what is older than the conversation shows goes before it.
    fn history(&mut self, peer: &str, records: Vec<Record>) {
        let at = self.conv(peer);
        // Whatever of it is not shown yet is older than everything shown: the stream began
        // with the newest records, the peer's own history ends with its newest.
        let older: Vec<Record> = records
            .into_iter()
            .filter(|r| !self.convs[at].seqs.contains(&r.seq))
            .collect();
        if older.is_empty() {
            return;
        }
        // Build the older part on its own, then put the newer items after it.
        let newer = std::mem::take(&mut self.convs[at].items);
        let (unread, scroll) = (self.convs[at].unread, self.convs[at].scroll);
        let history_until = std::mem::replace(&mut self.history_until, u64::MAX);
        for r in &older {
            match &r.body {
                RecordBody::Message { .. } | RecordBody::Receipt { .. } => self.record(r),
                // Old presence belongs in this conversation only, and says nothing of now.
                RecordBody::Presence { user, online } => {
                    let text = format!("{user} {}", if *online { "joined" } else { "left" });
                    let item = Item::Info {
                        time_ms: r.time_ms,
                        text,
                    };
                    self.convs[at].seqs.insert(r.seq);
                    self.push(at, item, false);
                }
                RecordBody::Key {
                    user,
                    event,
                    fingerprint,
                    other,
                } => {
                    let item = Item::Info {
                        time_ms: r.time_ms,
                        text: format::key_line(user, event, fingerprint, other.as_deref()),
                    };
                    self.convs[at].seqs.insert(r.seq);
                    self.push(at, item, false);
                }
                RecordBody::Link { .. } => {}
            }
        }
        self.history_until = history_until;
        let c = &mut self.convs[at];
        c.items.extend(newer);
        c.unread = unread;
        c.scroll = scroll;
    }

    fn info(&mut self, at: usize, text: impl Into<String>) {
        let item = Item::Info {
            time_ms: crate::clock::wall_ms(),
            text: text.into(),
        };
        self.push(at, item, false);
    }

    /// A history record: into its conversation (receipts update their message in place).
    fn record(&mut self, r: &Record) {
        let live = r.seq > self.history_until;
        match &r.body {
            RecordBody::Message {
                id,
                from,
                to,
                dir,
                text,
            } => {
                let peer = if *dir == Dir::In { from } else { to };
                let at = self.conv(peer);
                if !self.convs[at].seqs.insert(r.seq) {
                    return;
                }
                let state = (*dir == Dir::Out).then_some((MsgState::Queued, None));
                self.push(
                    at,
                    Item::Msg {
                        id: *id,
                        time_ms: r.time_ms,
                        from: from.clone(),
                        text: text.clone(),
                        state,
                    },
                    live && *dir == Dir::In,
                );
                self.by_id.insert(*id, at);
            }
            RecordBody::Receipt {
                id, state, reason, ..
            } => {
                // Receipts follow their message closely: look from the newest item back.
                let Some(&c) = self.by_id.get(id) else {
                    return;
                };
                let item = self.convs[c]
                    .items
                    .iter_mut()
                    .rev()
                    .find_map(|it| match it {
                        Item::Msg {
                            id: i,
                            state: Some(s),
                            ..
                        } if i == id => Some(s),
                        _ => None,
                    });
                if let Some(s) = item {
                    if *state >= s.0 {
                        *s = (*state, reason.clone());
                    }
                }
            }
            RecordBody::Link {
                up,
                reason,
                online,
                peers_online,
            } => {
                if let Some(st) = &mut self.status {
                    st.connected = *up;
                    st.relay_error = reason.clone();
                }
                let item = Item::Info {
                    time_ms: r.time_ms,
                    text: format::link_text(*up, reason.as_deref(), online, *peers_online),
                };
                if self.current != 0 {
                    let at = self.current;
                    self.push(at, item.clone(), false);
                }
                self.push(0, item, false);
            }
            RecordBody::Key {
                user,
                event,
                fingerprint,
                other,
            } => {
                if let Some(p) = self.peers.get_mut(user) {
                    match event {
                        crate::proto::control::KeyEvent::Changed => p.trust = TrustState::Changed,
                        crate::proto::control::KeyEvent::Trusted => p.trust = TrustState::Trusted,
                        _ => {}
                    }
                }
                let item = Item::Info {
                    time_ms: r.time_ms,
                    text: format::key_line(user, event, fingerprint, other.as_deref()),
                };
                if let Some(at) = self.convs.iter().position(|c| &c.peer == user) {
                    if self.convs[at].seqs.insert(r.seq) {
                        self.push(at, item.clone(), false);
                    }
                }
                self.push(0, item, false);
            }
            RecordBody::Presence { user, online } => {
                if let Some(p) = self.peers.get_mut(user) {
                    p.online = *online;
                }
                let text = format!("{user} {}", if *online { "joined" } else { "left" });
                let item = Item::Info {
                    time_ms: r.time_ms,
                    text: text.clone(),
                };
                if let Some(at) = self.convs.iter().position(|c| &c.peer == user) {
                    if self.convs[at].seqs.insert(r.seq) {
                        self.push(at, item.clone(), false);
                    }
                }
                self.push(0, item, false);
            }
        }
    }

    fn answer(&mut self, a: Answer) -> Option<Failure> {
        match a {
            Answer::SendFailed(peer, why, key_changed) => {
                if key_changed {
                    if let Some(p) = self.peers.get_mut(&peer) {
                        p.trust = TrustState::Changed;
                    }
                }
                let at = self.conv(&peer);
                let text = if key_changed {
                    format!("NOT SENT (as chatctl send's exit 5): {why}")
                } else {
                    format!("NOT SENT: {why}")
                };
                self.info(at, text);
            }
            Answer::Who(list, show) => {
                let at = self.current;
                if show && list.is_empty() {
                    self.info(at, "no contacts yet");
                }
                for line in format::peers(&list, false).into_iter().filter(|_| show) {
                    self.info(at, line);
                }
                if !show && !self.said_online {
                    self.said_online = true;
                    // The first answer, at start: who is online now, said once (later changes
                    // come as presence and link records).
                    let mut online: Vec<&str> = list
                        .iter()
                        .filter(|p| p.online)
                        .map(|p| p.user.as_str())
                        .collect();
                    online.sort_unstable();
                    let text = if online.is_empty() {
                        "online now: nobody else".to_string()
                    } else {
                        format!("online now: {}", online.join(", "))
                    };
                    self.info(0, text);
                }
                for p in list {
                    self.key_news(&p);
                    self.peers.insert(p.user.clone(), p);
                }
            }
            Answer::Done(m) => {
                let at = self.current;
                self.info(at, m);
            }
            Answer::Status(s) => {
                if self.me.is_empty() {
                    self.me = s.user.clone().unwrap_or_default();
                }
                self.status = Some(s);
            }
            Answer::History(peer, records) => self.history(&peer, records),
            Answer::Failed(m) => {
                let at = self.current;
                self.info(at, format!("failed: {m}"));
            }
            Answer::Lost(f) => return Some(f),
        }
        None
    }

    /// Say inline when a peer's key changed, or was trusted after a change, since chat last
    /// asked (`who` is asked again every [`WHO_EVERY`] status polls).
    fn key_news(&mut self, p: &PeerView) {
        let Some(was) = self
            .peers
            .get(&p.user)
            .map(|o| o.trust == TrustState::Changed)
        else {
            return;
        };
        let text = match (was, p.trust == TrustState::Changed) {
            (false, true) => format!(
                "KEY CHANGED: {} was pinned to {}, the relay now presents {}; messages are \
                 refused until you check it with {} and run /trust {} {}",
                p.user,
                p.fingerprint,
                p.presented.as_deref().unwrap_or("?"),
                p.user,
                p.user,
                p.presented.as_deref().unwrap_or("FINGERPRINT")
            ),
            (true, false) => format!("{}'s key is {} now", p.user, p.trust.as_str()),
            _ => return,
        };
        if let Some(at) = self.convs.iter().position(|c| c.peer == p.user) {
            self.info(at, text.clone());
        }
        self.info(0, text);
    }

    fn switch(&mut self, to: usize) {
        if to < self.convs.len() {
            self.current = to;
            self.convs[to].unread = 0;
        }
    }

    /// Handle one key press.
    fn key(&mut self, k: KeyEvent) -> Act {
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        let alt = k.modifiers.contains(KeyModifiers::ALT);
        match k.code {
            KeyCode::Char('c') if ctrl => self.quit = true,
            KeyCode::Char('d') if ctrl && self.input.is_empty() => self.quit = true,
            KeyCode::Char('l') if ctrl => return Act::Redraw,
            KeyCode::Char('a') if ctrl => self.cursor = 0,
            KeyCode::Char('e') if ctrl => self.cursor = self.input.len(),
            KeyCode::Char('u') if ctrl => {
                self.input.drain(..self.cursor);
                self.cursor = 0;
            }
            KeyCode::Char('k') if ctrl => self.input.truncate(self.cursor),
            KeyCode::Char('w') if ctrl => {
                let mut start = self.cursor;
                while start > 0 && self.input[start - 1] == ' ' {
                    start -= 1;
                }
                while start > 0 && self.input[start - 1] != ' ' {
                    start -= 1;
                }
                self.input.drain(start..self.cursor);
                self.cursor = start;
            }
            KeyCode::Char('n') if ctrl => self.switch((self.current + 1) % self.convs.len()),
            KeyCode::Char('p') if ctrl => {
                self.switch((self.current + self.convs.len() - 1) % self.convs.len())
            }
            KeyCode::Char(d @ '1'..='9') if alt => self.switch(d as usize - '1' as usize),
            KeyCode::Char(c) if !ctrl && !alt => {
                self.input.insert(self.cursor, c);
                self.cursor += 1;
            }
            KeyCode::Left => self.cursor = self.cursor.saturating_sub(1),
            KeyCode::Right => self.cursor = (self.cursor + 1).min(self.input.len()),
            KeyCode::Home => self.cursor = 0,
            KeyCode::End if self.input.is_empty() => self.convs[self.current].scroll = 0,
            KeyCode::End => self.cursor = self.input.len(),
            KeyCode::Backspace if self.cursor > 0 => {
                self.cursor -= 1;
                self.input.remove(self.cursor);
            }
            KeyCode::Delete if self.cursor < self.input.len() => {
                self.input.remove(self.cursor);
            }
            KeyCode::Up => self.recall_older(),
            KeyCode::Down => self.recall_newer(),
            KeyCode::PageUp => self.convs[self.current].scroll += 10,
            KeyCode::PageDown => {
                let c = &mut self.convs[self.current];
                c.scroll = c.scroll.saturating_sub(10);
            }
            KeyCode::Enter => return self.enter(),
            _ => {}
        }
        Act::None
    }

    fn recall_older(&mut self) {
        let next = match self.recall {
            None if self.sent_lines.is_empty() => return,
            None => {
                self.draft = self.input.clone();
                self.sent_lines.len() - 1
            }
            Some(0) => return,
            Some(i) => i - 1,
        };
        self.recall = Some(next);
        self.input = self.sent_lines[next].chars().collect();
        self.cursor = self.input.len();
    }

    fn recall_newer(&mut self) {
        let Some(i) = self.recall else { return };
        if i + 1 < self.sent_lines.len() {
            self.recall = Some(i + 1);
            self.input = self.sent_lines[i + 1].chars().collect();
        } else {
            self.recall = None;
            self.input = std::mem::take(&mut self.draft);
        }
        self.cursor = self.input.len();
    }

    /// Enter: a /command, or a message to the current conversation's peer.
    fn enter(&mut self) -> Act {
        let line: String = self.input.iter().collect();
        if line.trim().is_empty() {
            return Act::None;
        }
        self.input.clear();
        self.cursor = 0;
        self.recall = None;
        if self.sent_lines.last() != Some(&line) {
            self.sent_lines.push(line.clone());
        }
        let at = self.current;
        if let Some(cmd) = line.strip_prefix('/') {
            let mut words = cmd.split_whitespace();
            let name = words.next().unwrap_or("");
            match name {
                "quit" | "exit" => self.quit = true,
                "help" => {
                    for l in HELP.lines() {
                        self.info(at, l);
                    }
                }
                "who" => return Act::Job(JobSpec::Who),
                "msg" | "query" => {
                    let Some(user) = words.next() else {
                        self.info(at, "usage: /msg USER [TEXT]");
                        return Act::None;
                    };
                    if !crate::proto::valid_user(user) {
                        self.info(at, format!("invalid user name {:?}", format::escape(user)));
                        return Act::None;
                    }
                    let to = self.conv(user);
                    self.switch(to);
                    let rest = cmd
                        .trim_start()
                        .strip_prefix(name)
                        .unwrap_or("")
                        .trim_start()
                        .strip_prefix(user)
                        .unwrap_or("")
                        .trim_start();
                    if !rest.is_empty() {
                        return Act::Job(JobSpec::Send(user.to_string(), rest.to_string()));
                    }
                }
                "trust" => match (words.next(), words.next(), words.next()) {
                    (Some(u), Some(fp), None) => {
                        return Act::Job(JobSpec::Trust(u.to_string(), fp.to_string()))
                    }
                    _ => self.info(at, "usage: /trust USER FINGERPRINT"),
                },
                _ => self.info(
                    at,
                    format!(
                        "unknown command /{}: /help lists them",
                        format::escape(name)
                    ),
                ),
            }
            return Act::None;
        }
        let peer = self.convs[at].peer.clone();
        if peer.is_empty() {
            self.info(
                at,
                "this is chatd's window: /msg USER opens a conversation (Ctrl-N: the next one)",
            );
            return Act::None;
        }
        self.convs[at].scroll = 0;
        Act::Job(JobSpec::Send(peer, line))
    }

    fn style(&self, s: Style) -> Style {
        if self.color {
            s
        } else {
            // NO_COLOR: attributes stay (bold, reverse), colours go.
            Style {
                fg: None,
                bg: None,
                ..s
            }
        }
    }

    /// The rows of one item at `width` columns: escaped, wrapped, later lines of a multi-line
    /// message indented.
    fn rows(&self, item: &Item, width: usize) -> Vec<Line<'static>> {
        let (time_ms, head, head_style, text, tail) = match item {
            Item::Msg {
                time_ms,
                from,
                text,
                state,
                ..
            } => {
                let mine = state.is_some();
                let tail = state.as_ref().map(|(s, why)| match (s, why) {
                    (MsgState::Failed, Some(w)) => format!(" [failed: {}]", format::escape(w)),
                    (s, _) => format!(" [{}]", s.as_str()),
                });
                let color = if mine { Color::Cyan } else { Color::Green };
                (
                    *time_ms,
                    format!("<{from}> "),
                    Style::default().fg(color).add_modifier(Modifier::BOLD),
                    text.as_str(),
                    tail,
                )
            }
            Item::Info { time_ms, text } => (
                *time_ms,
                "-!- ".to_string(),
                Style::default().fg(Color::Yellow),
                text.as_str(),
                None,
            ),
        };
        let clock = format::rfc3339(time_ms);
        let clock = format!("{} ", clock.get(11..19).unwrap_or(""));
        let indent = clock.len() + 2;
        let mut rows = Vec::new();
        for (n, part) in text.split('\n').enumerate() {
            let mut body = format::escape(part);
            let last = n == text.split('\n').count() - 1;
            let tail_now = if last { tail.clone() } else { None };
            let first_prefix: Vec<Span<'static>> = if n == 0 {
                vec![
                    Span::styled(
                        clock.clone(),
                        self.style(Style::default().fg(Color::DarkGray)),
                    ),
                    Span::styled(head.clone(), self.style(head_style)),
                ]
            } else {
                vec![Span::raw(" ".repeat(indent))]
            };
            let prefix_w: usize = first_prefix.iter().map(|s| s.content.width()).sum();
            let mut prefix = Some(first_prefix);
            // Wrap on character widths; continuation rows are indented like the first.
            loop {
                let room = width
                    .saturating_sub(if prefix.is_some() { prefix_w } else { indent })
                    .max(1);
                let mut cut = 0;
                let mut w = 0;
                for (i, c) in body.char_indices() {
                    let cw = c.width().unwrap_or(0);
                    if w + cw > room {
                        break;
                    }
                    w += cw;
                    cut = i + c.len_utf8();
                }
                if cut == 0 && !body.is_empty() {
                    cut = body.chars().next().map(char::len_utf8).unwrap_or(1);
                }
                let rest = body.split_off(cut);
                let mut spans = prefix
                    .take()
                    .unwrap_or_else(|| vec![Span::raw(" ".repeat(indent))]);
                spans.push(Span::raw(std::mem::replace(&mut body, rest)));
                if body.is_empty() {
                    if let Some(t) = &tail_now {
                        let st = match item {
                            Item::Msg {
                                state: Some((MsgState::Failed, _)),
                                ..
                            } => Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
                            Item::Msg {
                                state: Some((MsgState::Delivered, _)),
                                ..
                            } => Style::default().fg(Color::Green),
                            _ => Style::default().fg(Color::DarkGray),
                        };
                        spans.push(Span::styled(t.clone(), self.style(st)));
                    }
                    rows.push(Line::from(spans));
                    break;
                }
                rows.push(Line::from(spans));
            }
        }
        rows
    }

    fn status_line(&self) -> String {
        let link = match &self.status {
            None => "connecting to chatd".to_string(),
            Some(s) if s.connected => "connected".to_string(),
            Some(s) => format!(
                "NOT CONNECTED{}",
                s.relay_error
                    .as_deref()
                    .map(|e| format!(" ({})", format::escape(e)))
                    .unwrap_or_default()
            ),
        };
        let mut line = format!("[{}] {link}", self.me);
        let peer = &self.convs[self.current].peer;
        if peer.is_empty() {
            line.push_str(" | 1:chatd");
        } else {
            let about = match self.peers.get(peer) {
                Some(p) => format!(
                    "{}, {}",
                    if p.online { "online" } else { "offline" },
                    p.trust.as_str()
                ),
                None => "not a contact yet".to_string(),
            };
            line.push_str(&format!(" | {}:{peer} ({about})", self.current + 1));
            if self
                .peers
                .get(peer)
                .is_some_and(|p| p.trust == TrustState::Changed)
            {
                line.push_str(" KEY CHANGED");
            }
        }
        let unread: Vec<String> = self
            .convs
            .iter()
            .enumerate()
            .filter(|(_, c)| c.unread > 0)
            .map(|(i, c)| format!("{}:{}({})", i + 1, c.peer, c.unread))
            .collect();
        if !unread.is_empty() {
            line.push_str(&format!(" | unread {}", unread.join(" ")));
        }
        line
    }

    fn draw(&self, f: &mut Frame) {
        let [body, status, input] = Layout::vertical([
            Constraint::Min(1),
            Constraint::Length(1),
            Constraint::Length(1),
        ])
        .areas(f.area());
        self.draw_body(f, body);
        f.render_widget(
            Paragraph::new(self.status_line()).style(
                self.style(
                    Style::default()
                        .fg(Color::White)
                        .bg(Color::Blue)
                        .add_modifier(Modifier::REVERSED),
                ),
            ),
            status,
        );
        self.draw_input(f, input);
    }

    fn draw_body(&self, f: &mut Frame, area: Rect) {
        let conv = &self.convs[self.current];
        let width = area.width as usize;
        let height = area.height as usize;
        // Only as many items from the end as can fill the screen plus the scroll.
        let want = height + conv.scroll;
        let mut rows: Vec<Line<'static>> = Vec::new();
        for item in conv.items.iter().rev() {
            let mut r = self.rows(item, width);
            r.extend(rows);
            rows = r;
            if rows.len() >= want {
                break;
            }
        }
        let end = rows
            .len()
            .saturating_sub(conv.scroll.min(rows.len().saturating_sub(1)));
        let start = end.saturating_sub(height);
        let mut shown: Vec<Line<'static>> = rows[start..end].to_vec();
        // New lines grow from the bottom, as in irssi.
        while shown.len() < height {
            shown.insert(0, Line::raw(""));
        }
        f.render_widget(Paragraph::new(shown), area);
    }

    fn draw_input(&self, f: &mut Frame, area: Rect) {
        let peer = &self.convs[self.current].peer;
        let prompt = if peer.is_empty() {
            "[chatd] ".to_string()
        } else {
            format!("[{peer}] ")
        };
        let shown: String = self
            .input
            .iter()
            .map(|c| if c.is_control() { '?' } else { *c })
            .collect();
        let before: usize = self.input[..self.cursor]
            .iter()
            .map(|c| c.width().unwrap_or(1))
            .sum();
        let width = area.width as usize;
        let room = width.saturating_sub(prompt.width() + 1).max(1);
        // Scroll the line sideways so the cursor stays on screen.
        let skip_w = before.saturating_sub(room);
        let mut skipped = 0;
        let visible: String = shown
            .chars()
            .skip_while(|c| {
                if skipped < skip_w {
                    skipped += c.width().unwrap_or(1);
                    true
                } else {
                    false
                }
            })
            .collect();
        f.render_widget(
            Paragraph::new(Line::from(vec![
                Span::styled(
                    prompt.clone(),
                    self.style(Style::default().add_modifier(Modifier::BOLD)),
                ),
                Span::raw(visible),
            ])),
            area,
        );
        let x = area.x as usize + prompt.width() + before - skipped;
        f.set_cursor_position((x.min(width.saturating_sub(1)) as u16, area.y));
    }
}

/// Restores the terminal when dropped, on every way out of the chat but a panic (the panic
/// hook ratatui installs restores it then).
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = ratatui::try_restore();
        let _ = ratatui::crossterm::execute!(io::stdout(), ratatui::crossterm::cursor::Show);
    }
}

fn worker(path: &Path, tx: Sender<Event>) -> Result<Sender<Job>, Step> {
    let mut client = Client::connect(path)?;
    let (jobs, rx) = mpsc::channel::<Job>();
    thread::spawn(move || {
        for job in rx {
            let a = match job {
                Job::Send { to, text } => {
                    match send_request(vec![to.clone()], false, text, Wait::None, 0) {
                        Err(f) => Some(Answer::SendFailed(to, f.message, false)),
                        Ok(req) => match client.request(&req) {
                            Ok(CtlResponse::Sent(_)) => None,
                            Ok(CtlResponse::Error { kind, message, .. }) => Some(
                                Answer::SendFailed(to, message, kind == ErrorKind::KeyChanged),
                            ),
                            Ok(_) => Some(Answer::SendFailed(to, "unexpected reply".into(), false)),
                            Err(e) => Some(Answer::Lost(e.into())),
                        },
                    }
                }
                Job::Who { show } => {
                    let mut all = Vec::new();
                    match who_stream(&mut client, &CtlRequest::Who, |chunk| {
                        all.extend(chunk);
                        Ok(())
                    }) {
                        Ok(()) => Some(Answer::Who(all, show)),
                        Err(Step::Fail(f)) if f.code == exit::UNREACHABLE => Some(Answer::Lost(f)),
                        Err(Step::Fail(f)) => Some(Answer::Failed(f.message)),
                        Err(Step::Pipe) => None,
                    }
                }
                Job::Trust { user, fingerprint } => {
                    match client.request(&CtlRequest::Trust { user, fingerprint }) {
                        Ok(CtlResponse::Done(m)) => Some(Answer::Done(m)),
                        Ok(CtlResponse::Error { message, .. }) => Some(Answer::Failed(message)),
                        Ok(_) => Some(Answer::Failed("unexpected reply".into())),
                        Err(e) => Some(Answer::Lost(e.into())),
                    }
                }
                Job::History { peer } => Some(peer_history(&mut client, peer)),
                Job::Status => match client.request(&CtlRequest::Status) {
                    Ok(CtlResponse::Status(s)) => Some(Answer::Status(s)),
                    Ok(_) => None,
                    Err(e) => Some(Answer::Lost(e.into())),
                },
            };
            if let Some(a) = a {
                let lost = matches!(a, Answer::Lost(_));
                if tx.send(Event::Answer(a)).is_err() || lost {
                    return;
                }
            }
        }
    });
    Ok(jobs)
}

/// The last [`PEER_HISTORY`] records with `peer`.
fn peer_history(client: &mut Client, peer: String) -> Answer {
    let req = CtlRequest::Tail {
        last: Some(PEER_HISTORY),
        since: None,
        with: Some(peer.clone()),
        follow: false,
        kinds: Vec::new(),
    };
    if let Err(e) = client.send(&req) {
        return Answer::Lost(e.into());
    }
    let mut records = Vec::new();
    loop {
        match client.recv() {
            Ok(CtlResponse::Record(r)) => records.push(r),
            Ok(CtlResponse::End) => return Answer::History(peer, records),
            Ok(CtlResponse::Error { message, .. }) => return Answer::Failed(message),
            Ok(_) => return Answer::Failed("unexpected reply from chatd to a tail".into()),
            Err(e) => return Answer::Lost(e.into()),
        }
    }
}

/// Every this many status polls, `who` again: online state and trust (a key change shows inline).
const WHO_EVERY: u32 = 5;

/// How often the status line asks chatd whether the link is up.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// Run the full-screen chat until /quit, Ctrl-C, a signal or chatd going away.
pub(crate) fn run(
    path: &Path,
    user: Option<String>,
    lines: u64,
    since: Option<u64>,
) -> Result<(), Step> {
    if let Some(u) = &user {
        super::check_name(u)?;
    }
    // Everything that can fail before the screen changes fails here, on a normal terminal.
    let mut client = Client::connect(path)?;
    let status = match client.request(&CtlRequest::Status)? {
        CtlResponse::Status(s) => s,
        other => return Err(super::error_of(other, false, &mut super::Out::stdout())),
    };
    let Some(me) = status.user.clone() else {
        return Err(fail(
            exit::FAILED,
            "this chatd is a relay only; chat needs a member (chatd --user NAME)",
        )
        .into());
    };
    let until = end_seq(&mut client)?;
    // The contacts before the first frame, so the status line never starts on a wrong
    // "not a contact yet" for a peer that is pinned.
    let mut contacts = Vec::new();
    who_stream(&mut client, &CtlRequest::Who, |chunk| {
        contacts.extend(chunk);
        Ok(())
    })?;
    drop(client);
    let (tx, rx) = mpsc::channel();
    follow(path, Some(lines), since, None, tx.clone())?;
    let jobs = worker(path, tx.clone())?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| fail(exit::FAILED, format!("cannot watch signals: {e}")))?;
    {
        let tx = tx.clone();
        thread::spawn(move || {
            if signals.forever().next().is_some() {
                let _ = tx.send(Event::Signal);
            }
        });
    }

    let color = std::env::var_os("NO_COLOR").map_or(true, |v| v.is_empty());
    let mut chat = Chat::new(me, color);
    chat.history_until = until;
    chat.status = Some(status);
    if let Some(u) = &user {
        let at = chat.conv(u);
        chat.switch(at);
    }
    let _ = chat.answer(Answer::Who(contacts, false));

    let mut terminal = ratatui::try_init()
        .map_err(|e| fail(exit::FAILED, format!("cannot set up the terminal: {e}")))?;
    let restore = Restore;
    // ratatui's hook gives the terminal back and prints the panic; a panic in any of the chat's
    // threads then ends chatctl (exit 101, as for a panic in main), since the screen is no
    // longer raw and the chat cannot go on without that thread.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        hook(info);
        std::process::exit(101);
    }));
    {
        let tx = tx.clone();
        thread::spawn(move || loop {
            match event::read() {
                Ok(e) => {
                    if tx.send(Event::Term(e)).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        });
    }
    let mut polls: u32 = 0;
    // A deadline, not a quiet spell: a busy conversation must not starve the status line.
    let mut next_poll = Instant::now() + STATUS_EVERY;
    let outcome = loop {
        if let Err(e) = terminal.draw(|f| chat.draw(f)) {
            break Err(fail(exit::FAILED, format!("cannot draw: {e}")));
        }
        let now = Instant::now();
        if now >= next_poll {
            next_poll = now + STATUS_EVERY;
            let _ = jobs.send(Job::Status);
            polls += 1;
            if polls % WHO_EVERY == 0 {
                let _ = jobs.send(Job::Who { show: false });
            }
        }
        let ev = match rx.recv_timeout(next_poll.saturating_duration_since(now)) {
            Ok(ev) => ev,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
        };
        match ev {
            Event::Record(r) => chat.record(&r),
            Event::Lost(f) => break Err(f),
            Event::Answer(a) => {
                if matches!(a, Answer::Done(_)) {
                    // A trust changed what the status line shows.
                    let _ = jobs.send(Job::Who { show: false });
                }
                if let Some(f) = chat.answer(a) {
                    break Err(f);
                }
            }
            Event::Signal => break Ok(()),
            Event::Term(TermEvent::Key(k)) if k.kind != KeyEventKind::Release => {
                let job = match chat.key(k) {
                    Act::None => None,
                    Act::Redraw => {
                        let _ = terminal.clear();
                        None
                    }
                    Act::Job(JobSpec::Send(to, text)) => Some(Job::Send { to, text }),
                    Act::Job(JobSpec::Who) => Some(Job::Who { show: true }),
                    Act::Job(JobSpec::Trust(user, fingerprint)) => {
                        Some(Job::Trust { user, fingerprint })
                    }
                };
                if let Some(j) = job {
                    let _ = jobs.send(j);
                }
            }
            Event::Term(TermEvent::Paste(text)) => {
                for c in text.chars().filter(|c| !c.is_control()) {
                    chat.input.insert(chat.cursor, c);
                    chat.cursor += 1;
                }
            }
            Event::Term(_) => {}
            _ => {}
        }
        if let Some(peer) = chat.history_wanted() {
            let _ = jobs.send(Job::History { peer });
        }
        if chat.quit {
            break Ok(());
        }
    };
    drop(terminal);
    drop(restore);
    let _ = io::stdout().flush();
    outcome.map_err(Step::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    fn typed(chat: &mut Chat, s: &str) {
        for c in s.chars() {
            chat.key(key(KeyCode::Char(c)));
        }
    }

    fn msg(seq: u64, id: u8, from: &str, to: &str, dir: Dir, text: &str) -> Record {
        Record {
            seq,
            time_ms: 0,
            body: RecordBody::Message {
                id: [id; 16],
                from: from.into(),
                to: to.into(),
                dir,
                text: text.into(),
            },
        }
    }

    #[test]
    fn incoming_messages_leave_the_input_line_alone() {
        let mut chat = Chat::new("alice".into(), false);
        let at = chat.conv("bob");
        chat.switch(at);
        typed(&mut chat, "half a li");
        chat.key(key(KeyCode::Left));
        chat.record(&msg(1, 1, "bob", "alice", Dir::In, "interrupting you"));
        assert_eq!(chat.input.iter().collect::<String>(), "half a li");
        assert_eq!(chat.cursor, 8);
        typed(&mut chat, "X");
        assert_eq!(chat.input.iter().collect::<String>(), "half a lXi");
        assert_eq!(
            chat.key(key(KeyCode::Enter)),
            Act::Job(JobSpec::Send("bob".into(), "half a lXi".into()))
        );
        assert!(chat.input.is_empty());
    }

    #[test]
    fn a_receipt_updates_its_message_in_place() {
        let mut chat = Chat::new("alice".into(), false);
        chat.record(&msg(1, 7, "alice", "bob", Dir::Out, "hi"));
        chat.record(&Record {
            seq: 2,
            time_ms: 0,
            body: RecordBody::Receipt {
                id: [7; 16],
                to: "bob".into(),
                state: MsgState::Delivered,
                reason: None,
            },
        });
        // A late `relayed` never moves it back.
        chat.record(&Record {
            seq: 3,
            time_ms: 0,
            body: RecordBody::Receipt {
                id: [7; 16],
                to: "bob".into(),
                state: MsgState::Relayed,
                reason: None,
            },
        });
        let c = chat.conv("bob");
        assert_eq!(chat.convs[c].items.len(), 1);
        let rows = chat.rows(&chat.convs[c].items[0], 80);
        let text: String = rows[0].spans.iter().map(|s| s.content.as_ref()).collect();
        assert!(text.ends_with("<alice> hi [delivered]"), "{text}");
    }

    #[test]
    fn a_peers_own_history_goes_before_what_is_shown_once() {
        let mut chat = Chat::new("alice".into(), false);
        chat.history_until = 60;
        chat.record(&msg(50, 5, "bob", "alice", Dir::In, "shown already"));
        let at = chat.conv("bob");
        chat.switch(at);
        assert_eq!(chat.history_wanted().as_deref(), Some("bob"));
        assert_eq!(chat.history_wanted(), None, "asked once");
        chat.history(
            "bob",
            vec![
                msg(10, 1, "alice", "bob", Dir::Out, "older"),
                Record {
                    seq: 11,
                    time_ms: 0,
                    body: RecordBody::Receipt {
                        id: [1; 16],
                        to: "bob".into(),
                        state: MsgState::Delivered,
                        reason: None,
                    },
                },
                msg(50, 5, "bob", "alice", Dir::In, "shown already"),
            ],
        );
        let texts: Vec<String> = chat.convs[at]
            .items
            .iter()
            .map(|i| {
                chat.rows(i, 80)[0]
                    .spans
                    .iter()
                    .map(|s| s.content.as_ref())
                    .collect()
            })
            .collect();
        assert_eq!(texts.len(), 2, "{texts:?}");
        assert!(texts[0].ends_with("<alice> older [delivered]"), "{texts:?}");
        assert!(texts[1].ends_with("<bob> shown already"), "{texts:?}");
        assert_eq!(chat.convs[at].unread, 0);

        // The other order: the peer's history first, then the stream's first records.
        let mut chat = Chat::new("alice".into(), false);
        chat.history_until = 60;
        chat.history(
            "bob",
            vec![
                msg(10, 1, "alice", "bob", Dir::Out, "older"),
                msg(50, 5, "bob", "alice", Dir::In, "shown already"),
            ],
        );
        chat.record(&msg(50, 5, "bob", "alice", Dir::In, "shown already"));
        chat.record(&msg(61, 6, "bob", "alice", Dir::In, "new"));
        let at = chat.conv("bob");
        assert_eq!(chat.convs[at].items.len(), 3, "{:?}", chat.convs[at].items);
    }

    #[test]
    fn unread_counts_only_live_messages_elsewhere() {
        let mut chat = Chat::new("alice".into(), false);
        chat.history_until = 1;
        chat.record(&msg(1, 1, "bob", "alice", Dir::In, "old"));
        chat.record(&msg(2, 2, "bob", "alice", Dir::In, "new"));
        chat.record(&msg(3, 3, "carol", "alice", Dir::In, "new"));
        assert!(
            chat.status_line().contains("unread 2:bob(1) 3:carol(1)"),
            "{}",
            chat.status_line()
        );
        chat.key(KeyEvent::new(KeyCode::Char('2'), KeyModifiers::ALT));
        assert!(chat.status_line().contains("unread 3:carol(1)"));
    }

    #[test]
    fn text_is_escaped_and_multi_line_is_indented() {
        let chat = Chat::new("alice".into(), false);
        let item = Item::Msg {
            id: [0; 16],
            time_ms: 0,
            from: "bob".into(),
            text: "one\x1b[2J\ntwo\r".into(),
            state: None,
        };
        let rows: Vec<String> = chat
            .rows(&item, 80)
            .iter()
            .map(|l| l.spans.iter().map(|s| s.content.as_ref()).collect())
            .collect();
        assert_eq!(rows.len(), 2);
        assert!(rows[0].ends_with("<bob> one\\x1b[2J"), "{rows:?}");
        assert!(
            rows[1].starts_with("  ") && rows[1].trim() == "two\\r",
            "{rows:?}"
        );
        // Narrow screens wrap, never cut.
        let long = Item::Info {
            time_ms: 0,
            text: "x".repeat(100),
        };
        let rows = chat.rows(&long, 40);
        assert!(rows.len() >= 3);
        assert!(rows.iter().all(|l| l.width() <= 40));
    }

    #[test]
    fn a_key_change_is_said_inline_once() {
        let mut chat = Chat::new("alice".into(), false);
        let view = |trust: TrustState| PeerView {
            user: "bob".into(),
            online: true,
            trust: trust.clone(),
            fingerprint: "SHA256:old".into(),
            presented: (trust == TrustState::Changed).then(|| "SHA256:new".into()),
        };
        let at = chat.conv("bob");
        chat.answer(Answer::Who(vec![view(TrustState::Pinned)], false));
        let before = chat.convs[at].items.len();
        chat.answer(Answer::Who(vec![view(TrustState::Changed)], false));
        chat.answer(Answer::Who(vec![view(TrustState::Changed)], false));
        let said: Vec<&Item> = chat.convs[at].items[before..].iter().collect();
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            matches!(said[0], Item::Info { text, .. } if text.contains("KEY CHANGED")
                && text.contains("SHA256:old") && text.contains("/trust bob SHA256:new")),
            "{said:?}"
        );
        chat.switch(at);
        assert!(
            chat.status_line().contains("KEY CHANGED"),
            "{}",
            chat.status_line()
        );
        chat.answer(Answer::Who(vec![view(TrustState::Trusted)], false));
        assert_eq!(chat.convs[at].items.len(), before + 2);
    }

    #[test]
    fn commands() {
        let mut chat = Chat::new("alice".into(), false);
        typed(&mut chat, "/msg carol hello there");
        assert_eq!(
            chat.key(key(KeyCode::Enter)),
            Act::Job(JobSpec::Send("carol".into(), "hello there".into()))
        );
        assert_eq!(chat.convs[chat.current].peer, "carol");
        typed(&mut chat, "/trust carol SHA256:x");
        assert_eq!(
            chat.key(key(KeyCode::Enter)),
            Act::Job(JobSpec::Trust("carol".into(), "SHA256:x".into()))
        );
        typed(&mut chat, "/who");
        assert_eq!(chat.key(key(KeyCode::Enter)), Act::Job(JobSpec::Who));
        // Input history.
        chat.key(key(KeyCode::Up));
        assert_eq!(chat.input.iter().collect::<String>(), "/who");
        chat.key(key(KeyCode::Up));
        assert_eq!(
            chat.input.iter().collect::<String>(),
            "/trust carol SHA256:x"
        );
        chat.key(key(KeyCode::Down));
        chat.key(key(KeyCode::Down));
        assert!(chat.input.is_empty());
        typed(&mut chat, "/quit");
        chat.key(key(KeyCode::Enter));
        assert!(chat.quit);
    }
}
