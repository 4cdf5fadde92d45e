#!/usr/bin/env bash
# Build the kubelet-side test peer into a cache keyed by the hash of go.sum and the sources,
# reusing an earlier build. Prints the binary path as the last line on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${DRA_TEST_CACHE:-$HOME/.cache/dra-core}/kubeletpeer"
key="$(cat "$here/go.sum" "$here/go.mod" "$here"/*.go | sha256sum | cut -c1-16)"
out="$cache/$key/kubeletpeer"

if [[ -x "$out" ]]; then
    echo "$out"
    exit 0
fi
command -v go >/dev/null || { echo "build.sh: the go toolchain is not on PATH" >&2; exit 1; }
mkdir -p "$cache/$key"
tmp="$(mktemp "$cache/$key/.kubeletpeer.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
cd "$here"
# -mod=readonly: go.mod and go.sum are committed and must be complete.
CGO_ENABLED=0 go build -mod=readonly -trimpath -o "$tmp" . >&2
chmod 0755 "$tmp"
mv -f "$tmp" "$out"
trap - EXIT
echo "$out"
