//! Issue 12: nothing readable on the wire. The member↔relay link is TLS 1.3 over the relay's RSA
//! identity key, members pin that key, and what crosses the network carries no name, key,
//! message id or text. Real `chatd` processes throughout; the proxy is a real TCP relay of bytes.

mod common;

use common::*;
use std::fs;
use std::time::Duration;

use chatd::crypto::{Fingerprint, Identity};

/// The member's pin file (docs/PROTOCOL.md "Pinning the relay").
fn known_relays(d: &Daemon) -> String {
    fs::read_to_string(d.state_dir().join("known_relays")).unwrap_or_default()
}

/// The SubjectPublicKeyInfo DER of a daemon's identity, as it would cross a plaintext link.
fn public_key_der(d: &Daemon) -> Vec<u8> {
    let pem = fs::read_to_string(d.state_dir().join("identity.pem")).expect("identity.pem");
    Identity::from_pem(&pem)
        .expect("an identity")
        .public()
        .der()
        .to_vec()
}

fn assert_ok(out: &std::process::Output, what: &str) {
    if !out.status.success() {
        fail(&format!("{what}: {}", describe(out)));
    }
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// A recording proxy between two members and the relay sees only TLS: no user name, no public
/// key (the members' or the relay's), no message id, no text, in either direction.
#[test]
fn the_wire_carries_no_name_key_id_or_text() {
    let relay = Daemon::relay();
    let proxy = Proxy::start(&relay.addr());
    // Long names, so that finding one by chance in random bytes is out of the question.
    let (an, bn) = ("alice-wire-zq5kx8", "bob-wire-zq5kx8");
    let alice = Daemon::member(an, &proxy.addr());
    let bob = Daemon::member(bn, &proxy.addr());
    alice.wait_peer_online(bn, true);
    let marker = unique("zq-marker-on-the-wire");
    let out = alice.ctl(&["send", "--wait", "delivered", bn, &marker]);
    assert_ok(&out, "alice -> bob through the proxy");
    let got = bob.wait_message(&marker);
    let reply = unique("zq-reply-on-the-wire");
    let out = bob.ctl(&["send", "--wait", "delivered", an, &reply]);
    assert_ok(&out, "bob -> alice through the proxy");
    alice.wait_message(&reply);

    let ids: Vec<Vec<u8>> = alice
        .messages()
        .iter()
        .chain(bob.messages().iter())
        .filter_map(|m| m["id"].as_str().map(hex_bytes))
        .collect();
    assert!(ids.len() >= 2, "message ids to look for: {ids:?}");
    assert_eq!(got["from"], an);
    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("alice's name".into(), an.as_bytes().to_vec()),
        ("bob's name".into(), bn.as_bytes().to_vec()),
        ("alice's key".into(), public_key_der(&alice)),
        ("bob's key".into(), public_key_der(&bob)),
        ("the relay's key".into(), public_key_der(&relay)),
        ("the marker".into(), marker.as_bytes().to_vec()),
        ("the reply".into(), reply.as_bytes().to_vec()),
    ];
    secrets.extend(
        ids.into_iter()
            .enumerate()
            .map(|(i, id)| (format!("message id #{i}"), id)),
    );

    let recs = proxy.recordings();
    assert!(
        proxy.total_bytes() > 2000,
        "the proxy carried the traffic ({} bytes)",
        proxy.total_bytes()
    );
    for (i, rec) in recs.iter().enumerate() {
        if rec.is_empty() {
            continue;
        }
        // Every connection is TLS from its first byte: a handshake record.
        assert_eq!(
            rec[0],
            0x16,
            "connection #{} direction {} is not TLS",
            i / 2,
            i % 2
        );
        for (what, bytes) in &secrets {
            assert!(
                !contains_bytes(rec, bytes),
                "{what} crossed the wire in the clear (connection #{}, direction {})",
                i / 2,
                i % 2
            );
        }
    }
}

/// The first connection pins the relay's key (logged, stored, shown in `status`), a restart
/// reuses the pin without a new first contact, and the relay shows the same fingerprint.
#[test]
fn the_first_connection_pins_the_relay_and_the_pin_is_reused() {
    let relay = Daemon::relay();
    let relay_fp = relay.fingerprint();
    let mut alice = Daemon::member("alice", &relay.addr());
    let pins = known_relays(&alice);
    assert_eq!(
        pins.trim(),
        format!("{} {relay_fp}", relay.addr()),
        "the pin file holds the relay's fingerprint"
    );
    let st = alice.status();
    assert_eq!(st["relay_fingerprint"], relay_fp.as_str(), "{st}");
    let first = |l: &str| l.contains("first connection to relay") && l.contains(&relay_fp);
    assert_eq!(alice.log().lines().filter(|l| first(l)).count(), 1);
    assert_eq!(relay.status()["fingerprint"], relay_fp.as_str());

    alice.restart();
    assert_eq!(known_relays(&alice), pins, "the pin is reused as it is");
    assert_eq!(
        alice.log().lines().filter(|l| first(l)).count(),
        1,
        "no second first contact"
    );
    assert!(
        alice
            .log()
            .lines()
            .filter(|l| l.contains("connected to relay") && l.contains(&relay_fp))
            .count()
            >= 2,
        "{}",
        alice.log()
    );
}

/// A relay that comes back with another key is refused, with both fingerprints and the way to
/// accept the new one; the member never logs in to it. Accepting the new key explicitly works
/// and replaces the pin.
#[test]
fn a_relay_with_another_key_is_refused_until_the_user_accepts_it() {
    let mut relay = Daemon::relay();
    let addr = relay.addr();
    let old_fp = relay.fingerprint();
    let mut alice = Daemon::member("alice", &addr);
    relay.kill();

    let impostor = {
        let mut d = Daemon::spawn("impostor", Role::Relay, &["--listen", &addr]);
        d.wait_ready();
        d
    };
    let new_fp = impostor.fingerprint();
    assert_ne!(new_fp, old_fp);
    let refused = |l: &str| {
        l.contains("refusing relay")
            && l.contains(&format!("presented key {new_fp}"))
            && l.contains(&format!("{old_fp} is pinned"))
            && l.contains(&format!("--relay-fingerprint {new_fp}"))
    };
    // Two tries, each refused (and each logged as a warning, then as the reason of the retry).
    wait_until(DEADLINE, "alice to refuse the impostor twice", || {
        let log = alice.log();
        let tries = log
            .lines()
            .filter(|l| refused(l) && l.contains("reconnecting in"))
            .count();
        tries >= 2 && log.lines().any(|l| refused(l) && l.contains("WARN"))
    });
    let st = alice.status();
    assert_eq!(st["connected"], false, "{st}");
    let err = st["relay_error"].as_str().unwrap_or_default();
    assert!(
        err.contains(&new_fp) && err.contains(&old_fp),
        "status says why: {st}"
    );
    assert_eq!(st["relay_fingerprint"], old_fp.as_str(), "{st}");
    assert!(
        impostor.who().is_empty(),
        "alice never logged in to the impostor"
    );
    assert!(known_relays(&alice).contains(&old_fp), "the pin is kept");

    // After an out-of-band check, alice accepts the new key (here through her config file, as
    // the flag would).
    let cfg = alice.dir().join("home/config/chatd");
    fs::create_dir_all(&cfg).expect("config dir");
    fs::write(
        cfg.join("chatd.toml"),
        format!("relay_fingerprint = \"{new_fp}\"\n"),
    )
    .expect("write chatd.toml");
    alice.restart();
    assert_eq!(alice.status()["relay_fingerprint"], new_fp.as_str());
    let pins = known_relays(&alice);
    assert!(pins.contains(&new_fp) && !pins.contains(&old_fp), "{pins}");
    wait_until(DEADLINE, "the impostor to see alice", || {
        impostor.who().len() == 1
    });
}

/// A fingerprint in the address (`SHA256:...@HOST:PORT`) is checked from the first connection:
/// a wrong one never connects and writes no pin; the right one connects.
#[test]
fn a_fingerprint_in_the_address_is_checked_from_the_first_connection() {
    let relay = Daemon::relay();
    let fp = relay.fingerprint();
    let wrong = Fingerprint([0x42; 32]).to_string();
    let mut bad = Daemon::spawn(
        "alice (wrong pin)",
        Role::Member,
        &[
            "--user",
            "alice",
            "--connect",
            &format!("{wrong}@{}", relay.addr()),
        ],
    );
    bad.wait_ready();
    wait_until(DEADLINE, "the wrong pin to refuse the relay", || {
        bad.log().contains("refusing relay")
    });
    let log = bad.log();
    assert!(
        log.contains(&format!("presented key {fp}")) && log.contains(&wrong),
        "{log}"
    );
    assert!(
        log.contains("relay_fingerprint setting"),
        "the message says where the pin came from: {log}"
    );
    assert_eq!(bad.status()["connected"], false);
    assert_eq!(known_relays(&bad), "", "a refused relay is not pinned");
    bad.kill();

    let good = Daemon::spawn(
        "bob (right pin)",
        Role::Member,
        &[
            "--user",
            "bob",
            "--connect",
            &format!("{fp}@{}", relay.addr()),
        ],
    );
    good.wait_connected();
    assert_eq!(good.status()["relay_fingerprint"], fp.as_str());
    assert!(
        !good.log().contains("first connection"),
        "an explicit pin is no first contact"
    );
    // A malformed pin is a start-up error that says what is wrong.
    let out = run_bounded(
        {
            let mut c = std::process::Command::new(CHATD);
            c.args([
                "--user",
                "carol",
                "--connect",
                "127.0.0.1:1",
                "--relay-fingerprint",
                "SHA256:nope",
            ]);
            c
        },
        None,
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("relay_fingerprint"), "{err}");
}

/// A relay that accepts TCP and never completes the TLS handshake, or answers garbage, does not
/// hold a member: it gives up within its 15 s handshake bound (or at once), says why, and
/// tries again.
#[test]
fn a_relay_that_never_completes_the_handshake_is_given_up() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fake relay");
    let addr = listener.local_addr().expect("address").to_string();
    let alice = Daemon::member_unconnected("alice", &addr);
    // Hold the first connection open and say nothing.
    let (_silent, _) = listener.accept().expect("alice connects");
    wait_for(
        Duration::from_secs(40),
        "alice to give up the handshake",
        || {
            alice
                .log()
                .contains("did not complete the TLS handshake within 15 s")
                .then_some(())
        },
    );
    let st = alice.status();
    assert_eq!(st["connected"], false, "{st}");
    // The next try gets garbage instead of a ServerHello: refused at once.
    let (mut junk, _) = listener.accept().expect("alice tries again");
    std::io::Write::write_all(&mut junk, b"HTTP/1.1 400 Bad Request\r\n\r\n").expect("garbage");
    wait_until(DEADLINE, "alice to refuse the garbage", || {
        alice.log().contains("TLS handshake with relay")
    });
    assert_eq!(known_relays(&alice), "", "nothing was pinned");
}
