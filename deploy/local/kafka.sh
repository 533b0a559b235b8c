#!/usr/bin/env bash
# Apache Kafka 4.x (KRaft, one node that is broker and controller) on the
# node address, as a managed Kafka outside the cluster would run. The jars
# come from Maven Central (cached outside the clone); Java is the machine's.
#
#   kafka.sh up       fetch (once), format (once) and start; idempotent
#   kafka.sh down     stop the broker we started (by its pid file)
#   kafka.sh status   say whether it runs
#   kafka.sh reset    down, then forget the data (a fresh log)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/pidfile.sh"
KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
CACHE="${PREVIEW_CACHE:-/var/cache/preview-env}"
HOME_DIR="$CACHE/kafka-$KAFKA_VERSION"
STATE="${PREVIEW_KAFKA_STATE:-/var/lib/preview-kafka}"
NODE_IP=198.18.255.254
PORT="${PREVIEW_KAFKA_PORT:-9092}"
CONTROLLER_PORT=9093
PIDF="$STATE/kafka.pid"

log() { echo "kafka: $*" >&2; }
die() { echo "kafka: error: $*" >&2; exit 1; }

alive() { still_ours "$PIDF" java kafka.Kafka; }
# Alive is not enough: a broker that lost the node address (cluster.sh down
# removes it) either goes from STARTED to SHUTTING_DOWN and hangs there, or
# its controller channel stops on a fatal error while the broker stays
# STARTED; either way its process and listener stay up. So it counts as
# serving only if its last state change is to STARTED and nothing fatal
# was logged since.
answers() {
  (exec 3<>"/dev/tcp/$NODE_IP/$PORT") 2>/dev/null || return 1
  local at
  at=$(grep -n "BrokerServer id=1\] Transition from" "$STATE/kafka.log" 2>/dev/null | tail -1) || return 1
  case "$at" in *"to STARTED"*) ;; *) return 1 ;; esac
  ! tail -n +"${at%%:*}" "$STATE/kafka.log" | grep -q "fatal error"
}

fetch() {
  [ -f "$HOME_DIR/.complete" ] && return 0
  command -v mvn >/dev/null || die "Maven (mvn) is required to fetch Kafka from Maven Central"
  command -v java >/dev/null || die "Java 17 is required to run Kafka"
  log "fetching org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its dependencies from Maven Central"
  local tmp; tmp=$(mktemp -d)
  cat >"$tmp/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>
<groupId>local.preview</groupId><artifactId>kafka-run</artifactId><version>1</version>
<dependencies>
<dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
<dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>2.24.3</version></dependency>
<dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>2.24.3</version></dependency>
<dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>2.0.16</version></dependency>
</dependencies></project>
EOF
  rm -rf "$HOME_DIR"; mkdir -p "$HOME_DIR/libs"
  (cd "$tmp" && mvn -q -B dependency:copy-dependencies -DoutputDirectory="$HOME_DIR/libs" -DincludeScope=runtime) \
    || die "mvn could not fetch Kafka $KAFKA_VERSION"
  rm -rf "$tmp"
  touch "$HOME_DIR/.complete"
}

ensure_node_ip() {
  ip -br addr show dev lo | grep -qw "$NODE_IP/32" || ip addr add "$NODE_IP/32" dev lo
}

config() {
  mkdir -p "$STATE/data"
  cat >"$STATE/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$NODE_IP:$CONTROLLER_PORT
listeners=PLAINTEXT://$NODE_IP:$PORT,CONTROLLER://$NODE_IP:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$NODE_IP:$PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$STATE/data
num.partitions=3
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=6
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
EOF
  cat >"$STATE/log4j2.yaml" <<EOF
Configuration:
  Appenders:
    File: {name: F, fileName: "$STATE/kafka.log", PatternLayout: {pattern: "[%d] %p %m (%c)%n"}}
  Loggers:
    Root: {level: WARN, AppenderRef: [{ref: F}]}
    Logger: [{name: kafka.server.KafkaServer, level: INFO}, {name: kafka.server.BrokerServer, level: INFO}]
EOF
}

# The broker's JVM options are those of Kafka's own start scripts, as users
# run it: kafka-server-start.sh's heap, and kafka-run-class.sh's G1 settings
# (a 20 ms pause goal; G1's own default is 200 ms).
SERVER_JVM="-Xms1g -Xmx1g -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
-XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15"

java_run() { # java_run MAIN ARGS...
  local main=$1; shift
  java -Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$STATE/log4j2.yaml" -cp "$HOME_DIR/libs/*" "$main" "$@"
}

up() {
  if alive && answers; then log "already running (pid $(cat "$PIDF")) on $NODE_IP:$PORT"; return 0; fi
  if alive; then log "pid $(cat "$PIDF") does not answer on $NODE_IP:$PORT: restarting it"; down; fi
  fetch
  ensure_node_ip
  config
  if [ ! -f "$STATE/data/meta.properties" ]; then
    java_run kafka.tools.StorageTool format -t "$(java_run kafka.tools.StorageTool random-uuid)" \
      -c "$STATE/server.properties" >"$STATE/format.log" 2>&1 || { cat "$STATE/format.log" >&2; die "format failed"; }
  fi
  # setsid: the broker outlives the shell that started it (make, CI).
  setsid bash -c "exec java $SERVER_JVM -Djava.awt.headless=true \
    -Dlog4j2.configurationFile='$STATE/log4j2.yaml' -cp '$HOME_DIR/libs/*' kafka.Kafka '$STATE/server.properties'" \
    >"$STATE/stdout.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$PIDF"
  local end=$(( $(date +%s) + 90 ))
  until answers; do
    started "$pid" || { tail -20 "$STATE/stdout.log" "$STATE/kafka.log" >&2 || true; die "the broker exited"; }
    [ "$(date +%s)" -lt "$end" ] || die "the broker did not listen on $NODE_IP:$PORT within 90 s"
    sleep 0.5
  done
  log "running (pid $(cat "$PIDF")) on $NODE_IP:$PORT"
}

down() {
  if alive; then
    local p; p=$(cat "$PIDF")
    kill "$p"
    for _ in $(seq 1 60); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p"
    log "stopped (pid $p)"
  fi
  rm -f "$PIDF"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) if alive && answers; then echo "kafka: running (pid $(cat "$PIDF")) on $NODE_IP:$PORT"; else echo "kafka: stopped"; exit 1; fi ;;
  reset) down; rm -rf "$STATE" ;;
  *) echo "usage: $0 up|down|status|reset" >&2; exit 2 ;;
esac
