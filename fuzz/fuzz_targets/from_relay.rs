//! Fuzz target: `FromRelay` payloads, as a member decodes them from the (untrusted) relay.
//! The checks live in `chatd_fuzz::from_relay` (`fuzz/src/lib.rs`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatd_fuzz::from_relay(data));
