//! Fuzz target: the relay core fed hostile frames: `Relay::receive` before and after login.
//! The checks live in `chatd_fuzz::relay_core` (`fuzz/src/lib.rs`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatd_fuzz::relay_core(data));
