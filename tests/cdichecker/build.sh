#!/usr/bin/env bash
# Build the CDI spec checker (cached; see ../go-build.sh); prints the binary path.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../go-build.sh" "$(dirname "${BASH_SOURCE[0]}")" cdichecker
