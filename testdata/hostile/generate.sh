#!/bin/sh
# Regenerates the hostile-image suite in this directory (index.json, oci-layout, blobs/):
# builds `arbor` (the converter) and testkit's `hostile-suite` generator, then runs it.
# The output is deterministic; cli/tests/hostile_mount.rs checks that the committed files are
# exactly what this writes.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
cargo build -p arbor-cli --bin arbor
cargo build -p arbor-testkit --bin hostile-suite
target=${CARGO_TARGET_DIR:-target}
"$target/debug/hostile-suite" --arbor "$target/debug/arbor" "$here"
