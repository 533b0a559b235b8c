#!/usr/bin/env bash
# Regenerates the Go and Python clients from proto/ with the pinned tools
# (clients/tools.sh). With --check, fails when the checked-in code differs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CACHE=${PREVIEW_CACHE:-/var/cache/preview-env}
TOOLS=$CACHE/tools
clients/tools.sh
export PATH=$TOOLS/bin:$PATH
PROTO=preview/v1/preview.proto
GO_MODULE=github.com/preview-env/preview/clients/go

out=clients
if [ "${1:-}" = --check ]; then
  out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
  mkdir -p "$out/go" "$out/python/src"
fi

# Go: messages and the gRPC client/server, at the go_package path.
rm -rf "$out/go/previewv1"
# protoc is the one bundled with the pinned grpcio-tools: no system protoc.
"$TOOLS/py/bin/python" -m grpc_tools.protoc -I proto --go_out="$out/go" --go_opt=module=$GO_MODULE \
  --go-grpc_out="$out/go" --go-grpc_opt=module=$GO_MODULE $PROTO

# Python: messages, type stubs and the gRPC stubs, importable as preview.v1.
rm -rf "$out/python/src/preview/v1"
mkdir -p "$out/python/src/preview/v1"
"$TOOLS/py/bin/python" -m grpc_tools.protoc -I proto --python_out="$out/python/src" \
  --pyi_out="$out/python/src" --grpc_python_out="$out/python/src" $PROTO
printf '"""Generated from proto/preview/v1 by clients/generate.sh."""\n' > "$out/python/src/preview/v1/__init__.py"

if [ "${1:-}" = --check ]; then
  status=0
  for d in go/previewv1 python/src/preview/v1; do
    diff -ru -x __pycache__ "clients/$d" "$out/$d" || status=1
  done
  [ $status = 0 ] || { echo "generate: checked-in clients differ from proto/; run make generate and commit" >&2; exit 1; }
  echo "generate: clients match proto/"
fi
