#!/usr/bin/env bash
# The cluster's own lifecycle, tested for real: down leaves nothing of ours
# behind, a second up works, and up recovers a killed kubelet or containerd.
# Runs last in `make test`: it stops and restarts the cluster.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE="${PREVIEW_STATE:-/var/lib/preview-cluster}"
C="$HERE/cluster.sh"
pass=0; fail=0
check() { # check NAME CMD...
  local name=$1; shift
  if "$@"; then echo "ok: $name"; pass=$((pass+1)); else echo "FAILED: $name"; fail=$((fail+1)); fi
}
no_processes() {
  local f p
  for f in "$STATE"/pids/*.pid; do [ -e "$f" ] && return 1; done
  # Nothing that runs from our binaries or on our containerd socket.
  p=$(pgrep -f "/var/cache/preview-env/k8s-|/run/preview-cluster/containerd|--data-dir $STATE/etcd" || true)
  [ -z "$p" ] || { ps -o pid,args -p $p; return 1; }
}
no_cni() { ! ip link show cni0 >/dev/null 2>&1 && [ -z "$(ip -o link show type veth 2>/dev/null | grep -c cni0 | grep -v '^0$')" ]; }
no_chains() { ! grep -qE '^:(KUBE-|CNI-|PREVIEW-)' <<<"$(iptables-save 2>/dev/null)"; }
# wait_until SECONDS WHAT CMD...: polls CMD every 0.1 s until it succeeds;
# after SECONDS it fails, saying what it waited for.
wait_until() {
  local secs=$1 what=$2; shift 2
  local end=$(( $(date +%s%N) + secs * 1000000000 ))
  until "$@"; do
    if [ "$(date +%s%N)" -ge "$end" ]; then echo "timed out after ${secs}s waiting for $what"; return 1; fi
    sleep 0.1
  done
}
# Gone: no such process, or a zombie (dead, its ports closed; cluster.sh's alive() agrees).
gone() { ! kill -0 "$1" 2>/dev/null || [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" = Z ]; }
listening() { [ -n "$(ss -ltnH "sport = :$1" 2>/dev/null)" ]; }
# On failure, show what up and status said.
up_ok() {
  local out
  out=$("$C" up 2>&1 && "$C" status 2>&1) || { echo "$out" | tail -n 15; return 1; }
}
kill_and_up() { # kill_and_up COMPONENT
  local p; p=$(cat "$STATE/pids/$1.pid") || return 1
  kill -KILL "$p" || { echo "could not SIGKILL $1 (pid $p)"; return 1; }
  wait_until 10 "$1 (pid $p) to be gone after SIGKILL" gone "$p" || return 1
  up_ok
}

t0=$(date +%s%N)
"$C" down >/dev/null 2>&1
echo "down took $(( ($(date +%s%N) - t0) / 1000000 )) ms"
check "down leaves no process of ours" no_processes
check "down leaves no CNI bridge or veth" no_cni
check "down leaves no KUBE-/CNI-/PREVIEW- chains" no_chains
t0=$(date +%s%N)
check "second up works" up_ok
echo "warm up took $(( ($(date +%s%N) - t0) / 1000000 )) ms"
check "up recovers a SIGKILLed kubelet" kill_and_up kubelet
check "up recovers a SIGKILLed containerd" kill_and_up containerd
# A port already in use stops up with a message naming it, leaving nothing half-started.
"$C" down >/dev/null 2>&1
python3 -c 'import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", 12379)); s.listen(); time.sleep(30)' &
blocker=$!
check "the blocker listens on port 12379" wait_until 10 "a listener on port 12379" listening 12379
msg=$("$C" up 2>&1); rc=$?
kill "$blocker" 2>/dev/null; wait "$blocker" 2>/dev/null
check "busy port stops up with a clear message" bash -c "[ $rc -ne 0 ] && grep -q 'port 12379 (for etcd) is already in use' <<<\"\$1\"" _ "$msg"
check "nothing half-started after the failed up" no_processes
# A missing package: a PATH without conntrack.
fakebin=$(mktemp -d)
for f in /usr/local/sbin/* /usr/local/bin/* /usr/sbin/* /usr/bin/* /sbin/* /bin/*; do
  n=$(basename "$f"); [ "$n" = conntrack ] || [ -e "$fakebin/$n" ] || ln -s "$f" "$fakebin/$n"
done
msg=$(PATH="$fakebin" "$C" up 2>&1); rc=$?
rm -rf "$fakebin"
check "missing package stops up and names it" bash -c "[ $rc -ne 0 ] && grep -q 'missing: conntrack' <<<\"\$1\"" _ "$msg"
check "nothing started after the missing package" no_processes
# A failed build: a version the Go module proxy does not have, in an empty cache.
cache=$(mktemp -d)
msg=$(PREVIEW_CACHE="$cache" K8S_VERSION=v1.34.999 "$C" up 2>&1); rc=$?
rm -rf "$cache"
check "failed build stops up and says where" bash -c "[ $rc -ne 0 ] && grep -q 'could not download k8s.io/kubernetes@v1.34.999' <<<\"\$1\" && grep -q 'building Kubernetes failed' <<<\"\$1\"" _ "$msg"
check "nothing started after the failed build" no_processes
check "up after the port is free works" up_ok
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
