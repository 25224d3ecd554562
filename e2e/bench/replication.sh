#!/usr/bin/env bash
# replication.sh: log shipping between two hosts (network namespaces on a
# bridge, one machine): the network and disk ceilings, shipping + apply
# throughput (catch-up of a paused secondary), replication lag under a
# steady load, and the primary's IOPS with the link throttled, in one run.
#
# This is a benchmark, not a test: it asserts nothing about timings. It exits
# non-zero only when something could not be run (a missing tool, a server
# that did not start, a failed I/O, a wait that ran out). Needs root.
#
#   e2e/bench/replication.sh [--quick] [--out FILE] [--keep] [--throttle-mbit N] [--tbf-burst SIZE]
#                            [--slow-link-only] [--ship-compression MODE] [--compressible PCT]
#
# Environment: MARS_BENCH_DIR (parent of the work directory, default
# /var/tmp; it must be on the file system you want to measure),
# MARS_BIN_DIR (default target/release of this repository). Figures and
# their meaning: e2e/bench/README.md.

set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${MARS_BIN_DIR:-$REPO/target/release}
HELP="python3 $HERE/replication_results.py"

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
    exit "${1:-0}"
}

MODE=default
OUT=
THROTTLE_MBIT=
TBF_BURST=256k     # above a GSO packet: see README "the token bucket's burst"
SLOW_ONLY=0
KEEP=0
SHIP_COMPRESSION=      # marsd's --ship-compression on both hosts (empty: its default)
COMPRESSIBLE=0         # fio's buffer_compress_percentage (0: random data)
while [ $# -gt 0 ]; do
    case $1 in
        --quick) MODE=quick ;;
        --out) OUT=${2:?--out needs a file}; shift ;;
        --keep) KEEP=1 ;;
        --throttle-mbit)
            THROTTLE_MBIT=${2:?--throttle-mbit needs a number}; shift
            [[ "$THROTTLE_MBIT" =~ ^[1-9][0-9]*$ ]] || { echo "replication.sh: --throttle-mbit takes a whole number of Mbit/s" >&2; exit 2; }
            ;;
        --slow-link-only) SLOW_ONLY=1 ;;
        --ship-compression) SHIP_COMPRESSION=${2:?--ship-compression needs off, zstd or zstd:LEVEL}; shift ;;
        --compressible)
            COMPRESSIBLE=${2:?--compressible needs a percentage}; shift
            [[ "$COMPRESSIBLE" =~ ^([0-9]|[1-9][0-9])$ ]] || { echo "replication.sh: --compressible takes 0-99 (fio's buffer_compress_percentage)" >&2; exit 2; }
            ;;
        --tbf-burst)
            TBF_BURST=${2:?--tbf-burst needs a size}; shift
            [[ "$TBF_BURST" =~ ^[1-9][0-9]*[kKmM]?$ ]] || { echo "replication.sh: --tbf-burst takes a size like 64k" >&2; exit 2; }
            ;;
        -h | --help) usage 0 ;;
        *) echo "replication.sh: unknown argument $1" >&2; usage 2 >&2 ;;
    esac
    shift
done

# SHIP_MIB: written while the secondary is paused, then shipped (also the
# volume's size and each stream of the disk ceiling). LAG_S: the steady-load
# run. IOPS_S: each 4 KiB run (throttled and not). IPERF_S: iperf3's run.
if [ "$MODE" = quick ]; then
    SHIP_MIB=512 LAG_S=10 IOPS_S=10 IPERF_S=3
else
    SHIP_MIB=2048 LAG_S=20 IOPS_S=10 IPERF_S=10
fi
VOL_MIB=$SHIP_MIB
SYNC_MIB=64            # disk ceiling: each stream starts writeout every 64 MiB
SAMPLE_S=0.2           # lag sampling period
THROTTLE_PCT=10        # slow link: this share of iperf3's throughput,
                       # unless --throttle-mbit gives the rate
WAIT_S=180             # bound of every wait for the secondary to catch up
CMD_TIMEOUT=60         # bound of any single marsadm / ip / tc command

NS_PREFIX=mars-bench-
WAN=${NS_PREFIX}wan
NS_A=${NS_PREFIX}a
NS_B=${NS_PREFIX}b
SUBNET=10.214.0        # a private range used only inside these namespaces
IP_A=$SUBNET.1
IP_B=$SUBNET.2
PEER_PORT=7000
NBD_PORT=10809
RES=r1
LOCK=/run/mars-bench-replication.lock

say() { printf '%s\n' "$*"; }
die() { printf 'replication.sh: %s\n' "$*" >&2; exit 1; }

# ---- prerequisites: say everything that is missing at once
missing=()
[ "$(id -u)" -eq 0 ] || missing+=("root (network namespaces and tc)")
command -v fio >/dev/null || missing+=("fio (apt-get install fio)")
if command -v fio >/dev/null && ! fio --enghelp=nbd >/dev/null 2>&1; then
    missing+=("fio's nbd ioengine (Debian's fio has it; a build needs libnbd)")
fi
command -v iperf3 >/dev/null || missing+=("iperf3 (apt-get install iperf3)")
command -v ip >/dev/null || missing+=("ip (apt-get install iproute2)")
command -v tc >/dev/null || missing+=("tc (apt-get install iproute2)")
command -v python3 >/dev/null || missing+=("python3")
command -v timeout >/dev/null || missing+=("timeout (coreutils)")
command -v flock >/dev/null || missing+=("flock (util-linux)")
for b in marsd marsadm; do
    [ -x "$BIN/$b" ] || missing+=("$BIN/$b (cargo build --release -p mars-datapath, or set MARS_BIN_DIR)")
done
if [ ${#missing[@]} -gt 0 ]; then
    printf 'replication.sh: missing:\n' >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 2
fi

# One run at a time: the namespaces' names are fixed.
exec 9>"$LOCK"
flock -n 9 || die "another replication.sh holds $LOCK"

PARENT=${MARS_BENCH_DIR:-/var/tmp}
mkdir -p "$PARENT"
W=$(mktemp -d "$PARENT/mars-repl-bench.XXXXXX")
[ -n "$OUT" ] || OUT=$PARENT/mars-repl-bench-$(date +%Y%m%d-%H%M%S).json
declare -A PID=()      # A/B -> marsd pid
IPERF_PID=
SAMPLER_PID=
NETWORK=0

# Namespaces of ours left by a run killed with SIGKILL (we hold the lock,
# so no live run owns them), with whatever still runs in them.
delete_namespaces() {
    local n p
    for n in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NS_PREFIX" || true); do
        for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
        ip netns del "$n" 2>/dev/null || true
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    for p in $SAMPLER_PID $IPERF_PID; do
        kill "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    local h
    for h in "${!PID[@]}"; do kill -9 "${PID[$h]}" 2>/dev/null; done
    for h in "${!PID[@]}"; do wait "${PID[$h]}" 2>/dev/null; done
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ]; then
        for h in A B; do
            [ -s "$W/$h/marsd.log" ] || continue
            say "--- last lines of marsd.log on $h:" >&2
            tail -n 15 "$W/$h/marsd.log" >&2
        done
    fi
    [ "$NETWORK" = 0 ] || delete_namespaces
    if [ "$KEEP" = 1 ]; then
        say "work directory kept: $W"
    else
        rm -rf "$W"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bounded() { timeout -k 5 "$CMD_TIMEOUT" "$@"; }
in_ns() { local n=$1; shift; ip netns exec "$n" "$@"; }
adm() { local h=$1; shift; bounded "$BIN/marsadm" --root "$W/$h/root" "$@"; }
# wait_b: marsadm wait on A, bounded by WAIT_S (not by CMD_TIMEOUT).
wait_b() { timeout -k 5 $((WAIT_S + 10)) "$BIN/marsadm" --root "$W/A/root" wait "$RES" --timeout "$WAIT_S"; }
ns_of() { [ "$1" = A ] && echo "$NS_A" || echo "$NS_B"; }
ip_of() { [ "$1" = A ] && echo "$IP_A" || echo "$IP_B"; }

# status HOST NODE: "appended fetched applied lag_bytes lag_seconds", the
# resource's log.appended on HOST and NODE's replica entry as HOST sees it.
status() { $HELP status "$BIN/marsadm" "$W/$1/root" "$RES" "$2"; }

# catch_up SECONDS: resumes B's fetching and times until B has applied
# everything A has logged, polled on B (its own position, no gossip delay).
# Prints "seconds applied_at_resume applied_at_end"; returns 1 when SECONDS
# ran out.
catch_up() {
    local target
    target=$(status A A | cut -d' ' -f1)
    $HELP catchup "$BIN/marsadm" "$W/B/root" "$RES" B "$target" "$1" \
        timeout -k 5 "$CMD_TIMEOUT" "$BIN/marsadm" --root "$W/B/root" resume-fetch "$RES"
}

# run_fio NAME JOBFILE CAP_SECONDS: fio in A's namespace (the NBD client
# is on the primary's host).
run_fio() {
    local out=$W/fio/$1.json
    if ! timeout --kill-after=10 "$3" ip netns exec "$NS_A" \
        fio --output-format=json --output="$out" "$2" >"$W/fio/$1.log" 2>&1; then
        cat "$W/fio/$1.log" >&2
        die "fio run $1 failed or took longer than $3 s"
    fi
}

nbd_job() { # RW BS QD [EXTRA OPTIONS...]
    printf '[global]\nioengine=nbd\nuri=nbd://%s:%s/%s\nrw=%s\nbs=%s\niodepth=%s\n' \
        "$IP_A" "$NBD_PORT" "$RES" "$1" "$2" "$3"
    # New data for every write: fio otherwise sends one buffer over and
    # over, which per-link compression shrinks to nothing on the wire (a
    # throttled link then never binds).
    printf 'size=%sm\ndirect=0\nnorandommap=1\nrandrepeat=1\nrefill_buffers=1\n' "$VOL_MIB"
    if [ "$COMPRESSIBLE" -gt 0 ]; then
        printf 'buffer_compress_percentage=%s\n' "$COMPRESSIBLE"
    fi
    shift 3
    printf '%s\n' "$@"
    printf '[r1]\n'
}

start_marsd() { # HOST
    local h=$1 a
    a=$(ip_of "$h")
    mkdir -p "$W/$h/root"
    local extra=()
    [ -z "$SHIP_COMPRESSION" ] || extra=(--ship-compression "$SHIP_COMPRESSION")
    ip netns exec "$(ns_of "$h")" "$BIN/marsd" --root "$W/$h/root" --node "$h" \
        --listen "$a:$PEER_PORT" --nbd "$a:$NBD_PORT" "${extra[@]}" >"$W/$h/marsd.log" 2>&1 9>&- &
    PID[$h]=$!
    local deadline=$((SECONDS + 30))
    until adm "$h" view >/dev/null 2>&1; do
        kill -0 "${PID[$h]}" 2>/dev/null || die "marsd on $h exited during start-up"
        ((SECONDS < deadline)) || die "marsd on $h did not answer within 30 s"
        sleep 0.1
    done
}

load1() { cut -d' ' -f1 /proc/loadavg; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

# ---- set up
free_mib=$(df -Pm "$W" | awk 'NR == 2 { print $4 }')
need_mib=$((SHIP_MIB * 8 + 16384))
[ "$free_mib" -ge "$need_mib" ] || die "$W has $free_mib MiB free, the run needs about $need_mib MiB"
mkdir -p "$W/fio" "$W/ceiling" "$W/A" "$W/B"
say "mars replication benchmark ($MODE): work directory $W"
say "  file system: $(findmnt -n -o SOURCE,FSTYPE --target "$W" | tr -s ' ')," \
    "$(nproc) CPUs, load $(load1), volume ${VOL_MIB} MiB, shipped ${SHIP_MIB} MiB," \
    "lag run ${LAG_S} s, IOPS runs ${IOPS_S} s," \
    "ship compression ${SHIP_COMPRESSION:-marsd default}, fio data ${COMPRESSIBLE}% compressible"

delete_namespaces
NETWORK=1
bounded ip netns add "$WAN"
bounded ip -n "$WAN" link add wan type bridge
bounded ip -n "$WAN" link set wan up
for h in A B; do
    n=$(ns_of "$h")
    bounded ip netns add "$n"
    bounded ip -n "$WAN" link add "$h" type veth peer name eth0 netns "$n"
    bounded ip -n "$WAN" link set "$h" master wan up
    bounded ip -n "$n" addr add "$(ip_of "$h")/24" dev eth0
    bounded ip -n "$n" link set eth0 up
    bounded ip -n "$n" link set lo up
done

# ---- 1a. network ceiling: iperf3 A -> B, one TCP stream (like shipping)
say ""
say "1. ceilings"
ip netns exec "$NS_B" iperf3 -s -B "$IP_B" >"$W/iperf3-server.log" 2>&1 &
IPERF_PID=$!
for _ in $(seq 50); do
    kill -0 "$IPERF_PID" 2>/dev/null || { cat "$W/iperf3-server.log" >&2; die "iperf3 server exited"; }
    ip netns exec "$NS_B" ss -Hltn "sport = :5201" | grep -q . && break
    sleep 0.1
done
timeout -k 5 $((IPERF_S + 30)) ip netns exec "$NS_A" iperf3 -c "$IP_B" -t "$IPERF_S" -J \
    >"$W/iperf3.json" 2>"$W/iperf3.err" || { cat "$W/iperf3.err" "$W/iperf3.json" >&2; die "iperf3 failed"; }
kill "$IPERF_PID" 2>/dev/null || true
wait "$IPERF_PID" 2>/dev/null || true
IPERF_PID=
NET_BITS=$($HELP iperf "$W/iperf3.json")
NET_MIB=$(awk -v b="$NET_BITS" 'BEGIN { printf "%.1f", b / 8 / 1048576 }')
say "  network: $(awk -v b="$NET_BITS" 'BEGIN { printf "%.2f", b / 1e9 }') Gbit/s = $NET_MIB MiB/s"

if [ "$SLOW_ONLY" = 0 ]; then
# ---- 1b. disk ceiling: the four streams one replicated write causes, at
# once on this file system: primary log append, primary image writeback,
# secondary log append, secondary image apply. Appends go to new files,
# image writes into prefilled files, all sequential 1 MiB, buffered, pushed
# to the disk every SYNC_MIB and fsync'd at the end.
for f in pimg simg; do dd if=/dev/zero of="$W/ceiling/$f" bs=1M count="$SHIP_MIB" status=none; done
sync
{ printf '[global]\nrw=write\nbs=1m\nioengine=psync\ndirect=0\nsize=%sm\nend_fsync=1\nsync_file_range=write:%s\n' \
      "$SHIP_MIB" "$SYNC_MIB"
  for f in plog pimg slog simg; do printf '[%s]\nfilename=%s\n' "$f" "$W/ceiling/$f"; done
} >"$W/ceiling.fio"
timeout -k 10 $((SHIP_MIB / 2 + 120)) fio --output-format=json --output="$W/fio/ceiling.json" "$W/ceiling.fio" \
    >"$W/fio/ceiling.log" 2>&1 || { cat "$W/fio/ceiling.log" >&2; die "disk ceiling fio run failed"; }
read -r DISK_BYTES DISK_SECS DISK_MIB DISK_STREAMS < <($HELP streams "$W/fio/ceiling.json" | awk '{ s = $4; for (i = 5; i <= NF; i++) s = s "/" $i; print $1, $2, $3, s }')
# The catch-up phase (2.) runs only the secondary's two streams (the
# primary has written back before it): its own ceiling, same files.
rm -f "$W/ceiling/plog" "$W/ceiling/slog" "$W/ceiling/pimg"
sync
{ printf '[global]\nrw=write\nbs=1m\nioengine=psync\ndirect=0\nsize=%sm\nend_fsync=1\nsync_file_range=write:%s\n' \
      "$SHIP_MIB" "$SYNC_MIB"
  for f in slog simg; do printf '[%s]\nfilename=%s\n' "$f" "$W/ceiling/$f"; done
} >"$W/ceiling2.fio"
timeout -k 10 $((SHIP_MIB / 2 + 120)) fio --output-format=json --output="$W/fio/ceiling2.json" "$W/ceiling2.fio" \
    >"$W/fio/ceiling2.log" 2>&1 || { cat "$W/fio/ceiling2.log" >&2; die "2-stream disk ceiling fio run failed"; }
read -r _ _ DISK2_MIB DISK2_STREAMS < <($HELP streams "$W/fio/ceiling2.json" | awk '{ s = $4; for (i = 5; i <= NF; i++) s = s "/" $i; print $1, $2, $3, s }')
rm -rf "$W/ceiling"
CEIL_MIB=$(awk -v a="$NET_MIB" -v b="$DISK_MIB" 'BEGIN { print (a < b ? a : b) }')
say "  disk, 4 streams of ${SHIP_MIB} MiB at once: $DISK_MIB MiB/s (per stream $DISK_STREAMS)"
say "  disk, 2 streams (the secondary's log + image) of ${SHIP_MIB} MiB at once: $DISK2_MIB MiB/s (per stream $DISK2_STREAMS)"
say "  replication ceiling min(network, disk 4 streams): $CEIL_MIB MiB/s"

fi
# ---- two hosts: A primary, B secondary; images prefilled with zeroes so
# that the fast full sync finds nothing to copy and no write pays for
# block allocation.
for h in A B; do dd if=/dev/zero of="$W/$h/$RES.img" bs=1M count="$VOL_MIB" status=none; done
sync
start_marsd A
start_marsd B
adm A create-resource "$RES" "$W/A/$RES.img" --size "${VOL_MIB}M" >/dev/null
adm B join-cluster "$IP_A:$PEER_PORT" >/dev/null
adm B join-resource "$RES" "$W/B/$RES.img" >/dev/null
adm A wait "$RES" --timeout 120 >/dev/null || die "B did not become UpToDate within 120 s"

if [ "$SLOW_ONLY" = 0 ]; then
# ---- 2. shipping + apply: write SHIP_MIB with B's fetching paused, then
# resume and time B's catch-up (fetch + apply, measured on B).
say ""
say "2. shipping + apply: ${SHIP_MIB} MiB sequential 1 MiB QD32 with B paused, then B catches up"
adm B pause-fetch "$RES" >/dev/null
nbd_job write 1m 32 end_fsync=1 >"$W/job.fio"
run_fio ship "$W/job.fio" $((SHIP_MIB / 4 + 120))
read -r SHIP_BYTES SHIP_SECS SHIP_MIB_S _ _ < <($HELP fio "$W/fio/ship.json")
say "  primary wrote ${SHIP_MIB} MiB at $SHIP_MIB_S MiB/s (B paused)"
# A writes back everything first, so that the catch-up runs only B's two
# streams (B's log append and apply), against the 2-stream ceiling.
deadline=$((SECONDS + WAIT_S))
until read -r app wb < <(adm A view "$RES" --json | python3 -c 'import json, sys; l = json.load(sys.stdin)["resources"][0]["log"]; print(l["appended"], l["written_back"])') && [ "$wb" -ge "$app" ]; do
    ((SECONDS < deadline)) || die "A's writeback still behind after $WAIT_S s"
    sleep 0.2
done
sync
CATCHUP_TIMED_OUT=0
target=$(status A A | cut -d' ' -f1)
catch_up "$WAIT_S" >"$W/catchup.out" || CATCHUP_TIMED_OUT=1
read -r CATCHUP_S APPLIED0 applied_now <"$W/catchup.out" || die "catch-up: the poller failed"
SHIP_LOG_BYTES=$((target - APPLIED0))
CATCHUP_MIB=$(awk -v b="$SHIP_LOG_BYTES" -v s="$CATCHUP_S" 'BEGIN { printf "%.1f", b / 1048576 / s }')
if [ "$CATCHUP_TIMED_OUT" = 1 ]; then
    say "  WARNING: B had not caught up after $WAIT_S s (applied $applied_now of $target)"
fi
say "  B fetched and applied $(mib "$SHIP_LOG_BYTES") MiB of log in $CATCHUP_S s: $CATCHUP_MIB MiB/s"
# What the catch-up took on the wire (A's counters since it started: only
# this phase has shipped anything so far).
read -r WIRE_LOG WIRE_BYTES < <(adm A view "$RES" --json | python3 -c 'import json, sys; l = json.load(sys.stdin)["resources"][0]["log"]; print(l.get("shipped_bytes", 0), l.get("shipped_wire_bytes", 0))')
say "  on the wire: $(mib "$WIRE_BYTES") MiB for $(mib "$WIRE_LOG") MiB of log" \
    "($(awk -v l="$WIRE_LOG" -v w="$WIRE_BYTES" 'BEGIN { printf "%.2f", (w > 0 ? l / w : 0) }')x)"

# ---- 3. lag under a steady load at about half the ceiling; B's lag as A
# sees it (gossip), every SAMPLE_S.
LAG_RATE=$(awk -v c="$CEIL_MIB" -v s="$CATCHUP_MIB" 'BEGIN { r = int(c / 2); if (r < 1) r = 1; print r }')
say ""
say "3. lag: sequential 1 MiB at $LAG_RATE MiB/s (half the ceiling) for $LAG_S s, B's lag sampled on A every $SAMPLE_S s"
wait_b >/dev/null || die "B (or A's own writeback, which wait also counts) did not catch up within $WAIT_S s before the lag run"
nbd_job write 1m 4 time_based=1 runtime="$LAG_S" rate="${LAG_RATE}m" >"$W/job.fio"
$HELP sample "$BIN/marsadm" "$W/A/root" "$RES" B "$SAMPLE_S" "$W/lag.jsonl" "$W/B/root" &
SAMPLER_PID=$!
run_fio lag "$W/job.fio" $((LAG_S + 120))
kill "$SAMPLER_PID"
wait "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=
read -r _ _ LAG_WRITE_MIB _ _ < <($HELP fio "$W/fio/lag.json")
read -r LAG_N LAG_B50 LAG_B99 LAG_BMAX LAG_S50 LAG_S99 LAG_SMAX LAG_ZERO \
    APPLY_B50 APPLY_B99 APPLY_BMAX APPLY_S50 APPLY_S99 APPLY_SMAX < <($HELP lagstats "$W/lag.jsonl")
[ "$LAG_N" -gt 0 ] || die "the lag sampler got no sample"
t0=$(date +%s%N)
wait_b >/dev/null || die "B (or A's own writeback, which wait also counts) did not catch up within $WAIT_S s after the lag run"
LAG_DRAIN=$(awk -v n="$(( $(date +%s%N) - t0 ))" 'BEGIN { printf "%.2f", n / 1e9 }')
say "  achieved $LAG_WRITE_MIB MiB/s; as A reports it: lag_bytes p50 $LAG_B50 p99 $LAG_B99; lag_seconds p50 $LAG_S50 p99 $LAG_S99 ($LAG_N samples); drained in $LAG_DRAIN s"
say "  apply lag (A's appended vs B's own applied): bytes p50 $APPLY_B50 p99 $APPLY_B99; seconds p50 $APPLY_S50 p99 $APPLY_S99"

fi
# ---- 4. the writer on a slow link: 4 KiB random QD32 on A, unthrottled,
# then with A-B throttled to THROTTLE_PCT % of iperf3's figure on both ends.
if [ -n "$THROTTLE_MBIT" ]; then
    TBF_BITS=$((THROTTLE_MBIT * 1000000))
else
    TBF_BITS=$((NET_BITS * THROTTLE_PCT / 100))
fi
say ""
say "4. slow link: rand-4K-QD32 for $IOPS_S s, unthrottled, then A-B throttled to $((TBF_BITS / 1000000)) Mbit/s"
nbd_job randwrite 4k 32 time_based=1 runtime="$IOPS_S" >"$W/job.fio"
# iops_run NAME: one run; sets R_MIB R_IOPS R_P99 R_LOG_MIB R_UNFETCHED
# R_LAG (B behind at the end: not yet fetched, not yet applied, as A sees it).
# cpu_ticks: CPU time so far (clock ticks) of marsd A, marsd B, and the
# machine's user+nice, system, softirq+irq, idle+iowait (all CPUs).
cpu_ticks() {
    local h t
    for h in A B; do
        read -r -a t <"/proc/${PID[$h]}/stat" 2>/dev/null || t=()
        # utime and stime are fields 14 and 15 (the name has no spaces here).
        printf '%s ' "$(( ${t[13]:-0} + ${t[14]:-0} ))"
    done
    awk '$1 == "cpu" { print $2 + $3, $4, $7 + $8, $5 + $6 }' /proc/stat
}
# cpu_share BEFORE AFTER: "marsd A, marsd B, user, system, softirq, idle"
# as seconds of CPU per second of the run (2.00 = both CPUs busy).
cpu_share() {
    awk -v b="$1" -v a="$2" -v s="$IOPS_S" -v hz="$(getconf CLK_TCK)" 'BEGIN {
        n = split(b, x, " "); split(a, y, " ");
        for (i = 1; i <= n; i++) printf "%.2f%s", (y[i] - x[i]) / hz / s, (i < n ? " " : "\n") }'
}

iops_run() {
    local app0 app1 fetched1 c0 c1
    wait_b >/dev/null || die "B (or A's own writeback, which wait also counts) did not catch up within $WAIT_S s before run $1"
    read -r app0 _ _ _ _ < <(status A B)
    c0=$(cpu_ticks)
    run_fio "$1" "$W/job.fio" $((IOPS_S + 120))
    c1=$(cpu_ticks)
    read -r R_CPU_A R_CPU_B R_CPU_USER R_CPU_SYS R_CPU_SOFTIRQ R_CPU_IDLE < <(cpu_share "$c0" "$c1")
    read -r app1 fetched1 _ R_LAG _ < <(status A B)
    read -r _ _ R_MIB R_IOPS R_P99 < <($HELP fio "$W/fio/$1.json")
    R_UNFETCHED=$((app1 - fetched1))
    R_LOG_MIB=$(awk -v b="$((app1 - app0))" -v s="$IOPS_S" 'BEGIN { printf "%.1f", b / 1048576 / s }')
    say "  $2 $R_IOPS IOPS ($R_MIB MiB/s, p99 $R_P99 µs); log $R_LOG_MIB MiB/s," \
        "B $(mib "$R_UNFETCHED") MiB unfetched, $(mib "$R_LAG") MiB unapplied at the end"
    say "               CPUs busy (of $(nproc)): marsd A $R_CPU_A, marsd B $R_CPU_B;" \
        "machine: user $R_CPU_USER, system $R_CPU_SYS, irq+softirq $R_CPU_SOFTIRQ, idle $R_CPU_IDLE"
    printf '%s %s %s %s %s %s %s\n' "$1" "$R_CPU_A" "$R_CPU_B" "$R_CPU_USER" "$R_CPU_SYS" \
        "$R_CPU_SOFTIRQ" "$R_CPU_IDLE" >>"$W/cpu.txt"
}
# Unthrottled before and after the throttled run, so that a drift (page
# cache, log files, other tenants) shows instead of passing for an effect.
iops_run iops-fast1 "unthrottled:"
FAST1_IOPS=$R_IOPS FAST1_MIB=$R_MIB FAST1_P99=$R_P99 FAST_LOG_MIB=$R_LOG_MIB
FAST_UNFETCHED=$R_UNFETCHED FAST_LAG_AFTER=$R_LAG
for n in "$NS_A" "$NS_B"; do
    bounded tc -n "$n" qdisc add dev eth0 root tbf rate "${TBF_BITS}bit" burst "$TBF_BURST" latency 50ms
done
iops_run iops-slow "throttled:  "
SLOW_IOPS=$R_IOPS SLOW_MIB=$R_MIB SLOW_P99=$R_P99 SLOW_LOG_MIB=$R_LOG_MIB
SLOW_UNFETCHED=$R_UNFETCHED SLOW_LAG_AFTER=$R_LAG
for n in "$NS_A" "$NS_B"; do bounded tc -n "$n" qdisc del dev eth0 root; done
iops_run iops-fast2 "unthrottled:"
FAST2_IOPS=$R_IOPS
# The same with B's fetching paused: nothing is shipped or applied, so this
# is the primary alone on this machine (B's work shares its CPUs and disk).
wait_b >/dev/null || die "B (or A's own writeback, which wait also counts) did not catch up within $WAIT_S s before the paused run"
adm B pause-fetch "$RES" >/dev/null
iops_run iops-paused "B paused:   "
PAUSED_IOPS=$R_IOPS PAUSED_P99=$R_P99
adm B resume-fetch "$RES" >/dev/null
FAST_IOPS=$(( (FAST1_IOPS + FAST2_IOPS) / 2 ))
FAST_MIB=$FAST1_MIB FAST_P99=$FAST1_P99
if awk -v l="$SLOW_LOG_MIB" -v t="$TBF_BITS" 'BEGIN { exit !(l * 1048576 * 8 < t * 0.8) }'; then
    say "  note: the log grew slower than the throttled link carries, so the throttle hardly bound;"
    say "        --throttle-mbit N with N below $(awk -v l="$FAST_LOG_MIB" 'BEGIN { printf "%d", l * 8.39 }') (the unthrottled log rate) makes it bind"
fi

if [ "$SLOW_ONLY" = 1 ]; then
    say ""
    say "--slow-link-only: no report"
    exit 0
fi

# ---- report
python3 - "$W/meta.json" <<EOF
import datetime, json, os, platform, subprocess, sys
def out(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd="$REPO").stdout.strip().splitlines()[0]
    except Exception:
        return None
json.dump({
    "mode": "$MODE",
    "params": {
        "volume_bytes": $VOL_MIB << 20, "shipped_bytes": $SHIP_MIB << 20,
        "lag_seconds": $LAG_S, "lag_sample_seconds": $SAMPLE_S, "iops_seconds": $IOPS_S,
        "iperf_seconds": $IPERF_S, "throttle_percent": $([ -n "$THROTTLE_MBIT" ] && echo None || echo "$THROTTLE_PCT"),
        "throttle_mbit_option": ${THROTTLE_MBIT:-None}, "tbf_burst": "$TBF_BURST",
        "disk_ceiling_sync_bytes": $SYNC_MIB << 20,
        "ship_compression": "${SHIP_COMPRESSION:-default}",
        "compressible_percent": $COMPRESSIBLE,
    },
    "catchup_wire": {"log_bytes": ${WIRE_LOG:-0}, "wire_bytes": ${WIRE_BYTES:-0}},
    "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
    "load1_at_end": os.getloadavg()[0],
    "filesystem": out("findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "--target", "$W"),
    "fio": out("fio", "--version"), "iperf3": out("iperf3", "--version"),
    "mars_commit": out("git", "rev-parse", "HEAD"),
    "mars_dirty": bool(out("git", "status", "--porcelain", "datapath")),
    "mars_bin": "$BIN",
    "mars_bin_built": datetime.datetime.fromtimestamp(
        os.path.getmtime("$BIN/marsd"), datetime.timezone.utc).isoformat(timespec="seconds"),
}, open(sys.argv[1], "w"), indent=2)
EOF
$HELP report "$W/meta.json" "$OUT" \
    net_bits_s="$NET_BITS" disk_mib_s="$DISK_MIB" disk_streams="$DISK_STREAMS" \
    disk2_mib_s="$DISK2_MIB" disk2_streams="$DISK2_STREAMS" \
    disk_bytes="$DISK_BYTES" disk_seconds="$DISK_SECS" \
    ship_bytes="$SHIP_BYTES" ship_write_mib_s="$SHIP_MIB_S" ship_write_seconds="$SHIP_SECS" \
    ship_log_bytes="$SHIP_LOG_BYTES" catchup_seconds="$CATCHUP_S" catchup_mib_s="$CATCHUP_MIB" \
    catchup_timed_out="$CATCHUP_TIMED_OUT" \
    lag_rate_mib_s="$LAG_RATE" lag_write_mib_s="$LAG_WRITE_MIB" lag_s="$LAG_S" lag_samples="$LAG_N" \
    lag_zero="$LAG_ZERO" lag_b50="$LAG_B50" lag_b99="$LAG_B99" lag_bmax="$LAG_BMAX" \
    lag_s50="$LAG_S50" lag_s99="$LAG_S99" lag_smax="$LAG_SMAX" lag_drain_seconds="$LAG_DRAIN" \
    apply_b50="$APPLY_B50" apply_b99="$APPLY_B99" apply_bmax="$APPLY_BMAX" \
    apply_s50="$APPLY_S50" apply_s99="$APPLY_S99" apply_smax="$APPLY_SMAX" \
    iops_paused="$PAUSED_IOPS" iops_paused_p99="$PAUSED_P99" cpu_file="$W/cpu.txt" \
    tbf_bits_s="$TBF_BITS" iops_fast="$FAST_IOPS" iops_slow="$SLOW_IOPS" \
    iops_fast1="$FAST1_IOPS" iops_fast2="$FAST2_IOPS" iops_fast_mib_s="$FAST_MIB" iops_slow_mib_s="$SLOW_MIB" \
    iops_fast_p99="$FAST_P99" iops_slow_p99="$SLOW_P99" slow_lag_after="$SLOW_LAG_AFTER" \
    slow_unfetched_after="$SLOW_UNFETCHED" fast_lag_after="$FAST_LAG_AFTER" \
    fast_unfetched_after="$FAST_UNFETCHED" fast_log_mib_s="$FAST_LOG_MIB" slow_log_mib_s="$SLOW_LOG_MIB"
say ""
say "results: $OUT"
