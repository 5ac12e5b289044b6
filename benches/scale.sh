#!/usr/bin/env bash
# Scale benchmark of kproxy's iptables mode on the real kernel, inside
# network namespaces it creates (the host's own tables are never touched).
#
#   benches/scale.sh [--full] [bench options]
#
# --full adds 50k services. Any other option goes to the bench binary
# (crates/testkit/src/bin/kproxy-scale-bench.rs), e.g.
#   benches/scale.sh --iptables-backend=nft --sizes=10000 --churn-secs=60
# Needs root. Prints one markdown table on stdout; progress on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-bench}"
cargo build --release --quiet --bin kproxy -p kproxy
cargo build --release --quiet --bin kproxy-scale-bench -p kproxy-testkit
exec "$CARGO_TARGET_DIR/release/kproxy-scale-bench" \
    --kproxy "$CARGO_TARGET_DIR/release/kproxy" "$@"
