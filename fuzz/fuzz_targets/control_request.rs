//! Fuzz target: `CtlRequest` payloads, as `chatd` decodes them from a control-socket client.
//! The checks live in `chatd_fuzz::control_request` (`fuzz/src/lib.rs`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatd_fuzz::control_request(data));
