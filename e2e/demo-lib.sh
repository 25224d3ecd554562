# Helpers of e2e/demo (sourced): output, three network-namespace hosts on a
# bridge, marsd per host, marsadm and NBD clients per host, JSON queries of
# `marsadm view`, and the cleanup that runs on every exit.
#
# Expects: $bin (marsd, marsadm), $work (temporary directory), $RES.

NS_PREFIX=mars-demo-
WAN=${NS_PREFIX}wan     # the "WAN": a namespace holding the bridge all hosts hang off
HOSTS=(dc1 dc2 dc3)
SUBNET=10.213.0         # a private range used only inside the demo's namespaces
PEER_PORT=7777
NBD_PORT=10809
CMD_TIMEOUT=60          # bound of any single command the demo runs

declare -A PID=()       # host -> marsd pid
started=$(date +%s)

# ---- output ---------------------------------------------------------------

if [ -t 1 ]; then B=$'\033[1m' D=$'\033[2m' G=$'\033[32m' R=$'\033[31m' N=$'\033[0m'; else B= D= G= R= N=; fi
step=0
say() { step=$((step + 1)); printf '\n%s== %d. %s%s\n' "$B" "$step" "$*" "$N"; }
note() { printf '%s%s%s\n' "$D" "$*" "$N"; }
ok() { printf '%s✓ %s%s\n' "$G" "$*" "$N"; }
die() { printf '%sFAILED: %s%s\n' "$R" "$*" "$N" >&2; exit 1; }

# ---- hosts ----------------------------------------------------------------

ns() { echo "$NS_PREFIX$1"; }
addr() { echo "$SUBNET.${1#dc}"; }
root() { echo "$work/$1/root"; }
img() { echo "$work/$1/$RES.img"; }

# shell-like rendering of a command line (arguments with blanks in '...').
show() {
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ [[:space:]\'\"\$\&\|\;\<\>\(\)\*\?] || -z "$a" ]]; then out+=("'$a'"); else out+=("$a"); fi
  done
  echo "${out[*]}"
}

# on HOST CMD...: shows `[HOST] CMD...` and runs it for HOST (marsadm against
# HOST's state root, anything else inside HOST's network namespace).
on() {
  local h=$1; shift
  printf '%s[%s]%s %s\n' "$B" "$h" "$N" "$(show "$@")"
  if [ "$1" = marsadm ]; then
    shift
    timeout -k 5 "$CMD_TIMEOUT" "$bin/marsadm" --root "$(root "$h")" "$@"
  else
    timeout -k 5 "$CMD_TIMEOUT" ip netns exec "$(ns "$h")" "$@"
  fi
}
# quiet variant for polling: marsadm of HOST, nothing shown.
adm() { local h=$1; shift; timeout -k 5 "$CMD_TIMEOUT" "$bin/marsadm" --root "$(root "$h")" "$@"; }
# run CMD...: shows `$ CMD...` and runs it here.
run() { printf '%s$%s %s\n' "$B" "$N" "$(show "$@")"; timeout -k 5 "$CMD_TIMEOUT" "$@"; }

# nbd HOST QEMU-IO-COMMANDS...: qemu-io on HOST against HOST's own NBD export.
nbd() {
  local h=$1; shift
  local args=() c
  for c in "$@"; do args+=(-c "$c"); done
  on "$h" qemu-io -f raw "nbd://$(addr "$h"):$NBD_PORT/$RES" "${args[@]}"
}

# A stale demo (its script killed with SIGKILL) may have left namespaces and
# the marsd processes it started in them.
delete_namespaces() {
  local n p
  for n in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NS_PREFIX" || true); do
    for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$n" 2>/dev/null || true
  done
}

make_network() {
  run ip netns add "$WAN"
  run ip -n "$WAN" link add wan type bridge
  run ip -n "$WAN" link set wan up
  local h
  for h in "${HOSTS[@]}"; do
    run ip netns add "$(ns "$h")"
    run ip -n "$WAN" link add "$h" type veth peer name eth0 netns "$(ns "$h")"
    run ip -n "$WAN" link set "$h" master wan up
    run ip -n "$(ns "$h")" addr add "$(addr "$h")/24" dev eth0
    run ip -n "$(ns "$h")" link set eth0 up
    run ip -n "$(ns "$h")" link set lo up
  done
}
cut_link() { run ip -n "$WAN" link set "$1" down; }
restore_link() { run ip -n "$WAN" link set "$1" up; }

# start_marsd HOST: marsd in HOST's namespace; returns when marsadm reaches it.
start_marsd() {
  local h=$1 a
  a=$(addr "$h")
  mkdir -p "$work/$h"
  printf '%s[%s]%s marsd --root %s --node %s --listen %s:%s --nbd %s:%s &\n' \
    "$B" "$h" "$N" "$(root "$h")" "$h" "$a" "$PEER_PORT" "$a" "$NBD_PORT"
  ip netns exec "$(ns "$h")" "$bin/marsd" --root "$(root "$h")" --node "$h" \
    --listen "$a:$PEER_PORT" --nbd "$a:$NBD_PORT" 2>>"$work/$h/marsd.log" 9>&- &
  PID[$h]=$!
  local deadline=$((SECONDS + 30))
  until adm "$h" view >/dev/null 2>&1; do
    kill -0 "${PID[$h]}" 2>/dev/null || die "marsd on $h exited (see its log above)"
    ((SECONDS < deadline)) || die "marsd on $h did not answer within 30 s"
    sleep 0.1
  done
}

# kill9_marsd HOST
kill9_marsd() {
  printf '%s[%s]%s kill -9 %s   (marsd)\n' "$B" "$1" "$N" "${PID[$1]}"
  kill -9 "${PID[$1]}"
  wait "${PID[$1]}" 2>/dev/null || true
  unset "PID[$1]"
}

# ---- queries of `marsadm view NAME --json` -----------------------------------

# q HOST PYTHON-EXPR: evaluates EXPR with r = this resource's view on HOST and
# rep(NODE) = its replica entry for NODE; prints the result.
q() {
  adm "$1" view "$RES" --json | python3 -c '
import json, sys
r = json.load(sys.stdin)["resources"][0]
def rep(n):
    return next((x for x in r.get("replicas", []) if x.get("node") == n), {})
v = eval(sys.argv[1])
print(str(v).lower() if isinstance(v, bool) else v)' "$2"
}

# until_true SECS WHAT HOST EXPR: polls q HOST EXPR until it prints "true".
until_true() {
  local secs=$1 what=$2 h=$3 expr=$4 deadline=$((SECONDS + $1))
  note "(waiting up to ${secs}s until $what)"
  until [ "$(q "$h" "$expr" 2>/dev/null)" = true ]; do
    ((SECONDS < deadline)) || die "$what did not happen within ${secs}s"
    sleep 0.2
  done
}

# ---- failure and cleanup ------------------------------------------------------

# ERR trap: names the failing line of e2e/demo (the outermost call).
on_err() {
  local rc=$? n=${#BASH_LINENO[@]}
  printf '%sFAILED (exit %d) at e2e/demo line %s%s\n' "$R" "$rc" "${BASH_LINENO[$((n - 2))]}" "$N" >&2
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM ERR
  set +e
  [ -n "${have_lock:-}" ] || exit "$rc"   # nothing of ours to clean up
  if ((rc != 0 && rc != 130 && rc != 143)) && [ -d "$work" ]; then
    local h
    for h in "${HOSTS[@]}"; do
      [ -s "$work/$h/marsd.log" ] || continue
      printf '\n%s--- last lines of marsd.log on %s ---%s\n' "$D" "$h" "$N" >&2
      tail -n 15 "$work/$h/marsd.log" >&2
    done
  fi
  printf '\n%s== cleaning up: stopping marsd, deleting the namespaces%s%s\n' "$B" "${work:+ and $work}" "$N"
  local p
  for p in "${PID[@]}"; do kill -9 "$p" 2>/dev/null; done
  for p in "${PID[@]}"; do wait "$p" 2>/dev/null; done
  delete_namespaces
  : >"$lock"
  if [ -n "${MARS_DEMO_KEEP:-}" ] && [ -n "$work" ]; then
    echo "keeping $work (MARS_DEMO_KEEP is set)"
  elif [ -n "$work" ]; then
    rm -rf "$work"
  fi
  if ((rc == 0)); then
    printf '%sdemo passed in %d s%s\n' "$G" "$(($(date +%s) - started))" "$N"
  else
    printf '%sdemo failed (exit %d) after %d s%s\n' "$R" "$rc" "$(($(date +%s) - started))" "$N" >&2
  fi
  exit "$rc"
}
