//! Fuzz target: `ToRelay` (and `Routed`) payloads, as the relay decodes them from anyone on its
//! port.
//! The checks live in `chatd_fuzz::to_relay` (`fuzz/src/lib.rs`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatd_fuzz::to_relay(data));
