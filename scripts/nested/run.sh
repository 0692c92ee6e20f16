#!/usr/bin/env bash
# The nested test harness. This machine's /dev/kvm (PVM) cannot run a Linux
# guest, so: QEMU with TCG and -cpu max (which emulates AMD SVM) boots the Debian
# kernel as L1; L1 loads kvm_amd (and tun, bridge and vhost_net, for scenarios that put
# guests on a network) and runs SCENARIO (a shell script) with $CEVM,
# $GUEST_KERNEL and $GUEST_INITRD; cevm boots the Linux guest inside L1.
# Everything L1 prints (cevm's stderr and the guest's console included) goes to
# our stdout. Exits with the scenario's status (124 on timeout).
# Files given with --in are in $DATA inside L1; what the scenario leaves in $OUT
# is copied to the --out directory (through a transfer disk).
#
# usage: scripts/nested/run.sh SCENARIO.sh [--cevm PATH] [--npt 0|1] [--timeout SECONDS]
#                              [--verbose] [--with-qemu] [--mem MIB] [--append ARGS] [--in FILE]... [--out DIR]
#                              [--bin PATH]...
# --bin puts another program into L1's /bin (e.g. cevm-bench, beside cevm).
# --with-qemu puts this machine's qemu-system-x86_64 (and its firmware) into L1
# too, for benchmarks that compare with QEMU on the same nested /dev/kvm.
# --mem sets L1's memory (default 4096 MiB); --append adds to L1's kernel command line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
top="$(cd "$here/../.." && pwd)"
scenario="$1"; shift
cevm="$top/target/release/cevm"; npt=1; timeout=900; l1_quiet=quiet; inputs=(); outdir=; with_qemu=0; l1_mem=4096; l1_append=; extra_bins=()
while [ $# -gt 0 ]; do
    case "$1" in
    --cevm) cevm="$2"; shift 2 ;;
    --npt) npt="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --verbose) l1_quiet="loglevel=7"; shift ;;
    --with-qemu) with_qemu=1; shift ;;
    --mem) l1_mem="$2"; shift 2 ;;
    --append) l1_append="$2"; shift 2 ;;
    --in) inputs+=("$2"); shift 2 ;;
    --out) outdir="$2"; shift 2 ;;
    --bin) extra_bins+=("$2"); shift 2 ;;
    *) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
kdir="$top/$("$top/scripts/guest-kernel.sh")"
initrd="$top/$("$top/scripts/nested/guest-initrd.sh")"
mods="$kdir/modules/kernel"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,proc,sys,dev,tmp,guest,lib/modules}
cp /bin/busybox "$root/bin/busybox"
cp "$here/l1-init" "$root/init"
cp "$scenario" "$root/scenario.sh"
# Without their debug info (symbols stay, for backtraces): a release build's is
# five times the code, and L1 unpacks its initramfs under TCG.
put_bin() { if command -v strip >/dev/null; then strip --strip-debug -o "$2" "$1"; else cp "$1" "$2"; fi; }
put_bin "$cevm" "$root/bin/cevm"
bins=("$cevm")
for b in ${extra_bins[@]+"${extra_bins[@]}"}; do
    put_bin "$b" "$root/bin/$(basename "$b")"
    bins+=("$b")
done
if [ "$with_qemu" = 1 ]; then
    qemu=$(command -v qemu-system-x86_64) || { echo "run.sh: --with-qemu: qemu-system-x86_64 is not installed (scripts/setup.sh --tests)" >&2; exit 2; }
    # At its host path: QEMU finds its firmware relative to its own location.
    mkdir -p "$root/usr/bin"
    cp "$qemu" "$root/usr/bin/qemu-system-x86_64"
    bins+=("$qemu")
    mkdir -p "$root/usr/share"
    cp -rL /usr/share/qemu /usr/share/seabios "$root/usr/share/"
fi
# The shared libraries, at the paths the dynamic loader looks for them.
for lib in $(for b in "${bins[@]}"; do ldd "$b"; done | awk '/=>/ {print $3} /ld-linux/ {print $1}' | sort -u); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
cp "$mods/virt/lib/irqbypass.ko" "$mods/arch/x86/kvm/kvm.ko" "$mods/arch/x86/kvm/kvm-amd.ko" "$root/lib/modules/"
v="$mods/drivers/virtio"
cp "$v/virtio.ko" "$v/virtio_ring.ko" "$v/virtio_pci_modern_dev.ko" "$v/virtio_pci_legacy_dev.ko" "$v/virtio_pci.ko" \
    "$mods/drivers/block/virtio_blk.ko" "$root/lib/modules/"
# For network scenarios: taps (tunctl) on a bridge (brctl, ip link ... type bridge).
cp "$mods/drivers/net/tun.ko" "$mods/net/llc/llc.ko" "$mods/net/802/stp.ko" "$mods/net/bridge/bridge.ko" "$root/lib/modules/"
# vhost-net, for the network benchmark's QEMU with vhost=on.
cp "$mods/drivers/vhost/vhost_iotlb.ko" "$mods/drivers/vhost/vhost.ko" "$mods/drivers/net/tap.ko" \
    "$mods/drivers/vhost/vhost_net.ko" "$root/lib/modules/"
cp "$kdir/vmlinuz" "$root/guest/vmlinuz"
cp "$initrd" "$root/guest/initrd.gz"
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$root.l1.gz"
trap 'rm -rf "$root" "$root.l1.gz"' EXIT

# The transfer disk: inputs as a tar, room for the outputs.
xfer="$root.xfer"
staging="$root.in"
mkdir -p "$staging"
for f in "${inputs[@]}"; do cp --sparse=always "$f" "$staging/"; done
tar cf "$xfer" -C "$staging" .
# L1 reads only the archive (in 64 KiB blocks), not the whole disk: busybox tar
# reads its input to the end, and 1 GiB through TCG's virtio-blk took a minute.
xfer_blocks=$(( ($(stat -c %s "$xfer") + 65535) / 65536 ))
truncate -s 1G "$xfer"
trap 'rm -rf "$root" "$root.l1.gz" "$xfer" "$staging"' EXIT

log="$root.log"
# L1 reports where its scenario waits a minute before the timeout (l1-init);
# 20 s before it, this host says what QEMU's threads do (busy or asleep, and
# where), which tells an L1 that stopped from one that spins.
watchdog=$(( timeout > 120 ? timeout - 60 : 0 ))
if [ "$watchdog" -gt 0 ]; then
    (
        # (Its sleep holds none of our outputs: killed early, this subshell
        # leaves no sleeper that keeps a reader of our stderr waiting.)
        sleep $(( timeout - 20 )) < /dev/null > /dev/null 2>&1
        for q in $(pgrep -f "$root.l1.gz" | grep -vx "$BASHPID"); do
            [ "$(cat /proc/$q/comm 2>/dev/null)" = qemu-system-x86 ] || continue
            echo "run.sh: QEMU (L1) still runs after $(( timeout - 20 ))s; its threads, 5 s apart:" >&2
            ps -L -o tid,stat,pcpu,time,wchan:24,comm -p "$q" >&2
            sleep 5
            ps -L -o tid,stat,pcpu,time,wchan:24,comm -p "$q" >&2
        done
    ) &
    host_watchdog=$!
fi
set +e
timeout "$timeout" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m "$l1_mem" \
    -nodefaults -no-user-config -nographic -serial stdio -no-reboot \
    -drive "file=$xfer,format=raw,if=virtio" \
    -kernel "$kdir/vmlinuz" -initrd "$root.l1.gz" \
    -append "console=ttyS0 $l1_quiet panic=-1 cevm.npt=$npt cevm.xfer=$xfer_blocks cevm.watchdog=$watchdog $l1_append" | tee "$log"
qrc=${PIPESTATUS[0]}
[ -n "${host_watchdog:-}" ] && kill "$host_watchdog" 2>/dev/null
set -e
rc=$(sed -n 's/.*cevm-nested: end rc=\([0-9]*\).*/\1/p' "$log" | tail -1)
rm -f "$log"
if [ -n "$outdir" ]; then
    mkdir -p "$outdir"
    tar xf "$xfer" -C "$outdir" 2>/dev/null || echo "run.sh: no outputs came back" >&2
fi
if [ "$qrc" = 124 ]; then echo "run.sh: timeout after ${timeout}s" >&2; exit 124; fi
if [ -z "$rc" ]; then echo "run.sh: the scenario did not finish (QEMU status $qrc)" >&2; exit 125; fi
exit "$rc"
