# The test cluster itself: network namespace, PKI, control plane, node VMs. Sourced by
# e2e/k8s/cluster after common.sh, build.sh and debs.sh.
#
# Layout (all inside the network namespace $NS, which the harness creates and removes):
#   br0 10.201.0.1/24          control plane (etcd on 127.0.0.1:2379, apiserver on :6443), image depot :8081
#   dc1-n1 10.201.0.11 ...     one qemu VM per node, tap mk-<node> on br0; pods 10.244.<i>.0/24
#   services 10.96.0.0/24      kubernetes Service 10.96.0.1 -> 10.201.0.1:6443 (kube-proxy, iptables)
# Host tools reach the apiserver at 127.0.0.1:$API_PORT through two relays (TCP on host loopback ->
# unix socket -> TCP in the namespace): no interface or address is added to the host namespace.

NS=mars-k8s
NET=10.201.0
GW=$NET.1
NODES=(dc1-n1 dc2-n1 dc3-n1)
API_PORT=${MARS_K8S_API_PORT:-16443}
IMAGE_PORT=8081
RUN=$KC/run
PKI=$RUN/pki
KUBECONFIG_ADMIN=$RUN/admin.kubeconfig
VM_SMP=${MARS_K8S_VM_SMP:-2}
VM_MEM=${MARS_K8S_VM_MEM:-1536}
NODE_DISK_SIZE=${MARS_K8S_NODE_DISK:-10G}
READY_TIMEOUT=${MARS_K8S_READY_TIMEOUT:-900}

node_index() { local i; for i in "${!NODES[@]}"; do [ "${NODES[$i]}" = "$1" ] && { echo $((i + 1)); return 0; }; done; return 1; }
node_ip() { echo "$NET.$((10 + $(node_index "$1")))"; }
node_tap() { echo "mk-$1"; }
nsexec() { ip netns exec "$NS" "$@"; }
kctl() { "$KBIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ---------------------------------------------------------------- prerequisites
check_prereqs() {
  [ "$(id -u)" = 0 ] || die "must run as root (network namespace, tap devices)"
  [ -c /dev/net/tun ] || die "/dev/net/tun is missing (needed for the node VMs' tap devices)"
  mkdir -p "$KC"
  need_host_pkgs iproute2 openssl e2fsprogs busybox-static cpio xz-utils
  local free; free=$(df -Pk "$KC" | awk 'NR==2{print int($4/1024/1024)}')
  [ "$free" -ge 8 ] || die "only ${free} GiB free under $KC (need >= 8 GiB)"
  if ! pid_alive "$RUN/pids/relay-host.pid" && ss -Hltn "sport = :$API_PORT" 2>/dev/null | grep -q .; then
    die "port 127.0.0.1:$API_PORT is in use (set MARS_K8S_API_PORT)"
  fi
}

# ---------------------------------------------------------------- artefacts
build_tools() {
  local src=$K8S_DIR/go/tools want out=$KC/bin/k8s-tools
  want=$(cat "$src/go.mod" "$src/main.go" | sha256sum | cut -c1-16)
  [ -x "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null)" = "$want" ] && return 0
  command -v go >/dev/null || die "go not found on PATH (Go >= 1.26 is required)"
  mkdir -p "$KC/bin"
  (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$out.tmp" .) || die "building k8s-tools failed"
  mv "$out.tmp" "$out"; echo "$want" >"$out.stamp"
}

# Local images: pause (the sandbox image) and busybox, as OCI archives in the image depot.
build_images() {
  local d=$KC/images t=$KC/bin/k8s-tools want
  want=$(sha256sum "$t" /bin/busybox | sha256sum | cut -c1-16)
  [ "$(cat "$d/.stamp" 2>/dev/null)" = "$want" ] && return 0
  need_host_pkgs busybox-static
  rm -rf "$d"; mkdir -p "$d/bb/bin"
  "$t" oci localhost/mars/pause:1 "$d/pause.tar" --entrypoint /pause "$t:/pause" || die "pause image"
  cp /bin/busybox "$d/bb/bin/busybox"
  local a; for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$d/bb/bin/$a"; done
  mkdir -p "$d/bb/tmp" "$d/bb/etc" "$d/bb/root"
  echo 'root:x:0:0:root:/root:/bin/sh' >"$d/bb/etc/passwd"; echo 'root:x:0:' >"$d/bb/etc/group"
  "$t" oci localhost/mars/busybox:1 "$d/busybox.tar" --cmd sh "$d/bb:/" || die "busybox image"
  rm -rf "$d/bb"; echo "$want" >"$d/.stamp"
}

# The node VM's disks: a read-only base image (Debian rootfs + kube binaries + node init; each
# VM writes to a throw-away overlay, snapshot=on) and the initramfs that mounts it.
build_node_image() {
  local R=$KC/rootfs img=$KC/node-base.img want
  want=$(cat "$KBIN/.stamp" "$R.stamp" "$K8S_DIR/node/init" "$K8S_DIR/node/containerd.toml" "$K8S_DIR/node/initramfs-init" | sha256sum | cut -c1-16)
  if [ ! -f "$img" ] || [ "$(cat "$img.stamp" 2>/dev/null)" != "$want" ]; then
    log "node base image"
    install -m755 "$KBIN/kube" "$R/usr/local/bin/kube"
    local n; for n in kubelet kube-proxy kubectl; do ln -sf kube "$R/usr/local/bin/$n"; done
    install -m755 "$K8S_DIR/node/init" "$R/sbin/mars-node-init"
    mkdir -p "$R/etc/containerd"; install -m644 "$K8S_DIR/node/containerd.toml" "$R/etc/containerd/config.toml"
    rm -f "$img.tmp"; truncate -s 4G "$img.tmp"
    mkfs.ext4 -q -F -L mars-node -d "$R" "$img.tmp" || die "mkfs.ext4 -d (node base image)"
    mv "$img.tmp" "$img"; echo "$want" >"$img.stamp"
  fi
  local ird=$KC/initramfs
  want=$(cat "$K8S_DIR/node/initramfs-init" "$MARS_VM_KERNEL" | sha256sum | cut -c1-16)
  if [ ! -f "$KC/initrd.gz" ] || [ "$(cat "$KC/initrd.gz.stamp" 2>/dev/null)" != "$want" ]; then
    need_host_pkgs busybox-static cpio xz-utils
    rm -rf "$ird"; mkdir -p "$ird"/{bin,dev,proc,sys,newroot}
    cp /bin/busybox "$ird/bin/busybox"
    install -m755 "$K8S_DIR/node/initramfs-init" "$ird/init"
    xz -dc "$MARS_VM_MODULES/kernel/drivers/block/virtio_blk.ko.xz" >"$ird/virtio_blk.ko"
    (cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1 >"$KC/initrd.gz.tmp") && mv "$KC/initrd.gz.tmp" "$KC/initrd.gz"
    echo "$want" >"$KC/initrd.gz.stamp"; rm -rf "$ird"
  fi
}

ensure_all_built() {
  eval "$("$K8S_DIR/../vm/prepare")" || die "e2e/vm/prepare failed"
  export MARS_VM_KERNEL MARS_VM_MODULES MARS_VM_KVER MARS_VM_QEMU MARS_VM_QEMU_DATA
  local s
  s=$(date +%s); build_kube;       log "stage build-kube $(( $(date +%s) - s ))s"
  s=$(date +%s); build_tools;      ensure_etcd; log "stage tools+etcd $(( $(date +%s) - s ))s"
  s=$(date +%s); ensure_rootfs;    log "stage node-rootfs $(( $(date +%s) - s ))s"
  s=$(date +%s); build_images;     build_node_image; log "stage images+node-image $(( $(date +%s) - s ))s"
}

# ---------------------------------------------------------------- PKI, tokens, kubeconfigs
gen_pki() {
  [ -f "$PKI/.done" ] && return 0
  mkdir -p "$PKI"; local o=(-nodes -days 3650) p=$PKI
  openssl req -x509 -newkey rsa:2048 -keyout "$p/ca.key" -out "$p/ca.crt" "${o[@]}" -subj "/CN=mars-test-ca" 2>/dev/null
  cat >"$p/apiserver.ext" <<EOF
subjectAltName=IP:127.0.0.1,IP:$GW,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth
EOF
  printf 'extendedKeyUsage=clientAuth\n' >"$p/client.ext"
  openssl req -newkey rsa:2048 -keyout "$p/apiserver.key" -out "$p/apiserver.csr" -nodes -subj "/CN=kube-apiserver" 2>/dev/null
  openssl x509 -req -in "$p/apiserver.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -days 3650 -extfile "$p/apiserver.ext" -out "$p/apiserver.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -keyout "$p/kubelet-client.key" -out "$p/kubelet-client.csr" -nodes -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" 2>/dev/null
  openssl x509 -req -in "$p/kubelet-client.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -days 3650 -extfile "$p/client.ext" -out "$p/kubelet-client.crt" 2>/dev/null
  openssl genrsa -out "$p/sa.key" 2048 2>/dev/null; openssl rsa -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
  [ -s "$p/apiserver.crt" ] && [ -s "$p/kubelet-client.crt" ] && [ -s "$p/sa.pub" ] || die "PKI generation failed"
  # static tokens: token,user,uid,"groups"
  tok() { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
  {
    echo "$(tok),admin,admin,\"system:masters\""
    echo "$(tok),system:kube-controller-manager,kcm"
    echo "$(tok),system:kube-scheduler,scheduler"
    echo "$(tok),system:kube-proxy,kube-proxy"
    local n; for n in "${NODES[@]}"; do echo "$(tok),system:node:$n,node-$n,\"system:nodes\""; done
  } >"$p/tokens.csv"
  chmod 600 "$p"/*.key "$p/tokens.csv"
  touch "$p/.done"
}
token_of() { awk -F, -v u="$1" '$2==u{print $1}' "$PKI/tokens.csv"; }
kubeconfig() {  # kubeconfig FILE SERVER USER
  local ca; ca=$(base64 -w0 "$PKI/ca.crt")
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: mars-test
  cluster: {server: "$2", certificate-authority-data: $ca}
users:
- name: $3
  user: {token: $(token_of "$3")}
contexts:
- name: mars-test
  context: {cluster: mars-test, user: $3}
current-context: mars-test
EOF
}

# ---------------------------------------------------------------- network namespace
net_up() {
  if ! ip netns list | grep -qw "^$NS"; then
    ip netns add "$NS" || die "ip netns add $NS"
  fi
  nsexec ip link set lo up
  if ! nsexec ip link show br0 >/dev/null 2>&1; then
    nsexec ip link add br0 type bridge
    nsexec ip addr add "$GW/24" dev br0
  fi
  nsexec ip link set br0 up
  nsexec sysctl -qw net.ipv4.ip_forward=1
  local n; for n in "${NODES[@]}"; do
    nsexec ip route replace "10.244.$(node_index "$n").0/24" via "$(node_ip "$n")" dev br0 onlink
  done
}

# start NAME [--netns] CMD...: start a detached daemon, log $RUN/logs/NAME.log, pid $RUN/pids/NAME.pid
start() {
  local name=$1; shift; local pre=()
  if [ "$1" = --netns ]; then pre=(ip netns exec "$NS"); shift; fi
  pid_alive "$RUN/pids/$name.pid" && return 0
  mkdir -p "$RUN/logs" "$RUN/pids"
  "${pre[@]}" setsid "$@" >>"$RUN/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/pids/$name.pid"
}

wait_for() {  # wait_for SECONDS WHAT CMD...
  local t=$1 what=$2 i=0; shift 2
  until "$@" >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -le $((t * 2)) ] || die "timed out after ${t}s waiting for $what"
    sleep 0.5
  done
}

control_plane_up() {
  gen_pki
  local p=$PKI
  mkdir -p "$RUN/etcd" "$RUN/logs" "$RUN/pids" "$RUN/images"
  kubeconfig "$KUBECONFIG_ADMIN" "https://127.0.0.1:$API_PORT" admin
  kubeconfig "$RUN/admin-ns.kubeconfig" "https://127.0.0.1:6443" admin
  kubeconfig "$RUN/kcm.kubeconfig" "https://127.0.0.1:6443" system:kube-controller-manager
  kubeconfig "$RUN/scheduler.kubeconfig" "https://127.0.0.1:6443" system:kube-scheduler
  start etcd --netns "$KC/etcd/usr/bin/etcd" --name mars-test --data-dir "$RUN/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster mars-test=http://127.0.0.1:2380 --unsafe-no-fsync --log-level warn
  start kube-apiserver --netns "$KBIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --secure-port=6443 --advertise-address="$GW" \
    --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" --client-ca-file="$p/ca.crt" \
    --token-auth-file="$p/tokens.csv" --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local --service-account-key-file="$p/sa.pub" \
    --service-account-signing-key-file="$p/sa.key" --service-cluster-ip-range=10.96.0.0/24 --allow-privileged=true \
    --kubelet-client-certificate="$p/kubelet-client.crt" --kubelet-client-key="$p/kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP --profiling=false -v=1
  start relay-ns --netns "$KC/bin/k8s-tools" relay "unix:$RUN/api.sock" "tcp:127.0.0.1:6443"
  start relay-host "$KC/bin/k8s-tools" relay "tcp:127.0.0.1:$API_PORT" "unix:$RUN/api.sock"
  start image-depot --netns "$KC/bin/k8s-tools" serve "$GW:$IMAGE_PORT" "$RUN/images"
  wait_for 180 "kube-apiserver /readyz" kctl get --raw /readyz
  start kube-controller-manager --netns "$KBIN/kube-controller-manager" --kubeconfig="$RUN/kcm.kubeconfig" \
    --authentication-kubeconfig="$RUN/kcm.kubeconfig" --authorization-kubeconfig="$RUN/kcm.kubeconfig" \
    --leader-elect=false --use-service-account-credentials=true --root-ca-file="$p/ca.crt" \
    --service-account-private-key-file="$p/sa.key" --cluster-signing-cert-file="$p/ca.crt" \
    --cluster-signing-key-file="$p/ca.key" --node-monitor-grace-period=60s --bind-address=127.0.0.1 --profiling=false -v=1
  start kube-scheduler --netns "$KBIN/kube-scheduler" --kubeconfig="$RUN/scheduler.kubeconfig" \
    --authentication-kubeconfig="$RUN/scheduler.kubeconfig" --authorization-kubeconfig="$RUN/scheduler.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --profiling=false -v=1
  wait_for 120 "the default ServiceAccount" kctl -n default get serviceaccount default
}

# ---------------------------------------------------------------- nodes
node_seed() {  # the node's data disk, created once per cluster (kept across node-kill/node-start)
  local n=$1 d=$RUN/nodes/$1 i routes="" m
  i=$(node_index "$n")
  [ -f "$d/data.img" ] && return 0
  mkdir -p "$d/seed/config"
  for m in "${NODES[@]}"; do [ "$m" = "$n" ] || routes+="10.244.$(node_index "$m").0/24@$(node_ip "$m") "; done
  cat >"$d/seed/config/node.env" <<EOF
NODE_NAME=$n
NODE_IP=$(node_ip "$n")
NODE_GW=$GW
NODE_ZONE=dc$i
NODE_POD_CIDR=10.244.$i.0/24
NODE_ROUTES="$routes"
IMAGE_PORT=$IMAGE_PORT
EOF
  cp "$PKI/ca.crt" "$d/seed/config/ca.crt"
  kubeconfig "$d/seed/config/kubelet.kubeconfig" "https://$GW:6443" "system:node:$n"
  kubeconfig "$d/seed/config/kube-proxy.kubeconfig" "https://$GW:6443" system:kube-proxy
  cat >"$d/seed/config/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: /etc/kubernetes/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
failSwapOn: false
resolvConf: /etc/resolv.conf
runtimeRequestTimeout: 10m
nodeStatusUpdateFrequency: 10s
nodeStatusReportFrequency: 1m
syncFrequency: 30s
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {nodefs.available: "0%", nodefs.inodesFree: "0%", imagefs.available: "0%"}
serializeImagePulls: false
podCIDR: 10.244.$i.0/24
rotateCertificates: false
serverTLSBootstrap: false
EOF
  cat >"$d/seed/config/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: /etc/kubernetes/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: 10.244.0.0/16
hostnameOverride: $n
conntrack: {maxPerCore: 0}
EOF
  truncate -s "$NODE_DISK_SIZE" "$d/data.img.tmp"
  mkfs.ext4 -q -F -L "data-$n" -d "$d/seed" "$d/data.img.tmp" || die "mkfs.ext4 (data disk of $n)"
  mv "$d/data.img.tmp" "$d/data.img"; rm -rf "$d/seed"
}

node_start() {
  local n=$1 d=$RUN/nodes/$1 tap i
  tap=$(node_tap "$n"); i=$(node_index "$n")
  pid_alive "$d/qemu.pid" && return 0
  node_seed "$n"
  nsexec ip link show "$tap" >/dev/null 2>&1 || nsexec ip tuntap add dev "$tap" mode tap
  nsexec ip link set "$tap" master br0
  nsexec ip link set "$tap" up
  : >"$d/console.log"
  QEMU_MODULE_DIR=$(dirname "$MARS_VM_QEMU")/../lib/x86_64-linux-gnu/qemu nsexec "$MARS_VM_QEMU" \
    -L "$MARS_VM_QEMU_DATA/seabios" -L "$MARS_VM_QEMU_DATA/qemu" \
    -name "$n" -nodefaults -no-user-config -display none -no-reboot \
    -machine pc -accel tcg,thread=multi -cpu max -smp "$VM_SMP" -m "$VM_MEM" \
    -kernel "$MARS_VM_KERNEL" -initrd "$KC/initrd.gz" \
    -append "console=ttyS0 panic=-1 quiet mitigations=off cryptomgr.notests no_timer_check tsc=reliable" \
    -drive "file=$KC/node-base.img,if=virtio,format=raw,snapshot=on" \
    -drive "file=$d/data.img,if=virtio,format=raw" \
    -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no,vnet_hdr=off" \
    -device "virtio-net-pci,netdev=n0,mac=52:54:00:4d:4b:0$i,romfile=" \
    -serial "file:$d/console.log" -pidfile "$d/qemu.pid" -daemonize || die "qemu for $n failed to start"
}

node_ready() { [ "$(kctl get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]; }

wait_nodes_ready() {  # wait_nodes_ready SECONDS NODE...
  local t=$1 s; s=$(date +%s); shift
  local n
  for n in "$@"; do
    until node_ready "$n"; do
      [ $(( $(date +%s) - s )) -lt "$t" ] || die "node $n not Ready after ${t}s (console: $RUN/nodes/$n/console.log)"
      pid_alive "$RUN/nodes/$n/qemu.pid" || die "node $n: its VM is gone (console: $RUN/nodes/$n/console.log)"
      sleep 2
    done
  done
}

# ---------------------------------------------------------------- teardown
cluster_down() {
  local f pid n alive
  for f in "$RUN"/nodes/*/qemu.pid "$RUN"/pids/*.pid; do
    [ -f "$f" ] && kill -TERM "$(cat "$f")" 2>/dev/null || true
  done
  for n in $(seq 1 50); do
    alive=0
    for f in "$RUN"/nodes/*/qemu.pid "$RUN"/pids/*.pid; do
      if [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then alive=1; fi
    done
    [ $alive = 0 ] && break; sleep 0.2
  done
  for f in "$RUN"/nodes/*/qemu.pid "$RUN"/pids/*.pid; do
    [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null || true
  done
  if ip netns list | grep -qw "^$NS"; then
    for pid in $(ip netns pids "$NS" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    sleep 0.3
    ip netns delete "$NS" || die "ip netns delete $NS"
  fi
  rm -rf "$RUN"
}
