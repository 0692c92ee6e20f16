#!/usr/bin/env bash
# The network benchmark in the nested harness (not a test): `cevm bench
# net-linux` for cevm (throughput, round trip, downtime under network load),
# then QEMU's userspace virtio-net and vhost-net (throughput, round trip), each
# in an L1 of its own (see scenarios/bench-net.sh), one after the other on this
# machine. Prints each L1's tables; the JSON goes to bench-work/net/.
#   scripts/nested/bench-net.sh [--runs N] [--ops N] [--stream-mib N]   (~25 min here)
# Other arguments go to every `cevm bench net-linux`.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p cevm -p cevm-bench
extra=$(echo "$*" | sed 's/ \+/,/g')
mkdir -p bench-work/net
for case in cevm:throughput,downtime qemu-userspace:throughput qemu-vhost:throughput; do
    vmm=${case%%:*}; parts=${case#*:}
    echo "== $vmm: $parts"
    scripts/nested/run.sh scripts/nested/scenarios/bench-net.sh --npt 0 --with-qemu --timeout 2400 \
        --bin target/release/cevm-bench --out bench-work/net \
        --append "cevm.vmms=$vmm cevm.parts=$parts${extra:+ cevm.bench=$extra}" |
        grep -E '^(\||  |    |QEMU|Two|Downtime|cevm /|migration|CEVM|\(medians|bench:|vhost)' || true
done
