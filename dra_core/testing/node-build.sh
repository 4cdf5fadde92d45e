#!/usr/bin/env bash
# Provide pinned binaries for a real test node (see node.py beside this script):
#   kubelet, kubectl                      k8s.io/kubernetes at the control plane's version
#   containerd, containerd-shim-runc-v2, ctr   github.com/containerd/containerd/v2 (CDI is on in 2.x)
#   runc, cni/{bridge,host-local,loopback}, busybox   Debian's runc, containernetworking-plugins
#                                         and busybox-static packages (extracted, not installed)
#   pause                                 a tiny static program for the pod sandbox image
#
# * If DRA_TEST_NODE_BINARIES names a directory holding all of them, use it.
# * Otherwise build them into a version-keyed cache outside the repo:
#   ${DRA_TEST_CACHE:-$HOME/.cache/dra-core}/node/<versions>/bin, reused on later runs.
#
# Progress goes to stderr; the last line on stdout is the bin directory.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG="node-build.sh"
# shellcheck source=build-lib.sh
source "$HERE/build-lib.sh"

CONTAINERD_VERSION="v2.4.2"
DEBIAN_PACKAGES=(runc containernetworking-plugins busybox-static)
BINARIES=(kubelet kubectl containerd containerd-shim-runc-v2 ctr runc
          cni/bridge cni/host-local cni/loopback busybox pause)

check_dir() {
    local dir="$1" b missing=()
    for b in "${BINARIES[@]}"; do
        [[ -f "$dir/$b" && -x "$dir/$b" ]] || missing+=("$b")
    done
    ((${#missing[@]} == 0)) || { printf '%s\n' "${missing[@]}"; return 1; }
}

print_versions() {
    local dir="$1"
    log "  kubelet: $("$dir/kubelet" --version 2>&1 | head -n 1)"
    log "  containerd: $("$dir/containerd" --version 2>&1 | head -n 1)"
    log "  runc: $("$dir/runc" --version 2>&1 | head -n 1)"
}

use_prebuilt DRA_TEST_NODE_BINARIES

command -v go >/dev/null 2>&1 || die "no 'go' on PATH and DRA_TEST_NODE_BINARIES is not set"

CACHE_ROOT="${DRA_TEST_CACHE:-$HOME/.cache/dra-core}/node/k8s-${K8S_VERSION}-containerd-${CONTAINERD_VERSION}"
BIN="$CACHE_ROOT/bin"
STAMP="$BIN/.stamp"
LOG_DIR="$CACHE_ROOT/logs"
STAMP_TEXT="k8s=${K8S_VERSION} containerd=${CONTAINERD_VERSION} debian=${DEBIAN_PACKAGES[*]} binaries=${BINARIES[*]}"

up_to_date() { [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]] && check_dir "$BIN" >/dev/null; }

if up_to_date; then
    log "cached node binaries up to date in $BIN"
    print_versions "$BIN"
    echo "$BIN"
    exit 0
fi

mkdir -p "$BIN/cni" "$CACHE_ROOT/src" "$LOG_DIR"
exec 9>"$CACHE_ROOT/.lock"
if ! flock -n 9; then
    log "another build is running; waiting for lock $CACHE_ROOT/.lock"
    flock 9
fi
if up_to_date; then
    log "node binaries were built by a concurrent run: $BIN"
    echo "$BIN"
    exit 0
fi
rm -f "$STAMP"
log "building node binaries into $BIN (first build: several minutes)"
export GOTOOLCHAIN=local GOFLAGS="-buildvcs=false" CGO_ENABLED=0
T_ALL=$SECONDS

# --- Debian packages: extracted, nothing is installed ---------------------------------
T0=$SECONDS
debs="$CACHE_ROOT/src/debs"
rm -rf "$debs" && mkdir -p "$debs/root"
cd "$debs"
if ! apt-get download "${DEBIAN_PACKAGES[@]}" >"$LOG_DIR/debian-download.log" 2>&1; then
    log "[debian] apt-get download failed; refreshing the package lists (apt-get update)"
    run_logged debian update apt-get update
    run_logged debian download apt-get download "${DEBIAN_PACKAGES[@]}"
fi
for deb in ./*.deb; do run_logged debian "extract-$(basename "$deb" .deb)" dpkg-deb -x "$deb" root; done
install -m 0755 root/usr/sbin/runc "$BIN/runc"
for p in bridge host-local loopback; do install -m 0755 "root/usr/lib/cni/$p" "$BIN/cni/$p"; done
install -m 0755 root/bin/busybox "$BIN/busybox"
log "[debian] $(cd "$debs" && ls ./*.deb | xargs -n1 basename | tr '\n' ' ')in $((SECONDS - T0))s"

# --- pause: sleeps until told to stop, reaps orphans (PID 1 of every pod sandbox) ------
T0=$SECONDS
cat >"$CACHE_ROOT/src/pause.c" <<'C'
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }

int main(void) {
    struct sigaction stop_action = {.sa_handler = stop}, reap_action = {.sa_handler = reap};
    sigaction(SIGINT, &stop_action, NULL);
    sigaction(SIGTERM, &stop_action, NULL);
    sigaction(SIGCHLD, &reap_action, NULL);
    for (;;) pause();
}
C
command -v cc >/dev/null 2>&1 || die "no C compiler (cc) on PATH to build the pause program"
run_logged pause build cc -static -O2 -s -o "$BIN/pause" "$CACHE_ROOT/src/pause.c"
log "[pause] built in $((SECONDS - T0))s"

# --- containerd ---------------------------------------------------------------------
T0=$SECONDS
CTRD=github.com/containerd/containerd/v2
run_logged containerd build env GOBIN="$BIN" go install -p 2 -trimpath \
    -tags "no_btrfs,no_devmapper,no_zfs" \
    "-ldflags=-s -X ${CTRD}/version.Version=${CONTAINERD_VERSION}" \
    "${CTRD}/cmd/containerd@${CONTAINERD_VERSION}" \
    "${CTRD}/cmd/containerd-shim-runc-v2@${CONTAINERD_VERSION}" \
    "${CTRD}/cmd/ctr@${CONTAINERD_VERSION}"
CTRD_SECS=$((SECONDS - T0))
log "[containerd] built in ${CTRD_SECS}s"

# --- kubelet, kubectl ------------------------------------------------------------------
T0=$SECONDS
build_k8s_commands "$CACHE_ROOT/src/k8s" "$BIN" kubelet kubectl
K8S_SECS=$((SECONDS - T0))
log "[kubernetes] built kubelet kubectl in ${K8S_SECS}s"

if ! missing="$(check_dir "$BIN")"; then
    die "build finished but binaries are missing: $(echo "$missing" | tr '\n' ' ')"
fi
echo "$STAMP_TEXT" >"$STAMP"
echo "containerd=${CTRD_SECS}s kubernetes=${K8S_SECS}s total=$((SECONDS - T_ALL))s date=$(date -u +%FT%TZ)" \
    >>"$CACHE_ROOT/build-times.txt"
log "build time: containerd ${CTRD_SECS}s, kubernetes ${K8S_SECS}s, total $((SECONDS - T_ALL))s"
print_versions "$BIN"
echo "$BIN"
