#!/usr/bin/env bash
# Runs the fuzz targets (the DNS request path, the records write path, the HTTP/1 request reader), each for a bounded
# time (FUZZ_SECONDS, default 60) from its committed seeds, on the stable toolchain (RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z flags;
# no other toolchain is needed). Installs cargo-fuzz from crates.io when missing.
# A crash fails the run and leaves its input under fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz --version 0.13.2
fi
# Its own target dir: the fuzz build uses other flags and would evict the workspace's build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/portcullis-target}-fuzz"
# Each target from its seeds, in a corpus of its own.
for target in dns_request record_write http1_request; do
  corpus=$(mktemp -d)
  cp fuzz/seeds/"$target"/* "$corpus"/
  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "$corpus" -- \
    -max_total_time="${FUZZ_SECONDS:-60}" -print_final_stats=1 2>&1 | grep -v "^#[0-9]")
  rm -rf "$corpus"
done
