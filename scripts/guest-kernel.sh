#!/usr/bin/env bash
# Unpacks the pinned Debian cloud kernel that cevm's Linux tests boot (as the
# guest, and as L1 of the nested harness) into target/guest-kernel/. Only
# Debian's package archive is used: apt-get download + dpkg -x. Prints the
# directory. Runs once; later calls find it in place.
set -euo pipefail
cd "$(dirname "$0")/.."
KVER=6.1.0-47-cloud-amd64
PKGVER=6.1.170-3
dest="target/guest-kernel/$KVER"
if [ ! -f "$dest/vmlinuz" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download -q "linux-image-$KVER=$PKGVER" >/dev/null 2>&1) || {
        echo "guest-kernel: cannot download linux-image-$KVER=$PKGVER from the Debian archive" >&2
        exit 1
    }
    dpkg -x "$tmp"/linux-image-*.deb "$tmp/x"
    mkdir -p "$dest.part"
    cp "$tmp/x/boot/vmlinuz-$KVER" "$dest.part/vmlinuz"
    cp -a "$tmp/x/lib/modules/$KVER" "$dest.part/modules"
    rm -rf "$dest"
    mv "$dest.part" "$dest"
fi
echo "$dest"
