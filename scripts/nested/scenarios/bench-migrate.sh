# Benchmark scenario (not a test): live migration of a 256 MiB Linux guest, idle
# and dirtying, by cevm (thread- and process-based) and by QEMU in the same run,
# on L1's nested /dev/kvm (load kvm_amd with npt=0: dirty tracking under nested
# paging loses writes in this harness, see NESTED.md). Run with:
#   scripts/nested/run.sh scripts/nested/scenarios/bench-migrate.sh --npt 0 --with-qemu --timeout 3000 \
#       --bin target/release/cevm-bench   (`cevm bench` runs the cevm-bench beside cevm)
mkdir -p /tmp/bench
$CEVM bench migrate-linux --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --qemu /usr/bin/qemu-system-x86_64 \
    --dir /tmp/bench
echo "bench: exit=$?"
