#!/usr/bin/env bash
# Installs everything kproxy's demo and tests need on a fresh Debian 12
# machine (root): the kernel tools kproxy calls, and the QEMU VM that gives
# the IPVS tests a kernel with IPVS. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for pair in iptables:iptables ip:iproute2 conntrack:conntrack ipvsadm:ipvsadm \
            curl:curl ps:procps python3:python3 jq:jq; do
    cmd=${pair%%:*} pkg=${pair##*:}
    command -v "$cmd" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "setup: installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# The IPVS VM (qemu, busybox, an unpacked Debian kernel). Skipped with
# KPROXY_SKIP_VM=1 for the demo, which needs no IPVS.
if [ "${KPROXY_SKIP_VM:-0}" != 1 ]; then
    vm_setup=../shared/vm/setup-ipvs-vm.sh
    if [ ! -x "$vm_setup" ]; then
        echo "setup: $vm_setup not found: the IPVS VM scripts must sit beside this repository" >&2
        exit 1
    fi
    "$vm_setup" >/dev/null
fi

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo (Rust toolchain) not found" >&2; exit 1; }
echo "setup: done"
