//! End-to-end tests of the core product (issue 2, points 1 to 13), run against the real `chatd`
//! and `chatctl` binaries on loopback.
//!
//! Each test starts its own relay / members / host in private temporary directories (see
//! `common`), talks to them only through `chatctl` (machine checks use `--json`; plain output is
//! checked where the point is about plain output), and waits by polling with deadlines, never by
//! sleeping. The tests follow the chatctl contract in DESIGN.md and the choices in DECISIONS.md.
//!
//! | point | tests |
//! |---|---|
//! | 1 relay with many members | `relay_serves_members_directory_and_presence` |
//! | 2 host mode | `host_mode_chats_both_ways`, `a_host_forwards_nothing_before_its_commit` |
//! | 3 send | `send_text_reaches_both_histories`, `send_to_several_recipients_with_separator`, `send_all_reaches_every_online_peer`, `send_from_stdin_sends_one_message_per_line_in_order` |
//! | 4 tail | `tail_last_n_since_with_and_json_fields`, `tail_follow_prints_new_records_until_killed`, `tail_follow_exits_3_when_daemon_goes_away` |
//! | 5 who, status, fingerprint, trust, forget | `status_reports_every_role`, `who_fingerprint_and_trust_plain_and_json`, `global_flags_work_before_or_after_the_subcommand`, `forget_is_refused_on_a_member_and_for_unknown_names` (forget on a relay: point 11) |
//! | 6 --wait | `wait_relay_and_delivered_report_receipts`, `wait_delivered_to_offline_recipient_times_out_with_exit_4` |
//! | 7 offline recipients | `offline_recipient_gets_queued_messages_exactly_once` |
//! | 8 identity | `identity_is_made_once_private_and_matches_openssl` |
//! | 9 relay cannot read | `relay_never_sees_the_text` |
//! | 10 impersonation | `impersonation_is_refused_and_owner_unaffected` |
//! | 11 changed key | `changed_key_is_caught_until_trusted` |
//! | 12 clear errors | `send_refuses_bad_input_and_sends_nothing`, `chatctl_without_daemon_exits_3`, `bad_usage_exits_2`, `chatd_refuses_to_start_without_a_role` |
//! | 13 safe plain output | `plain_tail_escapes_control_characters` |

mod common;

use common::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Assert that `out` exited with `code`, showing the whole output otherwise.
fn assert_exit(out: &Output, code: i32, what: &str) {
    if out.status.code() != Some(code) {
        fail(&format!(
            "{what}: expected exit {code}, got {}",
            describe(out)
        ));
    }
}

/// Assert a contract error line: exit `code`, nothing on stdout, exactly one stderr line starting
/// with `chatctl: `.
fn assert_error_line(out: &Output, code: i32, what: &str) -> String {
    assert_exit(out, code, what);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one stderr line, got {}",
        describe(out)
    );
    assert!(
        lines[0].starts_with("chatctl: "),
        "{what}: stderr line must start with `chatctl: `: {}",
        describe(out)
    );
    assert!(
        out.stdout.is_empty(),
        "{what}: diagnostics go to stderr only, stdout had: {}",
        describe(out)
    );
    lines[0].to_string()
}

/// The `--json` objects of a successful `chatctl send` (adds `--json`).
fn send_json(d: &Daemon, args: &[&str]) -> Vec<Value> {
    let mut full = vec!["send"];
    full.extend_from_slice(args);
    d.ctl_json(&full)
}

/// Check a `send --json` result line and return its id.
fn check_sent(v: &Value, to: &str, states: &[&str]) -> String {
    assert_eq!(v["to"], to, "send result names the recipient: {v}");
    let state = v["state"].as_str().unwrap_or_default();
    assert!(
        states.contains(&state),
        "send result state {state:?}, expected one of {states:?}: {v}"
    );
    let id = v["id"].as_str().unwrap_or_default().to_string();
    assert!(is_hex_id(&id), "send result id is 32 hex digits: {v}");
    id
}

/// Check the contract fields of a message record.
fn check_message_record(r: &Value) {
    assert_eq!(r["kind"], "message", "{r}");
    assert!(r["seq"].is_u64(), "message record has a numeric seq: {r}");
    assert!(
        is_hex_id(r["id"].as_str().unwrap_or_default()),
        "message id is 32 hex digits: {r}"
    );
    assert!(
        is_rfc3339_utc(r["time"].as_str().unwrap_or_default()),
        "message time is RFC 3339 UTC: {r}"
    );
    assert!(r["from"].is_string(), "message has from: {r}");
    assert!(r["to"].is_string(), "message has to: {r}");
    assert!(r["dir"] == "in" || r["dir"] == "out", "dir is in|out: {r}");
    assert!(r["text"].is_string(), "message has text: {r}");
}

/// Check the contract fields of a presence record.
fn check_presence_record(r: &Value) {
    assert_eq!(r["kind"], "presence", "{r}");
    assert!(r["seq"].is_u64(), "presence record has a numeric seq: {r}");
    assert!(
        is_rfc3339_utc(r["time"].as_str().unwrap_or_default()),
        "presence time is RFC 3339 UTC: {r}"
    );
    assert!(r["user"].is_string(), "presence has user: {r}");
    assert!(r["online"].is_boolean(), "presence has online: {r}");
}

/// Check the contract fields of a receipt record.
fn check_receipt_record(r: &Value) {
    assert_eq!(r["kind"], "receipt", "{r}");
    assert!(r["seq"].is_u64(), "receipt record has a numeric seq: {r}");
    assert!(
        is_rfc3339_utc(r["time"].as_str().unwrap_or_default()),
        "receipt time is RFC 3339 UTC: {r}"
    );
    assert!(
        is_hex_id(r["id"].as_str().unwrap_or_default()),
        "receipt id is 32 hex digits: {r}"
    );
    assert!(r["to"].is_string(), "receipt has to: {r}");
    let state = r["state"].as_str().unwrap_or_default();
    assert!(
        ["relayed", "delivered", "failed"].contains(&state),
        "receipt state is relayed|delivered|failed: {r}"
    );
    assert!(
        r.get("reason").is_some(),
        "receipt has a reason field (null unless failed): {r}"
    );
    if state != "failed" {
        assert!(r["reason"].is_null(), "reason is null unless failed: {r}");
    }
}

/// Check the fields of a link record (issue 11): up, the reason when down, who was online.
fn check_link_record(r: &Value) {
    assert_eq!(r["kind"], "link", "{r}");
    assert!(r["seq"].is_u64(), "link record has a numeric seq: {r}");
    assert!(
        is_rfc3339_utc(r["time"].as_str().unwrap_or_default()),
        "{r}"
    );
    let up = r["up"].as_bool().expect("link has up");
    assert_eq!(
        r["reason"].is_string(),
        !up,
        "a reason exactly when down: {r}"
    );
    let online = r["online"].as_array().expect("link has online");
    assert!(online.iter().all(Value::is_string), "{r}");
    assert!(
        r["peers_online"].as_u64() >= Some(online.len() as u64),
        "{r}"
    );
}

/// A key record: user, event, the fingerprint it is about, and the other key or null.
fn check_key_record(r: &Value) {
    assert_eq!(r["kind"], "key", "{r}");
    assert!(r["seq"].is_u64(), "key record has a numeric seq: {r}");
    assert!(r["user"].is_string(), "key record has user: {r}");
    let event = r["event"].as_str().unwrap_or_default();
    assert!(
        ["pinned", "changed", "returned", "trusted", "forgotten"].contains(&event),
        "key event is one of the documented ones: {r}"
    );
    assert!(
        r["fingerprint"]
            .as_str()
            .is_some_and(|f| f.starts_with("SHA256:")),
        "key record has a fingerprint: {r}"
    );
    assert!(
        r.get("other").is_some_and(|o| o.is_null() || o.is_string()),
        "key record has other (a fingerprint or null): {r}"
    );
}

/// Check any tail record by kind.
fn check_record(r: &Value) {
    match r["kind"].as_str() {
        Some("message") => check_message_record(r),
        Some("presence") => check_presence_record(r),
        Some("receipt") => check_receipt_record(r),
        Some("link") => check_link_record(r),
        Some("key") => check_key_record(r),
        _ => panic!("unknown record kind: {r}"),
    }
}

/// Seqs of a list of records.
fn seqs(records: &[Value]) -> Vec<u64> {
    records.iter().map(|r| r["seq"].as_u64().unwrap()).collect()
}

/// Presence records about `user` in `d`'s history.
fn presence_of(d: &Daemon, user: &str) -> Vec<bool> {
    d.tail(&[])
        .iter()
        .filter(|r| r["kind"] == "presence" && r["user"] == user)
        .map(|r| r["online"].as_bool().unwrap())
        .collect()
}

/// Wait until `d`'s history holds a presence record `user` → `online` (beyond `already` of them).
fn wait_presence(d: &Daemon, user: &str, online: bool, already: usize) {
    let what = format!(
        "{} to record presence {user} online={online} (after {already} such records)",
        d.label()
    );
    wait_until(DEADLINE, &what, || {
        presence_of(d, user)
            .iter()
            .filter(|o| **o == online)
            .count()
            > already
    });
}

// ---------------------------------------------------------------------------------------------
// Point 1: relay with many members.

#[test]
fn relay_serves_members_directory_and_presence() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    let mut carol = Daemon::member("carol", &relay.addr());
    let fp_alice = alice.fingerprint();
    let fp_bob = bob.fingerprint();
    let fp_carol = carol.fingerprint();
    assert_ne!(fp_alice, fp_bob);
    assert_ne!(fp_bob, fp_carol);

    // Carol joined last: she learned the directory (who is online, with which key) at login.
    carol.wait_peer_online("alice", true);
    carol.wait_peer_online("bob", true);
    assert_eq!(carol.peer("alice").unwrap()["fingerprint"], fp_alice);
    assert_eq!(carol.peer("bob").unwrap()["fingerprint"], fp_bob);
    assert!(carol.peer("carol").is_none(), "who leaves out oneself");

    // Alice was there first: she was told about both joins, with their keys.
    alice.wait_peer_online("bob", true);
    alice.wait_peer_online("carol", true);
    assert_eq!(alice.peer("bob").unwrap()["fingerprint"], fp_bob);
    assert_eq!(alice.peer("carol").unwrap()["fingerprint"], fp_carol);
    wait_presence(&alice, "bob", true, 0);
    wait_presence(&alice, "carol", true, 0);
    wait_presence(&bob, "carol", true, 0);
    for r in alice.tail(&[]) {
        check_record(&r);
    }
    assert_eq!(alice.status()["peers_online"], 2);

    // The relay lists the three registered names, online, with their fingerprints.
    let reg = relay.who();
    for (name, fp) in [("alice", &fp_alice), ("bob", &fp_bob), ("carol", &fp_carol)] {
        let e = reg
            .iter()
            .find(|p| p["user"] == name)
            .unwrap_or_else(|| panic!("relay who lists {name}: {reg:?}"));
        assert_eq!(e["online"], true, "{e}");
        assert_eq!(e["fingerprint"], **fp, "{e}");
    }

    // Carol leaves: everyone is told, and the relay knows.
    carol.kill();
    wait_presence(&alice, "carol", false, 0);
    wait_presence(&bob, "carol", false, 0);
    alice.wait_peer_online("carol", false);
    wait_until(DEADLINE, "relay to show carol offline", || {
        relay
            .who()
            .iter()
            .any(|p| p["user"] == "carol" && p["online"] == false)
    });
    assert_eq!(alice.status()["peers_online"], 1);

    // And comes back: a second join record.
    carol.start_stopped();
    wait_presence(&alice, "carol", true, 1);
    wait_presence(&bob, "carol", true, 1);
    assert_eq!(presence_of(&alice, "carol"), vec![true, false, true]);
}

// ---------------------------------------------------------------------------------------------
// Point 2: host mode.

#[test]
fn host_mode_chats_both_ways() {
    let alice = Daemon::host("alice");
    let st = alice.status();
    let roles: Vec<&str> = st["roles"]
        .as_array()
        .expect("roles is a list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        roles.contains(&"relay") && roles.contains(&"member"),
        "host has both roles: {st}"
    );
    assert_eq!(st["user"], "alice", "{st}");
    assert_eq!(st["connected"], true, "a host's member is connected: {st}");
    assert_eq!(st["listen"], alice.addr().as_str(), "{st}");

    let bob = Daemon::member("bob", &alice.addr());
    alice.wait_peer_online("bob", true);
    bob.wait_peer_online("alice", true);
    assert_eq!(
        bob.peer("alice").unwrap()["fingerprint"],
        alice.fingerprint()
    );
    assert_eq!(alice.peer("bob").unwrap()["fingerprint"], bob.fingerprint());

    let r = send_json(
        &alice,
        &["--wait", "delivered", "bob", "hi", "from", "host"],
    );
    assert_eq!(r.len(), 1);
    check_sent(&r[0], "bob", &["delivered"]);
    let got = bob.wait_message("hi from host");
    assert_eq!(got["from"], "alice");
    assert_eq!(got["to"], "bob");

    let r = send_json(&bob, &["--wait", "delivered", "alice", "hello", "host"]);
    check_sent(&r[0], "alice", &["delivered"]);
    let got = alice.wait_message("hello host");
    assert_eq!(got["from"], "bob");
    assert_eq!(got["dir"], "in");
    assert_eq!(alice.texts("out"), vec!["hi from host"]);
    assert_eq!(bob.texts("out"), vec!["hello host"]);
}

/// A host's relay and member share one transaction per turn, so the host forwards nothing
/// before that commits: an `Accepted` or a receipt sent earlier would promise what a failed
/// commit takes back (bob would see `delivered` for a message alice does not have). Armed, the
/// host aborts if it ever writes to a peer while its turn's writes are not committed.
#[test]
fn a_host_forwards_nothing_before_its_commit() {
    let mut alice = Daemon::host("alice");
    alice.set_env("CHATD_TEST_ABORT_BEFORE_COMMIT", Some("1"));
    alice.restart();
    let bob = Daemon::member("bob", &alice.addr());
    alice.wait_peer_online("bob", true);
    let r = send_json(&bob, &["--wait", "delivered", "alice", "kept", "whole"]);
    check_sent(&r[0], "alice", &["delivered"]);
    let r = send_json(&alice, &["--wait", "delivered", "bob", "and", "back"]);
    check_sent(&r[0], "bob", &["delivered"]);
    assert!(alice.is_running(), "the host never forwarded early");
    assert_eq!(alice.texts("in"), ["kept whole"]);
    assert_eq!(bob.texts("in"), ["and back"]);
    assert!(!alice.log().contains("aborting between forward and commit"));
}

// ---------------------------------------------------------------------------------------------
// Point 3: send.

#[test]
fn send_text_reaches_both_histories() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);

    let r = send_json(&alice, &["bob", "hello", "world"]);
    assert_eq!(r.len(), 1, "one result per recipient: {r:?}");
    let id = check_sent(&r[0], "bob", &["queued", "relayed", "delivered"]);

    let got = bob.wait_message("hello world");
    check_message_record(&got);
    assert_eq!(got["from"], "alice");
    assert_eq!(got["to"], "bob");
    assert_eq!(got["dir"], "in");
    assert_eq!(got["id"], id.as_str(), "same message id on both sides");

    let out: Vec<Value> = alice
        .messages()
        .into_iter()
        .filter(|m| m["id"] == id.as_str())
        .collect();
    assert_eq!(
        out.len(),
        1,
        "alice's history has the message once: {out:?}"
    );
    check_message_record(&out[0]);
    assert_eq!(out[0]["dir"], "out");
    assert_eq!(out[0]["from"], "alice");
    assert_eq!(out[0]["to"], "bob");
    assert_eq!(out[0]["text"], "hello world");

    // The plain form works the same.
    let plain = alice.ctl(&["send", "bob", "second"]);
    assert_exit(&plain, 0, "plain send");
    bob.wait_message("second");
    assert_eq!(bob.texts("in"), vec!["hello world", "second"]);
}

#[test]
fn send_to_several_recipients_with_separator() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    let carol = Daemon::member("carol", &relay.addr());
    alice.wait_peer_online("bob", true);
    alice.wait_peer_online("carol", true);

    let r = send_json(&alice, &["bob", "carol", "--", "-dash", "to", "both"]);
    assert_eq!(r.len(), 2, "one result per recipient: {r:?}");
    let mut tos: Vec<&str> = r.iter().filter_map(|v| v["to"].as_str()).collect();
    tos.sort_unstable();
    assert_eq!(tos, vec!["bob", "carol"]);
    assert_ne!(r[0]["id"], r[1]["id"], "one message (id) per recipient");
    bob.wait_message("-dash to both");
    carol.wait_message("-dash to both");
    assert_eq!(alice.texts("out").len(), 2);
}

#[test]
fn send_all_reaches_every_online_peer() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    let carol = Daemon::member("carol", &relay.addr());
    let mut dave = Daemon::member("dave", &relay.addr());
    for p in ["bob", "carol", "dave"] {
        alice.wait_peer_online(p, true);
    }
    // Dave is known but offline: --all means every peer online now.
    dave.kill();
    alice.wait_peer_online("dave", false);

    let r = send_json(&alice, &["--all", "hello", "everyone"]);
    let mut tos: Vec<&str> = r.iter().filter_map(|v| v["to"].as_str()).collect();
    tos.sort_unstable();
    assert_eq!(
        tos,
        vec!["bob", "carol"],
        "--all goes to online peers: {r:?}"
    );
    for v in &r {
        check_sent(
            v,
            v["to"].as_str().unwrap(),
            &["queued", "relayed", "delivered"],
        );
    }
    let b = bob.wait_message("hello everyone");
    let c = carol.wait_message("hello everyone");
    assert_eq!(b["from"], "alice");
    assert_eq!(c["from"], "alice");
    let outs = alice.texts("out");
    assert_eq!(outs, vec!["hello everyone", "hello everyone"]);
}

#[test]
fn send_from_stdin_sends_one_message_per_line_in_order() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);

    let out = alice.ctl_stdin(&["--json", "send", "bob"], b"a\nb\n");
    assert_exit(&out, 0, "send from stdin");
    let r = parse_json_lines(&out.stdout);
    assert_eq!(r.len(), 2, "one result per line: {r:?}");
    let id_a = check_sent(&r[0], "bob", &["queued", "relayed", "delivered"]);
    let id_b = check_sent(&r[1], "bob", &["queued", "relayed", "delivered"]);
    assert_ne!(id_a, id_b);

    bob.wait_message("b");
    let got = bob.messages();
    let texts: Vec<&str> = got.iter().filter_map(|m| m["text"].as_str()).collect();
    assert_eq!(texts, vec!["a", "b"], "two messages, in order: {got:?}");
    assert!(got[0]["seq"].as_u64() < got[1]["seq"].as_u64());
    assert_eq!(got[0]["id"], id_a.as_str());
    assert_eq!(got[1]["id"], id_b.as_str());
    assert_eq!(alice.texts("out"), vec!["a", "b"]);
}

#[test]
fn send_from_stdin_pipelines_a_burst_and_reports_every_line_in_order() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);

    // More lines than one window (256), all there at once, as from a file.
    let n = 600;
    let input: String = (0..n).map(|i| format!("line {i:04}\n")).collect();
    let out = alice.ctl_stdin(
        &["--json", "send", "--wait", "none", "bob"],
        input.as_bytes(),
    );
    assert_exit(&out, 0, "send 600 lines from stdin");
    let r = parse_json_lines(&out.stdout);
    assert_eq!(r.len(), n, "one result per line");
    let ids: Vec<&str> = r.iter().map(|v| v["id"].as_str().unwrap()).collect();
    let unique: std::collections::HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), n, "a message id per line");

    bob.wait_message("line 0599");
    let got = bob.tail(&[]);
    let texts: Vec<&str> = got
        .iter()
        .filter(|m| m["kind"] == "message" && m["from"] == "alice")
        .filter_map(|m| m["text"].as_str())
        .collect();
    let want: Vec<String> = (0..n).map(|i| format!("line {i:04}")).collect();
    assert_eq!(texts, want, "every line once, in order");
    // The results are in the lines' order: the ids match what bob stored, one by one.
    let stored: Vec<&str> = got
        .iter()
        .filter(|m| m["kind"] == "message" && m["from"] == "alice")
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(stored, ids);
}

#[test]
fn stdin_send_writes_the_lines_already_there_before_it_reads_an_answer() {
    // A fake chatd on a real socket: it answers the recipients check, then reads three `Send`s
    // before it answers any. A chatctl that waited for each answer before sending the next line
    // would leave it waiting for the second (and fail this test at its read timeout).
    use chatd::proto::control::{CtlRequest, CtlResponse, MsgState, PeerView, Sent, TrustState};
    use chatd::proto::frame::{read_from, write_to, MAX_FRAME};
    use chatd::proto::{from_payload, to_payload};
    use std::os::unix::net::{UnixListener, UnixStream};

    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("ctl.sock");
    let listener = UnixListener::bind(&sock).expect("bind the fake control socket");
    fn read_req(c: &mut UnixStream) -> Result<CtlRequest, String> {
        let p = read_from(c, MAX_FRAME)
            .map_err(|e| format!("read: {e}"))?
            .ok_or("closed")?;
        from_payload(&p).map_err(|e| format!("decode: {e}"))
    }
    fn answer(c: &mut UnixStream, r: &CtlResponse) -> Result<(), String> {
        let p = to_payload(r).map_err(|e| e.to_string())?;
        write_to(c, &p).map_err(|e| e.to_string())
    }
    let server = std::thread::spawn(move || -> Result<Vec<String>, String> {
        let timeout = Some(Duration::from_secs(10));
        let (mut c, _) = listener.accept().map_err(|e| e.to_string())?;
        c.set_read_timeout(timeout).map_err(|e| e.to_string())?;
        match read_req(&mut c)? {
            CtlRequest::Who => {}
            other => return Err(format!("expected Who first, got {other:?}")),
        }
        let bob = PeerView {
            user: "bob".into(),
            online: true,
            trust: TrustState::Pinned,
            fingerprint: "SHA256:x".into(),
            presented: None,
        };
        answer(&mut c, &CtlResponse::Peers(vec![bob]))?;
        answer(&mut c, &CtlResponse::End)?;
        let (mut c, _) = listener.accept().map_err(|e| e.to_string())?;
        c.set_read_timeout(timeout).map_err(|e| e.to_string())?;
        let mut texts = Vec::new();
        for _ in 0..3 {
            match read_req(&mut c) {
                Ok(CtlRequest::Send { text, .. }) => texts.push(text),
                Ok(other) => return Err(format!("expected Send, got {other:?}")),
                Err(e) => return Err(format!("after {texts:?}: {e} (chatctl waited?)")),
            }
        }
        for i in 0..3u8 {
            let sent = Sent {
                id: [i; 16],
                to: "bob".into(),
                state: MsgState::Queued,
            };
            answer(&mut c, &CtlResponse::Sent(vec![sent]))?;
        }
        Ok(texts)
    });

    // From a file, so all three lines are there from the start.
    let input = dir.path().join("lines");
    std::fs::write(&input, b"one\ntwo\nthree\n").expect("write the input");
    let mut cmd = chatctl_cmd();
    cmd.args(["--socket"])
        .arg(&sock)
        .args(["--json", "send", "bob"]);
    let file = std::fs::File::open(&input).expect("open the input");
    let out = run_bounded_stdin(cmd, file.into(), Duration::from_secs(30));
    assert_exit(&out, 0, "send three lines to the fake chatd");
    let texts = server
        .join()
        .expect("fake chatd thread")
        .expect("fake chatd");
    assert_eq!(texts, vec!["one", "two", "three"]);
    let r = parse_json_lines(&out.stdout);
    assert_eq!(r.len(), 3, "one result per line: {r:?}");
}

#[test]
fn a_bad_line_in_a_burst_ends_the_send_after_the_lines_before_it_are_sent() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);

    let mut input = b"first\nsecond\n".to_vec();
    input.extend_from_slice(b"\xff\xfe not UTF-8\nfourth\n");
    let out = alice.ctl_stdin(&["--json", "send", "--wait", "relay", "bob"], &input);
    assert_exit(&out, 1, "a line that is not UTF-8");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not valid UTF-8"), "{err}");
    let r = parse_json_lines(&out.stdout);
    assert_eq!(
        r.len(),
        2,
        "the two lines before it were sent and reported: {r:?}"
    );
    bob.wait_message("second");
    assert_eq!(
        alice.texts("out"),
        vec!["first", "second"],
        "nothing after the bad line"
    );
}

#[test]
fn control_answers_keep_the_order_of_pipelined_requests() {
    use chatd::client::Client;
    use chatd::proto::control::{CtlRequest, CtlResponse, Wait};
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);

    // The first request waits on a key lookup at the relay (nobody is pinned as "nemo"); the
    // second could be answered at once. Its answer must still come second.
    let send = |to: &str, text: &str| CtlRequest::Send {
        to: vec![to.to_string()],
        all: false,
        text: text.to_string(),
        wait: Wait::None,
        timeout_ms: 10_000,
    };
    let mut c = Client::connect(&alice.socket()).expect("connect");
    c.send_all(&[send("nemo", "to nobody"), send("bob", "to bob")])
        .expect("two requests in one write");
    match c.recv().expect("first answer") {
        CtlResponse::Error { message, .. } => {
            assert!(
                message.contains("nemo"),
                "the lookup's answer first: {message}"
            )
        }
        other => panic!("first answer is the refusal for nemo, got {other:?}"),
    }
    match c.recv().expect("second answer") {
        CtlResponse::Sent(list) => assert_eq!(list[0].to, "bob"),
        other => panic!("second answer is bob's, got {other:?}"),
    }
    bob.wait_message("to bob");

    // A request behind a streamed answer (`who`) waits for the stream's end, and is answered.
    c.send_all(&[CtlRequest::Who, send("bob", "after who")])
        .expect("who and a send in one write");
    loop {
        match c.recv().expect("the who stream") {
            CtlResponse::Peers(_) => {}
            CtlResponse::End => break,
            other => panic!("who streams Peers then End, got {other:?}"),
        }
    }
    match c.recv().expect("the send's answer") {
        CtlResponse::Sent(list) => assert_eq!(list[0].to, "bob"),
        other => panic!("the send after who is answered, got {other:?}"),
    }
    bob.wait_message("after who");
}

#[test]
fn a_host_answers_pipelined_waiting_sends_as_its_own_relay_accepts_them() {
    // On a host the relay is in the same loop: a `--wait relay` send to someone offline is
    // accepted when the relay writes it, late in the turn. Requests queued behind it must go on
    // then, not at the next event (which may be a 30 s ping away).
    use chatd::proto::control::{CtlRequest, CtlResponse, Wait};
    use chatd::proto::frame::{read_from, write_to, MAX_FRAME};
    use chatd::proto::{from_payload, to_payload};
    let host = Daemon::host("alice");
    let mut carol = Daemon::member("carol", &host.addr());
    host.wait_peer_online("carol", true);
    carol.stop();
    host.wait_peer_online("carol", false);

    let mut c = std::os::unix::net::UnixStream::connect(host.socket()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut burst = Vec::new();
    for i in 0..3 {
        let req = CtlRequest::Send {
            to: vec!["carol".into()],
            all: false,
            text: format!("held {i}"),
            wait: Wait::Relay,
            timeout_ms: 20_000,
        };
        write_to(&mut burst, &to_payload(&req).expect("encode")).expect("frame");
    }
    std::io::Write::write_all(&mut c, &burst).expect("three waiting sends in one write");
    for i in 0..3 {
        let p = read_from(&mut c, MAX_FRAME)
            .unwrap_or_else(|e| panic!("answer {i} did not come: {e}"))
            .expect("an answer, not the end");
        match from_payload::<CtlResponse>(&p).expect("decode") {
            CtlResponse::Sent(list) => assert_eq!(list[0].to, "carol"),
            other => panic!("answer {i}: the relay took it, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Point 4: tail.

#[test]
fn tail_last_n_since_with_and_json_fields() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    let carol = Daemon::member("carol", &relay.addr());
    alice.wait_peer_online("bob", true);
    carol.wait_peer_online("bob", true);

    // Twelve from alice, two from carol; wait until bob stored all so his history is quiet.
    let lines: String = (1..=12).map(|i| format!("m{i:02}\n")).collect();
    let out = alice.ctl_stdin(&["send", "--wait", "delivered", "bob"], lines.as_bytes());
    assert_exit(&out, 0, "send 12 lines --wait delivered");
    let out = carol.ctl(&["send", "--wait", "delivered", "bob", "c1"]);
    assert_exit(&out, 0, "carol send c1");
    let out = carol.ctl(&["send", "--wait", "delivered", "bob", "c2"]);
    assert_exit(&out, 0, "carol send c2");
    bob.wait_message("c2");

    let full = bob.tail(&[]);
    assert!(full.len() >= 14, "bob has at least 14 records: {full:?}");
    for r in &full {
        check_record(r);
    }
    let all_seqs = seqs(&full);
    assert!(
        all_seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs strictly increase: {all_seqs:?}"
    );
    let texts: Vec<&str> = full
        .iter()
        .filter(|r| r["kind"] == "message" && r["from"] == "alice")
        .filter_map(|r| r["text"].as_str())
        .collect();
    let expected: Vec<String> = (1..=12).map(|i| format!("m{i:02}")).collect();
    assert_eq!(texts, expected, "alice's messages once each, in send order");

    // Default: the last 10.
    let last10 = bob.ctl_json(&["tail"]);
    assert_eq!(seqs(&last10), all_seqs[all_seqs.len() - 10..].to_vec());
    // -n 3: the last 3, same records.
    let last3 = bob.ctl_json(&["tail", "-n", "3"]);
    assert_eq!(last3, full[full.len() - 3..].to_vec());
    // -n 0 without -f: nothing.
    assert!(bob.ctl_json(&["tail", "-n", "0"]).is_empty());

    // --since: records with a larger seq.
    let pivot = full.iter().find(|r| r["text"] == "m05").unwrap()["seq"]
        .as_u64()
        .unwrap();
    let pivot_s = pivot.to_string();
    let since = bob.ctl_json(&["tail", "-n", "1000", "--since", &pivot_s]);
    let want: Vec<u64> = all_seqs.iter().copied().filter(|s| *s > pivot).collect();
    assert_eq!(seqs(&since), want, "--since {pivot}");
    assert_eq!(since[0]["text"], "m06");
    // Fewer than 10 newer records: the same with or without -n.
    let late = full.iter().find(|r| r["text"] == "m12").unwrap()["seq"]
        .as_u64()
        .unwrap();
    let since_late = bob.ctl_json(&["tail", "--since", &late.to_string()]);
    let want: Vec<u64> = all_seqs.iter().copied().filter(|s| *s > late).collect();
    assert_eq!(seqs(&since_late), want, "--since {late} without -n");

    // --with: only what concerns carol.
    let with = bob.ctl_json(&["tail", "-n", "1000", "--with", "carol"]);
    let msgs: Vec<&str> = with
        .iter()
        .filter(|r| r["kind"] == "message")
        .filter_map(|r| r["text"].as_str())
        .collect();
    assert_eq!(msgs, vec!["c1", "c2"], "--with carol: {with:?}");
    for r in &with {
        let about_carol = match r["kind"].as_str() {
            Some("message") => r["from"] == "carol" || r["to"] == "carol",
            Some("presence") => r["user"] == "carol",
            Some("receipt") => r["to"] == "carol",
            Some("key") => r["user"] == "carol",
            _ => false,
        };
        assert!(about_carol, "--with carol printed an unrelated record: {r}");
    }

    // Alice's view: outgoing messages and receipts, with the contract's fields.
    let a = alice.tail(&[]);
    let outs: Vec<&Value> = a.iter().filter(|r| r["kind"] == "message").collect();
    assert_eq!(outs.len(), 12);
    assert!(outs
        .iter()
        .all(|r| r["dir"] == "out" && r["from"] == "alice"));
    let receipts: Vec<&Value> = a.iter().filter(|r| r["kind"] == "receipt").collect();
    assert!(
        receipts.iter().any(|r| r["state"] == "delivered"),
        "delivered receipts are in the history: {a:?}"
    );
    for r in &a {
        check_record(r);
    }

    // Plain tail: one line per record, time first.
    let plain = bob.ctl(&["tail", "-n", "5"]);
    assert_exit(&plain, 0, "plain tail");
    let text = String::from_utf8(plain.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "one line per record: {text:?}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with(|c: char| c.is_ascii_digit())),
        "each plain line starts with the time: {text:?}"
    );
    assert!(
        lines[4].contains("c2"),
        "last line is the last record: {text:?}"
    );
}

/// Make sure a freshly started `tail -f` on `to` is attached: `from` sends numbered pings (each
/// delivered before the next) until the follower prints a record. The records read go to `seen`.
fn ensure_attached(f: &Follower, from: &Daemon, to: &str, seen: &mut Vec<Value>) {
    let mut i = 0;
    wait_for(DEADLINE, "tail -f to print its first record", || {
        i += 1;
        let out = from.ctl(&["send", "--wait", "delivered", to, &format!("ping-{i}")]);
        assert_exit(&out, 0, "ping send");
        f.next(Duration::from_millis(500)).map(|r| seen.push(r))
    });
}

#[test]
fn tail_follow_prints_new_records_until_killed() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);
    let out = alice.ctl(&["send", "--wait", "delivered", "bob", "old"]);
    assert_exit(&out, 0, "send old");

    let mut follower = bob.follow(&["-f", "-n", "0"]);
    let mut seen = Vec::new();
    ensure_attached(&follower, &alice, "bob", &mut seen);
    // -n 0: nothing old is printed, only the pings sent after it started.
    let first = &seen[0];
    check_message_record(first);
    assert!(
        first["text"].as_str().unwrap_or("").starts_with("ping-"),
        "-n 0 -f prints only new records, first was: {first}"
    );

    let out = alice.ctl(&["send", "--wait", "delivered", "bob", "f1"]);
    assert_exit(&out, 0, "send f1");
    let out = alice.ctl(&["send", "--wait", "delivered", "bob", "f2"]);
    assert_exit(&out, 0, "send f2");
    let f1 = follower.wait_record("f1", &mut seen, |r| r["text"] == "f1");
    check_message_record(&f1);
    assert_eq!(f1["from"], "alice");
    assert_eq!(f1["dir"], "in");
    let f2 = follower.wait_record("the next message", &mut seen, |r| r["kind"] == "message");
    assert_eq!(f2["text"], "f2", "records in order");
    assert!(f1["seq"].as_u64() < f2["seq"].as_u64());
    assert!(
        !seen.iter().any(|r| r["text"] == "old"),
        "old history printed: {seen:?}"
    );

    // Presence comes through too.
    let carol = Daemon::member("carol", &relay.addr());
    let p = follower.wait_record("carol's join", &mut seen, |r| {
        r["kind"] == "presence" && r["user"] == "carol"
    });
    check_presence_record(&p);
    assert_eq!(p["online"], true);
    drop(carol);
    follower.wait_record("carol's leave", &mut seen, |r| {
        r["kind"] == "presence" && r["user"] == "carol" && r["online"] == false
    });
    assert!(follower.is_running(), "tail -f keeps running");

    // -f with history: the last record about bob first, then new ones, with no gap.
    let follower2 = alice.follow(&["-f", "-n", "1", "--with", "bob"]);
    let mut seen2 = Vec::new();
    let hist = follower2.wait_record("the history record", &mut seen2, |_| true);
    check_record(&hist);
    let out = bob.ctl(&["send", "alice", "bob-to-alice"]);
    assert_exit(&out, 0, "bob send");
    let live = follower2.wait_record("bob's message", &mut seen2, |r| {
        r["kind"] == "message" && r["dir"] == "in"
    });
    assert_eq!(live["text"], "bob-to-alice");
    assert!(
        hist["seq"].as_u64() < live["seq"].as_u64(),
        "history first, then new records"
    );
    assert!(follower.is_running(), "the first tail -f is still running");
}

#[test]
fn tail_follow_exits_3_when_daemon_goes_away() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let mut bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);
    let mut follower = bob.follow(&["-f", "-n", "0"]);
    let mut seen = Vec::new();
    ensure_attached(&follower, &alice, "bob", &mut seen);
    bob.kill();
    let status = follower.wait_exit();
    assert_eq!(
        status.code(),
        Some(3),
        "tail -f exits 3 when it loses the daemon; stderr: {}",
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

// ---------------------------------------------------------------------------------------------
// Point 5: who, status, fingerprint, trust (forget: point 11).

#[test]
fn status_reports_every_role() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let _bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);

    let r = relay.status();
    assert!(r["user"].is_null(), "a relay has no user: {r}");
    assert_eq!(r["roles"], serde_json::json!(["relay"]), "{r}");
    assert_eq!(r["listen"], relay.addr().as_str(), "{r}");
    assert!(r["relay"].is_null(), "a relay connects to no relay: {r}");
    assert!(
        r["fingerprint"]
            .as_str()
            .unwrap_or("")
            .starts_with("SHA256:"),
        "{r}"
    );
    for key in [
        "connected",
        "peers_online",
        "outbox_pending",
        "uptime_s",
        "version",
    ] {
        assert!(r.get(key).is_some(), "relay status has {key}: {r}");
    }

    let s = alice.status();
    assert_eq!(s["user"], "alice", "{s}");
    assert_eq!(s["roles"], serde_json::json!(["member"]), "{s}");
    assert_eq!(s["relay"], relay.addr().as_str(), "{s}");
    assert_eq!(s["connected"], true, "{s}");
    assert!(s["listen"].is_null(), "a member listens nowhere: {s}");
    assert_eq!(s["peers_online"], 1, "{s}");
    assert_eq!(s["outbox_pending"], 0, "{s}");
    assert!(s["uptime_s"].is_u64(), "{s}");
    assert!(!s["version"].as_str().unwrap_or("").is_empty(), "{s}");
    assert!(s["relay_error"].is_null(), "{s}");
    let fp = s["fingerprint"].as_str().unwrap();
    assert!(fp.starts_with("SHA256:") && fp.len() == 7 + 43, "{s}");
    assert_eq!(
        std::fs::canonicalize(s["state_dir"].as_str().unwrap()).unwrap(),
        std::fs::canonicalize(alice.state_dir()).unwrap(),
        "{s}"
    );

    // Plain status names the user, the fingerprint and the relay.
    let plain = alice.ctl(&["status"]);
    assert_exit(&plain, 0, "plain status");
    let text = String::from_utf8(plain.stdout).unwrap();
    assert!(text.contains("alice"), "{text}");
    assert!(text.contains(fp), "{text}");
    assert!(text.contains(&relay.addr()), "{text}");
    let plain = relay.ctl(&["status"]);
    assert_exit(&plain, 0, "plain status on a relay");
    assert!(String::from_utf8_lossy(&plain.stdout).contains(&relay.addr()));
}

#[test]
fn who_fingerprint_and_trust_plain_and_json() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let mut bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);
    let fp_alice = alice.fingerprint();
    let fp_bob = bob.fingerprint();

    // who --json: first sight pins.
    let who = alice.who();
    assert_eq!(who.len(), 1, "alice sees only bob: {who:?}");
    let b = &who[0];
    assert_eq!(b["user"], "bob");
    assert_eq!(b["online"], true);
    assert_eq!(b["trust"], "pinned");
    assert_eq!(b["fingerprint"], fp_bob.as_str());

    // Plain who: one line for bob with name, trust and fingerprint.
    let plain = alice.ctl(&["who"]);
    assert_exit(&plain, 0, "plain who");
    let text = String::from_utf8(plain.stdout).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("bob"))
        .unwrap_or_else(|| panic!("plain who lists bob: {text:?}"));
    assert!(line.contains(&fp_bob) && line.contains("pinned"), "{line}");

    // fingerprint: own, and a peer's pinned one; plain prints just the fingerprint.
    let own = alice.ctl(&["fingerprint"]);
    assert_exit(&own, 0, "fingerprint");
    assert_eq!(String::from_utf8(own.stdout).unwrap().trim(), fp_alice);
    let peer = alice.ctl(&["fingerprint", "bob"]);
    assert_exit(&peer, 0, "fingerprint bob");
    assert_eq!(String::from_utf8(peer.stdout).unwrap().trim(), fp_bob);
    let j = alice.ctl_json(&["fingerprint", "bob"]);
    assert_eq!(j.len(), 1);
    assert_eq!(j[0]["fingerprint"], fp_bob.as_str(), "{j:?}");
    let unknown = alice.ctl(&["fingerprint", "nobody"]);
    assert_error_line(&unknown, 1, "fingerprint of an unknown user");

    // trust: a wrong fingerprint is refused, naming the key the relay presents.
    let bogus = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let wrong = alice.ctl(&["trust", "bob", bogus]);
    let line = assert_error_line(&wrong, 1, "trust with a wrong fingerprint");
    assert!(line.contains(&fp_bob), "names bob's key: {line}");
    assert_eq!(alice.peer("bob").unwrap()["trust"], "pinned");
    // The right one makes bob trusted.
    let ok = alice.ctl(&["trust", "bob", &fp_bob]);
    assert_exit(&ok, 0, "trust bob");
    assert_eq!(alice.peer("bob").unwrap()["trust"], "trusted");
    let out = alice.ctl(&["send", "--wait", "delivered", "bob", "trusted now"]);
    assert_exit(&out, 0, "send to a trusted peer");

    // An offline peer stays listed (it can be written to), online false.
    bob.kill();
    alice.wait_peer_online("bob", false);
    assert_eq!(alice.peer("bob").unwrap()["trust"], "trusted");

    // The relay lists the registered names.
    let reg = relay.who();
    let names: Vec<&str> = reg.iter().filter_map(|p| p["user"].as_str()).collect();
    assert!(
        names.contains(&"alice") && names.contains(&"bob"),
        "{reg:?}"
    );
}

#[test]
fn global_flags_work_before_or_after_the_subcommand() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let sock = alice.socket();
    let sock = sock.to_str().unwrap();
    let before = chatctl(&["--socket", sock, "--json", "status"]);
    let after = chatctl(&["status", "--json", "--socket", sock]);
    assert_exit(&before, 0, "flags before");
    assert_exit(&after, 0, "flags after");
    let b = parse_json_lines(&before.stdout);
    let a = parse_json_lines(&after.stdout);
    assert_eq!(b.len(), 1);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0]["fingerprint"], b[0]["fingerprint"]);
    assert_eq!(a[0]["user"], "alice");

    // $CHATD_SOCKET is the fallback for --socket.
    let mut cmd = Command::new(CHATCTL);
    cmd.env("CHATD_SOCKET", sock).args(["--json", "status"]);
    let env = run_bounded(cmd, None, CTL_DEADLINE);
    assert_exit(&env, 0, "socket from $CHATD_SOCKET");
    assert_eq!(parse_json_lines(&env.stdout)[0]["user"], "alice");
}

#[test]
fn forget_on_a_member_drops_the_pin_and_unknown_names_fail() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let _bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);
    // On a member (issue 10): a name with nothing pinned or held is an error; a pinned one is
    // forgotten there (and only there: the relay keeps the name).
    let out = alice.ctl(&["forget", "nobody"]);
    assert_error_line(&out, 1, "forget of a name the member does not know");
    let out = alice.ctl(&["forget", "bob"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(alice.peer("bob").is_none(), "bob is still pinned");
    // On the relay: a name nobody registered, or not a valid name, is an error too.
    let out = relay.ctl(&["forget", "nobody"]);
    assert_error_line(&out, 1, "forget of an unregistered name");
    let out = relay.ctl(&["forget", "Not/A/Name"]);
    assert_error_line(&out, 1, "forget of an invalid name");
    // Nothing changed on the relay.
    let reg = relay.who();
    assert!(reg.iter().any(|p| p["user"] == "bob"), "{reg:?}");
    assert!(reg.iter().any(|p| p["user"] == "alice"), "{reg:?}");
}

// ---------------------------------------------------------------------------------------------
// Point 6: --wait.

#[test]
fn wait_relay_and_delivered_report_receipts() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);

    let r = send_json(&alice, &["--wait", "relay", "bob", "w-relay"]);
    assert_eq!(r.len(), 1);
    // Forward first: bob's receipt may reach alice before the relay's `Accepted` does.
    let id_relay = check_sent(&r[0], "bob", &["relayed", "delivered"]);

    let r = send_json(&alice, &["--wait", "delivered", "bob", "w-delivered"]);
    let id_deliv = check_sent(&r[0], "bob", &["delivered"]);
    // Delivered means bob's daemon stored it: it is in his history now, no waiting.
    let b = bob.messages();
    assert!(
        b.iter()
            .any(|m| m["id"] == id_deliv.as_str() && m["text"] == "w-delivered"),
        "delivered message is already in bob's history: {b:?}"
    );

    // The plain form exits 0 as well.
    let out = alice.ctl(&[
        "send",
        "--wait",
        "delivered",
        "--timeout",
        "20",
        "bob",
        "plain",
    ]);
    assert_exit(&out, 0, "plain send --wait delivered");

    // Receipts in alice's history: relayed then delivered for each message.
    wait_until(DEADLINE, "delivered receipts for both messages", || {
        let a = alice.tail(&[]);
        [&id_relay, &id_deliv].iter().all(|id| {
            a.iter().any(|r| {
                r["kind"] == "receipt" && r["id"] == id.as_str() && r["state"] == "delivered"
            })
        })
    });
    let a = alice.tail(&[]);
    for id in [&id_relay, &id_deliv] {
        let states: Vec<&str> = a
            .iter()
            .filter(|r| r["kind"] == "receipt" && r["id"] == id.as_str())
            .inspect(|r| {
                check_receipt_record(r);
                assert_eq!(r["to"], "bob");
            })
            .filter_map(|r| r["state"].as_str())
            .collect();
        assert_eq!(
            states,
            vec!["relayed", "delivered"],
            "receipts for {id}: {a:?}"
        );
        let msg_seq = a
            .iter()
            .find(|r| r["kind"] == "message" && r["id"] == id.as_str())
            .unwrap()["seq"]
            .as_u64();
        let rec_seq = a
            .iter()
            .find(|r| r["kind"] == "receipt" && r["id"] == id.as_str())
            .unwrap()["seq"]
            .as_u64();
        assert!(msg_seq < rec_seq, "receipt after its message");
    }
    assert_eq!(alice.status()["outbox_pending"], 0);
}

#[test]
fn wait_delivered_to_offline_recipient_times_out_with_exit_4() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let mut bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);
    bob.kill();
    alice.wait_peer_online("bob", false);

    let start = Instant::now();
    let out = alice.ctl(&[
        "--json",
        "send",
        "--wait",
        "delivered",
        "--timeout",
        "2",
        "bob",
        "late",
    ]);
    let took = start.elapsed();
    assert_exit(&out, 4, "--wait delivered to an offline user");
    assert!(
        took >= Duration::from_millis(1900),
        "waited the timeout out, took {took:?}"
    );
    assert!(
        took < DEADLINE,
        "exit 4 soon after --timeout, took {took:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("chatctl: "), "one line on stderr: {err:?}");

    // A timed-out wait leaves the message queued: bob gets it when he is back, once.
    bob.start_stopped();
    bob.wait_message("late");
    let out = alice.ctl(&["send", "--wait", "delivered", "bob", "sync"]);
    assert_exit(&out, 0, "sync send");
    let got = bob.texts("in");
    assert_eq!(got, vec!["late", "sync"], "delivered exactly once: {got:?}");
    assert_eq!(alice.texts("out"), vec!["late", "sync"], "not re-sent");
}

// ---------------------------------------------------------------------------------------------
// Point 7: offline recipients.

#[test]
fn offline_recipient_gets_queued_messages_exactly_once() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let mut bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);
    bob.kill();
    alice.wait_peer_online("bob", false);

    let texts = ["q1", "q2", "q3"];
    for t in texts {
        let r = send_json(&alice, &["--wait", "relay", "bob", t]);
        check_sent(&r[0], "bob", &["relayed"]);
    }

    bob.start_stopped();
    bob.wait_message("q3");
    assert_eq!(bob.texts("in"), texts, "in order, once each");
    let ids: Vec<Value> = bob.messages().iter().map(|m| m["id"].clone()).collect();

    // Another crash and restart (SIGKILL), then a graceful one: still exactly once.
    bob.restart();
    let out = alice.ctl(&["send", "--wait", "delivered", "bob", "after-crash"]);
    assert_exit(&out, 0, "send after bob's restart");
    let status = bob.stop();
    assert!(status.success(), "SIGTERM: chatd exits 0, got {status:?}");
    bob.start_stopped();
    let out = alice.ctl(&["send", "--wait", "delivered", "bob", "after-stop"]);
    assert_exit(&out, 0, "send after bob's second restart");

    let got = bob.texts("in");
    assert_eq!(
        got,
        vec!["q1", "q2", "q3", "after-crash", "after-stop"],
        "each message exactly once, in order"
    );
    let ids_now: Vec<Value> = bob
        .messages()
        .iter()
        .take(3)
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, ids_now, "the same records, not re-stored copies");
}

// ---------------------------------------------------------------------------------------------
// Point 8: identity.

/// `SHA256:` + unpadded base64 of SHA-256 of the SPKI DER, computed with openssl's DER output.
fn openssl_fingerprint(pem: &std::path::Path) -> Option<String> {
    use base64::Engine as _;
    use sha2::Digest as _;
    let which = Command::new("sh")
        .args(["-c", "command -v openssl"])
        .output()
        .ok()?;
    if !which.status.success() {
        return None;
    }
    let mut cmd = Command::new("openssl");
    cmd.arg("pkey")
        .arg("-in")
        .arg(pem)
        .args(["-pubout", "-outform", "DER"]);
    let out = run_bounded(cmd, None, CTL_DEADLINE);
    assert!(
        out.status.success(),
        "openssl pkey failed: {}",
        describe(&out)
    );
    let digest = sha2::Sha256::digest(&out.stdout);
    Some(format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    ))
}

#[test]
fn identity_is_made_once_private_and_matches_openssl() {
    let relay = Daemon::relay();
    let mut alice = Daemon::member("alice", &relay.addr());
    let fp = alice.fingerprint();
    let state = alice.state_dir();
    let pem_path = state.join("identity.pem");

    let pem = std::fs::read_to_string(&pem_path).expect("identity.pem in the state dir");
    assert!(
        pem.starts_with("-----BEGIN PRIVATE KEY-----"),
        "PKCS#8 PEM (not PKCS#1): {:?}",
        pem.lines().next()
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&pem_path), 0o600, "identity.pem is 0600");
    assert_eq!(mode(&state), 0o700, "state dir is 0700");

    match openssl_fingerprint(&pem_path) {
        Some(expected) => {
            assert_eq!(fp, expected, "fingerprint is SHA-256 of the SPKI DER");
            let plain = alice.ctl(&["fingerprint"]);
            assert_eq!(String::from_utf8(plain.stdout).unwrap().trim(), expected);
            // The key size asked for.
            let mut cmd = Command::new("openssl");
            cmd.args(["pkey", "-noout", "-text", "-in"]).arg(&pem_path);
            let text = run_bounded(cmd, None, CTL_DEADLINE);
            let text = String::from_utf8_lossy(&text.stdout);
            assert!(
                text.contains("2048 bit"),
                "--key-bits 2048: {:?}",
                text.lines().next()
            );
        }
        None => eprintln!("note: openssl not found; skipped the independent fingerprint check"),
    }

    // The relay and bob see the same key.
    let bob = Daemon::member("bob", &relay.addr());
    bob.wait_peer_online("alice", true);
    assert_eq!(bob.peer("alice").unwrap()["fingerprint"], fp.as_str());

    // Reused on restart (crash and graceful), byte for byte.
    alice.restart();
    assert_eq!(alice.fingerprint(), fp, "same fingerprint after restart");
    assert!(alice.stop().success());
    alice.start_stopped();
    assert_eq!(
        alice.fingerprint(),
        fp,
        "same fingerprint after SIGTERM restart"
    );
    assert_eq!(std::fs::read_to_string(&pem_path).unwrap(), pem);
    assert_eq!(mode(&pem_path), 0o600);
    assert!(
        !alice.log().contains("BEGIN PRIVATE KEY"),
        "no key in the log"
    );
}

// ---------------------------------------------------------------------------------------------
// Point 9: the relay cannot read.

#[test]
fn relay_never_sees_the_text() {
    let relay = Daemon::relay();
    let proxy = Proxy::start(&relay.addr());
    let alice = Daemon::member("alice", &proxy.addr());
    let bob = Daemon::member("bob", &proxy.addr());
    let mut carol = Daemon::member("carol", &proxy.addr());
    alice.wait_peer_online("bob", true);
    alice.wait_peer_online("carol", true);
    bob.wait_peer_online("alice", true);
    carol.kill();
    alice.wait_peer_online("carol", false);

    let marker = unique("zq-marker-cannot-read");
    let reply = unique("zq-reply-cannot-read");
    let queued = unique("zq-queued-cannot-read");

    // Online delivery both ways, and one message the relay must keep on disk for offline carol.
    let out = alice.ctl(&["send", "--wait", "delivered", "bob", &marker]);
    assert_exit(&out, 0, "alice -> bob");
    let out = bob.ctl(&["send", "--wait", "delivered", "alice", &reply]);
    assert_exit(&out, 0, "bob -> alice");
    let out = alice.ctl(&["send", "--wait", "relay", "carol", &queued]);
    assert_exit(&out, 0, "alice -> carol (queued at the relay)");
    assert_eq!(bob.wait_message(&marker)["from"], "alice");
    assert_eq!(alice.wait_message(&reply)["from"], "bob");

    // Every byte both ways on every relay connection went through the proxy.
    assert!(
        proxy.total_bytes() > 1000,
        "the proxy carried the traffic ({} bytes)",
        proxy.total_bytes()
    );
    for secret in [&marker, &reply, &queued] {
        for (i, rec) in proxy.recordings().iter().enumerate() {
            assert!(
                !contains_bytes(rec, secret.as_bytes()),
                "plaintext {secret:?} crossed the relay's TCP connection #{} ({} bytes)",
                i / 2,
                rec.len()
            );
        }
    }

    // No file the relay writes holds it: state dir (db, -wal, -shm, anything) and its log.
    let mut files = files_under(&relay.state_dir());
    files.push(relay.log_path());
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().contains("chatd.db")),
        "the relay has its database in its state dir: {files:?}"
    );
    for f in &files {
        let bytes = read_file(f);
        for secret in [&marker, &reply, &queued] {
            assert!(
                !contains_bytes(&bytes, secret.as_bytes()),
                "plaintext {secret:?} found in relay file {}",
                f.display()
            );
        }
    }

    // The queued one still arrives, so it really was stored (sealed) at the relay.
    carol.start_stopped();
    assert_eq!(carol.wait_message(&queued)["from"], "alice");
    // Nor did members log the text.
    for d in [&alice, &bob, &carol] {
        assert!(
            !d.log().contains(&marker),
            "{} logged a message text",
            d.label()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Point 10: impersonation fails.

#[test]
fn impersonation_is_refused_and_owner_unaffected() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    bob.wait_peer_online("alice", true);
    let fp_alice = alice.fingerprint();

    // A fresh state dir: a new key claiming the name "alice".
    let mut fake = Daemon::spawn(
        "impostor alice",
        Role::Member,
        &["--user", "alice", "--connect", &relay.addr()],
    );
    fake.wait_ready();
    let fp_fake = fake.fingerprint();
    assert_ne!(fp_fake, fp_alice);
    let st = wait_for(DEADLINE, "the impostor to report a relay_error", || {
        fake.try_status().filter(|s| s["relay_error"].is_string())
    });
    assert_eq!(st["connected"], false, "{st}");
    let reason = st["relay_error"].as_str().unwrap();
    assert!(!reason.is_empty());
    let log = fake.log();
    let line = log.lines().find(|l| {
        let l = l.to_lowercase();
        (l.contains("refus") || l.contains("reject") || l.contains("bound"))
            && (l.contains("warn") || l.contains("error"))
    });
    assert!(
        line.is_some(),
        "the impostor's log has a clear refusal line:\n{log}"
    );
    // Plain status shows it too.
    let plain = fake.ctl(&["status"]);
    assert_exit(&plain, 0, "plain status of the impostor");
    assert!(
        String::from_utf8_lossy(&plain.stdout).contains(reason),
        "plain status shows the relay's reason: {}",
        describe(&plain)
    );

    // The real owner is unaffected: still connected, same key everywhere, messages both ways.
    assert_eq!(alice.status()["connected"], true);
    let b = bob.peer("alice").unwrap();
    assert_eq!(b["fingerprint"], fp_alice.as_str(), "{b}");
    assert_eq!(b["trust"], "pinned", "{b}");
    assert_eq!(b["online"], true, "{b}");
    let r = relay.who();
    let a = r.iter().find(|p| p["user"] == "alice").unwrap();
    assert_eq!(a["fingerprint"], fp_alice.as_str(), "{a}");
    let out = alice.ctl(&["send", "--wait", "delivered", "bob", "still me"]);
    assert_exit(&out, 0, "alice -> bob");
    let out = bob.ctl(&["send", "--wait", "delivered", "alice", "hi real alice"]);
    assert_exit(&out, 0, "bob -> alice");
    alice.wait_message("hi real alice");
    assert!(
        fake.messages().is_empty(),
        "the impostor received nothing: {:?}",
        fake.messages()
    );
    // Still refused a little later (it retries, and keeps being refused).
    let st = fake.status();
    assert_eq!(st["connected"], false, "{st}");
}

// ---------------------------------------------------------------------------------------------
// Point 11: a changed key is caught.

#[test]
fn changed_key_is_caught_until_trusted() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    let mut carol = Daemon::member("carol", &relay.addr());
    alice.wait_peer_online("carol", true);
    let old_fp = carol.fingerprint();
    assert_eq!(alice.peer("carol").unwrap()["trust"], "pinned");
    let out = alice.ctl(&["send", "--wait", "delivered", "carol", "before"]);
    assert_exit(&out, 0, "send to carol's first key");

    // Carol loses her key; the relay operator frees the name.
    carol.kill();
    alice.wait_peer_online("carol", false);
    let out = relay.ctl(&["forget", "carol"]);
    assert_exit(&out, 0, "relay forget carol");
    assert!(
        !relay.who().iter().any(|p| p["user"] == "carol"),
        "forget drops the binding: {:?}",
        relay.who()
    );

    // Carol returns with a new key (new state dir); it can claim the name now.
    let carol2 = Daemon::member("carol", &relay.addr());
    let new_fp = carol2.fingerprint();
    assert_ne!(new_fp, old_fp);
    wait_until(DEADLINE, "alice to show carol as changed", || {
        alice.peer("carol").is_some_and(|p| p["trust"] == "changed")
    });
    assert!(
        alice.log().contains(&old_fp) && alice.log().contains(&new_fp),
        "alice's log names both fingerprints:\n{}",
        alice.log()
    );

    // Sending is refused with exit 5 and both fingerprints, and nothing is sent.
    let out = alice.ctl(&["send", "carol", "refused-text"]);
    let line = assert_error_line(&out, 5, "send to a changed key");
    assert!(
        line.contains(&old_fp) && line.contains(&new_fp),
        "names both fingerprints: {line}"
    );
    let out = alice.ctl(&[
        "--json",
        "send",
        "--wait",
        "delivered",
        "carol",
        "refused-too",
    ]);
    assert_exit(&out, 5, "send --wait to a changed key");
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    assert!(
        !alice.texts("out").iter().any(|t| t.starts_with("refused")),
        "a refused message is not in the history"
    );

    // Nor is anything accepted from the new key: carol2's message does not show at alice, while
    // a later message from bob does.
    let out = carol2.ctl(&["send", "--wait", "relay", "alice", "from-new-key"]);
    assert_exit(&out, 0, "carol2 -> alice (relay custody)");
    let out = bob.ctl(&["send", "--wait", "delivered", "alice", "from-bob"]);
    assert_exit(&out, 0, "bob -> alice");
    alice.wait_message("from-bob");
    assert!(
        !alice.texts("in").iter().any(|t| t == "from-new-key"),
        "alice accepted a message from an untrusted changed key"
    );

    // A fingerprint matching neither key is refused.
    let bogus = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let out = alice.ctl(&["trust", "carol", bogus]);
    assert_error_line(&out, 1, "trust with a wrong fingerprint");
    assert_eq!(alice.peer("carol").unwrap()["trust"], "changed");

    // After checking out of band, alice trusts the new key; sending works again.
    let out = alice.ctl(&["trust", "carol", &new_fp]);
    assert_exit(&out, 0, "trust carol NEWFP");
    let p = alice.peer("carol").unwrap();
    assert_eq!(p["trust"], "trusted", "{p}");
    assert_eq!(p["fingerprint"], new_fp.as_str(), "{p}");
    let fp = alice.ctl(&["fingerprint", "carol"]);
    assert_eq!(String::from_utf8_lossy(&fp.stdout).trim(), new_fp);
    let out = alice.ctl(&["send", "--wait", "delivered", "carol", "welcome back"]);
    assert_exit(&out, 0, "send to trusted new key");
    assert_eq!(carol2.wait_message("welcome back")["from"], "alice");
    let out = carol2.ctl(&["send", "--wait", "delivered", "alice", "thanks"]);
    assert_exit(&out, 0, "carol2 -> alice after trust");
    alice.wait_message("thanks");
}

// ---------------------------------------------------------------------------------------------
// Point 12: clear errors, nothing sent.

#[test]
fn send_refuses_bad_input_and_sends_nothing() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);

    let out = alice.ctl(&["send", "nosuchuser", "hi"]);
    let line = assert_error_line(&out, 1, "unknown recipient");
    assert!(line.contains("nosuchuser"), "names the user: {line}");
    // In stdin mode the recipient is checked before any line comes, even when none does.
    let out = alice.ctl_stdin(&["send", "nosuchuser"], b"");
    let line = assert_error_line(&out, 1, "unknown recipient, empty stdin");
    assert!(line.contains("nosuchuser"), "names the user: {line}");
    // One bad recipient among good ones: nothing is sent to anyone.
    let out = alice.ctl(&["send", "bob", "nosuchuser", "--", "partial"]);
    assert_error_line(&out, 1, "one unknown recipient among several");

    let long_name = "a".repeat(33);
    for bad in [
        "Bob",
        "bad/name",
        "bo b",
        "_bob",
        ".bob",
        "bób",
        long_name.as_str(),
    ] {
        let out = alice.ctl(&["send", bad, "--", "hi"]);
        assert_error_line(&out, 1, &format!("bad user name {bad:?}"));
    }

    let too_long = "x".repeat(64 * 1024 + 1);
    let out = alice.ctl(&["send", "bob", &too_long]);
    assert_error_line(&out, 1, "text over 64 KiB as an argument");
    let out = alice.ctl_stdin(&["send", "bob"], format!("{too_long}\n").as_bytes());
    assert_error_line(&out, 1, "text over 64 KiB on stdin");
    let invalid = alice.ctl_stdin(&["send", "bob"], b"\xff\xfe not utf-8\n");
    assert_error_line(&invalid, 1, "text that is not UTF-8");

    // Nothing of that was sent or stored, nothing is pending.
    assert!(
        alice.messages().is_empty(),
        "refused sends left records: {:?}",
        alice.messages()
    );
    assert_eq!(alice.status()["outbox_pending"], 0);

    // A bad name is refused wherever a user is named.
    let out = alice.ctl(&["tail", "--with", "Bad/Name"]);
    assert_error_line(&out, 1, "tail --with a bad name");
    let out = alice.ctl(&["fingerprint", "Bad/Name"]);
    assert_error_line(&out, 1, "fingerprint of a bad name");

    // Exactly 64 KiB is fine, and arrives intact; it is then the only message anywhere.
    let max = "y".repeat(64 * 1024);
    let out = alice.ctl(&["send", "--wait", "delivered", "bob", &max]);
    assert_exit(&out, 0, "text of exactly 64 KiB");
    let got = bob.messages();
    assert_eq!(got.len(), 1, "bob got only the valid message");
    assert_eq!(got[0]["text"].as_str().unwrap().len(), 64 * 1024);
    assert_eq!(alice.messages().len(), 1);
}

#[test]
fn chatctl_without_daemon_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nothing.sock");
    let sock = sock.to_str().unwrap();
    for args in [
        vec!["--socket", sock, "status"],
        vec!["--socket", sock, "--json", "who"],
        vec!["--socket", sock, "send", "bob", "hi"],
        vec!["--socket", sock, "tail", "-f"],
    ] {
        let out = chatctl(&args);
        assert_error_line(&out, 3, &format!("chatctl {args:?} with no daemon"));
    }
    // A path that exists but where nothing listens.
    std::fs::write(dir.path().join("plain-file"), b"").unwrap();
    let f = dir.path().join("plain-file");
    let out = chatctl(&["--socket", f.to_str().unwrap(), "status"]);
    assert_error_line(&out, 3, "socket path is a plain file");
}

#[test]
fn bad_usage_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().unwrap();
    for args in [
        vec![],
        vec!["--socket", sock, "--frobnicate", "status"],
        vec!["--socket", sock, "nosuchcommand"],
        vec!["--socket", sock, "tail", "-n", "many"],
        vec!["--socket", sock, "tail", "--since", "-3"],
        vec!["--socket", sock, "send", "--wait", "sometimes", "bob", "hi"],
        vec!["--socket", sock, "send", "--timeout", "soon", "bob", "hi"],
        vec!["--socket", sock, "trust", "bob"],
        vec!["--socket", sock, "forget"],
    ] {
        let out = chatctl(&args);
        assert_exit(&out, 2, &format!("chatctl {args:?}"));
        assert!(
            !out.stderr.is_empty(),
            "usage error explained on stderr: chatctl {args:?}"
        );
    }
    // chatd: an unsupported key size is a usage error too (DECISIONS.md).
    let mut cmd = Command::new(CHATD);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--key-bits",
        "1024",
        "--state-dir",
    ])
    .arg(dir.path().join("state"))
    .arg("--socket")
    .arg(dir.path().join("ctl.sock"));
    let out = run_bounded(cmd, None, DEADLINE);
    assert_exit(&out, 2, "chatd --key-bits 1024");
    assert!(
        !dir.path().join("state").join("identity.pem").exists(),
        "no key made with a refused size"
    );
}

#[test]
fn chatd_refuses_to_start_without_a_role() {
    let dir = tempfile::tempdir().unwrap();
    let base = |extra: &[&str]| {
        let mut cmd = Command::new(CHATD);
        cmd.args(extra)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(dir.path().join("ctl.sock"))
            .args(["--key-bits", "2048"])
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env_remove("CONFIGURATION_DIRECTORY");
        cmd
    };
    for extra in [
        vec![],
        vec!["--user", "alice"],
        vec!["--connect", "127.0.0.1:9"],
    ] {
        let out = run_bounded(base(&extra), None, DEADLINE);
        assert!(
            !out.status.success() && out.status.code().is_some(),
            "chatd {extra:?} must refuse to start: {}",
            describe(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line on stderr for {extra:?}: {err:?}");
        assert!(
            lines[0].contains("--connect") || lines[0].contains("--listen"),
            "says what to give: {}",
            lines[0]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Point 13: plain output is safe.

#[test]
fn plain_tail_escapes_control_characters() {
    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);

    let words = [
        "evil",
        "\x1b[2J\x1b[H",
        "cr\roverwrite",
        "two\nlines",
        "12:00:00 alice: forged",
        "bell\x07",
        "c1\u{9b}31m",
        "del\x7f",
    ];
    let text = words.join(" ");
    let mut args = vec!["send", "--wait", "delivered", "bob"];
    args.extend_from_slice(&words);
    let out = alice.ctl(&args);
    assert_exit(&out, 0, "send a text with escapes");
    let out = alice.ctl(&["send", "--wait", "delivered", "bob", "tame"]);
    assert_exit(&out, 0, "send a tame text");

    // --json keeps the exact text, on both sides.
    let got = bob.wait_message(&text);
    assert_eq!(got["text"], text.as_str());
    assert!(alice.texts("out").contains(&text));

    for d in [&bob, &alice] {
        let records = d.tail(&[]);
        let n = records.len().to_string();
        let plain = d.ctl(&["tail", "-n", &n]);
        assert_exit(&plain, 0, "plain tail");
        let raw = plain.stdout.clone();
        for (bad, name) in [
            (b"\x1b".as_slice(), "ESC"),
            (b"\r", "CR"),
            (b"\x07", "BEL"),
            (b"\x7f", "DEL"),
            ("\u{9b}".as_bytes(), "C1 CSI"),
        ] {
            assert!(
                !contains_bytes(&raw, bad),
                "{}: plain tail printed a raw {name}: {:?}",
                d.label(),
                String::from_utf8_lossy(&raw)
            );
        }
        let s = String::from_utf8(raw).expect("plain tail is UTF-8");
        let lines: Vec<&str> = s.lines().collect();
        // A record's line starts with its time; the later lines of a multi-line message are
        // indented under its text (issue 11), so no line of a text starts where a time does.
        assert!(
            lines
                .iter()
                .all(|l| l.starts_with(|c: char| c.is_ascii_digit())
                    || l.starts_with("                    ")),
            "{}: every line starts with the time or is an indented continuation (no forged \
             line): {s:?}",
            d.label()
        );
        let evil_at = lines
            .iter()
            .position(|l| l.contains("evil"))
            .unwrap_or_else(|| panic!("{}: the message is shown: {s:?}", d.label()));
        assert!(
            lines[evil_at].contains("overwrite") && lines[evil_at].ends_with("two"),
            "the CR is escaped, the newline starts a continuation: {s:?}"
        );
        let cont = lines[evil_at + 1];
        assert!(
            cont.starts_with(' ')
                && cont.trim_start().starts_with("lines")
                && cont.contains("forged"),
            "the second line of the text is indented: {s:?}"
        );
        let evil_at = lines.iter().position(|l| l.contains("evil")).unwrap();
        let tame_at = lines.iter().position(|l| l.contains("tame"));
        assert!(
            tame_at.is_some_and(|t| t > evil_at),
            "the next message has its own line after it: {s:?}"
        );
    }
}

/// The loop sleeps until a core's deadline, not on a fixed tick: a host's own member must still
/// log in on its own, with nothing (no `chatctl`) waking the loop. Before the cores could say
/// they had output waiting, it waited for the first control request or timer.
#[test]
fn a_host_logs_its_own_member_in_unprompted() {
    let d = Daemon::spawn(
        "host alice",
        Role::Host,
        &["--user", "alice", "--listen", "127.0.0.1:0"],
    );
    // Well under the relay's 10 s handshake timeout, whose wake-up would hide the bug.
    wait_until(
        Duration::from_secs(5),
        "alice's member to log in without a control request",
        || d.log().contains("logged in to relay as alice"),
    );
}

/// Issue 8 point 8: `send --all` keeps meaning "every peer online now" up to `max_fanout`; above
/// it chatctl fails with exit 1 and a line that names the limit, and nothing is sent.
#[test]
fn send_all_above_max_fanout_fails_and_sends_nothing() {
    let mut alice = Daemon::spawn(
        "host alice",
        Role::Host,
        &[
            "--user",
            "alice",
            "--listen",
            "127.0.0.1:0",
            "--max-fanout",
            "1",
        ],
    );
    alice.wait_ready();
    let bob = Daemon::member("bob", &alice.addr());
    let carol = Daemon::member("carol", &alice.addr());
    alice.wait_peer_online("bob", true);
    alice.wait_peer_online("carol", true);
    let out = alice.ctl(&["send", "--all", "hello", "everyone"]);
    let line = assert_error_line(&out, 1, "send --all above max_fanout");
    assert!(
        line.contains("max_fanout") && line.contains("2 peers"),
        "{line}"
    );
    assert!(alice.texts("out").is_empty(), "nothing was sent");
    drop((bob, carol));
}

/// Write `n` names bound to one real key straight into a stopped daemon's database: on a relay
/// as bindings, on a member as pins. Registering 20,000 names through the protocol would take
/// minutes; what is tested here is what the daemon does with them.
fn preseed(d: &Daemon, n: usize, relay: bool) {
    use chatd::store::{Pin, PinTrust, Store};
    let key = chatd::crypto::Identity::generate(&mut rand::thread_rng(), 2048)
        .expect("key")
        .public()
        .der()
        .to_vec();
    let mut store = Store::open(&d.state_dir().join("chatd.db")).expect("open the database");
    store.begin().expect("begin");
    for i in 0..n {
        let user = format!("p{i:05}-{}", "x".repeat(20));
        if relay {
            store.bind(&user, &key).expect("bind");
        } else {
            let pin = Pin {
                user,
                key: key.clone(),
                trust: PinTrust::Pinned,
                presented: None,
            };
            store.put_pin(&pin).expect("pin");
        }
    }
    store.commit().expect("commit");
}

/// Issue 8 point 4: no `who` reply may exceed the frame cap at any directory size. A relay with
/// 20,000 names lists them all (before, `who` failed from about 9,500 names with "reply too
/// large"), even with a write buffer of 64 KiB (the list goes out as the client reads it, as a
/// `tail` does), and a member with 20,000 pins answers `who` and still checks stdin recipients.
#[test]
fn who_lists_twenty_thousand_names_on_a_relay_and_a_member() {
    const N: usize = 20_000;
    let mut small = Daemon::spawn(
        "relay with a 64 KiB write buffer",
        Role::Relay,
        &["--listen", "127.0.0.1:0", "--max-write-buffer", "65536"],
    );
    small.wait_ready();
    small.stop();
    preseed(&small, N, true);
    small.start_stopped();
    let all = small.ctl_json(&["who"]);
    assert_eq!(
        all.len(),
        N,
        "every registered name, one JSON object a line"
    );
    assert!(all.iter().all(|p| p["trust"] == "bound"));
    assert!(!small.log().contains("cutting off"), "{}", small.log());
    drop(small);

    let relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let mut bob = Daemon::member("bob", &relay.addr());
    bob.stop();
    preseed(&bob, N, false);
    bob.start_stopped();
    bob.wait_peer_online("alice", true);
    let peers = bob.who();
    assert_eq!(peers.len(), N + 1, "the 20,000 pins and alice");
    let out = bob.ctl_stdin(
        &["send", "alice"],
        b"one line from a member with many pins\n",
    );
    assert!(out.status.success(), "{}", describe(&out));
    alice.wait_message("one line from a member with many pins");
    // The recipient check reads every chunk: the last pin is found, an unknown name is not.
    let last = format!("p{:05}-{}", N - 1, "x".repeat(20));
    let out = bob.ctl_stdin(&["send", &last], b"to the last pin\n");
    assert!(out.status.success(), "{}", describe(&out));
    let out = bob.ctl_stdin(&["send", "zed"], b"to nobody\n");
    assert_error_line(&out, 1, "stdin send to an unknown name");
}

/// Issue 8: on a relay of 20,000 names a login gets no directory; a member looks up the key of
/// a user it writes to (and the recipient the key of its new sender), pins it on first sight,
/// and from then on hears only its contacts' joins and leaves; `who` lists the contacts, and
/// `who --all` pages through all 20,000 names.
#[test]
fn a_large_relay_gives_keys_on_demand_and_pages_its_directory() {
    const N: usize = 20_000;
    let mut relay = Daemon::relay();
    relay.stop();
    preseed(&relay, N, true);
    relay.start_stopped();
    let alice = Daemon::member("alice", &relay.addr());
    let mut bob = Daemon::member("bob", &relay.addr());
    assert!(
        alice.who().is_empty(),
        "no directory at login on a large relay"
    );
    let out = alice.ctl(&["send", "bob", "first", "contact"]);
    assert!(out.status.success(), "{}", describe(&out));
    bob.wait_message("first contact");
    let contacts = alice.who();
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    assert_eq!(contacts[0]["user"], "bob");
    assert_eq!(contacts[0]["trust"], "pinned");
    assert_eq!(contacts[0]["online"], true);
    assert_eq!(bob.who().len(), 1, "bob pinned his new sender");
    assert!(alice.log().contains("pinned bob"), "{}", alice.log());

    let all = alice.ctl_json(&["who", "--all"]);
    assert_eq!(all.len(), N + 1, "every name but alice's own, bob included");
    assert!(all
        .iter()
        .any(|p| p["user"] == "bob" && p["trust"] == "pinned"));
    assert_eq!(all.iter().filter(|p| p["trust"] == "bound").count(), N);
    let some = alice.ctl_json(&["who", "--all", "--prefix", "p1999"]);
    assert_eq!(some.len(), 10, "{some:?}");
    assert_eq!(alice.who().len(), 1, "listing pins nothing");

    // Carol's join reaches nobody (nobody follows her); bob's leave reaches alice.
    let carol = Daemon::member("carol", &relay.addr());
    bob.stop();
    alice.wait_peer_online("bob", false);
    let heard: Vec<Value> = alice
        .tail(&[])
        .into_iter()
        .filter(|r| r["kind"] == "presence")
        .collect();
    assert!(heard.iter().all(|r| r["user"] == "bob"), "{heard:?}");
    let out = alice.ctl(&["send", "zed", "to nobody"]);
    assert_error_line(&out, 1, "send to a name the relay does not have");
    drop(carol);
}

/// The other side of the uplink's backpressure (issue 10 point 1): a relay that reads is never
/// dropped, however much waits for it. Alice's outbox, filled while the relay was down, is four
/// times her 64 KiB write buffer; after the relay comes back she delivers all of it.
#[test]
fn an_outbox_larger_than_max_write_buffer_drains_to_a_reading_relay() {
    let mut relay = Daemon::relay();
    let alice = Daemon::spawn(
        "alice",
        Role::Member,
        &[
            "--user",
            "alice",
            "--connect",
            &relay.addr(),
            "--max-write-buffer",
            "65536",
        ],
    );
    alice.wait_connected();
    let bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);
    relay.stop();
    let lines: String = (0..64)
        .map(|i| format!("{i:02} {}\n", "x".repeat(4000)))
        .collect();
    let out = alice.ctl_stdin(&["send", "bob"], lines.as_bytes());
    assert!(out.status.success(), "{}", describe(&out));
    relay.start_stopped();
    wait_until(
        Duration::from_secs(60),
        "bob to receive all 64 messages",
        || bob.texts("in").len() == 64,
    );
    assert!(!alice.log().contains("is not reading"), "{}", alice.log());
}
