#!/usr/bin/env bash
# Staging's SQS and RabbitMQ on the node address, as managed brokers outside
# the cluster would run: ElasticMQ (an SQS-compatible server; jars from Maven
# Central, cached outside the clone, run with the machine's Java 17) on :9324,
# and Debian's rabbitmq-server 3.10 on :5672 with a `staging` user (password
# $PREVIEW_RMQ_PASSWORD, default `staging-pw`, local test credentials only).
#
#   queues.sh up       fetch/install (once) and start both; idempotent
#   queues.sh down     stop the brokers we started (by their pid files)
#   queues.sh status   say whether each runs
#   queues.sh reset    down, then forget the data
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/pidfile.sh"
ELASTICMQ_VERSION="${ELASTICMQ_VERSION:-1.7.1}"
CACHE="${PREVIEW_CACHE:-/var/cache/preview-env}"
EMQ_HOME="$CACHE/elasticmq-$ELASTICMQ_VERSION"
STATE="${PREVIEW_QUEUES_STATE:-/var/lib/preview-queues}"
NODE_IP=198.18.255.254
SQS_PORT="${PREVIEW_SQS_PORT:-9324}"
RMQ_PORT="${PREVIEW_RMQ_PORT:-5672}"
PASSWORD="${PREVIEW_RMQ_PASSWORD:-staging-pw}"
EMQ_PIDF="$STATE/elasticmq.pid"
RMQ="$STATE/rabbitmq"
RMQ_PIDF="$RMQ/rabbitmq.pid"

log() { echo "queues: $*" >&2; }
die() { echo "queues: error: $*" >&2; exit 1; }

ensure_node_ip() {
  ip -br addr show dev lo | grep -qw "$NODE_IP/32" || ip addr add "$NODE_IP/32" dev lo
}
answers() { (exec 3<>"/dev/tcp/$NODE_IP/$1") 2>/dev/null; }
emq_alive() { still_ours "$EMQ_PIDF" java org.elasticmq.server.Main; }
rmq_alive() { still_ours "$RMQ_PIDF" beam.smp; }

emq_fetch() {
  [ -f "$EMQ_HOME/.complete" ] && return 0
  command -v mvn >/dev/null || die "Maven (mvn) is required to fetch ElasticMQ from Maven Central"
  log "fetching org.elasticmq:elasticmq-server_2.13:$ELASTICMQ_VERSION and its dependencies from Maven Central"
  local tmp; tmp=$(mktemp -d)
  cat >"$tmp/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>
<groupId>local.preview</groupId><artifactId>elasticmq-run</artifactId><version>1</version>
<dependencies>
<dependency><groupId>org.elasticmq</groupId><artifactId>elasticmq-server_2.13</artifactId><version>$ELASTICMQ_VERSION</version></dependency>
</dependencies></project>
EOF
  rm -rf "$EMQ_HOME"; mkdir -p "$EMQ_HOME/libs"
  (cd "$tmp" && mvn -q -B dependency:copy-dependencies -DoutputDirectory="$EMQ_HOME/libs" -DincludeScope=runtime) \
    || die "mvn could not fetch ElasticMQ $ELASTICMQ_VERSION"
  rm -rf "$tmp"
  touch "$EMQ_HOME/.complete"
}

emq_up() {
  if emq_alive && answers "$SQS_PORT"; then log "elasticmq already running on $NODE_IP:$SQS_PORT"; return 0; fi
  emq_alive && emq_down
  emq_fetch
  mkdir -p "$STATE"
  # strict: AWS's own limits (10 attributes, 256 KiB, batch of 10), so what
  # works here works on SQS.
  cat >"$STATE/elasticmq.conf" <<EOF
include classpath("application.conf")
node-address { protocol = http, host = "$NODE_IP", port = $SQS_PORT, context-path = "" }
rest-sqs { enabled = true, bind-port = $SQS_PORT, bind-hostname = "$NODE_IP", sqs-limits = strict }
rest-stats { enabled = false }
EOF
  setsid bash -c "exec java -Xms128m -Xmx512m -Dconfig.file='$STATE/elasticmq.conf' \
    -cp '$EMQ_HOME/libs/*' org.elasticmq.server.Main" >"$STATE/elasticmq.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$EMQ_PIDF"
  local end=$(( $(date +%s) + 60 ))
  until answers "$SQS_PORT"; do
    started "$pid" || { tail -20 "$STATE/elasticmq.log" >&2; die "elasticmq exited"; }
    [ "$(date +%s)" -lt "$end" ] || die "elasticmq did not listen on $NODE_IP:$SQS_PORT within 60 s"
    sleep 0.5
  done
  log "elasticmq running (pid $(cat "$EMQ_PIDF")) on $NODE_IP:$SQS_PORT"
}

emq_down() {
  if emq_alive; then
    local p; p=$(cat "$EMQ_PIDF"); kill "$p"
    for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p"
    log "elasticmq stopped (pid $p)"
  fi
  rm -f "$EMQ_PIDF"
}

rmq_install() {
  dpkg -s rabbitmq-server >/dev/null 2>&1 && return 0
  log "installing rabbitmq-server"
  # Its own service is not wanted (it would take the port): policy-rc.d 101.
  local policy=/usr/sbin/policy-rc.d made=
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; made=1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null \
    || { [ -n "$made" ] && rm -f "$policy"; die "apt-get install rabbitmq-server failed"; }
  [ -n "$made" ] && rm -f "$policy"
  return 0
}

# The node's environment: its own name, cookie (HOME), data and config, so
# that it never meets the package's default node.
rmq_env() {
  echo HOME="$RMQ" RABBITMQ_NODENAME=preview@localhost RABBITMQ_NODE_IP_ADDRESS="$NODE_IP" \
    RABBITMQ_NODE_PORT="$RMQ_PORT" RABBITMQ_DIST_PORT=25679 RABBITMQ_MNESIA_BASE="$RMQ/mnesia" \
    RABBITMQ_LOG_BASE="$RMQ/log" RABBITMQ_CONFIG_FILE="$RMQ/rabbitmq" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ/enabled_plugins" RABBITMQ_PID_FILE="$RMQ_PIDF"
}
ctl() { runuser -u rabbitmq -- env $(rmq_env) /usr/lib/rabbitmq/bin/rabbitmqctl -q "$@"; }

rmq_up() {
  if rmq_alive && answers "$RMQ_PORT"; then log "rabbitmq already running on $NODE_IP:$RMQ_PORT"; return 0; fi
  rmq_alive && rmq_down
  # A stale pid file would pass for the new node's below.
  rm -f "$RMQ_PIDF"
  rmq_install
  mkdir -p "$RMQ/log" "$RMQ/mnesia"
  cat >"$RMQ/rabbitmq.conf" <<EOF
listeners.tcp.default = $NODE_IP:$RMQ_PORT
disk_free_limit.absolute = 50MB
EOF
  echo "[]." >"$RMQ/enabled_plugins"
  chown -R rabbitmq:rabbitmq "$RMQ"
  setsid runuser -u rabbitmq -- env $(rmq_env) /usr/lib/rabbitmq/bin/rabbitmq-server \
    >"$RMQ/log/stdout.log" 2>&1 </dev/null &
  # rabbitmq-server writes its pid file once the VM is up; wait_for it.
  local end=$(( $(date +%s) + 90 ))
  until [ -s "$RMQ_PIDF" ]; do
    [ "$(date +%s)" -lt "$end" ] || { tail -20 "$RMQ/log/stdout.log" >&2; die "rabbitmq wrote no pid file within 90 s"; }
    sleep 0.5
  done
  ctl wait --timeout 90 "$RMQ_PIDF" >/dev/null || { tail -20 "$RMQ/log/stdout.log" >&2; die "rabbitmq did not start"; }
  ctl list_users | grep -q '^staging' || ctl add_user staging "$PASSWORD" >/dev/null
  ctl set_permissions -p / staging '.*' '.*' '.*' >/dev/null
  log "rabbitmq running (pid $(cat "$RMQ_PIDF")) on $NODE_IP:$RMQ_PORT"
}

rmq_down() {
  if rmq_alive; then
    local p; p=$(cat "$RMQ_PIDF")
    ctl stop "$RMQ_PIDF" >/dev/null 2>&1 || kill "$p"
    for _ in $(seq 1 60); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p"
    log "rabbitmq stopped (pid $p)"
  fi
  rm -f "$RMQ_PIDF"
}

case "${1:-}" in
  up) ensure_node_ip; emq_up; rmq_up ;;
  down) emq_down; rmq_down ;;
  status)
    ok=0
    if emq_alive && answers "$SQS_PORT"; then echo "elasticmq: running on $NODE_IP:$SQS_PORT"; else echo "elasticmq: stopped"; ok=1; fi
    if rmq_alive && answers "$RMQ_PORT"; then echo "rabbitmq: running on $NODE_IP:$RMQ_PORT"; else echo "rabbitmq: stopped"; ok=1; fi
    exit $ok ;;
  reset) emq_down; rmq_down; rm -rf "$STATE" ;;
  *) echo "usage: $0 up|down|status|reset" >&2; exit 2 ;;
esac
