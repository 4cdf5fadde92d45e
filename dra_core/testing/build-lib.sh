# Shared by controlplane-build.sh and node-build.sh (sourced, not run): logging, logged build
# steps, and the wrapper Go module that builds commands of k8s.io/kubernetes at a pinned version.
# The caller sets LOG_TAG (prefix of progress lines) and LOG_DIR (full logs of each step).

# The Kubernetes release to build: DRA_K8S_VERSION (e.g. v1.34.4), by default the release the
# project is developed on. Staging modules k8s.io/* come at v0.<minor>.<patch> of the same release.
DEFAULT_K8S_VERSION="v1.37.2"
K8S_VERSION="${DRA_K8S_VERSION:-$DEFAULT_K8S_VERSION}"
if [[ ! "$K8S_VERSION" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]]; then
    printf '[%s] ERROR: DRA_K8S_VERSION=%s is not a release like v1.34.4\n' "${LOG_TAG:-build}" "$K8S_VERSION" >&2
    exit 1
fi
K8S_MINOR="${BASH_REMATCH[1]}"
STAGING_VERSION="v0.${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"

log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$LOG_TAG" "$*" >&2; exit 1; }

run_logged() {  # run_logged <component> <step> <cmd...>: on failure, say which and why
    local comp="$1" step="$2"; shift 2
    local logf="$LOG_DIR/${comp}-${step}.log"
    log "[$comp] $step: $*"
    if ! "$@" >"$logf" 2>&1; then
        printf '[%s] ERROR: building %s failed at step "%s" (full log: %s); last lines:\n' \
            "$LOG_TAG" "$comp" "$step" "$logf" >&2
        tail -n 30 "$logf" >&2
        exit 1
    fi
}

# use_prebuilt <variable>: if the environment variable names a directory, check that it holds
# every binary (the caller's check_dir), print its versions (print_versions) and path, and exit.
use_prebuilt() {
    local var="$1" dir missing
    [[ -n "${!var:-}" ]] || return 0
    dir="$(cd "${!var}" 2>/dev/null && pwd)" || die "$var=${!var} is not a directory"
    if ! missing="$(check_dir "$dir")"; then
        die "$var=$dir lacks executable: $(echo "$missing" | tr '\n' ' ')"
    fi
    log "using prebuilt binaries from $var=$dir"
    print_versions "$dir"
    echo "$dir"
    exit 0
}

# build_k8s_commands <module dir> <output dir> <cmd...>: build k8s.io/kubernetes/cmd/<cmd> at
# K8S_VERSION in a wrapper module whose go.mod pins every staging module k8s.io/X (replaced by
# ./staging/src in the kubernetes repository) to STAGING_VERSION, with version stamps.
build_k8s_commands() {
    local dir="$1" out="$2"; shift 2
    local cmds=("$@") dl_json k8s_gomod m c
    mkdir -p "$dir"
    cd "$dir"
    log "[kubernetes] go mod download k8s.io/kubernetes@${K8S_VERSION}"
    dl_json="$(go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" 2>"$LOG_DIR/kubernetes-download.log")" || {
        log "ERROR: building kubernetes failed at step download; last lines:"
        tail -n 30 "$LOG_DIR/kubernetes-download.log" >&2
        exit 1
    }
    k8s_gomod="$(printf '%s' "$dl_json" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' | head -n 1)"
    [[ -n "$k8s_gomod" && -f "$k8s_gomod" ]] || die "kubernetes: cannot find go.mod of k8s.io/kubernetes@${K8S_VERSION} in: $dl_json"
    local staging
    mapfile -t staging < <(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\)[[:space:]]*=>[[:space:]]*\./staging/src/.*$#\1#p' "$k8s_gomod" | sort -u)
    ((${#staging[@]} > 10)) || die "kubernetes: found only ${#staging[@]} staging replaces in $k8s_gomod"
    log "[kubernetes] ${#staging[@]} staging modules -> ${STAGING_VERSION}"
    {
        echo "module dra-core.local/k8s"
        echo
        echo "go 1.26.0"
        echo
        echo "require k8s.io/kubernetes ${K8S_VERSION}"
        echo
        echo "replace ("
        for m in "${staging[@]}"; do echo "	$m => $m ${STAGING_VERSION}"; done
        echo ")"
    } >go.mod
    {
        echo "//go:build tools"
        echo
        echo "package tools"
        echo
        echo "import ("
        for c in "${cmds[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$c\""; done
        echo ")"
    } >tools.go
    rm -f go.sum
    run_logged kubernetes mod-tidy go mod tidy
    local vpkg=k8s.io/component-base/version cv=k8s.io/client-go/pkg/version ldflags
    ldflags="-s -X ${vpkg}.gitVersion=${K8S_VERSION} -X ${vpkg}.gitMajor=1 -X ${vpkg}.gitMinor=${K8S_MINOR}"
    ldflags+=" -X ${vpkg}.gitTreeState=clean -X ${vpkg}.buildDate=1970-01-01T00:00:00Z"
    ldflags+=" -X ${cv}.gitVersion=${K8S_VERSION} -X ${cv}.gitMajor=1 -X ${cv}.gitMinor=${K8S_MINOR} -X ${cv}.gitTreeState=clean"
    local pkgs=()
    for c in "${cmds[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
    run_logged kubernetes build go build -p 2 -trimpath "-ldflags=${ldflags}" -o "$out/" "${pkgs[@]}"
}
