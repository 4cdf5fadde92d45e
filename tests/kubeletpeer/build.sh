#!/usr/bin/env bash
# Build the kubelet-side test peer (cached; see ../go-build.sh); prints the binary path.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../go-build.sh" "$(dirname "${BASH_SOURCE[0]}")" kubeletpeer
