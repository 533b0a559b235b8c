#!/bin/sh
# The branch server's entrypoint (image preview.local/mariadb:10.11, from
# Debian's MariaDB 10.11): data in the pod's volume, superuser
# 'preview'@'%' with the password previewd put in the server's Secret.
set -eu
D=${PREVIEW_DB_DATA:-/var/lib/preview-db}
S=/usr/share/mysql
PWFILE=${PREVIEW_DB_PASSWORD_FILE:-/etc/preview-db/password}
# A branch is disposable: durability is traded for copy speed.
set -- --no-defaults --datadir="$D" --socket=/tmp/mariadbd.sock --pid-file=/tmp/mariadbd.pid --tmpdir=/tmp \
  --skip-name-resolve --skip-log-bin --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 \
  --innodb-use-native-aio=0 --innodb-log-file-size=64M --innodb-buffer-pool-size=256M --character-set-server=utf8mb4
if [ ! -f "$D/.preview-initialised" ]; then
  # A bootstrap a killed start left half-made goes first.
  rm -rf "${D:?}"/*
  # What mariadb-install-db feeds the server; root may log in only by
  # socket as the OS's root, which nothing in this pod is.
  { printf "CREATE DATABASE IF NOT EXISTS mysql;\nUSE mysql;\nSET @auth_root_socket='root';\n"
    cat "$S/mysql_system_tables.sql" "$S/mysql_performance_tables.sql" "$S/mysql_system_tables_data.sql" \
      "$S/maria_add_gis_sp_bootstrap.sql"
  } | /usr/sbin/mariadbd "$@" --bootstrap --log-warnings=0 --enforce-storage-engine="" \
      --max_allowed_packet=8M --net_buffer_length=16K >/dev/null
  : >"$D/.preview-initialised"
fi
# The superuser, with the Secret's password (hex), before the port opens.
# A Secret's value has no newline: read then fails, having read it.
read -r PW <"$PWFILE" || [ -n "$PW" ]
printf "CREATE USER IF NOT EXISTS 'preview'@'%%' IDENTIFIED BY '%s';\nALTER USER 'preview'@'%%' IDENTIFIED BY '%s';\nGRANT ALL PRIVILEGES ON *.* TO 'preview'@'%%' WITH GRANT OPTION;\n" \
  "$PW" "$PW" >/tmp/init.sql
exec /usr/sbin/mariadbd "$@" --init-file=/tmp/init.sql --bind-address=0.0.0.0 --port=3306
