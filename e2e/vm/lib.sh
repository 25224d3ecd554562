# Helpers for the VM scenarios (busybox sh, sourced by /init before each
# scenario; state lives under /tmp/s, wiped between scenarios).
# Hosts are network namespaces routed through the VM's root namespace:
# host X has 10.0.N.2, its link is vX (root side) / hX (its side).

set -e
echo 1 >/proc/sys/net/ipv4/ip_forward

# Static busybox runs its own applets before anything on PATH: call the real
# tools by their paths.
ip() { /usr/local/bin/ip "$@"; }
mke2fs() { /usr/local/bin/mke2fs "$@"; }
e2fsck() { /usr/local/bin/e2fsck "$@"; }
resize2fs() { /usr/local/bin/resize2fs "$@"; }

fail() { echo "FAIL: $*"; exit 1; }
note() { echo "NOTE $*"; }
step() { echo "-- $*"; }

# host NAME N [marsd args...]: make the namespace and start marsd in it.
host() {
  local name=$1 n=$2; shift 2
  ip netns add "$name"
  ip link add "v$name" type veth peer name "h$name"
  ip link set "h$name" netns "$name"
  ip addr add "10.0.$n.1/24" dev "v$name"; ip link set "v$name" up
  ip netns exec "$name" ip addr add "10.0.$n.2/24" dev "h$name"
  ip netns exec "$name" ip link set "h$name" up
  ip netns exec "$name" ip link set lo up
  ip netns exec "$name" ip route add default via "10.0.$n.1"
  mkdir -p "/tmp/s/$name"
  echo "$n" >"/tmp/s/$name/n"
  echo "$*" >"/tmp/s/$name/args"
  start_marsd "$name"
}

addr() { echo "10.0.$(cat /tmp/s/$1/n).2:7000"; }

# start_marsd NAME: (re)starts NAME's marsd with its arguments; waits for its socket.
start_marsd() {
  local name=$1 i=0
  rm -f "/tmp/s/$name/root/marsd.sock"
  rm -f "/tmp/s/$name/pid"
  # `ip netns exec` forks: the shell inside records marsd's own pid.
  ip netns exec "$name" sh -c 'echo $$ >"$1"; shift; exec "$@"' sh "/tmp/s/$name/pid" \
    marsd --root "/tmp/s/$name/root" --node "$name" \
    --listen "$(addr "$name")" --startup-wait 2 --log-quota 256M $(cat "/tmp/s/$name/args") \
    >>"/tmp/s/$name/marsd.log" 2>&1 &
  while [ ! -S "/tmp/s/$name/root/marsd.sock" ] || [ ! -s "/tmp/s/$name/pid" ]; do
    i=$((i + 1)); [ $i -lt 300 ] || fail "marsd on $name did not start"
    sleep 0.1
  done
}

# kill9 NAME: SIGKILL, then wait until the process is gone (a zombie has
# released its files and its lock on the state root).
kill9() {
  local pid i=0; pid=$(cat "/tmp/s/$1/pid"); kill -9 "$pid"
  while [ -e "/proc/$pid" ] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 300 ] || fail "marsd on $1 did not die within 30 s of SIGKILL"
    sleep 0.1
  done
}
term() {
  local pid i=0; pid=$(cat "/tmp/s/$1/pid"); kill -TERM "$pid"
  while kill -0 "$pid" 2>/dev/null; do i=$((i + 1)); [ $i -lt 300 ] || fail "marsd on $1 ignored SIGTERM"; sleep 0.1; done
}

adm() { local name=$1; shift; marsadm --root "/tmp/s/$name/root" "$@"; }

# json NAME RESOURCE FIELD: a top-level string/number field of `view --json`.
json() {
  adm "$1" view "$2" --json | tr -d '\n ' | sed 's/"replicas":\[[^]]*\]//' |
    grep -o "\"$3\":[^,}]*" | head -1 | cut -d: -f2- | tr -d '"'
}

wait_dev() {
  local i=0
  while [ ! -b "$1" ]; do i=$((i + 1)); [ $i -lt 200 ] || fail "$1 did not appear"; sleep 0.1; done
}

md5() { md5sum "$@" | cut -d' ' -f1; }
# md5_head FILE BYTES
md5_head() { dd if="$1" bs=1M count=$(($2 >> 20)) 2>/dev/null | md5sum | cut -d' ' -f1; }

# Writes N files of random data into DIR, records their sums in DIR.sums.
write_files() {
  local dir=$1 n=$2 i=0
  while [ $i -lt "$n" ]; do
    dd if=/dev/urandom of="$dir/f$i" bs=64k count=$((1 + i % 16)) 2>/dev/null
    i=$((i + 1))
  done
  (cd "$dir" && md5sum f*) >"/tmp/s/$(basename "$dir").sums"
}
check_files() {
  (cd "$1" && md5sum -c -s "/tmp/s/$2.sums") || fail "files in $1 differ from what was written"
}
