#!/usr/bin/env bash
# The network benchmark in the nested harness (not a test): `cevm bench
# net-linux`. First the throughput and round trip of cevm's virtio-net, QEMU's
# userspace virtio-net and QEMU's vhost-net, their runs alternating in one L1
# (so the noise of this shared machine falls on all three alike); then cevm's
# downtime under network load in a second L1 (see scenarios/bench-net.sh). An
# L1 that does not finish (this harness's L1 now and then locks up while KVM
# guests run for minutes) is started once more. Prints each L1's tables; the
# JSON and each L1's whole output go to bench-work/net/.
#   scripts/nested/bench-net.sh [--runs N] [--ops N] [--stream-mib N]   (~10 min here)
# Other arguments go to every `cevm bench net-linux`.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p cevm -p cevm-bench
extra=$(echo "$*" | sed 's/ \+/,/g')
mkdir -p bench-work/net
for case in cevm,qemu-userspace,qemu-vhost:throughput cevm:downtime; do
    vmms=${case%%:*}; parts=${case#*:}
    log="bench-work/net/$parts.log"
    for attempt in 1 2; do
        echo "== $vmms: $parts (attempt $attempt; whole output in $log)"
        scripts/nested/run.sh scripts/nested/scenarios/bench-net.sh --npt 0 --with-qemu --timeout 2400 \
            --bin target/release/cevm-bench --out bench-work/net \
            --append "cevm.vmms=$vmms cevm.parts=$parts${extra:+ cevm.bench=$extra}" > "$log" 2>&1 || true
        grep -E '^(\||  |    |QEMU|Two|Downtime|cevm /|migration|CEVM|\(medians|bench:|vhost)' "$log" || true
        if grep -q '^bench: exit=0' "$log"; then break; fi
        echo "== $vmms: $parts did not finish; its last lines:"
        tail -n 15 "$log"
    done
done
