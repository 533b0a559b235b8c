#!/usr/bin/env bash
# The main job, on the local cluster: deploy frontend → orders → payments
# (v1), run previewd (with its embedded redb store) and start a preview of
# orders with a v2 image; then show a request without the key (all v1), one
# with it (orders answered by v2), the same through the environment's share
# link (preview-gateway), the preview's own branch of staging's orders
# database (PostgreSQL), a preview of payments with a branch of its MariaDB
# database, Kafka records, SQS and RabbitMQ messages split by the key
# (order-events), and the status table.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE="${PREVIEW_CACHE:-/var/cache/preview-env}"
BIN="${CARGO_TARGET_DIR:-$CACHE/target}/release"
export KUBECONFIG="${KUBECONFIG:-/var/lib/preview-cluster/admin.kubeconfig}"
KUBECTL="$CACHE/k8s-v1.34.4/bin/kubectl"
DATA="${PREVIEW_DEMO_DATA:-/var/lib/preview-demo}"
# On the node address: agents in pods reach previewd there. Over TLS, with
# callers checked by the cluster: the CLI presents the admin kubeconfig's
# client certificate and trusts the CA previewd publishes in preview-system.
NODE_IP=198.18.255.254
ADDR=$NODE_IP:7443
export PREVIEW_SERVER="https://$ADDR"
PREVIEWD_DIR="$HERE/../previewd"
# Share links: http://<slug>.preview.test:30080/, opened by preview-gateway
# (a Deployment in preview-system, NodePort 30080 on the node address).
SHARE_DOMAIN=preview.test:30080

# What the in-cluster install also applies: previewd's namespace, the CRD
# (environments are PreviewEnvironments) and the preview roles.
"$KUBECTL" apply -f "$PREVIEWD_DIR/namespace.yaml" -f "$PREVIEWD_DIR/crd.yaml" -f "$PREVIEWD_DIR/crd-queuesplit.yaml" \
  -f "$PREVIEWD_DIR/roles.yaml" >/dev/null
"$KUBECTL" wait --for condition=established --timeout=60s crd/previewenvironments.preview.dev crd/queuesplits.preview.dev >/dev/null
# Staging's orders database (deploy/local/databases.sh on the node address),
# with a table of 3 orders, and the Secret the orders Deployment reads its URL from.
PGPASSWORD="${PREVIEW_DB_PASSWORD:-staging-pw}" /usr/lib/postgresql/15/bin/psql -X -q -v ON_ERROR_STOP=1 \
  "postgres://staging@$NODE_IP:5432/orders" <<'SQL'
CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, item text NOT NULL DEFAULT 'from a preview', at timestamptz NOT NULL DEFAULT now());
INSERT INTO orders (item) SELECT 'staging order ' || i FROM generate_series(1, 3) i WHERE NOT EXISTS (SELECT 1 FROM orders);
SQL
# Staging's payments database, on MariaDB (the same script), with 2 payments.
MYSQL_PWD="${PREVIEW_DB_PASSWORD:-staging-pw}" mariadb --no-defaults --protocol=TCP -h "$NODE_IP" -u staging orders <<'SQL'
CREATE TABLE IF NOT EXISTS payments (id INT AUTO_INCREMENT PRIMARY KEY, amount INT NOT NULL DEFAULT 1, at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP);
INSERT INTO payments (amount) SELECT seq * 10 FROM seq_1_to_2 WHERE NOT EXISTS (SELECT 1 FROM payments);
SQL
"$KUBECTL" create namespace demo --dry-run=client -o yaml | "$KUBECTL" apply -f - >/dev/null
"$KUBECTL" -n demo create secret generic payments-db \
  --from-literal=url="mysql://staging:${PREVIEW_DB_PASSWORD:-staging-pw}@$NODE_IP:3306/orders" \
  --dry-run=client -o yaml | "$KUBECTL" apply -f - >/dev/null
"$KUBECTL" -n demo create secret generic orders-db \
  --from-literal=url="postgres://staging:${PREVIEW_DB_PASSWORD:-staging-pw}@$NODE_IP:5432/orders" \
  --dry-run=client -o yaml | "$KUBECTL" apply -f - >/dev/null
# order-events' topic and queues, before it starts consuming them.
"$BIN/preview-echo" kafka-send --brokers "$NODE_IP:9092" --topic demo-orders --count 0
SQS_ENDPOINT="http://$NODE_IP:9324"
AMQP_URL="amqp://staging:staging-pw@$NODE_IP:5672/%2f"
"$BIN/preview-echo" sqs-send --endpoint "$SQS_ENDPOINT" --queue demo-payments --count 0
"$BIN/preview-echo" amqp-send --url "$AMQP_URL" --queue demo-emails --count 0
"$KUBECTL" apply -f "$HERE/demo.yaml" >/dev/null
for d in frontend orders payments order-events; do "$KUBECTL" -n demo rollout status "deploy/$d" --timeout=90s >/dev/null; done

if ! "$BIN/preview" status >/dev/null 2>&1; then
  mkdir -p "$DATA"
  # A previewd this demo started earlier (by pid) that does not answer here.
  if [ -f "$DATA/previewd.pid" ] && kill -0 "$(cat "$DATA/previewd.pid")" 2>/dev/null; then
    kill "$(cat "$DATA/previewd.pid")"; sleep 1
  fi
  setsid "$BIN/previewd" --listen "$ADDR" --data-dir "$DATA" --default-namespace demo --system-namespace preview-system \
    --image-pull-policy Never --instance demo --agent-image preview.local/agent:dev --share-domain "$SHARE_DOMAIN" \
    >>"$DATA/previewd.log" 2>&1 < /dev/null &
  echo $! > "$DATA/previewd.pid"
  for _ in $(seq 1 60); do "$BIN/preview" status >/dev/null 2>&1 && break; sleep 0.5; done
  echo "previewd running (pid $(cat "$DATA/previewd.pid"), store $DATA/previewd.redb, log $DATA/previewd.log)"
fi

# preview-gateway, as deploy/previewd installs it, but streaming its links
# from this previewd (its token for audience previewd, previewd's CA).
sed "s|https://previewd.preview-system.svc.cluster.local:7443|https://$ADDR|" "$PREVIEWD_DIR/gateway.yaml" |
  "$KUBECTL" apply -n preview-system -f - >/dev/null
"$KUBECTL" -n preview-system rollout status deploy/preview-gateway --timeout=90s >/dev/null

FRONTEND="http://$("$KUBECTL" -n demo get svc frontend -o jsonpath='{.spec.clusterIP}'):8080/"
# frontend v1 → orders v2 → payments v1, from the nested answers.
chain() {
  python3 -c 'import json,sys
v=json.load(sys.stdin); out=[]
for name in ("frontend","orders","payments"):
    out.append("%s %s (%s)" % (name, v.get("version", "?"), v.get("pod", "?"))); v = v.get("downstream") or {}
print("  " + " -> ".join(out))'
}

echo "\$ preview start -f deploy/demo/orders-preview.yaml --image preview.local/echo:v2 --key demo"
"$BIN/preview" start -f "$HERE/orders-preview.yaml" --image preview.local/echo:v2 --key demo --ttl 2h
# The agent is attached to the orders pod within seconds.
for _ in $(seq 1 120); do
  "$BIN/preview-echo" get -H "baggage: preview-key=demo" "$FRONTEND" 2>/dev/null | grep -q '"version":"v2"' && break
  sleep 0.5
done
echo
echo "GET $FRONTEND without the key:"
"$BIN/preview-echo" get "$FRONTEND" | chain
echo "GET $FRONTEND with 'baggage: preview-key=demo':"
"$BIN/preview-echo" get -H "baggage: preview-key=demo" "$FRONTEND" | chain
echo
LINK=$("$BIN/preview" share --key demo --list -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["url"])')
echo "The share link (no kubeconfig needed; a browser maps *.preview.test to $NODE_IP):"
echo "  $LINK"
echo "GET $LINK (curl, as a browser would send it):"
curl -fsS --connect-to "::$NODE_IP:" "$LINK" | chain
echo
# The preview's branch: orders v2 writes there; staging's database is untouched.
PREVIEW_IP=$("$KUBECTL" -n demo get pod -l preview.dev/key=demo,preview.dev/group=orders -o jsonpath='{.items[0].status.podIP}')
STAGING_IP=$("$KUBECTL" -n demo get pod -l 'app=orders,!preview.dev/key' -o jsonpath='{.items[0].status.podIP}')
"$BIN/preview-echo" get "http://$PREVIEW_IP:8080/db/write?table=orders" >/dev/null
"$BIN/preview-echo" get "http://$PREVIEW_IP:8080/db/write?table=orders" >/dev/null
echo "orders v2 wrote 2 orders to its database branch (GET /db/write twice); rows per table:"
echo "  preview (v2): $("$BIN/preview-echo" get "http://$PREVIEW_IP:8080/db/count")"
echo "  staging (v1): $("$BIN/preview-echo" get "http://$STAGING_IP:8080/db/count")"
echo
echo "\$ preview add-pod --key demo -f deploy/demo/payments-preview.yaml --image preview.local/echo:v2"
echo "  (payments v2 with a branch of staging's MariaDB database)"
"$BIN/preview" add-pod --key demo -f "$HERE/payments-preview.yaml" --image preview.local/echo:v2 >/dev/null
"$KUBECTL" -n demo wait --for=condition=ContainersReady pod -l preview.dev/key=demo,preview.dev/group=payments --timeout=90s >/dev/null
PREVIEW_IP=$("$KUBECTL" -n demo get pod -l preview.dev/key=demo,preview.dev/group=payments -o jsonpath='{.items[0].status.podIP}')
STAGING_IP=$("$KUBECTL" -n demo get pod -l 'app=payments,!preview.dev/key' -o jsonpath='{.items[0].status.podIP}')
"$BIN/preview-echo" get "http://$PREVIEW_IP:8080/db/write?table=payments" >/dev/null
echo "payments v2 wrote a payment to its branch (GET /db/write); rows per table:"
echo "  preview (v2): $("$BIN/preview-echo" get "http://$PREVIEW_IP:8080/db/count")"
echo "  staging (v1): $("$BIN/preview-echo" get "http://$STAGING_IP:8080/db/count")"
echo
echo "\$ preview add-pod --key demo -f deploy/demo/events-preview.yaml --image preview.local/echo:v2"
echo "  (the first split of each of order-events' queues restarts it onto staging's temporary topic or queue)"
"$BIN/preview" add-pod --key demo -f "$HERE/events-preview.yaml" --image preview.local/echo:v2 >/dev/null
RUN=$(date +%s)
"$BIN/preview-echo" kafka-send --brokers "$NODE_IP:9092" --topic demo-orders -H "baggage: preview-key=demo" \
  --first-id "${RUN}1" --count 2
"$BIN/preview-echo" kafka-send --brokers "$NODE_IP:9092" --topic demo-orders --first-id "${RUN}5" --count 2
"$BIN/preview-echo" sqs-send --endpoint "$SQS_ENDPOINT" --queue demo-payments -H "baggage: preview-key=demo" \
  --first-id "${RUN}3" --count 1
"$BIN/preview-echo" sqs-send --endpoint "$SQS_ENDPOINT" --queue demo-payments --first-id "${RUN}7" --count 1
"$BIN/preview-echo" amqp-send --url "$AMQP_URL" --queue demo-emails -H "x-preview-key: demo" --first-id "${RUN}4" --count 1
"$BIN/preview-echo" amqp-send --url "$AMQP_URL" --queue demo-emails --first-id "${RUN}8" --count 1
echo "Sent, with the key and without: Kafka records ${RUN}1, ${RUN}2 and ${RUN}5, ${RUN}6 to demo-orders;"
echo "SQS messages ${RUN}3 and ${RUN}7 to demo-payments; RabbitMQ messages ${RUN}4 and ${RUN}8 to demo-emails:"
for _ in $(seq 1 60); do
  n=$("$KUBECTL" -n demo logs -l app=order-events --tail=-1 2>/dev/null | grep -c "consumed id=$RUN" || true)
  [ "${n:-0}" -ge 8 ] && break
  sleep 0.5
done
"$KUBECTL" -n demo logs -l app=order-events --tail=-1 --prefix 2>/dev/null | grep "consumed id=$RUN" | sed 's/^/  /'
echo
echo "\$ preview status"
"$BIN/preview" status
echo
echo "\$ kubectl get previewenvironments -n demo"
"$KUBECTL" get previewenvironments -n demo
echo
echo "\$ preview status --token not-a-token   # previewd asks the cluster who is calling"
"$BIN/preview" status --token not-a-token 2>&1 || true
echo
echo "The environment lives for 2h. Clean it now with:"
echo "  PREVIEW_SERVER=$PREVIEW_SERVER $BIN/preview clean --key demo"
echo "Stop previewd with: kill \$(cat $DATA/previewd.pid)"
