//! Issue 4 point 8: long work shows progress on a terminal, and only there.
//!
//! A pseudo-terminal comes from util-linux `script`, which runs a command with its stdio on a pty
//! and copies what it prints. Without `script` the terminal halves are skipped with a note; the
//! pipe halves (no spinner, ever) always run.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

fn have_script() -> bool {
    Command::new("script")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Quote for `sh -c`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `carol` registered on the relay, then offline: a `--wait delivered` to her can only time out.
fn relay_with_offline_carol() -> (Daemon, Daemon, Daemon) {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let mut carol = Daemon::member("carol", &relay.addr());
    alice.wait_peer_online("carol", true);
    carol.kill();
    alice.wait_peer_online("carol", false);
    (relay, alice, carol)
}

#[test]
fn wait_shows_no_progress_in_a_pipe() {
    let (_relay, alice, _carol) = relay_with_offline_carol();
    let out = alice.ctl(&[
        "send",
        "--wait",
        "delivered",
        "--timeout",
        "1",
        "carol",
        "quiet please",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("waiting for delivery..."),
        "spinner in a pipe: {err:?}"
    );
    assert!(!err.contains('\r'), "carriage return in a pipe: {err:?}");
    assert_eq!(
        err.lines().count(),
        1,
        "one diagnostic line expected: {err:?}"
    );
}

#[test]
fn wait_shows_progress_on_a_terminal() {
    if !have_script() {
        eprintln!("SKIP: util-linux `script` is not installed; cannot make a pty");
        return;
    }
    let (_relay, alice, _carol) = relay_with_offline_carol();
    let inner = format!(
        "{} --socket {} send --wait delivered --timeout 1 carol hello",
        sh_quote(CHATCTL),
        sh_quote(&alice.socket().display().to_string())
    );
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &inner, "/dev/null"]);
    let out = run_bounded(cmd, None, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("waiting for delivery"),
        "no progress shown on a terminal: {text:?}"
    );
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
}

#[test]
fn key_generation_is_logged_and_spins_only_on_a_terminal() {
    // In a pipe (the harness logs stderr to a file): the log line, no spinner.
    let relay = Daemon::relay();
    let log = relay.log();
    assert!(
        log.contains("generating a new RSA-2048 identity key"),
        "no key generation log line: {log}"
    );
    assert!(
        !log.contains("identity key..."),
        "spinner written to a non-terminal: {log}"
    );
    if !have_script() {
        eprintln!("SKIP: util-linux `script` is not installed; cannot make a pty");
        return;
    }
    // On a terminal: the spinner line appears. The daemon then keeps running, so `script` is
    // killed at the deadline by run_bounded; what it copied so far is enough.
    let dir = tempfile::tempdir().expect("tempdir");
    // chatd refuses a control socket directory that others can enter.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod 700");
    let inner = format!(
        "timeout 20 {} --listen 127.0.0.1:0 --key-bits 2048 --state-dir {} --socket {} & pid=$!; \
         for i in $(seq 200); do [ -S {} ] && break; sleep 0.05; done; kill $pid; wait $pid",
        sh_quote(CHATD),
        sh_quote(&dir.path().join("state").display().to_string()),
        sh_quote(&dir.path().join("ctl.sock").display().to_string()),
        sh_quote(&dir.path().join("ctl.sock").display().to_string()),
    );
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &inner, "/dev/null"])
        .env("RUST_LOG", "info");
    let out = run_bounded(cmd, None, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("generating RSA-2048 identity key..."),
        "no spinner on a terminal: {text:?}"
    );
}
