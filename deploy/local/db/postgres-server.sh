#!/bin/sh
# The branch server's entrypoint (image preview.local/postgres:15, from
# Debian's PostgreSQL 15): data in the pod's volume, superuser "preview"
# with the password previewd put in the server's Secret.
#
# The image holds a data directory that `make images` made with initdb
# (deploy/local/db/postgres-template.sh): copying it and setting the
# password in single-user mode takes a tenth of what initdb takes.
set -eu
BIN=/usr/lib/postgresql/15/bin
D=${PREVIEW_DB_DATA:-/var/lib/preview-db}/data
TEMPLATE=${PREVIEW_DB_TEMPLATE:-/usr/share/preview-db/pg-data}
PWFILE=${PREVIEW_DB_PASSWORD_FILE:-/etc/preview-db/password}
if [ ! -s "$D/PG_VERSION" ]; then
  # A copy a killed start left half-made goes first.
  rm -rf "$D.tmp"
  cp -R "$TEMPLATE" "$D.tmp" && chmod 700 "$D.tmp"
  # A Secret's value has no newline: read then fails, having read it.
  read -r PW <"$PWFILE" || [ -n "$PW" ]
  # A password previewd made: hex, nothing to escape.
  echo "ALTER ROLE preview PASSWORD '$PW'" | "$BIN/postgres" --single -D "$D.tmp" -c fsync=off postgres >/dev/null
  mv "$D.tmp" "$D"
fi
# A branch is disposable: durability is traded for copy speed. With
# wal_level=minimal (no replicas, so no WAL senders) a table made and loaded
# in one transaction, as previewd's `psql --single-transaction` restores do,
# skips the WAL: PostgreSQL's own advice for loading a dump.
exec "$BIN/postgres" -D "$D" -c listen_addresses='*' -c unix_socket_directories=/tmp \
  -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c wal_level=minimal -c max_wal_senders=0
