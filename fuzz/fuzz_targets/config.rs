//! Fuzz target `config`: the body is [`checks::config`], shared with the seed test (tests/fuzz_seeds.rs).
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::config(data));
