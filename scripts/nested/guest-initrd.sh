#!/usr/bin/env bash
# Builds the Linux guest's initramfs (busybox-static, guest-linux/init, the
# benchmarks' workload guest-linux/work.c and the network tests' stream
# guest-linux/stream.c built static, and the virtio modules (block and net) the
# Debian kernel has as modules) into
# target/nested/guest-initrd.gz and prints its path.
set -euo pipefail
cd "$(dirname "$0")/../.."
kmods="$(scripts/guest-kernel.sh)/modules/kernel"
out=target/nested/guest-initrd.gz
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,proc,sys,dev,tmp,mnt,lib/modules} target/nested
cp "$kmods"/drivers/virtio/{virtio,virtio_ring,virtio_mmio}.ko "$kmods/drivers/block/virtio_blk.ko" "$root/lib/modules/"
# virtio_net depends on net_failover, which depends on failover (modinfo -F depends).
cp "$kmods"/drivers/net/{virtio_net,net_failover}.ko "$kmods/net/core/failover.ko" "$root/lib/modules/"
cp /bin/busybox "$root/bin/busybox"
cp guest-linux/init "$root/init"
gcc -static -O2 -Wall -Werror -o "$root/bin/cevm-work" guest-linux/work.c
gcc -static -O2 -Wall -Werror -o "$root/bin/cevm-stream" guest-linux/stream.c
chmod +x "$root/init"
# Renamed into place: two harness runs at once each build their own.
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out.part.$$"
mv "$out.part.$$" "$out"
echo "$out"
