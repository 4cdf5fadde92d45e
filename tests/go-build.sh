#!/usr/bin/env bash
# go-build.sh DIR NAME [PACKAGE [GO-BUILD-FLAG...]]: build a Go main package of the module in
# DIR into a cache keyed by the hash of its go.mod, go.sum and sources (and of PACKAGE and the
# flags, when given), reusing an earlier build:
#   ${DRA_TEST_CACHE:-$HOME/.cache/dra-core}/NAME/<hash>/NAME
# PACKAGE is `.` (DIR's own main package) unless given: e.g. a command of a module that DIR's
# go.mod requires through a `tool` directive. The flags go to `go build` (e.g. -ldflags).
# Prints the binary path as the last line on stdout; build output goes to stderr.
set -euo pipefail

here="$(cd "$1" && pwd)"
name="$2"
package="${3:-.}"
cache="${DRA_TEST_CACHE:-$HOME/.cache/dra-core}/$name"
shopt -s nullglob
key="$(
    {
        cat "$here/go.sum" "$here/go.mod" "$here"/*.go
        if (($# > 2)); then printf '%s\0' "${@:3}"; fi
    } | sha256sum | cut -c1-16
)"
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
CGO_ENABLED=0 go build -mod=readonly -trimpath "${@:4}" -o "$tmp" "$package" >&2
chmod 0755 "$tmp"
mv -f "$tmp" "$out"
trap - EXIT
echo "$out"
