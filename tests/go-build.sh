#!/usr/bin/env bash
# go-build.sh DIR NAME: build the Go main package in DIR (its own module) into a cache keyed
# by the hash of its go.mod, go.sum and sources, reusing an earlier build:
#   ${DRA_TEST_CACHE:-$HOME/.cache/dra-core}/NAME/<hash>/NAME
# Prints the binary path as the last line on stdout; build output goes to stderr.
set -euo pipefail

here="$(cd "$1" && pwd)"
name="$2"
cache="${DRA_TEST_CACHE:-$HOME/.cache/dra-core}/$name"
key="$(cat "$here/go.sum" "$here/go.mod" "$here"/*.go | sha256sum | cut -c1-16)"
out="$cache/$key/$name"

if [[ -x "$out" ]]; then
    echo "$out"
    exit 0
fi
command -v go >/dev/null || { echo "go-build.sh: the go toolchain is not on PATH" >&2; exit 1; }
mkdir -p "$cache/$key"
echo "go-build.sh: building $out (first use of these sources; later runs reuse it)" >&2
tmp="$(mktemp "$cache/$key/.$name.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
cd "$here"
# -mod=readonly: go.mod and go.sum are committed and must be complete.
CGO_ENABLED=0 go build -mod=readonly -trimpath -o "$tmp" . >&2
chmod 0755 "$tmp"
mv -f "$tmp" "$out"
trap - EXIT
echo "$out"
