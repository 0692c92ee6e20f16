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
    n=0
    while ! grep -q "cevm-guest: init" /tmp/boot.txt; do
        sleep 0.05; n=$((n + 1))
        if [ $n -gt 1200 ]; then echo "bench: boot run $i did not reach init in 60 s:"; cat /tmp/boot.txt; kill -9 $pid; break; fi
    done
    t1=$(up)
    wait $pid
    echo "bench: boot-to-init run $i: $(echo "$t1 - $t0" | bc 2>/dev/null || awk "BEGIN {print $t1 - $t0}") s"
done
$CEVM run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --mem 512M --api-sock /tmp/api.sock \
    --cmdline "$cmd cevm.test=compute cevm.steps=100000 cevm.fill=256" > /tmp/big.txt 2>&1 &
pid=$!
n=0
while ! grep -q "step 2/" /tmp/big.txt; do
    sleep 0.2; n=$((n + 1))
    if [ $n -gt 3000 ]; then echo "bench: the 512M guest did not start computing in 600 s:"; cat /tmp/big.txt; kill -9 $pid; exit 1; fi
done
for i in 1 2 3 4 5; do
    $CEVM checkpoint --api-sock /tmp/api.sock --out /tmp/ckpt > /tmp/ck.json
    echo "bench: stop-and-save 512M run $i: pause_ms=$(grep '"pause_ms"' /tmp/ck.json | tr -dc '0-9.') data_pages=$(grep '"data_pages"' /tmp/ck.json | tr -dc '0-9')"
    rm -rf /tmp/ckpt
done
$CEVM quit --api-sock /tmp/api.sock > /dev/null
wait $pid
