#!/usr/bin/env bash
# The main job on the embedded default: sets up the machine (idempotent), builds Arbor, then
# starts a private registry and containerd, builds a sample function image, converts it with
# `arbor convert`, inspects and checks it, and runs it through stock containerd.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
bash scripts/setup.sh
exec "${CARGO_TARGET_DIR:-$ROOT/target}/release/arbor-demo"
