#!/usr/bin/env bash
# The network benchmark in the nested harness (not a test): `cevm bench
# net-linux`. First the throughput and round trip of cevm's virtio-net, QEMU's
# userspace virtio-net and QEMU's vhost-net, their runs alternating in one L1
# (so the noise of this shared machine falls on all three alike); then cevm's
# downtime under network load in a second L1 (see scenarios/bench-net.sh). An
# L1 that does not finish (this harness's L1 now and then locks up while KVM
# guests run for minutes) is started once more. Prints each L1's tables; the
# JSON and each L1's whole output (PART.ATTEMPT.log) go to bench-work/net/.
#   scripts/nested/bench-net.sh [--runs N] [--ops N] [--stream-mib N]   (~10 min here)
# Other arguments go to every `cevm bench net-linux`.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p cevm -p cevm-bench
extra=$(echo "$*" | sed 's/ \+/,/g')
mkdir -p bench-work/net
rm -f bench-work/net/net-*.json bench-work/net/*.log bench-work/net/*l1-watchdog.txt
failed=0
for case in cevm,qemu-userspace,qemu-vhost:throughput cevm:downtime; do
    vmms=${case%%:*}; parts=${case#*:}
    for attempt in 1 2; do
        log="bench-work/net/$parts.$attempt.log"
        echo "== $vmms: $parts (attempt $attempt; whole output in $log)"
        scripts/nested/run.sh scripts/nested/scenarios/bench-net.sh --npt 0 --with-qemu --timeout 2400 \
            --bin target/release/cevm-bench --out bench-work/net \
            --append "cevm.vmms=$vmms cevm.parts=$parts${extra:+ cevm.bench=$extra}" 2>&1 | tee "$log" |
            grep --line-buffered -E '^(\||  |    |QEMU|Two|Downtime|cevm /|migration|CEVM|\(medians|bench:|vhost)' || true
        if [ -f bench-work/net/l1-watchdog.txt ]; then
            mv bench-work/net/l1-watchdog.txt "bench-work/net/$parts.$attempt.l1-watchdog.txt"
        fi
        # An L1 that ended without the benchmark's last line locked up or
        # crashed: once more. A benchmark that ended with an error is not retried.
        if grep -q '^bench: exit=' "$log"; then break; fi
        echo "== $vmms: $parts: L1 did not finish; its last lines:"
        tail -n 15 "$log"
    done
    if ! grep -q '^bench: exit=0' "$log"; then
        echo "== $vmms: $parts FAILED (see $log)"
        failed=1
    fi
done
exit "$failed"
