#!/usr/bin/env bash
# kproxy's main job on a built-in demo, no cluster needed: builds a small
# "cluster" of network namespaces, serves demo Services and EndpointSlices
# (crates/testkit/demo/cluster.yaml) from a fake API server, runs the real
# kproxy in iptables mode and shows which backend answers each request.
# Needs root on Linux (Debian 12 tested). Touches only namespaces it
# creates and removes them at exit, Ctrl-C included. Exits 0 only if every
# request got the expected answer.
#
#   ./scripts/demo.sh            # run the demo
#   ./scripts/demo.sh --keep     # leave it running to explore; Ctrl-C ends it
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "demo: run as root (it creates network namespaces and iptables rules)" >&2
    exit 1
fi

KPROXY_SKIP_VM=1 ./scripts/setup.sh
echo "demo: building kproxy and kproxy-demo (cargo build)"
cargo build --quiet -p kproxy -p kproxy-testkit --bin kproxy --bin kproxy-demo
target=${CARGO_TARGET_DIR:-target}/debug
exec "$target/kproxy-demo" "$target/kproxy" "$@"
