#!/usr/bin/env bash
# Builds arbor and the convert benchmark in release mode and runs it; arguments go to
# bench-convert (see `benches/run-convert.sh --help`). Needs root (see the bench's --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ARBOR_SKIP_BUILD=1 bash scripts/setup.sh   # system packages (idempotent)
cargo build --release -p arbor-cli -p arbor-benches
exec "${CARGO_TARGET_DIR:-$ROOT/target}/release/bench-convert" "$@"
