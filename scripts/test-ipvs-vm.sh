#!/usr/bin/env bash
# test-ipvs-vm.sh - build kproxy-ipvs's test binaries on the host and run them
# all inside ONE boot of the IPVS VM (../shared/vm/run-in-ipvs-vm.sh), with
# KPROXY_REQUIRE_IPVS=1 so no test can skip for lack of IPVS.
#
# Usage: scripts/test-ipvs-vm.sh [extra libtest args, e.g. a test name filter]
# Env:   CARGO_TARGET_DIR (default <repo>/target; must be under the repo,
#        which the VM shares read-write), IPVS_VM_RUNNER (the VM script),
#        IPVS_VM_TIMEOUT (passed through; default here 900 s); every
#        KPROXY_* variable reaches the tests (e.g. KPROXY_IPVS_OUTAGE_SECS).
# Exit:  0 if every test binary passed, 1 if any failed, the VM runner's
#        status (124/125) if the VM itself failed.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
RUNNER=${IPVS_VM_RUNNER:-$ROOT/../shared/vm/run-in-ipvs-vm.sh}
export IPVS_VM_TIMEOUT=${IPVS_VM_TIMEOUT:-900}
[ -x "$RUNNER" ] || { echo "test-ipvs-vm: VM runner $RUNNER not found" >&2; exit 2; }
case "$(cd "$CARGO_TARGET_DIR" 2>/dev/null && pwd -P || echo "$CARGO_TARGET_DIR")/" in
    "$(pwd -P)"/*) ;;
    *) echo "test-ipvs-vm: CARGO_TARGET_DIR must be under $ROOT (the VM only shares that)" >&2; exit 2 ;;
esac

start=$(date +%s)
echo "== building kproxy-ipvs, ipvs_e2e and ipvs_reliability test binaries"
# One JSON line per artifact; test binaries are those with an "executable".
# kproxy-ipvs's own tests, then the root package's tests/ipvs_e2e.rs and
# tests/ipvs_reliability.rs (which also build the kproxy binary they run).
BUILDS=("-p kproxy-ipvs" "-p kproxy --test ipvs_e2e" "-p kproxy --test ipvs_reliability")
BINS=()
for b in "${BUILDS[@]}"; do
    # shellcheck disable=SC2086
    mapfile -t found < <(
        cargo test $b --no-run --message-format=json 2>/dev/null |
            jq -r 'select(.reason == "compiler-artifact" and .executable != null and .profile.test == true) | .executable'
    )
    if [ "${#found[@]}" -eq 0 ]; then
        echo "test-ipvs-vm: no test binaries built for $b; cargo says:" >&2
        # shellcheck disable=SC2086
        cargo test $b --no-run >&2
        exit 1
    fi
    BINS+=("${found[@]}")
done
built=$(date +%s)
printf '   %s\n' "${BINS[@]}"

# The guest script: run every binary, keep going after a failure, summarise.
GUEST=$(mktemp "$CARGO_TARGET_DIR/ipvs-vm-guest.XXXXXX.sh")
trap 'rm -f "$GUEST"' EXIT
{
    echo 'export KPROXY_REQUIRE_IPVS=1 RUST_BACKTRACE=1'
    echo 'failed=0; summary=""'
    for b in "${BINS[@]}"; do
        q=$(printf '%q' "$b")
        extra=""
        for a in "$@"; do extra="$extra $(printf '%q' "$a")"; done
        cat <<EOF
echo "== running \$(basename $q)"
if $q$extra; then s=ok; else s=FAILED; failed=1; fi
summary="\$summary\$(printf '   %-6s %s' "\$s" "\$(basename $q)")
"
EOF
    done
    echo 'echo "== summary (in VM: $(uname -r))"; printf "%s" "$summary"'
    echo 'exit $failed'
} > "$GUEST"
chmod +x "$GUEST"

# Test knobs set on the host (KPROXY_IPVS_OUTAGE_SECS, KPROXY_TEST_LOG, ...)
# reach the tests in the guest.
IPVS_VM_ENV="${IPVS_VM_ENV:-} $(compgen -e | grep '^KPROXY_' | tr '\n' ' ' || true)"
export IPVS_VM_ENV

echo "== booting the IPVS VM"
set +e
"$RUNNER" -- /bin/sh "$GUEST"
rc=$?
set -e
end=$(date +%s)
echo "== build $((built - start)) s, VM $((end - built)) s, total $((end - start)) s"
case $rc in
    0) echo "== all IPVS VM tests passed" ;;
    124|125) echo "== the VM failed (status $rc)" >&2 ;;
    *) echo "== IPVS VM tests FAILED" >&2; rc=1 ;;
esac
exit $rc
