#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine (also used by CI).
set -euo pipefail
PKGS=(containerd runc containernetworking-plugins iptables conntrack etcd-server iproute2
      openssl curl gcc g++ zlib1g-dev libc6-dev make python3-venv nginx-light
      libnginx-mod-stream  # nginx: the agent benchmark's peer; its stream module is the byte-copy floor
      postgresql-15 postgresql-client-15  # database branches: the branch server image and pg_dump/psql
      mariadb-server-core mariadb-client  # the same for MariaDB/MySQL branches: mariadbd, mariadb-dump/mariadb
      chromium)  # the share-link test opens links in headless Chromium (playwright-core: clients/tools.sh)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { echo "install-deps: apt-get install ${missing[*]} failed" >&2; exit 1; }
fi
command -v go >/dev/null || { echo "install-deps: Go is required (>= 1.24) to build Kubernetes" >&2; exit 1; }
command -v cargo >/dev/null || { echo "install-deps: Rust (cargo) is required" >&2; exit 1; }
# make lint never skips: rustfmt and clippy are rustup components.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  command -v rustup >/dev/null || { echo "install-deps: rustfmt and clippy are missing and there is no rustup to add them" >&2; exit 1; }
  echo "install-deps: rustup component add rustfmt clippy"
  rustup component add rustfmt clippy >/dev/null
fi
