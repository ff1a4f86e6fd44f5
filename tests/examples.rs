//! The scripting contract, run end to end: the example scripts in `contrib/examples/` against
//! real daemons (a relay, alice and bob), and the `tail` behaviour they are built on — `tail -f
//! --json` exits 3 when its chatd goes away, and `--since SEQ` resumes exactly after SEQ.
//!
//! The scripts are run as they ship (their `#!` line and executable bit included), with
//! `CHATD_SOCKET` pointing at a daemon's socket and `CHATCTL` at the chatctl under test. Each
//! runs in its own process group, which a [`Script`] kills on drop, so no `chatctl tail` it
//! started can outlive a test. The echo bot is one `chatctl --json chat` process (the two-way
//! stream); the log forwarder and the tail tests use `tail`.

mod common;

use common::*;
use serde_json::Value;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const ECHO_BOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/examples/echo-bot");
const LOG_FORWARDER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/contrib/examples/log-forwarder"
);

/// An example script running in its own process group, killed (with its children) on drop.
struct Script {
    name: &'static str,
    child: Option<Child>,
    stderr: PathBuf,
}

impl Script {
    /// Start `path ARGS` against the daemon whose control socket is `socket`; its stderr goes
    /// to a file in `dir`.
    fn start(name: &'static str, path: &str, args: &[&str], socket: &Path, dir: &Path) -> Script {
        let stderr = dir.join(format!("{name}.stderr"));
        let err = File::create(&stderr).expect("create the script's stderr file");
        let child = Command::new(path)
            .args(args)
            .env("CHATD_SOCKET", socket)
            .env("CHATCTL", CHATCTL)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {path}: {e}"));
        Script {
            name,
            child: Some(child),
            stderr,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("script running").id() as i32
    }

    /// What the script printed on stderr so far.
    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Fail the test (with the daemons' logs and the script's stderr) if the script exited.
    fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("script running");
        if let Ok(Some(status)) = child.try_wait() {
            fail(&format!(
                "{} exited unexpectedly ({status}); its stderr:\n{}",
                self.name,
                self.stderr()
            ));
        }
    }

    /// Wait (bounded) for the script to exit on its own.
    fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("script running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() >= DEADLINE {
                fail(&format!(
                    "{} did not exit; its stderr:\n{}",
                    self.name,
                    self.stderr()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM the script itself (not its group) and wait for it: it must stop its children.
    fn terminate(&mut self) -> ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        self.wait_exit()
    }

    /// Whether any process of the script's group is still alive.
    fn group_alive(&self) -> bool {
        // SAFETY: signal 0 only checks that the process group exists.
        unsafe { libc::kill(-self.pid(), 0) == 0 }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: killing the process group we created for this script.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

fn assert_ok(out: &Output, what: &str) {
    if !out.status.success() {
        fail(&format!("{what} failed: {}", describe(out)));
    }
}

/// A relay with members alice and bob, who see each other online.
fn trio() -> (Daemon, Daemon, Daemon) {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);
    bob.wait_peer_online("alice", true);
    (relay, alice, bob)
}

/// Incoming texts of `d`'s history, in order.
fn incoming(d: &Daemon) -> Vec<String> {
    d.texts("in")
}

/// The echo bot starts with `tail -f -n 0`: it answers only what arrives after its tail is
/// attached. Send numbered warm-up messages from alice until one is answered, so that what is
/// sent next is surely seen.
fn wait_until_bot_answers(bot: &mut Script, alice: &Daemon) {
    let start = Instant::now();
    for i in 1.. {
        bot.assert_running();
        if start.elapsed() >= DEADLINE {
            fail(&format!(
                "the echo bot answered no warm-up message; its stderr:\n{}",
                bot.stderr()
            ));
        }
        assert_ok(
            &alice.ctl(&["send", "bob", &format!("warmup-{i}")]),
            "send a warm-up",
        );
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if incoming(alice)
                .iter()
                .any(|t| t.starts_with("echo: warmup-"))
            {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The seq in the bot's state file, if it holds one.
fn state_seq(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The seq of the incoming message `text` in `d`'s history.
fn seq_of(d: &Daemon, text: &str) -> u64 {
    d.messages()
        .iter()
        .find(|r| r["dir"] == "in" && r["text"] == text)
        .and_then(|r| r["seq"].as_u64())
        .unwrap_or_else(|| fail(&format!("{} has no incoming {text:?}", d.label())))
}

#[test]
fn echo_bot_answers_and_resumes_after_a_restart() {
    let (_relay, alice, bob) = trio();
    let work = tempfile::tempdir().expect("temporary directory");
    let state = work.path().join("bot").join("last-seq");
    let state_arg = state.to_str().expect("UTF-8 path");

    let mut bot = Script::start(
        "echo-bot",
        ECHO_BOT,
        &["--state", state_arg],
        &bob.socket(),
        work.path(),
    );
    wait_until_bot_answers(&mut bot, &alice);

    // alice sends "ping"; bob's bot answers; alice's history shows it, from bob.
    assert_ok(&alice.ctl(&["send", "bob", "ping"]), "send ping");
    let echo = alice.wait_message("echo: ping");
    assert_eq!(echo["from"], "bob", "the echo comes from bob: {echo}");
    assert_eq!(echo["to"], "alice");
    // Quoting survives: a text with shell metacharacters and a leading dash.
    let tricky = r#"-n "$HOME" `id`; it's \ fine * ?"#;
    assert_ok(&alice.ctl(&["send", "bob", "--", tricky]), "send tricky");
    alice.wait_message(&format!("echo: {tricky}"));

    // The bot remembers where it is.
    let tricky_seq = seq_of(&bob, tricky);
    wait_until(DEADLINE, "the bot to store the seq it handled", || {
        state_seq(&state).is_some_and(|s| s >= tricky_seq)
    });

    // Stop it cleanly: it exits 0 and takes its `chatctl chat` with it.
    let status = bot.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM stops the bot with 0; stderr:\n{}",
        bot.stderr()
    );
    wait_until(DEADLINE, "the bot's chatctl chat to be gone", || {
        !bot.group_alive()
    });
    drop(bot);

    // Messages that arrive while it is down are answered after a restart (it resumes with
    // --since), and nothing it already answered is answered again.
    for t in ["while-down-1", "while-down-2"] {
        assert_ok(
            &alice.ctl(&["send", "--wait", "delivered", "bob", t]),
            "send while the bot is down",
        );
    }
    let mut bot = Script::start(
        "echo-bot (restarted)",
        ECHO_BOT,
        &["--state", state_arg],
        &bob.socket(),
        work.path(),
    );
    alice.wait_message("echo: while-down-1");
    alice.wait_message("echo: while-down-2");
    bot.assert_running();
    assert!(
        bot.stderr().contains("resuming after seq"),
        "the restarted bot resumes from its state file; stderr:\n{}",
        bot.stderr()
    );
    assert_ok(&alice.ctl(&["send", "bob", "after-restart"]), "send");
    alice.wait_message("echo: after-restart");

    // bob's daemon delivers in send order, so any repeated answer would have come before
    // "echo: after-restart".
    let texts = incoming(&alice);
    let answers: Vec<&String> = texts.iter().filter(|t| t.starts_with("echo: ")).collect();
    for t in &answers {
        let n = texts.iter().filter(|u| u == t).count();
        assert_eq!(n, 1, "{t:?} answered {n} times; alice received {texts:#?}");
    }
    for t in ["ping", "while-down-1", "while-down-2", "after-restart"] {
        assert!(
            answers.contains(&&format!("echo: {t}")),
            "no answer to {t:?}; alice received {texts:#?}"
        );
    }
    // The bot answers incoming messages only: its own replies are not answered.
    assert!(
        !incoming(&bob).iter().any(|t| t.starts_with("echo: ")),
        "bob received an echo"
    );
}

#[test]
fn echo_bot_exits_3_when_chatd_goes_away() {
    let (_relay, alice, mut bob) = trio();
    let work = tempfile::tempdir().expect("temporary directory");
    let state = work.path().join("last-seq");
    let mut bot = Script::start(
        "echo-bot",
        ECHO_BOT,
        &["--state", state.to_str().expect("UTF-8 path")],
        &bob.socket(),
        work.path(),
    );
    wait_until_bot_answers(&mut bot, &alice);
    bob.kill();
    let status = bot.wait_exit();
    assert_eq!(
        status.code(),
        Some(3),
        "the bot exits 3 when chatd goes away; stderr:\n{}",
        bot.stderr()
    );
    assert!(
        bot.stderr().contains("chatctl: "),
        "chatctl said why on stderr: {}",
        bot.stderr()
    );
}

#[test]
fn tail_since_resumes_exactly_and_follow_exits_3_when_chatd_is_killed() {
    let (_relay, alice, mut bob) = trio();
    // More than the 10 records `tail` prints by default.
    for i in 1..=12 {
        assert_ok(
            &alice.ctl(&["send", "--wait", "delivered", "bob", &format!("m{i}")]),
            "send",
        );
    }
    let all = bob.tail(&[]);
    let seqs: Vec<u64> = all.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs.len(), all.len(), "every record has a seq: {all:#?}");
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs increase: {seqs:?}"
    );

    // `--since SEQ` prints exactly the records after SEQ, for every SEQ of the history, and
    // nothing after the last one.
    let cut = seq_of(&bob, "m2");
    for r in &all {
        let s = r["seq"].as_u64().expect("seq");
        let want: Vec<&Value> = all.iter().filter(|x| x["seq"].as_u64() > Some(s)).collect();
        let got = bob.ctl_json(&["tail", "--since", &s.to_string()]);
        let got: Vec<&Value> = got.iter().collect();
        assert_eq!(got, want, "tail --since {s}");
    }
    let before_first = seqs[0].saturating_sub(1);
    assert_eq!(
        bob.ctl_json(&["tail", "--since", &before_first.to_string()]),
        all,
        "--since before the first record prints the whole history, not the last 10"
    );

    // `-f --since SEQ`: the history after SEQ, then new records, with no gap and no repeat.
    let follower = bob.follow(&["-f", "--since", &cut.to_string()]);
    let mut seen = Vec::new();
    let history: Vec<Value> = all
        .iter()
        .filter(|x| x["seq"].as_u64() > Some(cut))
        .cloned()
        .collect();
    for want in &history {
        let got = follower.wait_record("a history record", &mut seen, |_| true);
        assert_eq!(&got, want, "tail -f --since {cut}: history first, in order");
    }
    assert_ok(
        &alice.ctl(&["send", "--wait", "delivered", "bob", "m13"]),
        "send m13",
    );
    let next = follower.wait_record("m13", &mut seen, |_| true);
    assert_eq!(
        next["text"], "m13",
        "the next record is the new message: {next}"
    );
    assert!(
        next["seq"].as_u64() > seqs.last().copied(),
        "new records come after the history: {next}"
    );

    // Kill the daemon: `tail -f` exits 3 with one line on stderr.
    let mut follower = follower;
    bob.kill();
    let status = follower.wait_exit();
    assert_eq!(
        status.code(),
        Some(3),
        "tail -f --json exits 3 when chatd is killed; stderr: {}",
        follower.stderr()
    );
    wait_until(DEADLINE, "chatctl's stderr to be read", || {
        !follower.stderr().is_empty()
    });
    let err = follower.stderr();
    assert!(
        err.starts_with("chatctl: ") && err.trim_end().lines().count() == 1,
        "one line on stderr: {err:?}"
    );
}

#[test]
fn log_forwarder_sends_each_line_and_exits_3_without_chatd() {
    let (_relay, alice, bob) = trio();
    let long = "x".repeat(70_000);
    let mut input = b"first line\n\nsecond \xff line\r\n".to_vec();
    input.extend_from_slice(long.as_bytes());
    input.extend_from_slice(b"\n'quoted' \"line\" $HOME\nlast\n");

    let mut cmd = Command::new(LOG_FORWARDER);
    cmd.arg("alice")
        .env("CHATD_SOCKET", bob.socket())
        .env("CHATCTL", CHATCTL);
    let out = run_bounded(cmd, Some(input), CTL_DEADLINE);
    assert_ok(&out, "log-forwarder alice");

    alice.wait_message("last");
    let texts = incoming(&alice);
    let want = vec![
        "first line".to_string(),
        "second \u{fffd} line".to_string(),
        "x".repeat(65_536),
        "'quoted' \"line\" $HOME".to_string(),
        "last".to_string(),
    ];
    assert_eq!(
        texts, want,
        "one message per non-empty line, in order, made valid"
    );

    // No daemon on the socket: the forwarder exits 3, as chatctl does.
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut cmd = Command::new(LOG_FORWARDER);
    cmd.arg("alice")
        .env("CHATD_SOCKET", dir.path().join("nothing.sock"))
        .env("CHATCTL", CHATCTL);
    let out = run_bounded(cmd, Some(b"hello\n".to_vec()), CTL_DEADLINE);
    assert_eq!(
        out.status.code(),
        Some(3),
        "no chatd: exit 3; {}",
        describe(&out)
    );
}
