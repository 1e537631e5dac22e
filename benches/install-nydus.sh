#!/usr/bin/env bash
# Installs nydusd and nydus-image (crates.io `nydus-rs`, the anchor bench-fuse-read compares
# Arbor with) into target/tools/nydus/bin. Idempotent: does nothing when they are there.
# Needs cmake (its zlib-ng build) and libssl-dev (its registry backend), installed with apt.
# A release build of nydus-rs takes about 15 minutes on 2 cores; the tests never need it.
#
# Environment:
#   NYDUS_VERSION   crate version (default 2.2.0, the newest on crates.io)
#   NYDUS_ROOT      install root (default target/tools/nydus)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${NYDUS_VERSION:-2.2.0}"
DEST="${NYDUS_ROOT:-${CARGO_TARGET_DIR:-$ROOT/target}/tools/nydus}"

# A crates.io build prints "Version: unknown" (no git tags): the stamp says what it is.
if [[ -x "$DEST/bin/nydusd" && -x "$DEST/bin/nydus-image" ]] &&
  [[ "$(cat "$DEST/VERSION" 2>/dev/null)" == "nydus-rs $VERSION" ]]; then
  echo "[nydus] nydusd $VERSION already in $DEST/bin"
  exit 0
fi

missing=()
for pkg in cmake libssl-dev pkg-config; do
  [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" == "install ok installed" ]] ||
    missing+=("$pkg")
done
if ((${#missing[@]} > 0)); then
  echo "[nydus] installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null || {
    apt-get update -qq </dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
  }
fi

echo "[nydus] building nydus-rs $VERSION into $DEST (slow: about 15 minutes on 2 cores)"
cargo install nydus-rs --version "$VERSION" --locked --root "$DEST" --bins
echo "nydus-rs $VERSION" >"$DEST/VERSION"
echo "[nydus] installed nydusd and nydus-image (nydus-rs $VERSION) in $DEST/bin"
