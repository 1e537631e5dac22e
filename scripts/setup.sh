#!/usr/bin/env bash
# Prepares a Debian 12 machine for building and testing Arbor: installs the system packages the
# integration tests and benchmarks drive (containerd, runc, skopeo, a local registry, FUSE, ...)
# and builds the workspace in release mode. Idempotent and non-interactive (CI=true, no stdin).
#
# Environment:
#   ARBOR_SKIP_BUILD=1   install packages only, do not run cargo
set -euo pipefail

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PACKAGES=(
  containerd runc skopeo umoci docker-registry fuse3 busybox-static
  iproute2 jq zstd apache2-utils ca-certificates containernetworking-plugins etcd-server
  python3
)

if [[ "$(id -u)" -eq 0 ]]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo -n)
else
  SUDO=()
fi

is_installed() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
  is_installed "$pkg" || missing+=("$pkg")
done

if ((${#missing[@]} > 0)); then
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found (Debian 12 expected); missing: ${missing[*]}"
  if [[ "$(id -u)" -ne 0 && ${#SUDO[@]} -eq 0 ]]; then
    die "not root and no sudo; install as root: ${missing[*]}"
  fi
  export DEBIAN_FRONTEND=noninteractive
  log "apt-get update"
  "${SUDO[@]}" apt-get update -qq </dev/null
  log "installing: ${missing[*]}"
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing[@]}" </dev/null >/dev/null
  # Tests run their own etcd on free ports; the package's system service is not wanted.
  if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
    "${SUDO[@]}" systemctl disable --now etcd >/dev/null 2>&1 || true
  fi
else
  log "system packages already installed"
fi

for bin in containerd ctr runc containerd-shim-runc-v2 skopeo umoci docker-registry \
  fusermount3 busybox ip jq zstd htpasswd etcd nsenter; do
  command -v "$bin" >/dev/null 2>&1 || die "'$bin' not found after installing packages"
done
[[ -x /bin/busybox ]] || die "/bin/busybox missing (package busybox-static)"
for plugin in bridge host-local loopback; do
  [[ -x "/usr/lib/cni/$plugin" ]] || die "/usr/lib/cni/$plugin missing (package containernetworking-plugins)"
done
[[ -e /dev/fuse ]] || log "warning: /dev/fuse is missing (FUSE tests will fail; try 'modprobe fuse')"
log "tools ok: containerd $(containerd --version | awk '{print $3}'), skopeo $(skopeo --version | awk '{print $3}')"

if [[ "${ARBOR_SKIP_BUILD:-0}" == "1" ]]; then
  log "ARBOR_SKIP_BUILD=1: skipping cargo build"
  exit 0
fi

if ! command -v cargo >/dev/null 2>&1 && [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]]; then
  export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (rustup) first"
log "$(cargo --version)"

log "cargo build --release --workspace --bins"
cargo build --release --workspace --bins </dev/null
log "done: binaries in ${CARGO_TARGET_DIR:-$ROOT/target}/release"
