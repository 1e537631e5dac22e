#!/usr/bin/env bash
# Builds arbor, arbord and the cold-start benchmark in release mode and runs it; arguments go to
# bench-cold-start (see `benches/run-cold-start.sh --help`: --image debian|pypi picks the function
# image, both by default). Needs root (see the bench's --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ARBOR_SKIP_BUILD=1 bash scripts/setup.sh   # system packages (idempotent)
cargo build --release -p arbor-cli -p arbord -p arbor-benches
exec "${CARGO_TARGET_DIR:-$ROOT/target}/release/bench-cold-start" "$@"
