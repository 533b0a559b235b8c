#!/usr/bin/env bash
# Builds the Kubernetes binaries (and CoreDNS) from the Go module proxy into a
# cache outside the clone, keyed by version, so a warm run is a no-op.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.34.4}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.12.4}"
CACHE="${PREVIEW_CACHE:-/var/cache/preview-env}"
OUT="$CACHE/k8s-$K8S_VERSION"
BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

die() { echo "build-k8s: $*" >&2; exit 1; }
command -v go >/dev/null || die "go is not installed (need Go >= 1.24 on PATH)"

have_all() {
  for b in "${BINS[@]}" coredns; do [ -x "$OUT/bin/$b" ] || return 1; done
}
if have_all; then echo "build-k8s: $OUT/bin is up to date"; exit 0; fi

mkdir -p "$OUT/bin" "$OUT/wrapper"
cd "$OUT/wrapper"
start=$(date +%s)

# k8s.io/kubernetes replaces its staging modules with ./staging paths, which do
# not exist in the module zip; a wrapper module pins each to its v0.x tag.
staging_ver="v0.${K8S_VERSION#v1.}"
json=$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$K8S_VERSION" 2>&1) \
  || die "could not download k8s.io/kubernetes@$K8S_VERSION from the Go module proxy: $(echo "$json" | sed -n 's/.*"Error": "\(.*\)".*/\1/p')"
modfile=$(echo "$json" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
[ -f "$modfile" ] || die "could not download k8s.io/kubernetes@$K8S_VERSION from the Go module proxy (no go.mod in the answer)"
{
  echo "module preview.local/k8s-build"
  echo
  echo "go 1.24.0"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo "require github.com/coredns/coredns $COREDNS_VERSION"
  echo
  grep -E '^\s*k8s.io/[a-z0-9-]+ => ./staging/' "$modfile" | awk -v v="$staging_ver" '{print "replace " $1 " => " $1 " " v}'
} > go.mod
cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "github.com/coredns/coredns"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
GOFLAGS=-mod=mod go mod download || die "go mod download failed in $OUT/wrapper"

minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor \
 -X $pkg.gitTreeState=clean -X $pkg.gitCommit=module-proxy -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
export CGO_ENABLED=0 GOFLAGS=-mod=mod
for b in "${BINS[@]}"; do
  [ -x "$OUT/bin/$b" ] && continue
  echo "build-k8s: building $b $K8S_VERSION"
  go build -trimpath -ldflags "$ldflags" -o "$OUT/bin/$b.tmp" "k8s.io/kubernetes/cmd/$b" \
    || die "building $b failed (see the go output above; wrapper in $OUT/wrapper)"
  mv "$OUT/bin/$b.tmp" "$OUT/bin/$b"
done
if [ ! -x "$OUT/bin/coredns" ]; then
  echo "build-k8s: building coredns $COREDNS_VERSION"
  go build -trimpath -ldflags "-s -w" -o "$OUT/bin/coredns.tmp" github.com/coredns/coredns \
    || die "building coredns failed (wrapper in $OUT/wrapper)"
  mv "$OUT/bin/coredns.tmp" "$OUT/bin/coredns"
fi
echo "build-k8s: built in $(( $(date +%s) - start ))s into $OUT/bin"
