//! `chatctl chat` against real daemons: line mode and the JSON stream through pipes, and the
//! full-screen chat in a real pseudo-terminal (a tmux session of its own: `send-keys` types,
//! `capture-pane` reads the screen, polled with a deadline).
//!
//! tmux is required in CI (`.ci/run` installs it; CI=true makes its absence a failure); on a
//! developer machine without it the full-screen tests print a loud SKIP and pass.

mod common;

use common::*;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A relay with members alice and bob, who see each other online.
fn trio() -> (Daemon, Daemon, Daemon) {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);
    bob.wait_peer_online("alice", true);
    (relay, alice, bob)
}

fn send(from: &Daemon, to: &str, text: &str) {
    let out = from.ctl(&["send", "--wait", "delivered", to, "--", text]);
    assert!(out.status.success(), "send: {}", describe(&out));
}

// ---------------------------------------------------------------------------------------------
// Line mode (point 2)

#[test]
fn line_mode_sends_stdin_lines_and_prints_only_the_peers_messages() {
    let (relay, alice, bob) = trio();
    let carol = Daemon::member("carol", &relay.addr());
    alice.wait_peer_online("carol", true);
    let mut chat = alice.converse(&["chat", "bob"]);
    chat.write_line("first from the chat");
    chat.write_line("");
    chat.write_line("second\r");
    bob.wait_message("first from the chat");
    bob.wait_message("second");

    // What must not be printed: another peer's message, alice's own, presence, receipts.
    send(&carol, "alice", "not for this chat");
    alice.wait_message("not for this chat");
    send(&alice, "bob", "sent by another chatctl");
    drop(carol);
    alice.wait_peer_online("carol", false);

    send(&bob, "alice", "a reply\nover two lines \x1b[2J");
    let line = chat
        .next_line(DEADLINE)
        .unwrap_or_else(|| fail(&format!("no line from chat; stderr: {}", chat.stderr())));
    assert_eq!(line, "a reply\\nover two lines \\x1b[2J");

    // The end of stdin ends the chat, with nothing else printed.
    chat.close_stdin();
    let status = chat.wait_exit();
    assert!(status.success(), "chat exited {status}: {}", chat.stderr());
    assert_eq!(chat.next_line(Duration::from_millis(200)), None);
    assert_eq!(chat.stderr(), "");
    // Empty lines were skipped, a CR before the newline dropped.
    let sent = bob.texts("in");
    assert_eq!(
        sent,
        ["first from the chat", "second", "sent by another chatctl"]
    );
}

#[test]
fn line_mode_refuses_before_reading_stdin() {
    let (_relay, alice, _bob) = trio();
    let out = alice.ctl_stdin(&["chat"], b"x\n");
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a peer"));
    let out = alice.ctl_stdin(&["chat", "nobody"], b"x\n");
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown user nobody"));
    let out = alice.ctl_stdin(&["chat", "Bad Name"], b"x\n");
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(out.stdout.is_empty());
    let gone = tempfile::tempdir().expect("tempdir");
    let out = run_bounded(
        {
            let mut c = chatctl_cmd();
            c.arg("--socket").arg(gone.path().join("none.sock"));
            c.args(["chat", "bob"]);
            c
        },
        Some(b"x\n".to_vec()),
        CTL_DEADLINE,
    );
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
}

#[test]
fn line_mode_exits_3_when_chatd_goes_away() {
    let (_relay, mut alice, bob) = trio();
    let mut chat = alice.converse(&["chat", "bob"]);
    chat.write_line("hello");
    bob.wait_message("hello");
    alice.kill();
    let status = chat.wait_exit();
    assert_eq!(status.code(), Some(3), "stderr: {}", chat.stderr());
    // stderr is read by a thread of its own: it may lag the exit a little.
    wait_until(DEADLINE, "chatctl to say why on stderr", || {
        chat.stderr().contains("chatctl: chatd went away")
    });
}

// ---------------------------------------------------------------------------------------------
// The JSON stream (point 3)

/// Read JSON lines from `chat` until `pred` matches one (returned); every line goes to `seen`.
fn wait_json(
    chat: &Follower,
    what: &str,
    seen: &mut Vec<Value>,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    if let Some(v) = seen.iter().find(|v| pred(v)) {
        return v.clone();
    }
    let start = Instant::now();
    loop {
        let left = DEADLINE.saturating_sub(start.elapsed());
        if left.is_zero() {
            fail(&format!(
                "chat --json: no {what}; saw {seen:#?}; stderr {}",
                chat.stderr()
            ));
        }
        let Some(line) = chat.next_line(left) else {
            continue;
        };
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| fail(&format!("chat --json printed {line:?}, not JSON: {e}")));
        assert!(v.is_object(), "{line}");
        seen.push(v.clone());
        if pred(&v) {
            return v;
        }
    }
}

fn reply_to(id: Value) -> impl Fn(&Value) -> bool {
    move |v| v["kind"] == "reply" && v["id"] == id
}

#[test]
fn json_chat_answers_by_id_and_streams_every_new_record() {
    let (_relay, alice, bob) = trio();
    let mut chat = alice.converse(&["--json", "chat"]);
    let mut seen = Vec::new();
    chat.write_line(r#"{"id":3,"op":"status"}"#);
    let r = wait_json(&chat, "status reply", &mut seen, reply_to(3.into()));
    assert_eq!(r["ok"], true);
    assert_eq!(r["status"]["user"], "alice");
    assert_eq!(r["status"]["connected"], true);

    // Records that arrive now come out between the replies.
    send(&bob, "alice", "hello json");
    let rec = wait_json(&chat, "bob's message", &mut seen, |v| {
        v["kind"] == "message" && v["text"] == "hello json"
    });
    assert_eq!(
        (rec["from"].as_str(), rec["dir"].as_str()),
        (Some("bob"), Some("in"))
    );
    assert!(rec["seq"].is_u64() && is_hex_id(rec["id"].as_str().unwrap_or("")));

    chat.write_line(r#"{"id":"s1","op":"send","to":"bob","text":"answer","wait":"delivered"}"#);
    chat.write_line(r#"{"id":[1],"op":"who"}"#);
    chat.write_line("this is not json");
    chat.write_line(r#"{"id":5,"op":"send","to":"nobody","text":"x"}"#);
    chat.write_line(r#"{"id":6,"op":"send","to":"bob","text":"x","wiat":"relay"}"#);
    chat.write_line(r#"{"id":7,"op":"fingerprint"}"#);
    chat.write_line(r#"{"id":8,"op":"who","all":true,"prefix":"b"}"#);

    let r = wait_json(&chat, "send reply", &mut seen, reply_to("s1".into()));
    assert_eq!(r["ok"], true, "{r}");
    let sent = &r["sent"][0];
    assert_eq!(
        (sent["to"].as_str(), sent["state"].as_str()),
        (Some("bob"), Some("delivered"))
    );
    let id = sent["id"].clone();
    bob.wait_message("answer");
    // The own message and its receipts are records too.
    wait_json(&chat, "own message", &mut seen, |v| {
        v["kind"] == "message" && v["dir"] == "out" && v["id"] == id
    });
    wait_json(&chat, "delivered receipt", &mut seen, |v| {
        v["kind"] == "receipt" && v["id"] == id && v["state"] == "delivered"
    });

    let r = wait_json(
        &chat,
        "who reply",
        &mut seen,
        reply_to(serde_json::json!([1])),
    );
    let peers = r["peers"].as_array().expect("peers list");
    assert!(
        peers
            .iter()
            .any(|p| p["user"] == "bob" && p["online"] == true),
        "{r}"
    );

    let r = wait_json(&chat, "bad line reply", &mut seen, |v| {
        v["kind"] == "reply" && v["id"].is_null()
    });
    assert_eq!(
        (r["ok"].as_bool(), r["exit"].as_u64()),
        (Some(false), Some(2))
    );
    assert_eq!(r["error"], "bad_request");

    let r = wait_json(&chat, "unknown user reply", &mut seen, reply_to(5.into()));
    assert_eq!(
        (r["ok"].as_bool(), r["exit"].as_u64()),
        (Some(false), Some(1)),
        "{r}"
    );
    assert!(
        r["message"].as_str().unwrap_or("").contains("nobody"),
        "{r}"
    );

    let r = wait_json(&chat, "misspelt field reply", &mut seen, reply_to(6.into()));
    assert_eq!(r["error"], "bad_request", "{r}");
    assert!(r["message"].as_str().unwrap_or("").contains("wiat"), "{r}");

    let r = wait_json(&chat, "fingerprint reply", &mut seen, reply_to(7.into()));
    assert_eq!(r["fingerprint"], alice.fingerprint());

    let r = wait_json(&chat, "who --all reply", &mut seen, reply_to(8.into()));
    let names: Vec<&str> = r["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter_map(|p| p["user"].as_str())
        .collect();
    assert_eq!(names, ["bob"], "the relay's names starting with b: {r}");

    // Replies come in request order.
    let order: Vec<Value> = seen
        .iter()
        .filter(|v| v["kind"] == "reply")
        .map(|v| v["id"].clone())
        .collect();
    assert_eq!(
        order,
        [
            3.into(),
            "s1".into(),
            serde_json::json!([1]),
            Value::Null,
            5.into(),
            6.into(),
            7.into(),
            8.into()
        ]
    );
    // Nothing was refused by mistake: bob got exactly the one good send.
    assert_eq!(bob.texts("in"), ["answer"]);

    chat.close_stdin();
    let status = chat.wait_exit();
    assert!(status.success(), "{status}: {}", chat.stderr());
}

#[test]
fn json_chat_replays_since_a_seq_and_exits_3_when_chatd_goes_away() {
    let (_relay, mut alice, bob) = trio();
    send(&bob, "alice", "one");
    send(&bob, "alice", "two");
    let seq_one = alice.wait_message("one")["seq"].as_u64().expect("seq");
    let mut chat = alice.converse(&["--json", "chat", "bob", "--since", &seq_one.to_string()]);
    let mut seen = Vec::new();
    let first = wait_json(&chat, "the first record after --since", &mut seen, |v| {
        v["kind"] == "message"
    });
    assert_eq!(first["text"], "two");
    assert!(
        seen.iter().all(|v| v["seq"].as_u64() > Some(seq_one)),
        "{seen:#?}"
    );
    alice.kill();
    let status = chat.wait_exit();
    assert_eq!(status.code(), Some(3), "{}", chat.stderr());
}

// ---------------------------------------------------------------------------------------------
// The full-screen chat (point 1), in tmux

/// A tmux server of its own (its own socket), killed on drop. The pane runs bash, so the test
/// can record `stty -g` before and after chatctl, and chatctl's exit status.
struct Tmux {
    socket: String,
    dir: tempfile::TempDir,
}

fn tmux_available() -> bool {
    let present = Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
            panic!(
                "tmux is not installed, and CI is set: .ci/run installs it (apt-get install tmux)"
            );
        }
        eprintln!(
            "\n!!!!! SKIP: tmux is not installed, so the full-screen `chatctl chat` was NOT tested. \
             apt-get install tmux !!!!!\n"
        );
    }
    present
}

impl Tmux {
    fn start() -> Tmux {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Tmux {
            socket: unique("chatd-tmux"),
            dir,
        };
        let out = t.cmd(&[
            "new-session",
            "-d",
            "-x",
            "80",
            "-y",
            "24",
            "-s",
            "chat",
            "bash --norc --noprofile",
        ]);
        assert!(out.status.success(), "tmux new-session: {}", describe(&out));
        t
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket, "-f", "/dev/null"]).args(args);
        c.env_remove("TMUX");
        run_bounded(c, None, CTL_DEADLINE)
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "chat"];
        args.extend_from_slice(keys);
        let out = self.cmd(&args);
        assert!(out.status.success(), "send-keys: {}", describe(&out));
    }

    /// Type `text` literally (no key names).
    fn type_text(&self, text: &str) {
        self.keys(&["-l", text]);
    }

    fn screen(&self) -> String {
        let out = self.cmd(&["capture-pane", "-p", "-t", "chat"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen_escapes(&self) -> String {
        let out = self.cmd(&["capture-pane", "-p", "-e", "-t", "chat"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Poll the screen until `pred` holds; the screen it held on.
    fn wait_screen(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            if start.elapsed() > DEADLINE {
                fail(&format!("screen never showed {what}; it shows:\n{s}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Run `chatctl ARGS` (the full-screen chat, say) in the pane (env `env`, e.g. `NO_COLOR=1`), recording the
    /// terminal mode before and after in `before.N`/`after.N` and the exit status in `rc.N`.
    fn run_chat(&self, n: u32, env: &str, socket: &Path, args: &str) {
        let d = self.dir.path().display();
        let line = format!(
            "stty -g > {d}/before.{n}; {env} {CHATCTL} --socket {} {args}; echo $? > {d}/rc.{n}.tmp; \
             stty -g > {d}/after.{n}; mv {d}/rc.{n}.tmp {d}/rc.{n}; clear",
            socket.display()
        );
        self.type_text(&line);
        self.keys(&["Enter"]);
    }

    /// Wait for run `n` to end; its exit status, with the terminal's mode checked unchanged.
    fn wait_chat_end(&self, n: u32) -> i32 {
        let rc = self.file(&format!("rc.{n}"));
        let what = format!("chat run {n} to end");
        let code = wait_for(DEADLINE, &what, || {
            fs::read_to_string(&rc)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
        });
        let before = fs::read_to_string(self.file(&format!("before.{n}"))).expect("before");
        let after = fs::read_to_string(self.file(&format!("after.{n}"))).expect("after");
        assert!(!before.trim().is_empty());
        assert_eq!(before, after, "run {n} left the terminal in another mode");
        code
    }

    /// The pid of the program the pane's shell runs now (chatctl), once there is one.
    fn chat_pid(&self) -> i32 {
        let out = self.cmd(&["display-message", "-p", "-t", "chat", "#{pane_pid}"]);
        let shell = String::from_utf8_lossy(&out.stdout).trim().to_string();
        wait_for(DEADLINE, "chatctl to run in the pane", || {
            let kids = fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).ok()?;
            kids.split_whitespace().next().and_then(|p| p.parse().ok())
        })
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("===== screen (test failed) =====\n{}", self.screen());
        }
        let _ = self.cmd(&["kill-server"]);
    }
}

/// The rows of a screen without trailing blanks.
fn rows(screen: &str) -> Vec<&str> {
    screen.lines().map(str::trim_end).collect()
}

/// The input line: the last non-empty row.
fn input_row(screen: &str) -> String {
    rows(screen)
        .into_iter()
        .rev()
        .find(|r| !r.is_empty())
        .unwrap_or("")
        .to_string()
}

/// SGR colour parameters (30-49, 90-107; not 39 and 49, "default colour") in `escaped` text.
fn has_colour(escaped: &str) -> bool {
    escaped.split("\x1b[").skip(1).any(|seq| {
        let Some(end) = seq.find('m') else {
            return false;
        };
        seq[..end].split(';').any(|p| {
            p.parse::<u32>().is_ok_and(|n| {
                ((30..=49).contains(&n) && n != 39 && n != 49) || (90..=107).contains(&n)
            })
        })
    })
}

#[test]
fn full_screen_chat_types_receives_marks_delivery_resizes_and_quits() {
    if !tmux_available() {
        return;
    }
    let (relay, alice, bob) = trio();
    let carol = Daemon::member("carol", &relay.addr());
    bob.wait_peer_online("carol", true);
    send(&alice, "bob", "from the history");
    let tmux = Tmux::start();
    tmux.run_chat(1, "", &bob.socket(), "chat alice");
    let s = tmux.wait_screen("the history and the status line", |s| {
        s.contains("<alice> from the history") && s.contains("[bob] connected")
    });
    assert!(s.contains("2:alice (online, pinned)"), "{s}");
    // The conversation's own history and the first records overlap: each is shown once.
    assert_eq!(s.matches("from the history").count(), 1, "{s}");
    assert_eq!(rows(&s).len(), 24);
    assert!(
        has_colour(&tmux.screen_escapes()),
        "colours without NO_COLOR"
    );

    // Type and send; the own message gets its delivered mark in place.
    tmux.type_text("hello alice");
    tmux.keys(&["Enter"]);
    alice.wait_message("hello alice");
    let s = tmux.wait_screen("the delivered mark", |s| {
        s.contains("<bob> hello alice [delivered]")
    });
    assert_eq!(
        s.matches("hello alice").count(),
        1,
        "one line per message:\n{s}"
    );
    assert_eq!(input_row(&s), "[alice]");

    // A message arrives while half a line is typed: the input line is intact.
    tmux.type_text("half a li");
    tmux.wait_screen("the half line", |s| input_row(s) == "[alice] half a li");
    send(&alice, "bob", "interrupting you");
    let s = tmux.wait_screen("the incoming message", |s| {
        s.contains("<alice> interrupting you")
    });
    assert_eq!(input_row(&s), "[alice] half a li", "{s}");
    tmux.type_text("ne");
    tmux.keys(&["Enter"]);
    alice.wait_message("half a line");

    // Another peer writes: an unread count on the status line; Ctrl-N shows that conversation
    // (and clears it), Ctrl-P goes back.
    send(&carol, "bob", "psst");
    tmux.wait_screen("carol's unread count", |s| s.contains("unread 3:carol(1)"));
    assert!(
        !tmux.screen().contains("psst"),
        "not in alice's conversation"
    );
    tmux.keys(&["C-n"]);
    let s = tmux.wait_screen("carol's conversation", |s| s.contains("<carol> psst"));
    assert!(
        s.contains("3:carol (online, pinned)") && !s.contains("unread"),
        "{s}"
    );
    assert_eq!(input_row(&s), "[carol]");
    tmux.keys(&["C-p"]);
    tmux.wait_screen("alice's conversation again", |s| input_row(s) == "[alice]");

    // Resize: everything is redrawn for the new size.
    let out = tmux.cmd(&["resize-window", "-t", "chat", "-x", "50", "-y", "15"]);
    assert!(out.status.success(), "{}", describe(&out));
    send(
        &alice,
        "bob",
        "after the resize, a line longer than fifty columns to wrap it",
    );
    let s = tmux.wait_screen("the wrapped message at 50x15", |s| {
        rows(s).len() == 15 && s.contains("to wrap it")
    });
    assert!(rows(&s).iter().all(|r| r.chars().count() <= 50), "{s}");
    assert!(s.contains("<alice> after the resize"), "{s}");
    assert_eq!(input_row(&s), "[alice]");

    // /help lists the commands inline; /quit leaves with the terminal as it was.
    tmux.type_text("/help");
    tmux.keys(&["Enter"]);
    tmux.wait_screen("the help", |s| s.contains("/quit"));
    tmux.type_text("/quit");
    tmux.keys(&["Enter"]);
    assert_eq!(tmux.wait_chat_end(1), 0);
}

#[test]
fn full_screen_chat_gives_the_terminal_back_on_ctrl_c_sigterm_and_chatd_going_away() {
    if !tmux_available() {
        return;
    }
    let (_relay, alice, mut bob) = trio();
    let tmux = Tmux::start();

    tmux.run_chat(1, "NO_COLOR=1", &bob.socket(), "chat alice");
    tmux.wait_screen("the chat", |s| s.contains("[bob] connected"));
    assert!(!has_colour(&tmux.screen_escapes()), "NO_COLOR: no colours");
    tmux.keys(&["C-c"]);
    assert_eq!(tmux.wait_chat_end(1), 0);

    tmux.run_chat(2, "", &bob.socket(), "chat alice");
    tmux.wait_screen("the chat", |s| s.contains("[bob] connected"));
    let pid = tmux.chat_pid();
    // SAFETY: signalling the chatctl this test started in its pane.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    assert_eq!(tmux.wait_chat_end(2), 0);

    tmux.run_chat(3, "", &bob.socket(), "chat alice");
    tmux.wait_screen("the chat", |s| s.contains("[bob] connected"));
    send(&alice, "bob", "last words");
    tmux.wait_screen("the message", |s| s.contains("last words"));
    bob.kill();
    assert_eq!(tmux.wait_chat_end(3), 3, "chatd going away is exit 3");
}

#[test]
fn full_screen_chat_explains_a_changed_key_inline_and_trusts_it() {
    if !tmux_available() {
        return;
    }
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let mut carol = Daemon::member("carol", &relay.addr());
    alice.wait_peer_online("carol", true);
    let old_fp = carol.fingerprint();
    carol.kill();
    alice.wait_peer_online("carol", false);
    let out = relay.ctl(&["forget", "carol"]);
    assert!(out.status.success(), "{}", describe(&out));
    let carol2 = Daemon::member("carol", &relay.addr());
    let new_fp = carol2.fingerprint();
    wait_until(DEADLINE, "alice to see carol's key changed", || {
        alice.peer("carol").is_some_and(|p| p["trust"] == "changed")
    });

    let tmux = Tmux::start();
    tmux.run_chat(1, "", &alice.socket(), "chat ");
    tmux.wait_screen("the chat", |s| s.contains("[alice] connected"));
    tmux.type_text("/msg carol are you really carol?");
    tmux.keys(&["Enter"]);
    let s = tmux.wait_screen("the exit-5 explanation", |s| s.contains("NOT SENT"));
    assert!(s.contains("KEY CHANGED"), "the status line says so:\n{s}");
    // Rejoin the wrapped rows (without their indent and spaces) to look for the words.
    let flat: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(flat.contains("exit5") && flat.contains("keychanged"), "{s}");
    assert!(
        flat.contains(&old_fp) && flat.contains(&new_fp),
        "both fingerprints:\n{s}"
    );
    assert!(carol2.texts("in").is_empty());

    tmux.type_text(&format!("/trust carol {new_fp}"));
    tmux.keys(&["Enter"]);
    tmux.wait_screen("the trust answer", |s| s.contains("trusted"));
    tmux.type_text("now for real");
    tmux.keys(&["Enter"]);
    carol2.wait_message("now for real");
    tmux.keys(&["C-d"]);
    assert_eq!(tmux.wait_chat_end(1), 0);
}

// ---------------------------------------------------------------------------------------------
// Plain tail reads like a chat (point 4); link records (point 5)

fn plain_lines(d: &Daemon, args: &[&str]) -> Vec<String> {
    let out = d.ctl(args);
    assert!(out.status.success(), "{}", describe(&out));
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn plain_tail_shows_each_sent_message_with_its_state_and_follows_with_short_lines() {
    let (_relay, alice, bob) = trio();
    send(&alice, "bob", "lunch?");
    send(&alice, "bob", "first line\nsecond line\r");
    send(&bob, "alice", "yes");
    let json = alice.history();
    let receipts = json.iter().filter(|r| r["kind"] == "receipt").count();
    assert!(receipts >= 4, "relayed and delivered for both: {json:#?}");

    let lines = plain_lines(&alice, &["tail", "-n", "100"]);
    assert!(
        !lines
            .iter()
            .any(|l| l.contains(": relayed") || l.contains(": delivered ")),
        "no separate receipt lines for messages in the history: {lines:#?}"
    );
    let lunch = lines
        .iter()
        .find(|l| l.contains("lunch?"))
        .expect("lunch line");
    assert!(
        lunch.contains("alice -> bob: lunch?  [delivered] "),
        "{lunch}"
    );
    let at = lines
        .iter()
        .position(|l| l.contains("first line"))
        .expect("multi-line");
    assert!(
        !lines[at].contains("[delivered]"),
        "the state follows the last line"
    );
    let cont = &lines[at + 1];
    let indent = lines[at].find("first line").expect("text start");
    assert_eq!(
        &cont[..indent],
        " ".repeat(indent),
        "continuation indented under the text"
    );
    assert!(
        cont[indent..].starts_with("second line\\r  [delivered] "),
        "{cont}"
    );
    assert!(lines.iter().any(|l| l.contains("alice <- bob: yes")));
    // The link record is one compact line naming who was online.
    assert!(
        lines.iter().any(|l| l.contains("* link up: ")),
        "the login is shown: {lines:#?}"
    );
    // --json is unchanged: every receipt is still its own record.
    assert_eq!(
        alice
            .ctl_json(&["tail", "-n", "100"])
            .iter()
            .filter(|r| r["kind"] == "receipt")
            .count(),
        receipts
    );

    // -f: a new message shows queued, then each state change is one short line.
    let f = alice.converse(&["tail", "-f", "-n", "0"]);
    let mut i = 0;
    // (A state line of a warm-up message sent before it attached may come first.)
    let first = wait_for(DEADLINE, "plain tail -f to print a new message", || {
        i += 1;
        send(&alice, "bob", &format!("warm {i}"));
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(500) {
            match f.next_line(Duration::from_millis(100)) {
                Some(l) if l.contains("[queued]") => return Some(l),
                _ => {}
            }
        }
        None
    });
    assert!(
        first.contains("warm") && first.contains("[queued]"),
        "{first}"
    );
    let id12 = first.rsplit(' ').next().expect("id").to_string();
    let mut states = Vec::new();
    let start = Instant::now();
    while !states.iter().any(|l: &String| l.contains("delivered")) && start.elapsed() < DEADLINE {
        if let Some(l) = f.next_line(Duration::from_millis(200)) {
            if l.contains(&id12) {
                states.push(l);
            }
        }
    }
    assert!(
        states
            .iter()
            .any(|l| l.ends_with(&format!("-> bob: delivered {id12}"))),
        "a short state line: {states:#?}"
    );
}

#[test]
fn link_records_say_when_the_relay_goes_and_comes_back() {
    let mut relay = Daemon::relay();
    let addr = relay.addr();
    let alice = Daemon::member("alice", &addr);
    let bob = Daemon::member("bob", &addr);
    alice.wait_peer_online("bob", true);
    let links = |d: &Daemon| -> Vec<Value> {
        d.history()
            .into_iter()
            .filter(|r| r["kind"] == "link")
            .collect()
    };
    let first = links(&bob);
    assert_eq!(first.len(), 1, "{first:#?}");
    assert_eq!(first[0]["up"], true);
    assert_eq!(first[0]["online"], serde_json::json!(["alice"]));
    assert_eq!(first[0]["peers_online"], 1);

    let mut f = alice.follow(&["-f", "-n", "0"]);
    let mut seen = Vec::new();
    let mut i = 0;
    wait_for(DEADLINE, "tail -f to attach", || {
        i += 1;
        send(&alice, "bob", &format!("ping {i}"));
        f.next(Duration::from_millis(500))
    });
    relay.stop();
    let down = f.wait_record("link down", &mut seen, |r| r["kind"] == "link");
    assert_eq!(down["up"], false, "{down}");
    assert!(
        down["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{down}"
    );
    relay.start_stopped();
    let up = f.wait_record("link up", &mut seen, |r| {
        r["kind"] == "link" && r["up"] == true
    });
    assert!(up["reason"].is_null());
    // Reconnect attempts while the relay was away wrote nothing more.
    let all = links(&alice);
    assert_eq!(
        all.iter().filter(|r| r["up"] == false).count(),
        1,
        "{all:#?}"
    );
    // --with leaves link records out.
    assert!(alice
        .ctl_json(&["tail", "-n", "1000", "--with", "bob"])
        .iter()
        .all(|r| r["kind"] != "link"));
    let _ = f.is_running();
}

// ---------------------------------------------------------------------------------------------
// Completions know people (point 6)

fn completion_file(name: &str) -> String {
    format!("{}/contrib/completions/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A shell is installed, or (in CI, which installs it) the test fails.
fn shell_available(shell: &str) -> bool {
    let present = Command::new(shell)
        .args(["-c", "exit 0"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
            panic!("{shell} is not installed, and CI is set: .ci/run installs it");
        }
        eprintln!(
            "\n!!!!! SKIP: {shell} is not installed; its completions were NOT tested !!!!!\n"
        );
    }
    present
}

/// Run `script` in `shell` with chatctl on PATH; its stdout lines (stderr must be empty).
fn in_shell(shell: &str, args: &[&str], script: &str) -> Vec<String> {
    let home = tempfile::tempdir().expect("tempdir");
    let bin = Path::new(CHATCTL).parent().expect("bin dir");
    let mut c = Command::new(shell);
    c.args(args)
        .arg(script)
        .env("HOME", home.path())
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env_remove("CHATD_SOCKET");
    let out = run_bounded(c, None, CTL_DEADLINE);
    assert!(out.status.success(), "{shell}: {}", describe(&out));
    assert!(out.stderr.is_empty(), "{shell} said: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn completions_offer_user_names_from_the_running_daemon() {
    let (relay, alice, _bob) = trio();
    let _carol = Daemon::member("carol", &relay.addr());
    alice.wait_peer_online("carol", true);
    let sock = alice.socket();
    let sock = sock.to_str().expect("UTF-8 socket path");
    let gone = "/nonexistent/chatd.sock";
    let people = ["bob", "carol"];

    let bash = |words: &str, cword: usize| {
        in_shell(
            "bash",
            &["--norc", "-c"],
            &format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; _chatctl_people; \
                 printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                completion_file("chatctl.bash")
            ),
        )
    };
    for (words, cword) in [
        (format!("chatctl --socket {sock} send ''"), 4),
        (format!("chatctl --socket {sock} chat ''"), 4),
        (format!("chatctl --socket {sock} trust ''"), 4),
        (format!("chatctl --socket {sock} fingerprint ''"), 4),
        (format!("chatctl --socket {sock} tail --with ''"), 5),
    ] {
        assert_eq!(bash(&words, cword), people, "bash: {words}");
    }
    assert_eq!(
        bash(&format!("chatctl --socket {sock} send c"), 4),
        ["carol"]
    );
    // Not a user's place: the text after `--`, or the value of --wait.
    let after = bash(&format!("chatctl --socket {sock} send bob -- ''"), 6);
    assert!(!after.contains(&"carol".to_string()), "{after:?}");
    // No chatd: quietly nothing.
    assert_eq!(bash(&format!("chatctl --socket {gone} send ''"), 4), [""]);

    if shell_available("zsh") {
        let zsh = |words: &str| {
            in_shell(
                "zsh",
                &["-fc"],
                &format!(
                    "autoload -U compinit; compinit -u -D; source {}; words=({words}); \
                     _chatctl_user_names",
                    completion_file("_chatctl")
                ),
            )
        };
        assert_eq!(zsh(&format!("chatctl --socket {sock} send ''")), people);
        assert!(zsh(&format!("chatctl --socket {gone} send ''")).is_empty());
        let script = fs::read_to_string(completion_file("_chatctl")).expect("_chatctl");
        assert_eq!(script.matches(":_chatctl_users'").count(), 5);
    }
    if shell_available("fish") {
        let fish = |line: &str| {
            in_shell(
                "fish",
                &["--no-config", "-c"],
                &format!(
                    "source {}; complete -C '{line}'",
                    completion_file("chatctl.fish")
                ),
            )
        };
        for line in [
            format!("chatctl --socket {sock} send "),
            format!("chatctl --socket {sock} chat "),
            format!("chatctl --socket {sock} trust "),
            format!("chatctl --socket {sock} fingerprint "),
            format!("chatctl --socket {sock} tail --with "),
        ] {
            assert_eq!(fish(&line), people, "fish: {line}");
        }
        assert!(fish(&format!("chatctl --socket {gone} chat ")).is_empty());
    }
}

#[test]
fn send_on_a_terminal_says_what_it_waits_for_and_in_a_pipe_says_nothing() {
    let (_relay, alice, bob) = trio();
    let out = alice.ctl_stdin(&["send", "bob"], b"from a pipe\n");
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        out.stderr.is_empty(),
        "nothing on stderr in a pipe: {}",
        describe(&out)
    );
    bob.wait_message("from a pipe");
    if !tmux_available() {
        return;
    }
    let tmux = Tmux::start();
    tmux.run_chat(1, "", &alice.socket(), "send bob");
    let s = tmux.wait_screen("the waiting line", |s| s.contains("type messages for bob"));
    assert_eq!(
        s.matches("chatctl: type messages for bob, one per line; Ctrl-D ends")
            .count(),
        1,
        "{s}"
    );
    tmux.type_text("from a terminal");
    tmux.keys(&["Enter"]);
    bob.wait_message("from a terminal");
    tmux.keys(&["C-d"]);
    assert_eq!(tmux.wait_chat_end(1), 0);
}
