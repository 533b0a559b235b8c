#!/bin/sh
# The branch server's entrypoint (image preview.local/postgres:15, from
# Debian's PostgreSQL 15): data in the pod's volume, superuser "preview"
# with the password previewd put in the server's Secret.
set -eu
BIN=/usr/lib/postgresql/15/bin
D=/var/lib/preview-db/data
if [ ! -s "$D/PG_VERSION" ]; then
  "$BIN/initdb" -D "$D" -U preview --pwfile=/etc/preview-db/password -A scram-sha-256 -E UTF8 --locale=C --no-sync >/dev/null
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$D/pg_hba.conf"
fi
# A branch is disposable: durability is traded for copy speed.
exec "$BIN/postgres" -D "$D" -c listen_addresses='*' -c unix_socket_directories=/tmp \
  -c fsync=off -c synchronous_commit=off -c full_page_writes=off
