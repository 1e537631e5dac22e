#!/usr/bin/env bash
# Fuzzes arbor-format with cargo-fuzz (libFuzzer): the `toc` target (whole layer blobs: footer,
# TOC, chunk decoding), the `tar` target (tar parsing and conversion) and the `tree` target
# (TOC JSON through the validating reader into the tree a lazy mount serves, checked to be a tree).
# Needs only cargo: cargo-fuzz is installed from crates.io when missing, and the nightly toolchain
# is used when present (else the default one with RUSTC_BOOTSTRAP=1).
#
# Usage: scripts/fuzz.sh [SECONDS]     (default 60 per target)
#
# Installs cargo-fuzz if it is missing, regenerates the seed corpora under fuzz/corpus/ (valid
# tars and the layers made of them), builds the targets, then runs
# each target for SECONDS. Prints one summary line per target and exits non-zero if any target
# found a crash, panic, timeout or out-of-memory (inputs are saved under fuzz/artifacts/TARGET/;
# full logs under fuzz/target/fuzz-logs/).
#
# Environment:
#   FUZZ_TARGETS="toc tar tree"   targets to run
#   FUZZ_TIMEOUT=30          libFuzzer -timeout: seconds one input may take before it counts as a hang
#   FUZZ_ARGS=""             extra libFuzzer flags (e.g. "-jobs=2" or "-dict=...")
#   FUZZ_RUNS=""             stop each target after this many executions (libFuzzer -runs) as well
#   FUZZ_SANITIZER=address   cargo fuzz --sanitizer: `address` (default) or `none`. The code under
#                            test is safe Rust, so ASan finds little here; `none` runs 3-5x more
#                            inputs per second, which is what a long campaign wants.
#
# A long campaign (how the >= 10^7 executions per target were run):
#   FUZZ_SANITIZER=none FUZZ_RUNS=10000000 scripts/fuzz.sh 86400
set -uo pipefail

log() { printf '[fuzz] %s\n' "$*"; }
die() { printf '[fuzz] error: %s\n' "$*" >&2; exit 2; }

SECONDS_PER_TARGET="${1:-60}"
[[ "$SECONDS_PER_TARGET" =~ ^[0-9]+$ && "$SECONDS_PER_TARGET" -gt 0 ]] \
  || die "SECONDS must be a positive integer, got '$SECONDS_PER_TARGET'"
read -r -a TARGETS <<<"${FUZZ_TARGETS:-toc tar tree}"
read -r -a EXTRA <<<"${FUZZ_ARGS:-}"
TIMEOUT="${FUZZ_TIMEOUT:-30}"
SANITIZER="${FUZZ_SANITIZER:-address}"
RUNS=()
if [[ -n "${FUZZ_RUNS:-}" ]]; then
  [[ "$FUZZ_RUNS" =~ ^[0-9]+$ ]] || die "FUZZ_RUNS must be a number, got '$FUZZ_RUNS'"
  RUNS=(-runs="$FUZZ_RUNS")
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FUZZ_DIR="$ROOT/fuzz"
LOG_DIR="$FUZZ_DIR/target/fuzz-logs"

command -v cargo >/dev/null 2>&1 || die "cargo not found (install a Rust toolchain with rustup)"
# cargo-fuzz needs a compiler that accepts -Z flags (sanitizers, coverage instrumentation): the
# nightly toolchain when it is installed, otherwise the default toolchain with RUSTC_BOOTSTRAP=1
# (stable ships the sanitizer runtimes; the flag only unlocks the unstable options).
if rustup run nightly rustc --version >/dev/null 2>&1; then
  TOOLCHAIN=(+nightly)
  log "toolchain: $(rustup run nightly rustc --version)"
else
  TOOLCHAIN=()
  export RUSTC_BOOTSTRAP=1
  log "no nightly toolchain: using $(rustc --version) with RUSTC_BOOTSTRAP=1"
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked || die "cargo install cargo-fuzz failed"
fi
log "$(cargo fuzz --version)"

log "generating seed corpora"
cargo run -q --manifest-path "$FUZZ_DIR/Cargo.toml" --bin seeds -- "$FUZZ_DIR/corpus" \
  || die "seed generation failed"

log "building targets: ${TARGETS[*]} (sanitizer: $SANITIZER)"
for t in "${TARGETS[@]}"; do
  cargo "${TOOLCHAIN[@]}" fuzz build -s "$SANITIZER" --fuzz-dir "$FUZZ_DIR" "$t" || die "building fuzz target $t failed"
done

mkdir -p "$LOG_DIR"
failed=()
summaries=()
for t in "${TARGETS[@]}"; do
  corpus="$FUZZ_DIR/corpus/$t"
  mkdir -p "$corpus"
  logfile="$LOG_DIR/$t.log"
  # The tar target converts through convert_layer's worker threads, whose std channel
  # thread-locals LeakSanitizer reports as leaked (112 bytes, once per process): not a leak
  # of the code under test, so leak detection is off for that target only.
  per_target=()
  [[ "$t" == "tar" ]] && per_target=(-detect_leaks=0)
  log "running $t for ${SECONDS_PER_TARGET}s (log: ${logfile#"$ROOT"/})"
  cargo "${TOOLCHAIN[@]}" fuzz run -s "$SANITIZER" --fuzz-dir "$FUZZ_DIR" "$t" "$corpus" -- \
    -max_total_time="$SECONDS_PER_TARGET" "${RUNS[@]}" -rss_limit_mb=2048 -timeout="$TIMEOUT" \
    -print_final_stats=1 "${per_target[@]}" "${EXTRA[@]}" >"$logfile" 2>&1
  rc=$?

  # libFuzzer's final stats: "stat::number_of_executed_units: N"; older: "Done N runs in S second(s)".
  execs="$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$logfile" | tail -n1 | grep -oE '[0-9]+$')"
  [[ -n "$execs" ]] || execs="$(grep -oE 'Done [0-9]+ runs' "$logfile" | tail -n1 | grep -oE '[0-9]+')"
  secs="$(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$logfile" | tail -n1 | grep -oE '[0-9]+ second' | grep -oE '[0-9]+')"
  rss="$(grep -oE 'stat::peak_rss_mb: *[0-9]+' "$logfile" | tail -n1 | grep -oE '[0-9]+$')"
  cov="$(grep -E '^#[0-9]+' "$logfile" | tail -n1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' || true)"
  line="$t: ${execs:-?} execs in ${secs:-?}s, ${cov:-no coverage line}, peak rss ${rss:-?} MB"
  if [[ $rc -ne 0 ]]; then
    artifact="$(grep -oE 'Test unit written to [^ ]+' "$logfile" | tail -n1 | sed 's/Test unit written to //')"
    line="$line, FAILED (exit $rc${artifact:+, input ${artifact#"$ROOT"/}})"
    failed+=("$t")
    log "$t failed; end of its log:"
    tail -n 60 "$logfile" >&2
  else
    line="$line, ok"
  fi
  summaries+=("$line")
done

echo
for s in "${summaries[@]}"; do
  echo "[fuzz] summary: $s"
done
if ((${#failed[@]} > 0)); then
  log "failing targets: ${failed[*]}"
  exit 1
fi
