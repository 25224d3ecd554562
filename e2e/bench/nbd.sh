#!/usr/bin/env bash
# nbd.sh: write throughput of mars's NBD export against qemu-nbd, against fio
# on the file system itself, and against the two-stream ceiling (log +
# writeback), all in one run on one work directory.
#
# This is a benchmark, not a test: it asserts nothing about timings. It exits
# non-zero only when something could not be run (a missing tool, a server
# that did not start, a failed I/O).
#
#   e2e/bench/nbd.sh [--quick] [--out FILE] [--keep]
#
# Environment: MARS_BENCH_DIR (parent of the work directory, default
# /var/tmp; it must be on the file system you want to measure),
# MARS_BIN_DIR (default target/release of this repository). Figures and
# their meaning: e2e/bench/README.md.

set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${MARS_BIN_DIR:-$REPO/target/release}
PYNBD=/usr/bin/python3 # libnbd's Python module is packaged for the system Python
RESULTS="python3 $HERE/nbd_results.py"

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
    exit "${1:-0}"
}

MODE=default
OUT=
KEEP=0
while [ $# -gt 0 ]; do
    case $1 in
        --quick) MODE=quick ;;
        --out) OUT=${2:?--out needs a file}; shift ;;
        --keep) KEEP=1 ;;
        -h | --help) usage 0 ;;
        *) echo "nbd.sh: unknown argument $1" >&2; usage 2 >&2 ;;
    esac
    shift
done

# Sizes in MiB. A burst fits in the overlay; a sustained run writes for
# SUSTAIN_S seconds, which should be several times the overlay.
if [ "$MODE" = quick ]; then
    VOL_MIB=256 BURST_MIB=32 BURST_REPS=1 OVERLAY_MIB=64 SUSTAIN_S=5 FUA_S=3
else
    VOL_MIB=1024 BURST_MIB=128 BURST_REPS=3 OVERLAY_MIB=256 SUSTAIN_S=15 FUA_S=8
fi
# The two-stream ceiling starts writeout of each stream every SYNC_MIB
# (sync_file_range, which does not wait), so that every byte reaches the
# disk, as writeback's syncs make it do for mars, without stalling a stream.
SYNC_MIB=64
WORKLOADS=(
    # name          rw         bs  qd
    "seq-1M-QD1     write      1m  1"
    "seq-1M-QD32    write      1m  32"
    "rand-4K-QD1    randwrite  4k  1"
    "rand-4K-QD32   randwrite  4k  32"
)

say() { printf '%s\n' "$*"; }
die() { printf 'nbd.sh: %s\n' "$*" >&2; exit 1; }

# ---- prerequisites: say everything that is missing at once
missing=()
command -v fio >/dev/null || missing+=("fio (apt-get install fio)")
if command -v fio >/dev/null && ! fio --enghelp=nbd >/dev/null 2>&1; then
    missing+=("fio's nbd ioengine (Debian's fio has it; a build needs libnbd)")
fi
command -v qemu-nbd >/dev/null || missing+=("qemu-nbd (apt-get install qemu-utils)")
command -v python3 >/dev/null || missing+=("python3")
command -v timeout >/dev/null || missing+=("timeout (coreutils)")
"$PYNBD" -c 'import nbd' 2>/dev/null || missing+=("libnbd for $PYNBD (apt-get install python3-libnbd)")
for b in marsd marsadm; do
    [ -x "$BIN/$b" ] || missing+=("$BIN/$b (cargo build --release -p mars-datapath, or set MARS_BIN_DIR)")
done
if [ ${#missing[@]} -gt 0 ]; then
    printf 'nbd.sh: missing:\n' >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 2
fi

PARENT=${MARS_BENCH_DIR:-/var/tmp}
mkdir -p "$PARENT"
W=$(mktemp -d "$PARENT/mars-bench.XXXXXX")
[ -n "$OUT" ] || OUT=$PARENT/mars-bench-$(date +%Y%m%d-%H%M%S).json
RUNS=$W/runs.jsonl
MARSD_PID=
QEMU_PID=
SAMPLER_PID=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$SAMPLER_PID" ]; then
        kill "$SAMPLER_PID" 2>/dev/null || true
        wait "$SAMPLER_PID" 2>/dev/null || true
    fi
    if [ -n "$QEMU_PID" ]; then
        kill "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    if [ -n "$MARSD_PID" ]; then
        kill -TERM "$MARSD_PID" 2>/dev/null || true
        # marsd writes back for up to 15 s on SIGTERM.
        for _ in $(seq 200); do kill -0 "$MARSD_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$MARSD_PID" 2>/dev/null || true
        wait "$MARSD_PID" 2>/dev/null || true
    fi
    if [ "$rc" -ne 0 ] && [ -f "$W/marsd.log" ]; then
        say "--- last lines of marsd.log:" >&2
        tail -n 20 "$W/marsd.log" >&2 || true
    fi
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

free_ports() {
    python3 -c '
import socket
socks = [socket.socket() for _ in range(int(__import__("sys").argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])' "$1"
}

wait_port() { # PORT PID NAME
    for _ in $(seq 100); do
        kill -0 "$2" 2>/dev/null || die "$3 exited during start-up"
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "$3 does not listen on port $1 after 10 s"
}

marsadm() { "$BIN/marsadm" --root "$W/root" "$@"; }

# Bytes logged but not yet written back (the one resource's "appended" -
# "written_back" in `view --json`).
backlog() {
    marsadm view --json | awk -F'[:,]' '/"appended"/ { a = $2 } /"written_back"/ { w = $2 } END { print a - w }'
}

# Samples the backlog every 0.5 s and keeps the largest in FILE.
sample_backlog() { # FILE
    local max=0 b
    echo 0 >"$1"
    while :; do
        b=$(backlog 2>/dev/null) || b=0
        if [ "$b" -gt "$max" ]; then max=$b; echo "$max" >"$1"; fi
        sleep 0.5
    done
}

# Waits until marsd has written back everything it logged, then syncs the
# file system, so that no run pays for the previous run's dirty pages.
settle() {
    local b
    for _ in $(seq 600); do
        b=$(backlog)
        [ "$b" -eq 0 ] && break
        sleep 0.2
    done
    [ "$b" -eq 0 ] || die "writeback still $b bytes behind after 120 s"
    sync
    sleep 1
}

load1() { cut -d' ' -f1 /proc/loadavg; }

# Sectors written to the work directory's disk so far (-1: not a disk in
# /proc/diskstats). Other tenants' writes count too: a hint, not a measure.
disk_sectors() {
    awk -v d="$DISK_DEV" '$3 == d { print $10; found = 1 } END { if (!found) print -1 }' /proc/diskstats
}

# CPU ticks (USER_HZ) used by the whole machine, and by this benchmark:
# this shell and every child it has waited for (fio, the FUA driver,
# marsadm), plus marsd and qemu-nbd. Their difference is other people's
# work (and kernel threads, some of which do our I/O): a noise hint.
cpu_all() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
cpu_ours() {
    local t=0 pid
    for pid in $$ $MARSD_PID $QEMU_PID; do
        t=$(( t + $(awk '{ print $14 + $15 + $16 + $17 }' "/proc/$pid/stat" 2>/dev/null || echo 0) ))
    done
    echo "$t"
}

# begin_run, then $(end_run) among a record's KEY=VALUE pairs: the load
# average around the run, the share of the CPUs that others used, and the
# bytes the disk took during it.
begin_run() {
    RUN_LOAD=$(load1)
    RUN_SECTORS=$(disk_sectors)
    RUN_T0=$(date +%s%N)
    RUN_CPU_ALL=$(cpu_all)
    RUN_CPU_OURS=$(cpu_ours)
}
end_run() {
    local s; s=$(disk_sectors)
    local disk=-1
    [ "$s" -lt 0 ] || [ "$RUN_SECTORS" -lt 0 ] || disk=$(( (s - RUN_SECTORS) * 512 ))
    local others=$(( $(cpu_all) - RUN_CPU_ALL - ($(cpu_ours) - RUN_CPU_OURS) ))
    local wall_ms=$(( ($(date +%s%N) - RUN_T0) / 1000000 ))
    # ticks / (ticks per second * seconds * CPUs)
    local share; share=$(awk -v o="$others" -v w="$wall_ms" -v n="$(nproc)" -v hz="$(getconf CLK_TCK)" \
        'BEGIN { v = o * 1000 / (hz * w * n); print (v < 0 ? 0 : v) }')
    echo "load1_before=$RUN_LOAD load1_after=$(load1) others_cpu_share=$share disk_bytes=$disk"
}

# run_fio NAME JOBFILE CAP_SECONDS
run_fio() {
    local out=$W/fio/$1.json
    if ! timeout --kill-after=10 "$3" fio --output-format=json --output="$out" "$2" >"$W/fio/$1.log" 2>&1; then
        cat "$W/fio/$1.log" >&2
        die "fio run $1 failed or took longer than $3 s"
    fi
}

# ---- set up: three equal images, prefilled so that no target pays for
# block allocation; marsd and qemu-nbd export theirs.
mkdir -p "$W/fio" "$W/root"
DISK_DEV=$(basename "$(findmnt -n -o SOURCE --target "$W")")
read -r P_LISTEN P_MARS P_QEMU < <(free_ports 3)
say "mars NBD benchmark ($MODE): work directory $W"
say "  file system: $(findmnt -n -o SOURCE,FSTYPE --target "$W" | tr -s ' ')," \
    "$(nproc) CPUs, load $(load1), volume ${VOL_MIB} MiB, burst ${BURST_MIB} MiB," \
    "overlay ${OVERLAY_MIB} MiB, sustained ${SUSTAIN_S} s"
for img in mars qemu fio; do
    dd if=/dev/zero of="$W/$img.img" bs=1M count="$VOL_MIB" status=none
done
sync

"$BIN/marsd" --root "$W/root" --node bench --listen "127.0.0.1:$P_LISTEN" \
    --nbd "127.0.0.1:$P_MARS" --overlay-limit "${OVERLAY_MIB}M" >"$W/marsd.log" 2>&1 &
MARSD_PID=$!
for _ in $(seq 100); do
    [ -S "$W/root/marsd.sock" ] && break
    kill -0 "$MARSD_PID" 2>/dev/null || die "marsd exited during start-up"
    sleep 0.1
done
[ -S "$W/root/marsd.sock" ] || die "marsd did not create its socket within 10 s"
marsadm create-resource bench "$W/mars.img" --size "${VOL_MIB}M" >/dev/null
wait_port "$P_MARS" "$MARSD_PID" marsd

qemu-nbd -f raw -t -b 127.0.0.1 -p "$P_QEMU" -x bench -e 8 \
    --cache=writeback --discard=unmap "$W/qemu.img" >"$W/qemu-nbd.log" 2>&1 &
QEMU_PID=$!
wait_port "$P_QEMU" "$QEMU_PID" qemu-nbd

MARS_URI=nbd://127.0.0.1:$P_MARS/bench
QEMU_URI=nbd://127.0.0.1:$P_QEMU/bench

# job_head RW BS: options every job shares.
job_head() {
    cat <<EOF
[global]
rw=$1
bs=$2
size=${VOL_MIB}m
direct=0
norandommap=1
randrepeat=1
fallocate=none
EOF
}

# target_opts TARGET QD: how a job reaches its target.
target_opts() {
    case $1 in
        mars) printf 'ioengine=nbd\nuri=%s\niodepth=%s\n' "$MARS_URI" "$2" ;;
        qemu-nbd) printf 'ioengine=nbd\nuri=%s\niodepth=%s\n' "$QEMU_URI" "$2" ;;
        fio-fs)
            # Buffered like both servers; libaio on buffered files runs
            # synchronously in io_submit, so QD32 adds little there.
            if [ "$2" = 1 ]; then
                printf 'ioengine=psync\n'
            else
                printf 'ioengine=libaio\niodepth=%s\n' "$2"
            fi
            printf 'filename=%s\n' "$W/fio.img"
            ;;
    esac
}

record() { # JSONFILE KEY=VALUE... (a single-job fio run)
    $RESULTS fio "$RUNS" "$@"
}

# ---- bursts: BURST_MIB written, timed to the last write's completion.
say ""
say "burst: ${BURST_MIB} MiB per run (fits in the ${OVERLAY_MIB} MiB overlay), ${BURST_REPS} run(s) each, the table shows the median"
for rep in $(seq "$BURST_REPS"); do
    for wl in "${WORKLOADS[@]}"; do
        read -r name rw bs qd <<<"$wl"
        for t in mars qemu-nbd fio-fs; do
            settle
            begin_run
            { job_head "$rw" "$bs"; printf 'io_size=%sm\n[%s]\n' "$BURST_MIB" "$t"; target_opts "$t" "$qd"; } >"$W/job.fio"
            run_fio "burst-$name-$t-$rep" "$W/job.fio" 300
            record "$W/fio/burst-$name-$t-$rep.json" phase=burst workload="$name" target="$t" rep="$rep" \
                $(end_run)
        done
    done
done

# ---- sustained: mars writes for SUSTAIN_S seconds and ends with a flush;
# then every other target writes the same bytes in the same pattern and
# ends with fsync/flush too: each run is timed until its data is durable
# (rewrites of the same blocks may still merge in the page cache).
say ""
say "sustained: mars writes for ${SUSTAIN_S} s, the others write the same bytes; each ends with a flush"
cap=$((SUSTAIN_S * 4 + 60))
for wl in "${WORKLOADS[@]}"; do
    read -r name rw bs qd <<<"$wl"
    settle
    begin_run
    { job_head "$rw" "$bs"
      printf 'time_based=1\nruntime=%s\nend_fsync=1\n[mars]\n' "$SUSTAIN_S"
      target_opts mars "$qd"; } >"$W/job.fio"
    sample_backlog "$W/backlog.max" &
    SAMPLER_PID=$!
    run_fio "sustained-$name-mars" "$W/job.fio" "$cap"
    kill "$SAMPLER_PID"
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=
    record "$W/fio/sustained-$name-mars.json" phase=sustained workload="$name" target=mars \
        max_backlog_bytes="$(cat "$W/backlog.max")" $(end_run)
    bytes=$($RESULTS bytes "$W/fio/sustained-$name-mars.json")

    for t in qemu-nbd fio-fs; do
        settle
        begin_run
        { job_head "$rw" "$bs"
          printf 'io_size=%s\nend_fsync=1\nruntime=%s\n[%s]\n' "$bytes" "$cap" "$t"
          target_opts "$t" "$qd"; } >"$W/job.fio"
        run_fio "sustained-$name-$t" "$W/job.fio" $((cap + 30))
        record "$W/fio/sustained-$name-$t.json" phase=sustained workload="$name" target="$t" \
            $(end_run)
    done

    # The ceiling: the same bytes twice at once, as a sequential append
    # (the log) and in the workload's pattern (the image), each pushed to
    # the disk every SYNC_MIB.
    settle
    begin_run
    rm -f "$W/two-stream.log"
    case $bs in
        *m) bs_bytes=$(( ${bs%m} << 20 )) ;;
        *k) bs_bytes=$(( ${bs%k} << 10 )) ;;
    esac
    { job_head "$rw" "$bs"
      printf 'end_fsync=1\nruntime=%s\nsync_file_range=write:%s\n' "$cap" $(( (SYNC_MIB << 20) / bs_bytes ))
      printf '[log]\nrw=write\nioengine=psync\nfilename=%s\nsize=%s\n' "$W/two-stream.log" "$bytes"
      printf '[image]\nio_size=%s\n' "$bytes"
      target_opts fio-fs "$qd"; } >"$W/job.fio"
    run_fio "sustained-$name-two-stream" "$W/job.fio" $((cap + 30))
    $RESULTS fio "$RUNS" "$W/fio/sustained-$name-two-stream.json" --streams phase=sustained \
        workload="$name" target=two-stream $(end_run)
    rm -f "$W/two-stream.log"
done

# ---- FUA: group commit. 4 KiB random writes with FUA through NBD (our
# driver: fio's nbd engine sends no FUA), against one fdatasync per write.
say ""
say "fua: 4 KiB random writes, ${FUA_S} s each"
fua() { # TARGET-LABEL URI QD [--no-fua]
    settle
    begin_run
    timeout --kill-after=10 $((FUA_S + 60)) "$PYNBD" "$HERE/nbd_fua.py" "$2" --qd "$3" --seconds "$FUA_S" "${@:4}" \
        >"$W/fio/fua-$1.json" || die "FUA driver failed against $2"
    $RESULTS fua "$RUNS" "$W/fio/fua-$1.json" phase=fua workload=rand-4K target="$1" qd="$3" \
        $(end_run)
}
fua mars-FUA-QD1 "$MARS_URI" 1
fua mars-FUA-QD32 "$MARS_URI" 32
fua qemu-nbd-FUA-QD32 "$QEMU_URI" 32
fua driver-ceiling-QD32 "$MARS_URI" 32 --no-fua
# One fdatasync per 4 KiB write, at QD1: in place in a written file (random,
# like the workload), and appended to a new file (what a log without group
# commit would do: every sync also commits the file's new size).
for t in fdatasync-each fdatasync-each-append; do
    settle
    begin_run
    rm -f "$W/append.log"
    if [ "$t" = fdatasync-each ]; then
        file=$W/fio.img rw=randwrite
    else
        file=$W/append.log rw=write
    fi
    { job_head "$rw" 4k
      printf 'time_based=1\nruntime=%s\nfdatasync=1\n[%s]\nioengine=psync\nfilename=%s\n' "$FUA_S" "$t" "$file"
      [ "$t" = fdatasync-each ] || printf 'size=4g\n'; } >"$W/job.fio"
    run_fio "fua-$t" "$W/job.fio" $((FUA_S + 60))
    record "$W/fio/fua-$t.json" phase=fua workload=rand-4K target="$t" qd=1 \
        $(end_run)
    rm -f "$W/append.log"
done

# ---- report
python3 - "$W/meta.json" <<EOF
import json, os, platform, subprocess, sys
def out(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd="$REPO").stdout.strip().splitlines()[0]
    except Exception:
        return None
json.dump({
    "mode": "$MODE",
    "params": {
        "volume_bytes": $VOL_MIB << 20, "burst_bytes": $BURST_MIB << 20,
        "overlay_limit_bytes": $OVERLAY_MIB << 20, "sustained_seconds": $SUSTAIN_S, "fua_seconds": $FUA_S,
        "burst_reps": $BURST_REPS, "two_stream_sync_bytes": $SYNC_MIB << 20,
    },
    "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
    "filesystem": out("findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "--target", "$W"),
    "fio": out("fio", "--version"), "qemu_nbd": out("qemu-nbd", "--version"),
    # HEAD of the work tree, which the binaries may be older than: compare
    # with the time they were built.
    "mars_commit": out("git", "rev-parse", "HEAD"),
    "mars_dirty": bool(out("git", "status", "--porcelain", "datapath")),
    "mars_bin": "$BIN",
    "mars_bin_built": __import__("datetime").datetime.fromtimestamp(
        os.path.getmtime("$BIN/marsd"), __import__("datetime").timezone.utc).isoformat(timespec="seconds"),
}, open(sys.argv[1], "w"), indent=2)
EOF
$RESULTS report "$RUNS" "$W/meta.json" "$OUT"
say ""
say "results: $OUT"
