#!/usr/bin/env bash
# Build the CDI spec checker into a cache keyed by the hash of go.sum and the sources,
# reusing an earlier build. Prints the binary path as the last line on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${DRA_TEST_CACHE:-$HOME/.cache/dra-core}/cdichecker"
key="$(cat "$here/go.sum" "$here/go.mod" "$here"/*.go | sha256sum | cut -c1-16)"
out="$cache/$key/cdichecker"

if [[ -x "$out" ]]; then
    echo "$out"
    exit 0
fi
command -v go >/dev/null || { echo "build.sh: the go toolchain is not on PATH" >&2; exit 1; }
mkdir -p "$cache/$key"
echo "build.sh: building $out (first use of these sources; later runs reuse it)" >&2
tmp="$(mktemp "$cache/$key/.cdichecker.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
cd "$here"
# -mod=readonly: go.mod and go.sum are committed and must be complete.
CGO_ENABLED=0 go build -mod=readonly -trimpath -o "$tmp" . >&2
chmod 0755 "$tmp"
mv -f "$tmp" "$out"
trap - EXIT
echo "$out"
