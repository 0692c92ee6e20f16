mkdir -p /tmp/bench
: > /tmp/exp.log
tail -F /tmp/exp.log 2>/dev/null | sed 's/^/EXPLINE /' &
$CEVM bench net-linux --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --vmms cevm --parts downtime --ops 3 --dir /tmp/bench --json "$OUT/net-exp.json"
echo "bench: exit=$?"
sleep 2
