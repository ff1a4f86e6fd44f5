//! Golden bytes for both sockets and for the cryptographic transcripts, pinned against
//! `docs/PROTOCOL.md`.
//!
//! Why: the MessagePack encoding comes from `serde` derives, so renaming a field, reordering a
//! struct or changing an attribute silently changes the wire and breaks every other
//! implementation. Each value below is built with the library's own types and must encode to
//! exactly the bytes written here and decode back to itself. The transcripts, the AEAD vectors
//! and the RSA-PSS/OAEP parameters were also checked once against an independent implementation
//! (Python `cryptography`, i.e. OpenSSL) built from PROTOCOL.md alone. The last tests read
//! `docs/PROTOCOL.md` and check that every golden value appears in it, and that the document
//! holds no hex or JSON example that is not pinned here, so the document cannot drift either.
//!
//! If one of these fails, the wire (or the `--json` contract) changed: that breaks every other
//! implementation and script. Change it only on purpose, and update PROTOCOL.md with it.

use std::fmt::Debug;

use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::{Oaep, Pss, RsaPrivateKey, RsaPublicKey};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use chatd::cli::format;
use chatd::crypto::{
    login_transcript, make_key_packet, message_ad, open_envelope, receipt_tag, rekey_transcript,
    seal_envelope, verify_receipt, Fingerprint, Header, Identity, SessionKey,
};
use chatd::proto::control::*;
use chatd::proto::frame::{self, Decoded, FrameError, MAX_FRAME};
use chatd::proto::relay::*;
use chatd::proto::{from_payload, hex, to_payload};

// ---- fixed inputs -------------------------------------------------------------------------------

/// `Fingerprint::of_spki(b"")`: SHA-256 of the empty string, in the `SHA256:` form.
const FP: &str = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";
const FP2: &str = "SHA256:LXEWQrcmsEQBYnyp+6wy9chTD7GQPMTbAiWHF5IaSIE";
/// The session key of the AEAD vectors.
const KEY: [u8; 32] = [0x42; 32];
/// The receipt tag of the message vector (`RECEIPT_TAG`, also carried by `FROM_DELIVER_RECEIPT`).
const TAG: [u8; 16] = [
    0x9a, 0xeb, 0x48, 0xa4, 0x05, 0x9f, 0xf2, 0x7a, 0xac, 0x3f, 0x11, 0xbf, 0x84, 0x32, 0x2f, 0x4d,
];

// ---- golden bytes: relay socket -----------------------------------------------------------------

const FRAME_PING: &str = "00000005a450696e67";
const TO_PING: &str = "a450696e67";
const FROM_PONG: &str = "a4506f6e67";
const FROM_CHALLENGE: &str = "81a94368616c6c656e676582a56e6f6e6365c4200000000000000000000000000000000000000000000000000000000000000000a776657273696f6ea131";
const TO_LOGIN: &str =
    "81a54c6f67696e83a475736572a5616c696365a36b6579c404aaaaaaaaa97369676e6174757265c404bbbbbbbb";
const FROM_WELCOME: &str = "81a757656c636f6d6582a475736572a5616c696365a570656572739183a475736572a3626f62a36b6579c404aaaaaaaaa66f6e6c696e65c3";
const TO_LOOKUP: &str = "81a64c6f6f6b757092a3626f62a37a6564";
const TO_LIST: &str = "81a44c69737482a56166746572a5616c696365a6707265666978a0";
const FROM_KEYS: &str = "81a44b65797382a570656572739183a475736572a3626f62a36b6579c404aaaaaaaaa66f6e6c696e65c3a7756e6b6e6f776e91a37a6564";
const FROM_LISTING: &str = "81a74c697374696e6782a570656572739183a475736572a3626f62a36b6579c404aaaaaaaaa66f6e6c696e65c3a46d6f7265c3";
const FROM_PRESENCE: &str =
    "81a850726573656e636583a475736572a56361726f6ca36b6579c404cccccccca66f6e6c696e65c2";
const ROUTED_MESSAGE: &str = "81a74d65737361676588a26964c41002020202020202020202020202020202a466726f6da161a2746fa162a774696d655f6d7301a773657373696f6ec41003030303030303030303030303030303a7636f756e74657200aa6b65795f7061636b6574c0aa63697068657274657874c40109";
const TO_SEND_WITH_KEY_PACKET: &str = "81a453656e6481a74d65737361676588a26964c41002020202020202020202020202020202a466726f6da161a2746fa162a774696d655f6d7301a773657373696f6ec41003030303030303030303030303030303a7636f756e74657200aa6b65795f7061636b657482a777726170706564c402dddda97369676e6174757265c402eeeeaa63697068657274657874c40109";
const ROUTED_REKEY: &str = "81a552656b657985a26964c41001010101010101010101010101010101a466726f6da162a2746fa161a773657373696f6ec41003030303030303030303030303030303a97369676e6174757265c402eeee";
const REKEY_TRANSCRIPT: &str = "63686174642d72656b65792d7631000000001001010101010101010101010101010101000000016200000001610000001003030303030303030303030303030303";
const FROM_ACCEPTED: &str =
    "81a8416363657074656482a46b696e64a752656365697074a26964c41001010101010101010101010101010101";
const FROM_REFUSED: &str = "81a75265667573656483a36b657982a46b696e64a74d657373616765a26964c41002020202020202020202020202020202a4636f6465ac756e6b6e6f776e5f75736572a6726561736f6eb16e6f2075736572206e616d6564207a6564";
const FROM_DELIVER_RECEIPT: &str = "81a744656c6976657281a75265636569707486a26964c41001010101010101010101010101010101a466726f6da162a2746fa161a773657373696f6ec41003030303030303030303030303030303a7636f756e74657204a3746167c4109aeb48a4059ff27aac3f11bf84322f4d";
const TO_ACK: &str =
    "81a341636b82a46b696e64a74d657373616765a26964c41001010101010101010101010101010101";
const FROM_ERROR: &str =
    "81a54572726f7282a4636f6465a774696d656f7574a6726561736f6eac69646c652074696d656f7574";

// ---- golden bytes: control socket ---------------------------------------------------------------

const CTL_SEND: &str = "81a453656e6485a2746f91a3626f62a3616c6cc2a474657874a26869a477616974a552656c6179aa74696d656f75745f6d73cd7530";
const CTL_TAIL: &str = "81a45461696c85a46c6173740aa573696e6365c0a477697468a3626f62a6666f6c6c6f77c3a56b696e647392a76d657373616765a36b6579";
const CTL_WHO: &str = "a357686f";
const CTL_DIRECTORY: &str = "81a94469726563746f727981a6707265666978a162";
const CTL_STATUS: &str = "a6537461747573";
const CTL_FINGERPRINT: &str = "81ab46696e6765727072696e7481a475736572c0";
const CTL_TRUST: &str = "81a5547275737482a475736572a56361726f6cab66696e6765727072696e74d9325348413235363a3437444551706a38484253612b2f54496d572b354a4365755165526b6d354e4d704a575a47336853754655";
const CTL_FORGET: &str = "81a6466f7267657481a475736572a56361726f6c";
const RESP_SENT: &str = "81a453656e749183a26964c41011111111111111111111111111111111a2746fa3626f62a57374617465a6517565756564";
const RESP_RECORD_MESSAGE: &str = "81a65265636f726483a37365710ca774696d655f6d73cf0000018bcfe56800a4626f647981a74d65737361676585a26964c410ababababababababababababababababa466726f6da5616c696365a2746fa3626f62a3646972a2496ea474657874a568656c6c6f";
const RESP_RECORD_PRESENCE: &str = "81a65265636f726483a37365710da774696d655f6d73cf0000018bcfe56be8a4626f647981a850726573656e636582a475736572a56361726f6ca66f6e6c696e65c2";
const RESP_RECORD_LINK: &str = "81a65265636f726483a37365710fa774696d655f6d73cf0000018bcfe573b8a4626f647981a44c696e6b84a27570c3a6726561736f6ec0a66f6e6c696e6591a3626f62ac70656572735f6f6e6c696e6501";
const RESP_RECORD_RECEIPT: &str = "81a65265636f726483a37365710ea774696d655f6d73cf0000018bcfe56fd0a4626f647981a75265636569707484a26964c41011111111111111111111111111111111a2746fa37a6564a57374617465a64661696c6564a6726561736f6ebf756e6b6e6f776e5f757365723a206e6f2075736572206e616d6564207a6564";
const RESP_RECORD_KEY: &str = "81a65265636f726483a37365710fa774696d655f6d73cf0000018bcfe573b8a4626f647981a34b657984a475736572a3626f62a56576656e74a76368616e676564ab66696e6765727072696e74d9325348413235363a4c5845575172636d73455142596e79702b3677793963685444374751504d54624169574846354961534945a56f74686572d9325348413235363a3437444551706a38484253612b2f54496d572b354a4365755165526b6d354e4d704a575a47336853754655";
const RESP_END: &str = "a3456e64";
const RESP_PEERS: &str = "81a550656572739185a475736572a3626f62a66f6e6c696e65c3a57472757374a670696e6e6564ab66696e6765727072696e74d9325348413235363a3437444551706a38484253612b2f54496d572b354a4365755165526b6d354e4d704a575a47336853754655a970726573656e746564c0";
const RESP_STATUS: &str = "81a65374617475738da475736572a5616c696365ab66696e6765727072696e74d9325348413235363a3437444551706a38484253612b2f54496d572b354a4365755165526b6d354e4d704a575a47336853754655a5726f6c657391a66d656d626572a572656c6179ae3132372e302e302e313a39393939a9636f6e6e6563746564c3ab72656c61795f6572726f72c0a66c697374656ec0ac70656572735f6f6e6c696e6501ae6f7574626f785f70656e64696e6700a8757074696d655f732aa776657273696f6ea5302e312e30a973746174655f646972ae2f7661722f6c69622f6368617464b172656c61795f66696e6765727072696e74c0";
const RESP_FINGERPRINT: &str = "81ab46696e6765727072696e7482a475736572a5616c696365ab66696e6765727072696e74d9325348413235363a3437444551706a38484253612b2f54496d572b354a4365755165526b6d354e4d704a575a47336853754655";
const RESP_DONE: &str = "81a4446f6e65d9496361726f6c2773206b6579205348413235363a3437444551706a38484253612b2f54496d572b354a4365755165526b6d354e4d704a575a473368537546552069732074727573746564";
const RESP_ERROR: &str = "81a54572726f7283a46b696e64a754696d656f7574a76d657373616765a974696d6564206f7574a473656e749183a26964c41011111111111111111111111111111111a2746fa3626f62a57374617465a6517565756564";

// ---- golden bytes: cryptography -----------------------------------------------------------------

const LOGIN_TRANSCRIPT: &str = "63686174642d6c6f67696e2d76320000000020070707070707070707070707070707070707070707070707070707070707070700000005616c696365000000200909090909090909090909090909090909090909090909090909090909090909";
const MESSAGE_AD: &str = "63686174642d6d73672d763100000000100101010101010101010101010101010100000001610000000162000000000000000200000010030303030303030303030303030303030000000000000004";
const MESSAGE_CIPHERTEXT: &str = "3ac50020b1072b327a1d1ee56d0bf643dd90";
const RECEIPT_TAG: &str = "9aeb48a4059ff27aac3f11bf84322f4d";

/// Every golden byte string, by name. PROTOCOL.md must hold each one in a ```hex block.
const ALL_HEX: &[(&str, &str)] = &[
    ("frame of ToRelay::Ping", FRAME_PING),
    ("ToRelay::Ping", TO_PING),
    ("FromRelay::Pong", FROM_PONG),
    ("FromRelay::Challenge", FROM_CHALLENGE),
    ("ToRelay::Login", TO_LOGIN),
    ("ToRelay::Lookup", TO_LOOKUP),
    ("ToRelay::List", TO_LIST),
    ("FromRelay::Keys", FROM_KEYS),
    ("FromRelay::Listing", FROM_LISTING),
    ("FromRelay::Welcome", FROM_WELCOME),
    ("FromRelay::Presence", FROM_PRESENCE),
    ("Routed::Message", ROUTED_MESSAGE),
    ("ToRelay::Send with a key packet", TO_SEND_WITH_KEY_PACKET),
    ("Routed::Rekey", ROUTED_REKEY),
    ("FromRelay::Accepted", FROM_ACCEPTED),
    ("FromRelay::Refused", FROM_REFUSED),
    ("FromRelay::Deliver of a receipt", FROM_DELIVER_RECEIPT),
    ("ToRelay::Ack", TO_ACK),
    ("FromRelay::Error", FROM_ERROR),
    ("CtlRequest::Send", CTL_SEND),
    ("CtlRequest::Tail", CTL_TAIL),
    ("CtlRequest::Who", CTL_WHO),
    ("CtlRequest::Directory", CTL_DIRECTORY),
    ("CtlRequest::Status", CTL_STATUS),
    ("CtlRequest::Fingerprint", CTL_FINGERPRINT),
    ("CtlRequest::Trust", CTL_TRUST),
    ("CtlRequest::Forget", CTL_FORGET),
    ("CtlResponse::Sent", RESP_SENT),
    ("CtlResponse::Record (message)", RESP_RECORD_MESSAGE),
    ("CtlResponse::Record (presence)", RESP_RECORD_PRESENCE),
    ("CtlResponse::Record (receipt)", RESP_RECORD_RECEIPT),
    ("CtlResponse::Record (link)", RESP_RECORD_LINK),
    ("CtlResponse::Record (key)", RESP_RECORD_KEY),
    ("CtlResponse::End", RESP_END),
    ("CtlResponse::Peers", RESP_PEERS),
    ("CtlResponse::Status", RESP_STATUS),
    ("CtlResponse::Fingerprint", RESP_FINGERPRINT),
    ("CtlResponse::Done", RESP_DONE),
    ("CtlResponse::Error", RESP_ERROR),
    ("login transcript", LOGIN_TRANSCRIPT),
    ("message associated data", MESSAGE_AD),
    ("message ciphertext", MESSAGE_CIPHERTEXT),
    ("receipt tag", RECEIPT_TAG),
    ("rekey transcript", REKEY_TRANSCRIPT),
];

// ---- golden `chatctl --json` lines --------------------------------------------------------------

const JSON_MESSAGE: &str = r#"{"kind":"message","seq":12,"id":"abababababababababababababababab","time":"2023-11-14T22:13:20Z","from":"alice","to":"bob","dir":"in","text":"hello"}"#;
const JSON_PRESENCE: &str =
    r#"{"kind":"presence","seq":13,"time":"2023-11-14T22:13:21Z","user":"carol","online":false}"#;
const JSON_RECEIPT: &str = r#"{"kind":"receipt","seq":14,"time":"2023-11-14T22:13:22Z","id":"11111111111111111111111111111111","to":"zed","state":"failed","reason":"unknown_user: no user named zed"}"#;
const JSON_LINK: &str = r#"{"kind":"link","seq":15,"time":"2023-11-14T22:13:23Z","up":true,"reason":null,"online":["bob"],"peers_online":1}"#;
const JSON_LINK_DOWN: &str = r#"{"kind":"link","seq":16,"time":"2023-11-14T22:13:24Z","up":false,"reason":"relay stopped answering","online":[],"peers_online":0}"#;
const JSON_KEY: &str = r#"{"kind":"key","seq":15,"time":"2023-11-14T22:13:23Z","user":"bob","event":"changed","fingerprint":"SHA256:LXEWQrcmsEQBYnyp+6wy9chTD7GQPMTbAiWHF5IaSIE","other":"SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"}"#;
const JSON_WHO: &str = r#"{"user":"bob","online":true,"trust":"pinned","fingerprint":"SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"}"#;
const JSON_WHO_CHANGED: &str = r#"{"user":"bob","online":false,"trust":"changed","fingerprint":"SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU","presented":"SHA256:LXEWQrcmsEQBYnyp+6wy9chTD7GQPMTbAiWHF5IaSIE"}"#;
const JSON_STATUS: &str = r#"{"user":"alice","fingerprint":"SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU","roles":["member"],"relay":"127.0.0.1:9999","connected":true,"relay_error":null,"listen":null,"peers_online":1,"outbox_pending":0,"uptime_s":42,"version":"0.1.0","state_dir":"/var/lib/chatd","relay_fingerprint":null}"#;
const JSON_SEND: &str = r#"{"id":"11111111111111111111111111111111","to":"bob","state":"queued"}"#;
const JSON_FINGERPRINT: &str =
    r#"{"fingerprint":"SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU","user":"alice"}"#;
const JSON_DONE: &str = r#"{"message":"carol's key SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU is trusted","ok":true}"#;

/// Every golden JSON line. PROTOCOL.md must hold each one as a line of a ```json block.
const ALL_JSON: &[&str] = &[
    JSON_MESSAGE,
    JSON_PRESENCE,
    JSON_RECEIPT,
    JSON_LINK,
    JSON_LINK_DOWN,
    JSON_KEY,
    JSON_WHO,
    JSON_WHO_CHANGED,
    JSON_STATUS,
    JSON_SEND,
    JSON_FINGERPRINT,
    JSON_DONE,
];

// ---- the values ---------------------------------------------------------------------------------

/// The value of `golden_envelope` in src/proto/relay.rs.
fn envelope() -> Envelope {
    Envelope {
        id: [2; 16],
        from: "a".into(),
        to: "b".into(),
        time_ms: 1,
        session: [3; 16],
        counter: 0,
        key_packet: None,
        ciphertext: vec![9],
    }
}

/// The header of the AEAD vectors.
fn header() -> Header<'static> {
    Header {
        id: &[1; 16],
        from: "a",
        to: "b",
        time_ms: 2,
        session: &[3; 16],
        counter: 4,
    }
}

/// The receipt of the message vector, with its tag.
fn vector_receipt() -> Receipt {
    Receipt {
        id: [1; 16],
        from: "b".into(),
        to: "a".into(),
        session: [3; 16],
        counter: 4,
        tag: TAG,
    }
}

fn sent() -> Sent {
    Sent {
        id: [0x11; 16],
        to: "bob".into(),
        state: MsgState::Queued,
    }
}

fn record_message() -> Record {
    Record {
        seq: 12,
        time_ms: 1_700_000_000_000,
        body: RecordBody::Message {
            id: [0xab; 16],
            from: "alice".into(),
            to: "bob".into(),
            dir: Dir::In,
            text: "hello".into(),
        },
    }
}

fn record_presence() -> Record {
    Record {
        seq: 13,
        time_ms: 1_700_000_001_000,
        body: RecordBody::Presence {
            user: "carol".into(),
            online: false,
        },
    }
}

fn record_receipt() -> Record {
    Record {
        seq: 14,
        time_ms: 1_700_000_002_000,
        body: RecordBody::Receipt {
            id: [0x11; 16],
            to: "zed".into(),
            state: MsgState::Failed,
            reason: Some("unknown_user: no user named zed".into()),
        },
    }
}

fn record_link() -> Record {
    Record {
        seq: 15,
        time_ms: 1_700_000_003_000,
        body: RecordBody::Link {
            up: true,
            reason: None,
            online: vec!["bob".into()],
            peers_online: 1,
        },
    }
}

fn record_link_down() -> Record {
    Record {
        seq: 16,
        time_ms: 1_700_000_004_000,
        body: RecordBody::Link {
            up: false,
            reason: Some("relay stopped answering".into()),
            online: vec![],
            peers_online: 0,
        },
    }
}

fn record_key() -> Record {
    Record {
        seq: 15,
        time_ms: 1_700_000_003_000,
        body: RecordBody::Key {
            user: "bob".into(),
            event: KeyEvent::Changed,
            fingerprint: FP2.into(),
            other: Some(FP.into()),
        },
    }
}

fn peer_view() -> PeerView {
    PeerView {
        user: "bob".into(),
        online: true,
        trust: "pinned".into(),
        fingerprint: FP.into(),
        presented: None,
    }
}

fn status_view() -> StatusView {
    StatusView {
        user: Some("alice".into()),
        fingerprint: FP.into(),
        roles: vec!["member".into()],
        relay: Some("127.0.0.1:9999".into()),
        connected: true,
        relay_error: None,
        listen: None,
        peers_online: 1,
        outbox_pending: 0,
        uptime_s: 42,
        version: "0.1.0".into(),
        state_dir: "/var/lib/chatd".into(),
        relay_fingerprint: None,
    }
}

fn trusted_message() -> String {
    format!("carol's key {FP} is trusted")
}

// ---- helpers ------------------------------------------------------------------------------------

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex length: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// `value` encodes to exactly `want`, and `want` decodes to exactly `value`.
fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T, want: &str) {
    let got = hex(&to_payload(value).expect("encode"));
    assert_eq!(got, want, "the encoding of {value:?} changed");
    let back: T = from_payload(&unhex(want)).expect("decode");
    assert_eq!(&back, value, "the decoding of {want} changed");
}

// ---- framing ------------------------------------------------------------------------------------

#[test]
fn frame_is_u32_big_endian_length_then_payload() {
    let mut out = Vec::new();
    frame::encode(&to_payload(&ToRelay::Ping).unwrap(), &mut out).unwrap();
    assert_eq!(hex(&out), FRAME_PING);
    assert_eq!(
        frame::decode(&out, MAX_FRAME).unwrap(),
        Decoded::Frame {
            payload: &unhex(TO_PING),
            consumed: 9
        }
    );
}

#[test]
fn frame_cap_is_one_mebibyte_inclusive() {
    assert_eq!(MAX_FRAME, 1_048_576);
    // Exactly 1 MiB is allowed (the decoder waits for the payload) ...
    let at_cap = (MAX_FRAME as u32).to_be_bytes();
    assert_eq!(
        frame::decode(&at_cap, MAX_FRAME).unwrap(),
        Decoded::NeedMore
    );
    // ... one byte more is refused from the header alone, before any payload arrives.
    let over = (MAX_FRAME as u32 + 1).to_be_bytes();
    assert!(matches!(
        frame::decode(&over, MAX_FRAME),
        Err(FrameError::TooLarge { len: 1_048_577, .. })
    ));
    // And nothing above the cap is ever encoded.
    let mut out = Vec::new();
    assert!(frame::encode(&vec![0; MAX_FRAME + 1], &mut out).is_err());
    assert!(out.is_empty());
}

// ---- relay socket -------------------------------------------------------------------------------

#[test]
fn relay_unit_variants() {
    check(&ToRelay::Ping, TO_PING);
    check(&FromRelay::Pong, FROM_PONG);
}

#[test]
fn relay_challenge() {
    let c = FromRelay::Challenge {
        nonce: [0; 32],
        version: "1".into(),
    };
    check(&c, FROM_CHALLENGE);
}

#[test]
fn relay_login() {
    let login = ToRelay::Login {
        user: "alice".into(),
        key: vec![0xaa; 4],
        signature: vec![0xbb; 4],
    };
    check(&login, TO_LOGIN);
}

#[test]
fn relay_welcome_with_one_peer() {
    let w = FromRelay::Welcome {
        user: "alice".into(),
        peers: vec![Peer {
            user: "bob".into(),
            key: vec![0xaa; 4],
            online: true,
        }],
    };
    check(&w, FROM_WELCOME);
}

fn bob_online() -> Peer {
    Peer {
        user: "bob".into(),
        key: vec![0xaa; 4],
        online: true,
    }
}

#[test]
fn relay_lookup_and_keys() {
    check(
        &ToRelay::Lookup(vec!["bob".into(), "zed".into()]),
        TO_LOOKUP,
    );
    let keys = FromRelay::Keys {
        peers: vec![bob_online()],
        unknown: vec!["zed".into()],
    };
    check(&keys, FROM_KEYS);
}

#[test]
fn relay_list_and_listing() {
    let list = ToRelay::List {
        after: "alice".into(),
        prefix: "".into(),
    };
    check(&list, TO_LIST);
    let listing = FromRelay::Listing {
        peers: vec![bob_online()],
        more: true,
    };
    check(&listing, FROM_LISTING);
}

#[test]
fn relay_presence() {
    let p = FromRelay::Presence(Peer {
        user: "carol".into(),
        key: vec![0xcc; 4],
        online: false,
    });
    check(&p, FROM_PRESENCE);
}

#[test]
fn relay_envelope_and_send() {
    check(&Routed::Message(envelope()), ROUTED_MESSAGE);
    let mut e = envelope();
    e.key_packet = Some(KeyPacket {
        wrapped: vec![0xdd; 2],
        signature: vec![0xee; 2],
    });
    check(&ToRelay::Send(Routed::Message(e)), TO_SEND_WITH_KEY_PACKET);
}

#[test]
fn relay_acknowledgements() {
    let accepted = FromRelay::Accepted(ItemKey {
        kind: Kind::Receipt,
        id: [1; 16],
    });
    check(&accepted, FROM_ACCEPTED);
    let refused = FromRelay::Refused {
        key: ItemKey {
            kind: Kind::Message,
            id: [2; 16],
        },
        code: "unknown_user".into(),
        reason: "no user named zed".into(),
    };
    check(&refused, FROM_REFUSED);
    let ack = ToRelay::Ack(ItemKey {
        kind: Kind::Message,
        id: [1; 16],
    });
    check(&ack, TO_ACK);
}

#[test]
fn relay_deliver_receipt() {
    let d = FromRelay::Deliver(Routed::Receipt(vector_receipt()));
    check(&d, FROM_DELIVER_RECEIPT);
}

#[test]
fn relay_error() {
    let e = FromRelay::Error {
        code: "timeout".into(),
        reason: "idle timeout".into(),
    };
    check(&e, FROM_ERROR);
}

// ---- control socket -----------------------------------------------------------------------------

#[test]
fn control_send() {
    let req = CtlRequest::Send {
        to: vec!["bob".into()],
        all: false,
        text: "hi".into(),
        wait: Wait::Relay,
        timeout_ms: 30_000,
    };
    check(&req, CTL_SEND);
}

#[test]
fn control_tail() {
    let req = CtlRequest::Tail {
        last: Some(10),
        since: None,
        with: Some("bob".into()),
        follow: true,
        kinds: vec![RecordKind::Message, RecordKind::Key],
    };
    check(&req, CTL_TAIL);
}

#[test]
fn control_other_requests() {
    check(&CtlRequest::Who, CTL_WHO);
    check(
        &CtlRequest::Directory {
            prefix: Some("b".into()),
        },
        CTL_DIRECTORY,
    );
    check(&CtlRequest::Status, CTL_STATUS);
    check(&CtlRequest::Fingerprint { user: None }, CTL_FINGERPRINT);
    let trust = CtlRequest::Trust {
        user: "carol".into(),
        fingerprint: FP.into(),
    };
    check(&trust, CTL_TRUST);
    let forget = CtlRequest::Forget {
        user: "carol".into(),
    };
    check(&forget, CTL_FORGET);
}

#[test]
fn control_sent_and_error() {
    check(&CtlResponse::Sent(vec![sent()]), RESP_SENT);
    let err = CtlResponse::Error {
        kind: ErrorKind::Timeout,
        message: "timed out".into(),
        sent: vec![sent()],
    };
    check(&err, RESP_ERROR);
}

#[test]
fn control_records_and_end() {
    check(&CtlResponse::Record(record_message()), RESP_RECORD_MESSAGE);
    check(
        &CtlResponse::Record(record_presence()),
        RESP_RECORD_PRESENCE,
    );
    check(&CtlResponse::Record(record_receipt()), RESP_RECORD_RECEIPT);
    check(&CtlResponse::Record(record_link()), RESP_RECORD_LINK);
    check(&CtlResponse::Record(record_key()), RESP_RECORD_KEY);
    check(&CtlResponse::End, RESP_END);
}

#[test]
fn control_other_responses() {
    check(&CtlResponse::Peers(vec![peer_view()]), RESP_PEERS);
    check(&CtlResponse::Status(status_view()), RESP_STATUS);
    let fp = CtlResponse::Fingerprint {
        user: "alice".into(),
        fingerprint: FP.into(),
    };
    check(&fp, RESP_FINGERPRINT);
    check(&CtlResponse::Done(trusted_message()), RESP_DONE);
}

/// What PROTOCOL.md promises about decoding: keys in any order, unknown keys ignored, absent
/// optional fields read as nil, any integer width; but fixed-size ids must have their size.
#[test]
fn decoder_tolerance() {
    // `Ack` with its keys swapped and an unknown key added.
    let mut ack = unhex("81a341636b83a26964c410");
    ack.extend_from_slice(&[1; 16]);
    ack.extend_from_slice(&unhex("a46b696e64a74d657373616765a56578747261c3"));
    assert_eq!(
        from_payload::<ToRelay>(&ack).unwrap(),
        ToRelay::Ack(ItemKey {
            kind: Kind::Message,
            id: [1; 16]
        })
    );
    // `Tail` with only `follow`, and then with `last` as a uint64.
    let tail = |hex: &str| from_payload::<CtlRequest>(&unhex(hex)).unwrap();
    assert_eq!(
        tail("81a45461696c81a6666f6c6c6f77c2"),
        CtlRequest::Tail {
            last: None,
            since: None,
            with: None,
            follow: false,
            kinds: Vec::new(),
        }
    );
    assert_eq!(
        tail("81a45461696c82a46c617374cf0000000000000005a6666f6c6c6f77c2"),
        CtlRequest::Tail {
            last: Some(5),
            since: None,
            with: None,
            follow: false,
            kinds: Vec::new(),
        }
    );
    // A 15-byte id is an error, not a panic and not a truncation.
    let mut short = unhex("81a341636b82a46b696e64a74d657373616765a26964c40f");
    short.extend_from_slice(&[1; 15]);
    assert!(from_payload::<ToRelay>(&short).is_err());
    // A missing non-optional field is an error.
    assert!(
        from_payload::<CtlResponse>(&unhex("81a54572726f7281a46b696e64a64661696c6564")).is_err()
    );
}

// ---- cryptography -------------------------------------------------------------------------------

#[test]
fn fingerprint_is_sha256_base64_unpadded() {
    assert_eq!(Fingerprint::of_spki(b"").to_string(), FP);
    assert_eq!(Fingerprint::parse(FP).unwrap(), Fingerprint::of_spki(b""));
}

#[test]
fn login_transcript_bytes() {
    assert_eq!(
        hex(&login_transcript(&[7; 32], "alice", &[9; 32])),
        LOGIN_TRANSCRIPT
    );
}

/// The request bob (`b`) sends alice (`a`) for the key of session `[3; 16]`, having dropped
/// message `[1; 16]`; a 2-byte stand-in for the signature.
#[test]
fn rekey_bytes() {
    let r = Routed::Rekey(Rekey {
        id: [1; 16],
        from: "b".into(),
        to: "a".into(),
        session: [3; 16],
        signature: vec![0xee, 0xee],
    });
    check(&r, ROUTED_REKEY);
    assert_eq!(
        hex(&rekey_transcript(&[1; 16], "b", "a", &[3; 16])),
        REKEY_TRANSCRIPT
    );
}

#[test]
fn message_ad_bytes() {
    assert_eq!(hex(&message_ad(&header())), MESSAGE_AD);
}

#[test]
fn aead_vectors() {
    let k = SessionKey::from_bytes(&KEY).unwrap();
    assert_eq!(
        hex(&seal_envelope(&k, &header(), b"hi")),
        MESSAGE_CIPHERTEXT
    );
    let tag = receipt_tag(&k, &[1; 16], "b", "a", &[3; 16], 4);
    assert_eq!(hex(&tag), RECEIPT_TAG);
    assert_eq!(tag, TAG);
    let r = Receipt {
        tag,
        ..vector_receipt()
    };
    verify_receipt(&k, &r).unwrap();
}

/// The vectors open again, and nothing else does: a changed byte anywhere in the ciphertext or
/// its tag, a cut ciphertext (down to nothing), another counter, a changed receipt tag.
#[test]
fn aead_vectors_open_and_nothing_else_does() {
    let k = SessionKey::from_bytes(&KEY).unwrap();
    let h = header();
    let env = |ciphertext: Vec<u8>, counter: u64| chatd::proto::relay::Envelope {
        id: *h.id,
        from: h.from.into(),
        to: h.to.into(),
        time_ms: h.time_ms,
        session: *h.session,
        counter,
        key_packet: None,
        ciphertext,
    };
    let ct = unhex(MESSAGE_CIPHERTEXT);
    assert_eq!(open_envelope(&k, &env(ct.clone(), 4)).unwrap(), b"hi");
    for i in 0..ct.len() {
        let mut bad = ct.clone();
        bad[i] ^= 0x01;
        assert!(open_envelope(&k, &env(bad, 4)).is_err(), "byte {i} changed");
    }
    for n in 0..ct.len() {
        assert!(
            open_envelope(&k, &env(ct[..n].to_vec(), 4)).is_err(),
            "cut to {n}"
        );
    }
    assert!(open_envelope(&k, &env(ct, 5)).is_err(), "another counter");
    let good = vector_receipt();
    for i in 0..16 {
        let mut r = good.clone();
        r.tag[i] ^= 0x80;
        assert!(verify_receipt(&k, &r).is_err(), "tag byte {i} changed");
    }
    let mut r = good.clone();
    r.counter = 5;
    assert!(verify_receipt(&k, &r).is_err(), "another counter");
    verify_receipt(&k, &good).unwrap();
}

/// The transcript layout and the RSA parameters of PROTOCOL.md, checked with the `rsa` crate
/// directly: a second implementation that follows the document interoperates.
#[test]
fn key_packet_and_login_follow_the_documented_rsa_parameters() {
    let mut rng = rand::thread_rng();
    let alice = Identity::generate(&mut rng, 2048).unwrap();
    let bob = Identity::generate(&mut rng, 2048).unwrap();
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let session = [3u8; 16];
    let kp = make_key_packet(
        &mut rng,
        &alice,
        "alice",
        "bob",
        bob.public(),
        &session,
        &key,
    )
    .unwrap();

    // Key-packet transcript, built from the document.
    let field = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    };
    let mut t = b"chatd-keypacket-v1\0".to_vec();
    field(&mut t, b"alice");
    field(&mut t, b"bob");
    field(&mut t, &Sha256::digest(bob.public().der()));
    field(&mut t, &session);
    field(&mut t, &kp.wrapped);

    // RSASSA-PSS, SHA-256, MGF1-SHA-256, salt length 32, over the transcript.
    let alice_pub = RsaPublicKey::from_public_key_der(alice.public().der()).unwrap();
    alice_pub
        .verify(
            Pss::new_with_salt::<Sha256>(32),
            &Sha256::digest(&t),
            &kp.signature,
        )
        .expect("key packet signature over the documented transcript");
    alice.public().verify(&t, &kp.signature).unwrap();

    // RSAES-OAEP, SHA-256, MGF1-SHA-256, empty label: unwraps to the 32-byte session key.
    let bob_priv = RsaPrivateKey::from_pkcs8_pem(&bob.to_pem().unwrap()).unwrap();
    let unwrapped = bob_priv
        .decrypt(Oaep::new::<Sha256>(), &kp.wrapped)
        .unwrap();
    assert_eq!(unwrapped, KEY);
    assert_eq!(kp.wrapped.len(), 256);
    assert_eq!(kp.signature.len(), 256);

    // The login signature is the same PSS over the login transcript.
    let lt = login_transcript(&[7; 32], "alice", &[9; 32]);
    let sig = alice.sign(&mut rng, &lt).unwrap();
    alice_pub
        .verify(Pss::new_with_salt::<Sha256>(32), &Sha256::digest(&lt), &sig)
        .expect("login signature over the documented transcript");
}

// ---- chatctl --json -----------------------------------------------------------------------------

#[test]
fn json_lines() {
    assert_eq!(format::record_json(&record_message()), JSON_MESSAGE);
    assert_eq!(format::record_json(&record_presence()), JSON_PRESENCE);
    assert_eq!(format::record_json(&record_receipt()), JSON_RECEIPT);
    assert_eq!(format::record_json(&record_link()), JSON_LINK);
    assert_eq!(format::record_json(&record_link_down()), JSON_LINK_DOWN);
    assert_eq!(format::record_json(&record_key()), JSON_KEY);
    assert_eq!(format::peers(&[peer_view()], true), vec![JSON_WHO]);
    let mut changed = peer_view();
    changed.online = false;
    changed.trust = "changed".into();
    changed.presented = Some(Fingerprint::of_spki(b"x").to_string());
    assert_eq!(format::peers(&[changed], true), vec![JSON_WHO_CHANGED]);
    assert_eq!(format::status(&status_view(), true), vec![JSON_STATUS]);
    assert_eq!(format::sent(&[sent()], true), vec![JSON_SEND]);
    assert_eq!(format::fingerprint("alice", FP, true), JSON_FINGERPRINT);
    assert_eq!(format::done(&trusted_message(), true), JSON_DONE);
}

// ---- the document -------------------------------------------------------------------------------

/// The fenced blocks of `docs/PROTOCOL.md` whose info string is `lang`, as lists of lines.
fn blocks(lang: &str) -> Vec<Vec<String>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md");
    let doc = std::fs::read_to_string(path).expect("docs/PROTOCOL.md");
    let mut out = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in doc.lines() {
        let trimmed = line.trim();
        match current.as_mut() {
            None if trimmed.starts_with("```") && trimmed[3..].trim() == lang => {
                current = Some(Vec::new())
            }
            Some(_) if trimmed == "```" => out.extend(current.take()),
            Some(lines) => lines.push(line.to_string()),
            None => {}
        }
    }
    assert!(current.is_none(), "unclosed ```{lang} block in PROTOCOL.md");
    out
}

/// A ```hex block holds hex digits, with spaces and line breaks anywhere and a `#` comment at
/// the end of any line; its value is the digits alone.
fn hex_block_value(lines: &[String]) -> String {
    let mut v = String::new();
    for line in lines {
        let code = line.split('#').next().unwrap_or("");
        for c in code.chars().filter(|c| !c.is_whitespace()) {
            assert!(
                c.is_ascii_hexdigit(),
                "{c:?} in a ```hex block of PROTOCOL.md: {line}"
            );
            v.push(c.to_ascii_lowercase());
        }
    }
    v
}

#[test]
fn protocol_md_holds_every_golden_hex_and_no_other() {
    let in_doc: Vec<String> = blocks("hex").iter().map(|b| hex_block_value(b)).collect();
    for (name, golden) in ALL_HEX {
        assert!(
            in_doc.iter().any(|b| b == golden),
            "docs/PROTOCOL.md has no ```hex block for {name}: {golden}"
        );
    }
    for b in &in_doc {
        assert!(
            ALL_HEX.iter().any(|(_, golden)| golden == b),
            "docs/PROTOCOL.md has a ```hex block that no test pins: {b}"
        );
    }
}

#[test]
fn protocol_md_holds_every_golden_json_line_and_no_other() {
    let lines: Vec<String> = blocks("json")
        .into_iter()
        .flatten()
        .filter(|l| !l.trim().is_empty())
        .collect();
    for golden in ALL_JSON {
        assert!(
            lines.iter().any(|l| l == golden),
            "docs/PROTOCOL.md has no ```json line {golden}"
        );
    }
    for l in &lines {
        assert!(
            ALL_JSON.contains(&l.as_str()),
            "docs/PROTOCOL.md has a ```json line that no test pins: {l}"
        );
    }
}

#[test]
fn protocol_md_holds_the_fingerprint_vector() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md"))
        .expect("docs/PROTOCOL.md");
    assert!(
        doc.contains(FP),
        "docs/PROTOCOL.md lacks the fingerprint vector {FP}"
    );
}

/// The codes in the tables of PROTOCOL.md section 5, in order: `(error codes, refusal codes)`.
fn documented_codes() -> (Vec<String>, Vec<String>) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md");
    let doc = std::fs::read_to_string(path).expect("docs/PROTOCOL.md");
    let table = |head: &str| -> Vec<String> {
        let start = doc
            .find(head)
            .unwrap_or_else(|| panic!("PROTOCOL.md lacks {head}"));
        doc[start..]
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| {
                let cell = l.split('|').nth(1)?.trim();
                Some(cell.strip_prefix('`')?.strip_suffix('`')?.to_string())
            })
            .collect()
    };
    (table("**`Error` codes**"), table("**`Refused` codes**"))
}

/// Every code the relay can send is documented, and the document names no code the code lacks:
/// the protocol words are enums, and this keeps the enums and section 5 the same list.
#[test]
fn protocol_md_lists_exactly_the_known_codes() {
    use chatd::proto::codes::{ErrorCode, RefuseCode};
    let (errors, refusals) = documented_codes();
    let known_errors: Vec<String> = ErrorCode::KNOWN.iter().map(|c| c.to_string()).collect();
    let known_refusals: Vec<String> = RefuseCode::KNOWN.iter().map(|c| c.to_string()).collect();
    assert_eq!(errors, known_errors, "PROTOCOL.md section 5, Error codes");
    assert_eq!(
        refusals, known_refusals,
        "PROTOCOL.md section 5, Refused codes"
    );
}
