//! Fuzz target: the frame codec: `frame::decode` (any cap), a stream split into frames, and
//! the blocking `frame::read_from` over a reader that returns short reads and errors.
//! The checks live in `chatd_fuzz::frame` (`fuzz/src/lib.rs`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatd_fuzz::frame(data));
