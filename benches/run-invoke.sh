#!/usr/bin/env bash
# Builds arbor, arbord, the arbor runtime shim and the invoke benchmark in release mode and
# runs it: cold invoke of a scaled-to-zero PyPI Flask function through arbord's gateway on
# Arbor vs on stock containerd's overlayfs (registry behind 1 Gbit/s), warm latency through
# the gateway vs calling the instance, throughput with 1-4 instances. Arguments go to
# bench-invoke (see `benches/run-invoke.sh --help`); without any, the results go to
# target/bench-results/invoke.{json,png}. Needs root (see the bench's --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ARBOR_SKIP_BUILD=1 bash scripts/setup.sh   # system packages (idempotent)
cargo build --release -p arbor-cli -p arbord -p arbor-runtime-shim -p arbor-benches
OUT="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ "$#" -eq 0 ]; then
  set -- --json "$OUT/bench-results/invoke.json" --png "$OUT/bench-results/invoke.png"
fi
exec "$OUT/release/bench-invoke" "$@"
