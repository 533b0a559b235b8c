#!/usr/bin/env bash
# The main job, on the local cluster: deploy `orders` v1, run previewd (with
# its embedded redb store) and start a preview of orders with a v2 image.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE="${PREVIEW_CACHE:-/var/cache/preview-env}"
BIN="${CARGO_TARGET_DIR:-$CACHE/target}/release"
export KUBECONFIG="${KUBECONFIG:-/var/lib/preview-cluster/admin.kubeconfig}"
KUBECTL="$CACHE/k8s-v1.34.4/bin/kubectl"
DATA="${PREVIEW_DEMO_DATA:-/var/lib/preview-demo}"
PORT=7443
export PREVIEW_SERVER="http://127.0.0.1:$PORT"

"$KUBECTL" apply -f "$HERE/demo.yaml" >/dev/null
"$KUBECTL" -n demo rollout status deploy/orders --timeout=90s >/dev/null

if ! "$BIN/preview" status >/dev/null 2>&1; then
  mkdir -p "$DATA"
  setsid "$BIN/previewd" --listen "127.0.0.1:$PORT" --data-dir "$DATA" --default-namespace demo \
    --image-pull-policy Never --instance demo >>"$DATA/previewd.log" 2>&1 < /dev/null &
  echo $! > "$DATA/previewd.pid"
  for _ in $(seq 1 60); do "$BIN/preview" status >/dev/null 2>&1 && break; sleep 0.5; done
  echo "previewd running (pid $(cat "$DATA/previewd.pid"), store $DATA/previewd.redb, log $DATA/previewd.log)"
fi

echo "\$ preview start -f deploy/demo/orders-preview.yaml --image preview.local/echo:v2 --key demo"
"$BIN/preview" start -f "$HERE/orders-preview.yaml" --image preview.local/echo:v2 --key demo --ttl 2h
echo
echo "\$ preview status"
"$BIN/preview" status
echo
echo "The environment lives for 2h. Clean it now with:"
echo "  PREVIEW_SERVER=$PREVIEW_SERVER $BIN/preview clean --key demo"
echo "Stop previewd with: kill \$(cat $DATA/previewd.pid)"
