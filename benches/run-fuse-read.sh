#!/usr/bin/env bash
# Builds arbor and the FUSE read benchmark in release mode and runs it; arguments go to
# bench-fuse-read (see `benches/run-fuse-read.sh --help`). Needs root (see the bench's --help).
# nydusd, the anchor, is measured side by side when installed: `benches/install-nydus.sh`
# (a 15-minute build, once), or NYDUS=1 here to install it first; otherwise its rows are
# skipped with a message.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ARBOR_SKIP_BUILD=1 bash scripts/setup.sh   # system packages (idempotent)
if [[ "${NYDUS:-0}" == 1 ]]; then
  bash benches/install-nydus.sh
fi
cargo build --release -p arbor-cli -p arbor-benches
exec "${CARGO_TARGET_DIR:-$ROOT/target}/release/bench-fuse-read" "$@"
