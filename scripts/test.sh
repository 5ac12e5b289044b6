#!/usr/bin/env bash
# Installs what the tests need, then runs the whole test suite: formatting,
# lints, unit/property/golden tests, the end-to-end tests (real kproxy, fake
# API server, real iptables and traffic in network namespaces; needs root),
# and the IPVS tests inside a VM with an IPVS kernel.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== IPVS tests (in a VM)"
./scripts/test-ipvs-vm.sh
echo "== cargo test"
cargo test --workspace --locked
