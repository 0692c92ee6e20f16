mkdir -p /tmp/bench
$CEVM bench net-linux --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --qemu /usr/bin/qemu-system-x86_64 --vmms cevm,qemu-userspace --parts throughput --runs 2 --dir /tmp/bench --json "$OUT/net-tp.json"
echo "bench: exit=$?"
