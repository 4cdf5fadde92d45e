#!/usr/bin/env bash
# Build the Helm CLI (helm.sh/helm/v4's cmd/helm, at the version go.mod requires) into the test
# cache (see ../../go-build.sh); prints the binary path. `helm version` reports that version.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
version="$(awk '$1 == "helm.sh/helm/v4" { print $2 }' "$here/go.mod")"
[[ -n "$version" ]] || { echo "build.sh: helm.sh/helm/v4 is not required in $here/go.mod" >&2; exit 1; }
exec bash "$here/../../go-build.sh" "$here" helm helm.sh/helm/v4/cmd/helm \
    -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$version"
