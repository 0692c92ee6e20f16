#!/usr/bin/env bash
# Runs cevm's whole benchmark (`cevm bench all`): installs what it needs, builds
# cevm, and writes bench/results/<date>-<host>.{json,md} and plots.
#   scripts/bench.sh --quick    under 5 minutes on the project's machines
#   scripts/bench.sh            the full plan (2 to 3.5 hours there: see the
#                               README); updates the README's headline table
# Other arguments go to `cevm bench all` (see `cevm bench all --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --bench
cargo build --release -p cevm -p cevm-bench
exec target/release/cevm bench all "$@"
