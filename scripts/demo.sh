#!/usr/bin/env bash
# Quick start, command 1: boot the built-in digest guest, checkpoint it live,
# SIGKILL its VMM, restore it, and show the restored run's digest equals an
# undisturbed run's.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet -p cevm
exec target/release/cevm demo "$@"
