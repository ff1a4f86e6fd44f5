//! Fuzz target: the member core fed hostile frames from the relay: `Member::receive` in every
//! link state.
//! The checks live in `chatd_fuzz::member_core` (`fuzz/src/lib.rs`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatd_fuzz::member_core(data));
