#!/usr/bin/env bash
# Installs what cevm needs on a Debian machine, only what is missing.
#   scripts/setup.sh          to build and run cevm and its built-in guests:
#                             gcc, binutils, libc6-dev (the guests are C built at build time)
#   scripts/setup.sh --tests  also what the Linux-guest tests need: busybox-static and
#                             cpio (guest initramfs), qemu-system-x86 (the nested harness
#                             on machines whose /dev/kvm cannot run Linux), qemu-utils
#                             (qemu-img checks the images cevm writes), strace (a test
#                             slows a VMM's renames and fsyncs to kill it between them), iproute2
#                             (the network tests make a bridge and taps with `ip`), slurmctld,
#                             slurmd, slurm-client and munge (the Slurm tests start a cluster of
#                             their own), and the pinned Debian guest kernel (scripts/guest-kernel.sh)
#   scripts/setup.sh --bench  what --tests installs, and a font for the benchmark's
#                             plots (fonts-dejavu-core)
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(gcc binutils libc6-dev)
if [ "${1:-}" = "--tests" ] || [ "${1:-}" = "--bench" ]; then
    pkgs+=(busybox-static cpio qemu-system-x86 qemu-utils strace iproute2 slurmctld slurmd slurm-client munge)
fi
if [ "${1:-}" = "--bench" ]; then
    pkgs+=(fonts-dejavu-core)
fi
missing() {
    local pkg
    need=()
    for pkg in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
    done
}
sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
missing
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}"
    "${sudo_cmd[@]}" apt-get update -qq
    # Twice at most: installing one package can remove another that conflicts
    # with it (Debian's qemu-system-x86 removes a newer backported qemu-utils),
    # and the second pass installs the matching version of what was removed.
    for _ in 1 2; do
        DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
        missing
        ((${#need[@]})) || break
        echo "setup: installing again what the first pass removed: ${need[*]}"
    done
    if ((${#need[@]})); then
        echo "setup: could not install ${need[*]}" >&2
        exit 1
    fi
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2; exit 1; }
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "setup: /dev/kvm is missing or not accessible to $(id -un): cevm needs KVM" >&2
    exit 1
fi
if [ "${1:-}" = "--tests" ] || [ "${1:-}" = "--bench" ]; then
    scripts/guest-kernel.sh >/dev/null
fi
