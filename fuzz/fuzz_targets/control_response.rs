//! Fuzz target: `CtlResponse` payloads, as `chatctl` decodes them from `chatd`.
//! The checks live in `chatd_fuzz::control_response` (`fuzz/src/lib.rs`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatd_fuzz::control_response(data));
