//! Fuzz target `router`: the body is [`checks::router`], shared with the seed test (tests/fuzz_seeds.rs).
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::router(data));
