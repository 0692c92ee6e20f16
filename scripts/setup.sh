#!/usr/bin/env bash
# Installs what cevm needs to build and run its built-in guests on a Debian machine:
# gcc and binutils (the guests are freestanding C built by crates/guests/build.rs).
# Safe to run again: it only installs what is missing.
set -euo pipefail

need=()
for pkg in gcc binutils libc6-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}"
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need[@]}"
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2; exit 1; }
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "setup: /dev/kvm is missing or not accessible to $(id -un): cevm needs KVM" >&2
    exit 1
fi
