#!/usr/bin/env bash
# Installs the pinned code generators and grpcurl into $PREVIEW_CACHE/tools
# (outside the clone, so warm runs skip it). Prints nothing when all are there.
set -euo pipefail
CACHE=${PREVIEW_CACHE:-/var/cache/preview-env}
TOOLS=$CACHE/tools

# Every generator is pinned: the checked-in code must come out byte-identical.
PROTOC_GEN_GO=v1.36.12        # google.golang.org/protobuf/cmd/protoc-gen-go
PROTOC_GEN_GO_GRPC=v1.5.1     # google.golang.org/grpc/cmd/protoc-gen-go-grpc
GRPCURL=v1.9.3                # github.com/fullstorydev/grpcurl/cmd/grpcurl
GRPCIO_TOOLS=1.85.1           # grpcio-tools (bundles its own protoc for Python)
PYTEST=8.4.2
PLAYWRIGHT_CORE=1.65.1        # drives Debian's Chromium in the share-link test (no browser download)

gotool() { # name module version
  local bin=$TOOLS/go/$1-$3
  if [ ! -x "$bin" ]; then
    echo "tools: go install $2@$3" >&2
    local tmp; tmp=$(mktemp -d)
    GOBIN=$tmp GOFLAGS=-mod=mod go install "$2@$3"
    mkdir -p "$TOOLS/go"; mv "$tmp/$1" "$bin"; rm -rf "$tmp"
  fi
  mkdir -p "$TOOLS/bin"; ln -sf "$bin" "$TOOLS/bin/$1"
}
gotool protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go $PROTOC_GEN_GO
gotool protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc $PROTOC_GEN_GO_GRPC
gotool grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl $GRPCURL

# A venv of our own: grpcio-tools for generation, grpcio/protobuf and pytest
# for the Python client's tests.
PY=$TOOLS/py-$GRPCIO_TOOLS
if [ ! -x "$PY/bin/python" ] || ! "$PY/bin/python" -c 'import grpc_tools, pytest' 2>/dev/null; then
  echo "tools: python venv with grpcio-tools==$GRPCIO_TOOLS" >&2
  python3 -m venv "$PY"
  "$PY/bin/pip" install -q "grpcio-tools==$GRPCIO_TOOLS" "pytest==$PYTEST"
fi
ln -sfn "$PY" "$TOOLS/py"

# playwright-core alone (it downloads no browser): tests drive /usr/bin/chromium.
NODE=$TOOLS/node-playwright-$PLAYWRIGHT_CORE
if [ ! -f "$NODE/node_modules/playwright-core/package.json" ]; then
  echo "tools: npm install playwright-core@$PLAYWRIGHT_CORE" >&2
  mkdir -p "$NODE"
  (cd "$NODE" && echo '{"private": true}' > package.json && npm install -q --no-audit --no-fund "playwright-core@$PLAYWRIGHT_CORE" >/dev/null)
fi
ln -sfn "$NODE" "$TOOLS/node"
