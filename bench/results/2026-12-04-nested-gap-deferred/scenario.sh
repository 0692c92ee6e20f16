mkdir -p /tmp/bench
# Alternating: the release build's behaviour, then the old instance's teardown
# (thread-based migration) and the CEVM writer's start (CEVM thread) deferred
# 600 ms past the switch.
for i in 1 2 3; do
  cevm-bench compare --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --dir /tmp/bench --json "$OUT/base$i.json" --cases 256M:idle --methods cevm-migrate-thread,cevm-thread --runs 3
  grep -h EXPERIMENT /tmp/bench/*.log | wc -l > "$OUT/exp-lines-base$i.txt"
  CEVM_EXP_DEFER_MS=600 cevm-bench compare --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --dir /tmp/bench --json "$OUT/defer$i.json" --cases 256M:idle --methods cevm-migrate-thread,cevm-thread --runs 3
  grep -h EXPERIMENT /tmp/bench/*.log | wc -l > "$OUT/exp-lines-defer$i.txt"
done
