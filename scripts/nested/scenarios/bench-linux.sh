# Benchmark scenario (not a test), run with:
#   scripts/nested/run.sh scripts/nested/scenarios/bench-linux.sh
# Measures, from L1's clock: a Linux guest's boot time to init (median of 5), and
# the stop-and-save pause of a 512 MiB Linux guest with 256 MiB of it filled
# (median of 5 checkpoints, cevm's own report).
up() { cut -d' ' -f1 /proc/uptime; }
cmd="console=ttyS0 reboot=acpi panic=-1 pci=off quiet"
for i in 1 2 3 4 5; do
    t0=$(up)
    $CEVM run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --mem 256M --cmdline "$cmd cevm.test=boot" > /tmp/boot.txt 2>&1 &
    pid=$!
    while ! grep -q "cevm-guest: init" /tmp/boot.txt; do sleep 0.05; done
    t1=$(up)
    wait $pid
    echo "bench: boot-to-init run $i: $(echo "$t1 - $t0" | bc 2>/dev/null || awk "BEGIN {print $t1 - $t0}") s"
done
$CEVM run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --mem 512M --api-sock /tmp/api.sock \
    --cmdline "$cmd cevm.test=compute cevm.steps=100000 cevm.fill=256" > /tmp/big.txt 2>&1 &
pid=$!
while ! grep -q "step 2/" /tmp/big.txt; do sleep 0.2; done
for i in 1 2 3 4 5; do
    $CEVM checkpoint --api-sock /tmp/api.sock --out /tmp/ckpt > /tmp/ck.json
    echo "bench: stop-and-save 512M run $i: pause_ms=$(grep '"pause_ms"' /tmp/ck.json | tr -dc '0-9.') data_pages=$(grep '"data_pages"' /tmp/ck.json | tr -dc '0-9')"
    rm -rf /tmp/ckpt
done
$CEVM quit --api-sock /tmp/api.sock > /dev/null
wait $pid
