#!/usr/bin/env bash
# Sets up the machine (idempotent) and runs every test: unit, property, bad-input and the
# end-to-end tests against a real docker-registry, containerd + runc and skopeo (those need
# root; run as a normal user they print why they skip), then fuzzes the TOC and tar parsers.
#
#   ARBOR_FUZZ_SECONDS=60   seconds per fuzz target (0 skips fuzzing)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

ARBOR_SKIP_BUILD=1 bash scripts/setup.sh

echo "[test] cargo fmt --check"
cargo fmt --all -- --check

mkdir -p target
echo "[test] cargo test --workspace"
cargo test --workspace --no-fail-fast 2>&1 | tee target/test.log
# cargo test exits non-zero on failure (pipefail); also refuse a run that ran no test.
grep -q "test result: ok" target/test.log || { echo "[test] no test ran" >&2; exit 1; }

fuzz_seconds="${ARBOR_FUZZ_SECONDS:-60}"
if [[ "$fuzz_seconds" != "0" ]]; then
  echo "[test] fuzzing ${fuzz_seconds}s per target"
  bash scripts/fuzz.sh "$fuzz_seconds"
fi
echo "[test] all passed"
