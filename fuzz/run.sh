#!/usr/bin/env bash
# A longer fuzzing run: bash fuzz/run.sh TARGET [SECONDS] (default 600), TARGET one of
# usage_scanner, config, key_record, router. Needs cargo-fuzz (`cargo install cargo-fuzz`);
# RUSTC_BOOTSTRAP=1 lets a stable toolchain take its sanitizer flags. New inputs go to
# fuzz/work/TARGET (ignored by git): the seeds in fuzz/corpus/TARGET are read, not written.
# A failing input lands in fuzz/artifacts/TARGET; tests/it/fuzz_seeds.rs runs those too, so
# `cargo test --test it fuzz_seeds` reproduces it. Once fixed, copy it into fuzz/corpus/TARGET
# under a name that says what it found.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: bash fuzz/run.sh usage_scanner|config|key_record|router [seconds]}
mkdir -p "work/$target"
RUSTC_BOOTSTRAP=1 exec cargo fuzz run "$target" "work/$target" "corpus/$target" -- \
  -max_total_time="${2:-600}" -print_final_stats=1
