#!/usr/bin/env bash
# Sets up the machine (idempotent) and runs every test: unit, property, bad-input and the
# end-to-end tests against a real docker-registry, containerd + runc and skopeo (those need
# root; run as a normal user they print why they skip), then fuzzes the TOC and tar parsers.
#
#   ARBOR_FUZZ_SECONDS=60   seconds per fuzz target (0 skips fuzzing)
#   ARBOR_SOAK_MINUTES=3    minutes of benches/soak (0 skips it)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

ARBOR_SKIP_BUILD=1 bash scripts/setup.sh

echo "[test] cargo fmt --check"
cargo fmt --all -- --check

mkdir -p target "${CARGO_TARGET_DIR:-target}"
# A full debug build, the fuzz builds and the tests' registries and caches need room; a full disk
# fails deep inside a C compiler, so say it here.
need_gb=12
free_gb=$(( $(df -Pk "${CARGO_TARGET_DIR:-target}" | awk 'NR==2 {print $4}') / 1048576 ))
tmp_gb=$(( $(df -Pk "${TMPDIR:-/tmp}" | awk 'NR==2 {print $4}') / 1048576 ))
if (( free_gb < need_gb || tmp_gb < 4 )); then
  echo "[test] error: ${free_gb} GB free for the build and ${tmp_gb} GB in ${TMPDIR:-/tmp}; the tests need ${need_gb} GB and 4 GB" >&2
  exit 1
fi
# A fresh clone gains nothing from incremental state; it only takes disk.
[[ -n "${CI:-}" ]] && export CARGO_INCREMENTAL=0
echo "[test] cargo test --workspace"
cargo test --workspace --no-fail-fast 2>&1 | tee target/test.log
# cargo test exits non-zero on failure (pipefail); also refuse a run that ran no test.
grep -q "test result: ok" target/test.log || { echo "[test] no test ran" >&2; exit 1; }

# The soak: random container starts and stops, arbord restarts and crashes, registry faults,
# cache pressure and a full disk, with the invariants checked (benches/soak.rs). Bounded here;
# `--minutes 60` by hand.
soak_minutes="${ARBOR_SOAK_MINUTES:-3}"
if [[ "$soak_minutes" != "0" ]]; then
  if [[ "$(id -u)" == "0" ]]; then
    echo "[test] soak for ${soak_minutes} min"
    cargo build -p arbor-benches --bin bench-soak
    bin="${CARGO_TARGET_DIR:-target}/debug"
    "$bin/bench-soak" --minutes "$soak_minutes" --arbord "$bin/arbord" \
      --json "${CARGO_TARGET_DIR:-target}/bench-soak.json"
  else
    echo "[test] soak skipped: it needs root (mounts, containerd)"
  fi
fi

fuzz_seconds="${ARBOR_FUZZ_SECONDS:-60}"
if [[ "$fuzz_seconds" != "0" ]]; then
  echo "[test] fuzzing ${fuzz_seconds}s per target"
  bash scripts/fuzz.sh "$fuzz_seconds"
fi
echo "[test] all passed"
