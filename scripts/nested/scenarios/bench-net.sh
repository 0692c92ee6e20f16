# Benchmark scenario (not a test): `cevm bench net-linux` in L1, two Linux
# guests on a bridge of taps. Which VMMs and parts come from L1's command line
# (cevm.vmms=, cevm.parts=, as run.sh --append passes them):
# scripts/nested/bench-net.sh runs the throughput part in one L1 and the
# downtime part in another (an L1 that runs KVM guests for minutes now and then
# crashes or hangs in this harness; one such end then costs one part, not
# both). L1 loads vhost_net for QEMU's vhost=on.
mkdir -p /tmp/bench
vmms=cevm; parts=throughput,downtime; extra=
for a in $(cat /proc/cmdline); do
    case "$a" in
    cevm.vmms=*) vmms="${a#cevm.vmms=}" ;;
    cevm.parts=*) parts="${a#cevm.parts=}" ;;
    cevm.bench=*) extra="$extra $(echo "${a#cevm.bench=}" | tr , ' ')" ;;
    esac
done
$CEVM bench net-linux --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --qemu /usr/bin/qemu-system-x86_64 \
    --vmms "$vmms" --parts "$parts" --dir /tmp/bench --json "$OUT/net-$(echo "$parts" | tr , -).json" $extra
echo "bench: exit=$?"
