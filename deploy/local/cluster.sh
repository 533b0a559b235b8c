#!/usr/bin/env bash
# A real single-node Kubernetes on this machine, built from source.
#
#   cluster.sh up [--api-only]   start what is not running (idempotent)
#   cluster.sh down              stop what we started, remove our CNI/iptables state
#   cluster.sh status            say what runs
#   cluster.sh kubeconfig        print the admin kubeconfig path
#
# Everything lives in $PREVIEW_STATE (default /var/lib/preview-cluster); the
# binaries come from build-k8s.sh's cache. Pods use 198.18.0.0/24 (of
# 198.18.0.0/16), services 198.19.0.0/16; the node's own address is
# 198.18.255.254 on lo, so nothing here uses the machine's real network.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/pidfile.sh"
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.12.4}"
CACHE="${PREVIEW_CACHE:-/var/cache/preview-env}"
BIN="$CACHE/k8s-$K8S_VERSION/bin"
STATE="${PREVIEW_STATE:-/var/lib/preview-cluster}"
RUN=/run/preview-cluster
SOCK="$RUN/containerd/containerd.sock"
NODE_IP=198.18.255.254
NODE=preview-node
POD_SUBNET=198.18.0.0/24
CLUSTER_CIDR=198.18.0.0/16
SERVICE_CIDR=198.19.0.0/16
API_SERVICE_IP=198.19.0.1
DNS_IP=198.19.0.10
ETCD_PORT=12379
KC="$STATE/admin.kubeconfig"
EGRESS_CHAIN=PREVIEW-EGRESS

# name → ports it listens on (checked before start)
declare -A PORTS=(
  [etcd]="$ETCD_PORT 12380" [kube-apiserver]=6443 [kube-controller-manager]=10257
  [kube-scheduler]=10259 [containerd]="" [kubelet]="10250 10248" [kube-proxy]="10249 10256"
)

log() { echo "cluster: $*" >&2; }
die() { echo "cluster: error: $*" >&2; exit 1; }

pid_of() { local f="$STATE/pids/$1.pid"; [ -f "$f" ] && cat "$f" || true; }
# Alive, and still running NAME's program (see pidfile.sh).
alive() { still_ours "$STATE/pids/$1.pid" "$1"; }

kubectl() { "$BIN/kubectl" --kubeconfig "$KC" "$@"; }

wait_for() { # wait_for DESC SECONDS CMD...
  local desc=$1 secs=$2; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.5
  done
}

preflight() {
  local missing=()
  for cmd in containerd containerd-shim-runc-v2 runc ctr iptables conntrack openssl curl ip ss gcc; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  [ -x /usr/lib/cni/bridge ] || missing+=("/usr/lib/cni/bridge (containernetworking-plugins)")
  command -v etcd >/dev/null || missing+=("etcd (etcd-server)")
  [ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]}; run 'make deps' (deploy/local/install-deps.sh) as root"
  [ "$(id -u)" = 0 ] || die "must run as root (it starts kubelet and containerd)"
  [ -d /sys/fs/cgroup/memory ] || die "needs cgroup v1 with the memory controller at /sys/fs/cgroup/memory"
  if ! [ -x "$BIN/kubelet" ] || ! [ -x "$BIN/coredns" ]; then
    log "Kubernetes $K8S_VERSION binaries not in $BIN; building them (cold: ~10 min)"
    "$HERE/build-k8s.sh" || die "building Kubernetes failed (see above)"
  fi
}

# Fully exited: no such process, or a zombie with no thread left. A killed multi-threaded
# process (kubelet, containerd) shows its leader as a zombie while other threads are still
# exiting, and those hold its files, so its ports, until the last one is gone.
exited() {
  kill -0 "$1" 2>/dev/null || return 0
  [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" = Z ] && [ "$(ls "/proc/$1/task" 2>/dev/null | wc -l)" -le 1 ]
}

check_ports() { # check_ports NAME: fail if one of NAME's ports is taken
  local name=$1 port line p
  # Our own dead process (a zombie whose threads are still exiting) may still
  # be closing its ports: give it up to 10 s. A live process of another
  # program at that pid is not ours, and is not waited for.
  p=$(pid_of "$name")
  if [ -n "$p" ] && [ -z "$(program_of "$p")" ]; then
    wait_for "$name (pid $p) to finish exiting" 10 exited "$p" || true
  fi
  for port in ${PORTS[$name]}; do
    line=$(ss -ltnpH "sport = :$port" 2>/dev/null | head -1)
    [ -z "$line" ] || die "port $port (for $name) is already in use: $line; stop that process or change the port"
  done
}

start_bg() { # start_bg NAME CMD... ; logs in $STATE/logs/NAME.log
  local name=$1; shift
  check_ports "$name"
  mkdir -p "$STATE/logs" "$STATE/pids"
  setsid "$@" >>"$STATE/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$STATE/pids/$name.pid"
  log "started $name (pid $!)"
}

failed() { # failed NAME: stop it and say where its log is
  local name=$1
  tail -n 15 "$STATE/logs/$name.log" >&2 || true
  stop_one "$name"
  die "$name did not become healthy; log: $STATE/logs/$name.log"
}

# ---------------------------------------------------------------- pki ----

pki() {
  local d="$STATE/pki"
  [ -f "$d/done" ] && return 0
  mkdir -p "$d"; cd "$d"
  log "generating certificates in $d"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=preview-ca" 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  cert() { # cert NAME SUBJECT [SANS]
    local name=$1 subj=$2 sans=${3:-}
    openssl req -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "$subj" 2>/dev/null
    local ext="$name.ext"
    { echo "basicConstraints=CA:FALSE"; echo "keyUsage=digitalSignature,keyEncipherment"
      echo "extendedKeyUsage=serverAuth,clientAuth"; [ -n "$sans" ] && echo "subjectAltName=$sans"; } > "$ext"
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$name.crt" -days 3650 -extfile "$ext" 2>/dev/null
    rm -f "$name.csr" "$ext"
  }
  cert apiserver "/CN=kube-apiserver" "IP:$NODE_IP,IP:$API_SERVICE_IP,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  cert admin "/O=system:masters/CN=admin"
  cert controller-manager "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  cert kubelet "/O=system:nodes/CN=system:node:$NODE" "IP:$NODE_IP,DNS:$NODE"
  cert kube-proxy "/CN=system:kube-proxy"
  for who in admin controller-manager scheduler kubelet kube-proxy; do
    local out="$STATE/$who.kubeconfig"
    cat > "$out" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: preview
  cluster:
    server: https://$NODE_IP:6443
    certificate-authority: $d/ca.crt
users:
- name: $who
  user:
    client-certificate: $d/$who.crt
    client-key: $d/$who.key
contexts:
- name: preview
  context: {cluster: preview, user: $who}
current-context: preview
EOF
  done
  touch "$d/done"
  cd - >/dev/null
}

# ---------------------------------------------------------- components ----

node_net() {
  # Not `ip | grep -q`: with pipefail, grep's early exit SIGPIPEs ip.
  [[ $(ip -4 addr show dev lo) == *" $NODE_IP/"* ]] || ip addr add "$NODE_IP/32" dev lo
  sysctl -qw net.ipv4.ip_forward=1
  [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] || modprobe br_netfilter 2>/dev/null || true
  [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] || die "br_netfilter is not available (needed for service traffic between pods)"
  sysctl -qw net.bridge.bridge-nf-call-iptables=1
  # Pods may talk to each other, to services and to this node, never beyond.
  if ! iptables -w -nL "$EGRESS_CHAIN" >/dev/null 2>&1; then
    iptables -w -N "$EGRESS_CHAIN"
    iptables -w -A "$EGRESS_CHAIN" -d "$CLUSTER_CIDR" -j RETURN
    iptables -w -A "$EGRESS_CHAIN" -d "$SERVICE_CIDR" -j RETURN
    iptables -w -A "$EGRESS_CHAIN" -j REJECT
  fi
  iptables -w -C FORWARD -s "$POD_SUBNET" -j "$EGRESS_CHAIN" 2>/dev/null || iptables -w -I FORWARD -s "$POD_SUBNET" -j "$EGRESS_CHAIN"
  # A ClusterIP port that no Service has is not DNATed: without this route it
  # would take the default route off the machine. Through lo it goes nowhere.
  ip route replace "$SERVICE_CIDR" dev lo src "$NODE_IP"
}

etcd_up() {
  alive etcd && return 0
  mkdir -p "$STATE/etcd"
  start_bg etcd etcd --name preview --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls http://127.0.0.1:12380 --initial-advertise-peer-urls http://127.0.0.1:12380 \
    --initial-cluster preview=http://127.0.0.1:12380 --quota-backend-bytes 2147483648
  wait_for etcd 30 curl -fsS "http://127.0.0.1:$ETCD_PORT/health" || failed etcd
}

apiserver_up() {
  alive kube-apiserver && return 0
  local d="$STATE/pki"
  start_bg kube-apiserver "$BIN/kube-apiserver" \
    --advertise-address="$NODE_IP" --bind-address="$NODE_IP" --secure-port=6443 \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --client-ca-file="$d/ca.crt" --tls-cert-file="$d/apiserver.crt" --tls-private-key-file="$d/apiserver.key" \
    --kubelet-client-certificate="$d/apiserver-kubelet-client.crt" --kubelet-client-key="$d/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$d/sa.pub" --service-account-signing-key-file="$d/sa.key" \
    --authorization-mode=Node,RBAC --allow-privileged=true \
    --enable-admission-plugins=NodeRestriction --profiling=false
  wait_for kube-apiserver 90 kubectl get --raw /readyz || failed kube-apiserver
}

controller_manager_up() {
  alive kube-controller-manager && return 0
  local d="$STATE/pki" k="$STATE/controller-manager.kubeconfig"
  start_bg kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$k" --authentication-kubeconfig="$k" --authorization-kubeconfig="$k" \
    --bind-address=127.0.0.1 --secure-port=10257 --leader-elect=false \
    --service-account-private-key-file="$d/sa.key" --root-ca-file="$d/ca.crt" \
    --cluster-signing-cert-file="$d/ca.crt" --cluster-signing-key-file="$d/ca.key" \
    --use-service-account-credentials=true \
    --allocate-node-cidrs=true --cluster-cidr="$CLUSTER_CIDR" --node-cidr-mask-size=24 \
    --service-cluster-ip-range="$SERVICE_CIDR" --profiling=false
  wait_for kube-controller-manager 60 curl -kfsS https://127.0.0.1:10257/healthz || failed kube-controller-manager
}

scheduler_up() {
  alive kube-scheduler && return 0
  local k="$STATE/scheduler.kubeconfig"
  start_bg kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig="$k" --authentication-kubeconfig="$k" --authorization-kubeconfig="$k" \
    --bind-address=127.0.0.1 --secure-port=10259 --leader-elect=false --profiling=false
  wait_for kube-scheduler 60 curl -kfsS https://127.0.0.1:10259/livez || failed kube-scheduler
}

containerd_up() {
  alive containerd && return 0
  mkdir -p "$STATE/containerd" "$STATE/cni/net.d" "$RUN/containerd"
  cat > "$STATE/cni/net.d/10-preview.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "preview", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$STATE/cni/ipam",
            "ranges": [[{"subnet": "$POD_SUBNET", "gateway": "198.18.0.1"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOF
  cat > "$STATE/containerd/config.toml" <<EOF
version = 2
root = "$STATE/containerd/root"
state = "$RUN/containerd/state"
[grpc]
  address = "$SOCK"
[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "preview.local/pause:3"
  # This machine refuses to lower oom_score_adj below our own (runc fails
  # with "can't get final child's PID"); clamp instead of failing.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
EOF
  start_bg containerd containerd --config "$STATE/containerd/config.toml"
  wait_for containerd 30 ctr --address "$SOCK" version || failed containerd
  images_up
}

images_up() {
  local out="$CACHE/images"
  mkdir -p "$out"
  if [ ! -f "$out/pause.tar" ]; then
    gcc -static -Os -o "$out/pause" "$HERE/pause.c" || die "compiling deploy/local/pause.c failed (needs gcc and libc6-dev)"
    "$HERE/image.sh" build "$out/pause.tar" preview.local/pause:3 /pause "$out/pause=/pause" >/dev/null
  fi
  if [ ! -f "$out/coredns-$COREDNS_VERSION.tar" ]; then
    "$HERE/image.sh" build "$out/coredns-$COREDNS_VERSION.tar" "preview.local/coredns:$COREDNS_VERSION" /coredns "$BIN/coredns=/coredns" >/dev/null
  fi
  CONTAINERD_ADDRESS=$SOCK "$HERE/image.sh" import "$out/pause.tar" "$out/coredns-$COREDNS_VERSION.tar"
}

kubelet_up() {
  alive kubelet && return 0
  local d="$STATE/pki"
  mkdir -p "$STATE/kubelet"
  cat > "$STATE/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $d/ca.crt}
authorization: {mode: AlwaysAllow}
tlsCertFile: $d/kubelet.crt
tlsPrivateKeyFile: $d/kubelet.key
cgroupDriver: cgroupfs
failCgroupV1: false
containerRuntimeEndpoint: unix://$SOCK
failSwapOn: false
clusterDNS: [$DNS_IP]
clusterDomain: cluster.local
resolvConf: ""
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
serializeImagePulls: false
maxPods: 110
registerNode: true
EOF
  start_bg kubelet "$BIN/kubelet" --config="$STATE/kubelet/config.yaml" \
    --kubeconfig="$STATE/kubelet.kubeconfig" --root-dir="$STATE/kubelet/root" \
    --hostname-override="$NODE" --node-ip="$NODE_IP"
  wait_for kubelet 60 curl -fsS http://127.0.0.1:10248/healthz || failed kubelet
}

proxy_up() {
  alive kube-proxy && return 0
  cat > "$STATE/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $STATE/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $CLUSTER_CIDR
hostnameOverride: $NODE
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [$NODE_IP/32]
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  start_bg kube-proxy "$BIN/kube-proxy" --config="$STATE/kube-proxy.yaml"
  wait_for kube-proxy 30 curl -fsS http://127.0.0.1:10256/livez || failed kube-proxy
}

coredns_up() {
  sed -e "s/@DNS_IP@/$DNS_IP/" -e "s/@VERSION@/$COREDNS_VERSION/" "$HERE/coredns.yaml" | kubectl apply -f - >/dev/null
}

node_ready() { [ "$(kubectl get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }
dns_ready() { [ "$(kubectl -n kube-system get deploy coredns -o jsonpath='{.status.readyReplicas}')" = 1 ]; }

up() {
  local api_only=0
  [ "${1:-}" = "--api-only" ] && api_only=1
  local t0; t0=$(date +%s)
  preflight
  # Every port we will need, before anything starts: a busy one stops us clean.
  local name
  for name in "${!PORTS[@]}"; do alive "$name" || check_ports "$name"; done
  pki
  node_net
  etcd_up
  apiserver_up
  controller_manager_up
  if [ $api_only = 1 ]; then
    log "API-only cluster ready in $(( $(date +%s) - t0 ))s; KUBECONFIG=$KC"
    return 0
  fi
  scheduler_up
  node_up
  wait_for "node Ready" 90 node_ready || failed kubelet
  coredns_up
  wait_for "CoreDNS" 90 dns_ready || die "CoreDNS did not become ready: kubectl --kubeconfig $KC -n kube-system describe pods"
  # A kubelet that was itself starting when containerd went away exits a
  # moment later; check once more and start again what ended.
  sleep 2
  if ! { alive containerd && alive kubelet && alive kube-proxy; }; then
    log "a node component exited during start-up; starting it again"
    node_up
    wait_for "node Ready" 90 node_ready || failed kubelet
  fi
  log "cluster ready in $(( $(date +%s) - t0 ))s; KUBECONFIG=$KC"
}

node_up() {
  containerd_up
  kubelet_up
  proxy_up
}

# ---------------------------------------------------------------- down ----

stop_one() {
  local name=$1 p; p=$(pid_of "$name")
  [ -n "$p" ] || return 0
  # Not a live process of another program: the pid may have been reused.
  # (Ours, or a zombie whose threads are still exiting, is stopped.)
  if kill -0 "$p" 2>/dev/null && { alive "$name" || [ -z "$(program_of "$p")" ]; }; then
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$p" 2>/dev/null || true
    log "stopped $name (pid $p)"
  fi
  rm -f "$STATE/pids/$name.pid"
}

ours() { iptables -w -t "$1" -S 2>/dev/null | awk '/^-N (KUBE-|CNI-)/{print $2}' || true; }

clean_chains() { # remove jumps to our chains, then flush and delete them
  local table=$1 chain rule
  for chain in $(ours "$table"); do
    while read -r rule; do
      [ -n "$rule" ] && eval iptables -w -t "$table" "${rule/#-A/-D}" 2>/dev/null || true
    done < <(iptables -w -t "$table" -S 2>/dev/null | grep -E -- "-j $chain( |\$)" | grep -vE "^-A (KUBE-|CNI-)" || true)
  done
  for chain in $(ours "$table"); do iptables -w -t "$table" -F "$chain" 2>/dev/null || true; done
  for chain in $(ours "$table"); do iptables -w -t "$table" -X "$chain" 2>/dev/null || true; done
}

down() {
  # Let kubelet tear pods down itself (sandboxes, veths, IPs): stop the
  # controllers that would recreate them, then delete every pod.
  if alive kube-apiserver && alive kubelet; then
    stop_one kube-controller-manager
    stop_one kube-scheduler
    kubectl delete pods --all --all-namespaces --grace-period=0 --force --wait=false >/dev/null 2>&1 || true
    wait_for "pods gone" 60 bash -c "[ -z \"\$(ctr --address $SOCK -n k8s.io tasks ls -q 2>/dev/null)\" ]" \
      || log "some containers still ran after 60s; stopping them directly"
  fi
  for name in kube-proxy kubelet kube-scheduler kube-controller-manager kube-apiserver; do stop_one "$name"; done
  if alive containerd; then
    for t in $(ctr --address "$SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$SOCK" -n k8s.io tasks kill -s KILL "$t" >/dev/null 2>&1 || true
      ctr --address "$SOCK" -n k8s.io tasks delete "$t" >/dev/null 2>&1 || true
    done
  fi
  stop_one containerd
  # Shims of our containerd name its socket on their command line.
  for p in $(pgrep -f "containerd-shim-runc-v2 .*-address $SOCK" || true); do kill -KILL "$p" 2>/dev/null || true; done
  stop_one etcd
  # Mounts under our state (pod volumes, rootfs) and network namespaces of our pods.
  grep -oE " ($STATE|$RUN)[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  if ip link show cni0 >/dev/null 2>&1; then ip link del cni0 && log "removed cni0"; fi
  rm -rf "$STATE/cni/ipam"
  if [ -x "$BIN/kube-proxy" ]; then "$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true; fi
  for table in filter nat mangle; do clean_chains "$table"; done
  iptables -w -D FORWARD -s "$POD_SUBNET" -j "$EGRESS_CHAIN" 2>/dev/null || true
  iptables -w -F "$EGRESS_CHAIN" 2>/dev/null || true
  iptables -w -X "$EGRESS_CHAIN" 2>/dev/null || true
  ip route del "$SERVICE_CIDR" dev lo 2>/dev/null || true
  ip addr del "$NODE_IP/32" dev lo 2>/dev/null || true
  log "down"
}

status() {
  local rc=0 name
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy; do
    if alive "$name"; then echo "$name: running (pid $(pid_of "$name"))"; else echo "$name: stopped"; rc=1; fi
  done
  if alive kube-apiserver; then
    echo "apiserver /livez: $(kubectl get --raw /livez 2>&1 | head -1)"
    echo "apiserver /readyz: $(kubectl get --raw /readyz 2>&1 | head -1)"
    kubectl get nodes 2>/dev/null || true
  fi
  echo "KUBECONFIG=$KC"
  return $rc
}

# restart etcd|kube-apiserver: stop it (TERM, then KILL) and start it again,
# as after a crash and its supervisor (the chaos suite's case 3).
restart() {
  case "${1:-}" in
    etcd) stop_one etcd; etcd_up ;;
    kube-apiserver) stop_one kube-apiserver; apiserver_up ;;
    *) die "restart: etcd or kube-apiserver" ;;
  esac
  log "restarted $1"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  restart) shift; restart "$@" ;;
  down) down ;;
  status) status ;;
  kubeconfig) echo "$KC" ;;
  *) die "usage: cluster.sh up [--api-only] | down | restart etcd|kube-apiserver | status | kubeconfig" ;;
esac
