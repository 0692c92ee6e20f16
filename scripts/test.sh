#!/usr/bin/env bash
# Quick start, command 2: every check CI runs. Formatting, clippy with warnings
# as errors, and the whole test suite (unit tests and tests that boot real guests
# on /dev/kvm).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --tests
export RUSTFLAGS="-D warnings"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --release
