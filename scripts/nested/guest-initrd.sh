#!/usr/bin/env bash
# Builds the Linux guest's initramfs (busybox-static + guest-linux/init) into
# target/nested/guest-initrd.gz and prints its path.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=target/nested/guest-initrd.gz
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,proc,sys,dev,tmp} target/nested
cp /bin/busybox "$root/bin/busybox"
cp guest-linux/init "$root/init"
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out.part"
mv "$out.part" "$out"
echo "$out"
