#!/usr/bin/env bash
# Staging's databases on the node address, as managed databases outside the
# cluster would run: PostgreSQL 15 on :5432 and MariaDB 10.11 (the MySQL
# protocol) on :3306, from Debian's packages, with data outside the clone.
# Each has a `staging` user (password from $PREVIEW_DB_PASSWORD, default
# `staging-pw`, local test credentials only) that owns a database `orders`.
#
#   databases.sh up       install (once), initialise (once) and start both; idempotent
#   databases.sh down     stop the servers we started (by their pid files)
#   databases.sh status   say whether each runs
#   databases.sh reset    down, then forget the data
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/pidfile.sh"
STATE="${PREVIEW_DB_STATE:-/var/lib/preview-db}"
NODE_IP=198.18.255.254
PG_PORT="${PREVIEW_PG_PORT:-5432}"
MY_PORT="${PREVIEW_MYSQL_PORT:-3306}"
PASSWORD="${PREVIEW_DB_PASSWORD:-staging-pw}"
PG_BIN=/usr/lib/postgresql/15/bin
PG_DATA="$STATE/pg"
MY_DATA="$STATE/mysql"
MY_RUN="$STATE/mysql-run"  # the server's socket, pid and log (it runs as mysql)
MY_PIDF="$MY_RUN/mysql.pid"

log() { echo "databases: $*" >&2; }
die() { echo "databases: error: $*" >&2; exit 1; }

ensure_node_ip() {
  ip -br addr show dev lo | grep -qw "$NODE_IP/32" || ip addr add "$NODE_IP/32" dev lo
}

install() {
  local missing=()
  for p in postgresql-15 mariadb-server mariadb-client; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  # The packages' own services are not wanted (they would take the ports):
  # policy-rc.d 101 tells their postinst not to start them.
  local policy=/usr/sbin/policy-rc.d made=
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; made=1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { [ -n "$made" ] && rm -f "$policy"; die "apt-get install ${missing[*]} failed"; }
  [ -n "$made" ] && rm -f "$policy"
  return 0
}

answers() { (exec 3<>"/dev/tcp/$NODE_IP/$1") 2>/dev/null; }

pg_alive() { still_ours "$PG_DATA/postmaster.pid" postgres; }
my_alive() { still_ours "$MY_PIDF" mariadbd; }

pg_up() {
  if pg_alive && answers "$PG_PORT"; then log "postgres already running on $NODE_IP:$PG_PORT"; return 0; fi
  # Postgres refuses to start while its lock file names a live process, even
  # one that only reuses a dead postmaster's pid.
  pg_alive || rm -f "$PG_DATA/postmaster.pid"
  mkdir -p "$STATE" && chmod 755 "$STATE"
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    mkdir -p "$PG_DATA" && chown postgres:postgres "$PG_DATA"
    local pw; pw=$(mktemp) && echo "$PASSWORD" >"$pw" && chown postgres "$pw"
    runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --pwfile="$pw" \
      --auth-local=peer --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$STATE/pg-initdb.log" 2>&1 \
      || { rm -f "$pw"; cat "$STATE/pg-initdb.log" >&2; die "initdb failed"; }
    rm -f "$pw"
    # Pods (198.18.0.0/16) and the node reach it with a password.
    echo "host all all 0.0.0.0/0 scram-sha-256" >>"$PG_DATA/pg_hba.conf"
  fi
  mkdir -p "$STATE/pg-run" && chown postgres:postgres "$STATE/pg-run"
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$STATE/pg-run/postgres.log" -w -t 60 \
    -o "-c listen_addresses=$NODE_IP -p $PG_PORT -k $STATE/pg-run" start >/dev/null \
    || { tail -20 "$STATE/pg-run/postgres.log" >&2; die "postgres did not start"; }
  runuser -u postgres -- psql -h "$STATE/pg-run" -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qAt >/dev/null <<EOF
SELECT 'CREATE ROLE staging LOGIN CREATEDB PASSWORD ''$PASSWORD'''
  WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'staging') \gexec
SELECT 'CREATE DATABASE orders OWNER staging'
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'orders') \gexec
EOF
  log "postgres running (pid $(head -1 "$PG_DATA/postmaster.pid")) on $NODE_IP:$PG_PORT"
}

pg_down() {
  if pg_alive; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
    log "postgres stopped"
  fi
}

# Staging's user, and its database (idempotent). It may also make the
# tests' source databases (src_*, bench_*), as an app's owner could.
my_users() {
  mariadb --socket="$MY_RUN/mysql.sock" -uroot <<EOF
CREATE USER IF NOT EXISTS 'staging'@'%' IDENTIFIED BY '$PASSWORD';
CREATE DATABASE IF NOT EXISTS orders;
GRANT ALL ON orders.* TO 'staging'@'%';
GRANT ALL ON \`src\\_%\`.* TO 'staging'@'%';
GRANT ALL ON \`bench\\_%\`.* TO 'staging'@'%';
EOF
}

my_up() {
  if my_alive && answers "$MY_PORT"; then my_users; log "mariadb already running on $NODE_IP:$MY_PORT"; return 0; fi
  mkdir -p "$STATE" && chmod 755 "$STATE"
  local fresh=
  if [ ! -d "$MY_DATA/mysql" ]; then
    mkdir -p "$MY_DATA" && chown mysql:mysql "$MY_DATA"
    mariadb-install-db --user=mysql --datadir="$MY_DATA" --auth-root-authentication-method=socket \
      --skip-test-db >"$STATE/mysql-install.log" 2>&1 || { cat "$STATE/mysql-install.log" >&2; die "mariadb-install-db failed"; }
    fresh=1
  fi
  mkdir -p "$MY_RUN" && chown mysql:mysql "$MY_RUN"
  # setsid: the server outlives the shell that started it (make, CI).
  setsid mariadbd --no-defaults --user=mysql --datadir="$MY_DATA" --bind-address="$NODE_IP" --port="$MY_PORT" \
    --socket="$MY_RUN/mysql.sock" --pid-file="$MY_PIDF" --log-error="$MY_RUN/mysql.log" \
    --skip-name-resolve >/dev/null 2>&1 </dev/null &
  local end=$(( $(date +%s) + 60 ))
  until answers "$MY_PORT" && [ -S "$MY_RUN/mysql.sock" ]; do
    [ "$(date +%s)" -lt "$end" ] || { tail -20 "$MY_RUN/mysql.log" >&2 || true; die "mariadb did not listen on $NODE_IP:$MY_PORT within 60 s"; }
    sleep 0.5
  done
  my_users
  [ -n "$fresh" ] && log "mariadb initialised in $MY_DATA"
  log "mariadb running (pid $(cat "$MY_PIDF")) on $NODE_IP:$MY_PORT"
}

my_down() {
  if my_alive; then
    local p; p=$(cat "$MY_PIDF")
    kill "$p"
    for _ in $(seq 1 60); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p"
    log "mariadb stopped (pid $p)"
  fi
  rm -f "$MY_PIDF"
}

status() {
  local rc=0
  if pg_alive && answers "$PG_PORT"; then echo "postgres: running on $NODE_IP:$PG_PORT"; else echo "postgres: stopped"; rc=1; fi
  if my_alive && answers "$MY_PORT"; then echo "mariadb: running on $NODE_IP:$MY_PORT"; else echo "mariadb: stopped"; rc=1; fi
  return $rc
}

case "${1:-}" in
  up) install; ensure_node_ip; pg_up; my_up ;;
  down) pg_down; my_down ;;
  status) status ;;
  reset) pg_down; my_down; rm -rf "$STATE" ;;
  *) echo "usage: $0 up|down|status|reset" >&2; exit 2 ;;
esac
