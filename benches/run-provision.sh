#!/usr/bin/env bash
# Builds arbor, arbord and the provision benchmark in release mode and runs it: bursts of N
# simultaneous cold starts of one function (N = 1..32 node namespaces), lazy loading from the
# registry vs function trees vs a full pull, behind a 1 Gbit/s and a 200 Mbit/s registry.
# Arguments go to bench-provision (see `benches/run-provision.sh --help`); without any, the
# results go to target/bench-results/provision.{json,png}, and benches/provision-floor.py then
# measures, in the same run, the bare work of the same N nodes with no Arbor code (what this
# machine's cores allow; provision-floor.json). Needs root (see the bench's --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ARBOR_SKIP_BUILD=1 bash scripts/setup.sh   # system packages (idempotent)
cargo build --release -p arbor-cli -p arbord -p arbor-benches
OUT="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ "$#" -eq 0 ]; then
  "$OUT/release/bench-provision" --json "$OUT/bench-results/provision.json" \
    --png "$OUT/bench-results/provision.png"
  echo
  echo "The same bursts' bare work, with no Arbor code (benches/provision-floor.py):"
  exec python3 benches/provision-floor.py --nodes 1,2,4,8,16,32 \
    --json "$OUT/bench-results/provision-floor.json"
fi
exec "$OUT/release/bench-provision" "$@"
