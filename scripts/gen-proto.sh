#!/usr/bin/env bash
# Regenerate the committed gRPC code from proto/. The device API brings the
# first .proto file and the generator call; until then there is nothing to do.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "$(find proto -name '*.proto' 2>/dev/null)" ]; then
    echo "gen-proto: no .proto files under proto/; nothing to generate"
    exit 0
fi
echo "gen-proto: .proto files found but no generator is configured yet" >&2
exit 1
