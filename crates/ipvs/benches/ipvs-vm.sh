#!/usr/bin/env bash
# ipvs-vm.sh - build the ipvs_scale bench (debug profile) and run it inside the
# IPVS VM. Usage: crates/ipvs/benches/ipvs-vm.sh [services] [endpoints]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-ipvs}
export IPVS_VM_TIMEOUT=${IPVS_VM_TIMEOUT:-900}
RUNNER=${IPVS_VM_RUNNER:-$ROOT/../shared/vm/run-in-ipvs-vm.sh}
# Debug profile: the deps are prebuilt there, and the time is the kernel's.
BIN=$(cargo build -p kproxy-ipvs --bench ipvs_scale --message-format=json 2>/dev/null |
    jq -r 'select(.reason == "compiler-artifact" and .executable != null) | .executable' | tail -1)
[ -n "$BIN" ] || { cargo build -p kproxy-ipvs --bench ipvs_scale; exit 1; }
exec "$RUNNER" -- "$BIN" "$@"
