//! Fuzz target `usage_scanner`: the body is [`checks::usage_scanner`], shared with the seed test (tests/fuzz_seeds.rs).
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::usage_scanner(data));
