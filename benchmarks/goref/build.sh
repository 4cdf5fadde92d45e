#!/usr/bin/env bash
# Build the Go reference plugin (goref) and the kubelet-side driver (kubeletbench) into a cache
# keyed by the hash of go.mod, go.sum and the sources, reusing an earlier build. Prints the
# directory holding both binaries as the last line on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${DRA_TEST_CACHE:-$HOME/.cache/dra-core}/goref"
key="$(cd "$here" && cat go.sum go.mod ./*.go kubeletbench/*.go | sha256sum | cut -c1-16)"
out="$cache/$key"

if [[ -x "$out/goref" && -x "$out/kubeletbench" ]]; then
    echo "$out"
    exit 0
fi
command -v go >/dev/null || { echo "build.sh: the go toolchain is not on PATH" >&2; exit 1; }
mkdir -p "$out"
echo "build.sh: building $out (first use of these sources; later runs reuse it)" >&2
tmp="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
cd "$here"
# -mod=readonly: go.mod and go.sum are committed and must be complete.
export GOTOOLCHAIN=local CGO_ENABLED=0
go build -mod=readonly -trimpath -o "$tmp/goref" . >&2
go build -mod=readonly -trimpath -o "$tmp/kubeletbench" ./kubeletbench >&2
chmod 0755 "$tmp/goref" "$tmp/kubeletbench"
mv -f "$tmp/goref" "$tmp/kubeletbench" "$out/"
echo "$out"
