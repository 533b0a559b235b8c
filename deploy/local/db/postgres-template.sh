#!/usr/bin/env bash
# Makes the branch server image's template data directory (run by
# `make images`): initdb as nobody, superuser "preview" with a password
# that the entrypoint replaces, scram logins from anywhere.
#   postgres-template.sh OUT_DIR
set -euo pipefail
out=$1
rm -rf "$out" "$out.work" && mkdir -p "$out.work" && chown nobody "$out.work"
echo "replaced-at-start" >"$out.work/pw" && chmod 644 "$out.work/pw"
runuser -u nobody -- /usr/lib/postgresql/15/bin/initdb -D "$out.work/data" -U preview --pwfile="$out.work/pw" \
  -A scram-sha-256 -E UTF8 --locale=C --no-sync >/dev/null
echo "host all all 0.0.0.0/0 scram-sha-256" >>"$out.work/data/pg_hba.conf"
# Read by the pod's user (nobody), which copies it and owns the copy.
chmod -R a+rX "$out.work/data"
mv "$out.work/data" "$out" && rm -rf "$out.work"
