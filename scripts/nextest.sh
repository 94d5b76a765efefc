#!/usr/bin/env bash
# Runs cargo-nextest, installing it from crates.io first if this machine lacks it.
set -euo pipefail
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
exec cargo nextest "$@"
