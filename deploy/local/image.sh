#!/usr/bin/env bash
# Builds OCI image tarballs from local files (no Docker, no registry) and
# imports them into containerd's k8s.io namespace.
#
#   image.sh build OUT.tar REF ENTRYPOINT [--env K=V]... FILE[=DEST]...
#       Each FILE is copied to DEST (default: the same path); for dynamically
#       linked programs their shared libraries come along. A directory is
#       copied whole (data files: no libraries are looked for in it).
#   image.sh import TAR...       (uses $CONTAINERD_ADDRESS)
set -euo pipefail

die() { echo "image.sh: $*" >&2; exit 1; }

sha() { sha256sum "$1" | cut -d' ' -f1; }

copy_with_libs() {
  local src=$1 dst=$2 root=$3
  [ -e "$src" ] || die "file not found: $src"
  if [ -d "$src" ]; then
    mkdir -p "$root$dst" && cp -a "$src/." "$root$dst/"
    return
  fi
  install -D -m "$(stat -c %a "$src")" "$src" "$root$dst"
  # ldd prints "lib => /path (addr)" and "/lib64/ld-linux… (addr)".
  if ldd "$src" >/dev/null 2>&1; then
    # A module with no NEEDED entries prints "statically linked": no paths.
    ldd "$src" | { grep -oE '/[^ ]+' || true; } | while read -r lib; do
      [ -e "$lib" ] && install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done
  fi
}

build() {
  [ $# -ge 4 ] || die "usage: image.sh build OUT.tar REF ENTRYPOINT [--env K=V]... FILE[=DEST]..."
  local out=$1 ref=$2 entry=$3; shift 3
  local envs='"PATH=/usr/local/bin:/usr/bin:/bin"'
  local work root
  work=$(mktemp -d); root="$work/rootfs"; mkdir -p "$root/tmp" "$root/etc" "$work/oci/blobs/sha256"
  trap 'rm -rf "$work"' RETURN
  while [ $# -gt 0 ]; do
    case $1 in
      --env) envs="$envs,\"$2\""; shift 2 ;;
      *) local src=${1%%=*} dst=${1#*=}; [ "$src" = "$1" ] && dst=$src
         copy_with_libs "$src" "$dst" "$root"; shift ;;
    esac
  done
  chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n' > "$root/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\n' > "$root/etc/group"
  printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"

  # An uncompressed layer: its digest is its diff_id, and import is faster.
  local layer="$work/layer.tar"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$root" -cf "$layer" .
  local ld lsz; ld=$(sha "$layer"); lsz=$(stat -c %s "$layer"); mv "$layer" "$work/oci/blobs/sha256/$ld"

  local cfg="$work/config.json"
  printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["%s"],"Env":[%s],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$entry" "$envs" "$ld" > "$cfg"
  local cd csz; cd=$(sha "$cfg"); csz=$(stat -c %s "$cfg"); mv "$cfg" "$work/oci/blobs/sha256/$cd"

  local man="$work/manifest.json"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$cd" "$csz" "$ld" "$lsz" > "$man"
  local md msz; md=$(sha "$man"); msz=$(stat -c %s "$man"); mv "$man" "$work/oci/blobs/sha256/$md"

  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$md" "$msz" "$ref" "${ref##*:}" > "$work/oci/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' > "$work/oci/oci-layout"
  mkdir -p "$(dirname "$out")"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/oci" -cf "$out.tmp" . && mv "$out.tmp" "$out"
  echo "image.sh: built $ref -> $out ($(( lsz / 1024 )) KiB)"
}

import() {
  local addr=${CONTAINERD_ADDRESS:?set CONTAINERD_ADDRESS to the containerd socket}
  for t in "$@"; do
    [ -f "$t" ] || die "no such image tarball: $t"
    ctr --address "$addr" -n k8s.io images import --no-unpack=false "$t" >/dev/null || die "importing $t into containerd at $addr failed"
  done
}

cmd=${1:-}; shift || true
case $cmd in
  build) build "$@" ;;
  import) import "$@" ;;
  *) die "usage: image.sh build|import …" ;;
esac
