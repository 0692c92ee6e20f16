#!/usr/bin/env bash
# Installs what cevm needs on a Debian machine, only what is missing.
#   scripts/setup.sh          to build and run cevm and its built-in guests:
#                             gcc, binutils, libc6-dev (the guests are C built at build time)
#   scripts/setup.sh --tests  also what the Linux-guest tests need: busybox-static and
#                             cpio (guest initramfs), qemu-system-x86 (the nested harness
#                             on machines whose /dev/kvm cannot run Linux), qemu-utils
#                             (qemu-img checks the images cevm writes), and the pinned
#                             Debian guest kernel (scripts/guest-kernel.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(gcc binutils libc6-dev)
if [ "${1:-}" = "--tests" ]; then
    pkgs+=(busybox-static cpio qemu-system-x86 qemu-utils)
fi
need=()
for pkg in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}"
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2; exit 1; }
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "setup: /dev/kvm is missing or not accessible to $(id -un): cevm needs KVM" >&2
    exit 1
fi
if [ "${1:-}" = "--tests" ]; then
    scripts/guest-kernel.sh >/dev/null
fi
