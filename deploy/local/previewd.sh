#!/usr/bin/env bash
# previewd installed in the local cluster from deploy/previewd, as a user
# would install it, with its volume on this machine.
#
#   previewd.sh install     fresh store; apply the manifests; wait until ready
#   previewd.sh uninstall   delete everything the manifests made, and the volume
#
# The cluster has no volume provisioner: a hostPath PersistentVolume
# pre-bound to preview-system/previewd-data stands in for one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
CACHE=${PREVIEW_CACHE:-/var/cache/preview-env}
STATE=${PREVIEW_STATE:-/var/lib/preview-cluster}
KUBECTL=${KUBECTL:-$CACHE/k8s-v1.34.4/bin/kubectl}
export KUBECONFIG=${KUBECONFIG:-$STATE/admin.kubeconfig}
DATA=$STATE/volumes/previewd-data

pv() {
  cat <<YAML
apiVersion: v1
kind: PersistentVolume
metadata:
  name: preview-system-previewd-data
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  claimRef: {namespace: preview-system, name: previewd-data}
  hostPath: {path: $DATA, type: Directory}
YAML
}

# Everything the manifests made but what other previewds share: deleting the
# CRD would delete every PreviewEnvironment in the cluster (and so their
# pods), and the preview roles are bound by others.
without_crd() {
  "$KUBECTL" kustomize deploy/previewd | python3 -c 'import sys
shared = ("kind: CustomResourceDefinition", "name: preview-user\n", "name: preview-admin\n", "name: preview-sharer\n")
docs = sys.stdin.read().split("\n---\n")
print("\n---\n".join(d for d in docs if not any(s in d + "\n" for s in shared)))'
}

uninstall() {
  without_crd | "$KUBECTL" delete -f - --ignore-not-found --wait=true --timeout=90s >/dev/null
  "$KUBECTL" delete pv preview-system-previewd-data --ignore-not-found >/dev/null
  rm -rf "$DATA"
}

case ${1:-} in
  install)
    uninstall
    # previewd runs as 65532; hostPath volumes ignore fsGroup.
    install -d -o 65532 -g 65532 -m 0700 "$DATA"
    pv | "$KUBECTL" apply -f - >/dev/null
    "$KUBECTL" apply -k deploy/previewd >/dev/null
    "$KUBECTL" -n preview-system rollout status deployment/previewd --timeout=120s >/dev/null
    echo "previewd: installed in preview-system ($("$KUBECTL" -n preview-system get svc previewd -o jsonpath='{.spec.clusterIP}'):7443)"
    ;;
  uninstall) uninstall ;;
  *) echo "usage: previewd.sh install|uninstall" >&2; exit 2 ;;
esac
