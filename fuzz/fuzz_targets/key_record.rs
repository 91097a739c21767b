//! Fuzz target `key_record`: the body is [`checks::key_record`], shared with the seed test (tests/fuzz_seeds.rs).
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::key_record(data));
