#!/usr/bin/env bash
# Provide pinned control-plane binaries for dra-core's integration tests:
#   etcd, kube-apiserver, kube-scheduler, kube-controller-manager
#
# * If DRA_TEST_BINARIES names a directory holding all four, use it.
# * Otherwise build them with the local Go toolchain into a version-keyed cache
#   outside the repo: ${DRA_TEST_CACHE:-$HOME/.cache/dra-core}/controlplane/k8s-<ver>/bin
#   and reuse that on later runs (stamp file must match).
#
# Progress goes to stderr; the last line on stdout is the bin directory.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG="build.sh"
# shellcheck source=build-lib.sh
source "$HERE/build-lib.sh"     # K8S_VERSION, STAGING_VERSION, log, die, run_logged

# go.etcd.io/etcd/server/v3 of the line each release's etcd client belongs to (its go.mod):
# 1.37 uses the 3.7 client; 1.34 to 1.36 the 3.6 one (v3.6.4, v3.6.5, v3.6.8), served here by
# its newest patch release.
case "$K8S_MINOR" in
    37) ETCD_VERSION="v3.7.3" ;;
    34 | 35 | 36) ETCD_VERSION="v3.6.16" ;;
    *) die "no etcd chosen for Kubernetes $K8S_VERSION (supported: 1.34 to 1.37)" ;;
esac
BINARIES=(etcd kube-apiserver kube-scheduler kube-controller-manager)
K8S_CMDS=(kube-apiserver kube-scheduler kube-controller-manager)

print_versions() {
    local dir="$1" b
    for b in "${BINARIES[@]}"; do
        if [[ "$b" == etcd ]]; then
            log "  etcd: $("$dir/etcd" --version 2>&1 | head -n 1)"
        else
            log "  $b: $("$dir/$b" --version 2>&1 | head -n 1)"
        fi
    done
}

check_dir() {
    local dir="$1" b missing=()
    for b in "${BINARIES[@]}"; do
        [[ -f "$dir/$b" && -x "$dir/$b" ]] || missing+=("$b")
    done
    if ((${#missing[@]})); then
        printf '%s\n' "${missing[@]}"
        return 1
    fi
    return 0
}

# --- 1. prebuilt binaries --------------------------------------------------------
use_prebuilt DRA_TEST_BINARIES

# --- 2. cached build --------------------------------------------------------------
command -v go >/dev/null 2>&1 || die "no 'go' on PATH and DRA_TEST_BINARIES is not set"

CACHE_ROOT="${DRA_TEST_CACHE:-$HOME/.cache/dra-core}/controlplane/k8s-${K8S_VERSION}"
BIN="$CACHE_ROOT/bin"
STAMP="$BIN/.stamp"
STAMP_TEXT="k8s=${K8S_VERSION} staging=${STAGING_VERSION} etcd=${ETCD_VERSION} binaries=${BINARIES[*]}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]] && check_dir "$BIN" >/dev/null; then
    log "cached binaries up to date in $BIN"
    print_versions "$BIN"
    echo "$BIN"
    exit 0
fi

mkdir -p "$BIN" "$CACHE_ROOT/src/k8s" "$CACHE_ROOT/src/etcd" "$CACHE_ROOT/logs"
# Serialize concurrent builders (e.g. parallel pytest sessions).
exec 9>"$CACHE_ROOT/.lock"
if command -v flock >/dev/null 2>&1; then
    if ! flock -n 9; then
        log "another build is running; waiting for lock $CACHE_ROOT/.lock"
        flock 9
    fi
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]] && check_dir "$BIN" >/dev/null; then
        log "binaries were built by a concurrent run: $BIN"
        print_versions "$BIN"
        echo "$BIN"
        exit 0
    fi
fi

rm -f "$STAMP"
log "building pinned binaries into $BIN (first build: several minutes)"
export GOTOOLCHAIN=local GOFLAGS="-buildvcs=false" CGO_ENABLED=0
GO_VERSION="$(go env GOVERSION)"
log "go: $GO_VERSION ($(go env GOOS)/$(go env GOARCH)); build cache $(go env GOCACHE)"

LOG_DIR="$CACHE_ROOT/logs"

T_ALL=$SECONDS

# --- etcd: its own small module -----------------------------------------------------
T0=$SECONDS
cd "$CACHE_ROOT/src/etcd"
cat >go.mod <<EOF
module dra-core.local/controlplane/etcd

go 1.26.0

require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}
EOF
cat >tools.go <<'EOF'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
EOF
rm -f go.sum
run_logged etcd mod-tidy go mod tidy
run_logged etcd build go build -p 2 -trimpath -ldflags=-s -o "$BIN/etcd" go.etcd.io/etcd/server/v3
ETCD_SECS=$((SECONDS - T0))
log "[etcd] built in ${ETCD_SECS}s"

# --- kubernetes: generated module with staging replaces ------------------------------
T0=$SECONDS
build_k8s_commands "$CACHE_ROOT/src/k8s" "$BIN" "${K8S_CMDS[@]}"
K8S_SECS=$((SECONDS - T0))
log "[kubernetes] built ${K8S_CMDS[*]} in ${K8S_SECS}s"

if ! missing="$(check_dir "$BIN")"; then
    die "build finished but binaries are missing: $(echo "$missing" | tr '\n' ' ')"
fi
echo "$STAMP_TEXT" >"$STAMP"
echo "etcd=${ETCD_SECS}s kubernetes=${K8S_SECS}s total=$((SECONDS - T_ALL))s go=${GO_VERSION} date=$(date -u +%FT%TZ)" \
    >>"$CACHE_ROOT/build-times.txt"
log "build time: etcd ${ETCD_SECS}s, kubernetes ${K8S_SECS}s, total $((SECONDS - T_ALL))s"
print_versions "$BIN"
echo "$BIN"
