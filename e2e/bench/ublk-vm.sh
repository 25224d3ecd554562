# The ublk benchmark, run inside the VM by `e2e/vm/run --bench`: our
# /dev/ublkbN against rublk's loop target on the same kind of backing file
# (a tmpfs file in the VM), same workloads, same run, at the same number of
# hardware queues (BENCH_QUEUES). TCG emulation makes absolute figures
# meaningless; only the ratios mean something. mars writes every byte
# twice (log + writeback), rublk once.
#
# All devices exist for the whole run and every workload runs on each
# device in turn, BENCH_ROUNDS times, so that the figures of a ratio are
# taken under the same load of the host (other builds and VMs on a shared
# machine change qemu's share of the CPUs from minute to minute). Before
# each run every marsd's writeback backlog is drained (bounded wait), so no
# run pays for an earlier one's writeback; each mars write run still pays
# for the writeback that runs during it.
#
# With marsd-base/marsadm-base in the VM (MARS_VM_BENCH_BASELINE, see
# e2e/vm/run), that build serves one more device per queue count,
# "mars-base-qN", run right after "mars-qN": before/after figures under
# the same load.
set -e
SIZE_MB=${BENCH_SIZE_MB:-256}
ROUNDS=${BENCH_ROUNDS:-3}
FIO_S=${BENCH_FIO_SECONDS:-5}
# Queue counts to compare at: each is one rublk device (`-q N`) and one
# mars device (`--ublk-queues N`). The pairs must match: under TCG a
# second queue costs rublk itself up to half its random-write IOPS, and
# rublk's default is 1 queue, marsd's one per CPU.
QUEUES=${BENCH_QUEUES:-"1 2"}
MB=$((SIZE_MB / 2))
now() { cut -d' ' -f1 /proc/uptime; }
# 4 KiB random I/O at queue depth 32 on device $1: rand_fio DEV randread|randwrite SECONDS [fio options]
rand_fio() {
  r_dev=$1 r_rw=$2 r_s=$3; shift 3
  fio --name=b --filename="$r_dev" --direct=1 --ioengine=libaio --iodepth=32 --rw=$r_rw --bs=4k \
      --size=${MB}M --time_based --runtime=$r_s "$@"
}
mbps() { awk -v s="$1" -v e="$2" -v m="$3" 'BEGIN{d=e-s; if (d<0.01) d=0.01; printf "%.1f", m/d}'; }
waitdev() { i=0; while [ ! -b "$1" ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done; [ -b "$1" ]; }
# adm LABEL ARGS...: the marsadm of the marsd that serves device LABEL.
adm() {
  a_l=$1; shift
  case $a_l in
    mars-base*) marsadm-base --root /tmp/$a_l/root "$@" ;;
    *) marsadm --root /tmp/$a_l/root "$@" ;;
  esac
}

# Until every marsd has written back everything it logged.
drain() {
  for d_l in $mars_labels; do drain1 "$d_l"; done
}

# counter LABEL NAME: that marsd's log counter NAME ("appended", "written_back").
counter() {
  adm "$1" view vol --json | grep -o "\"$2\": *[0-9]*" | head -1 | grep -o '[0-9]*$'
}

# drain1 LABEL: until that marsd has written back everything (at most 60 s).
drain1() {
  # (sh has no local variables: each function's names carry its prefix)
  d_i=0
  while [ $d_i -lt 600 ]; do
    d_a=$(counter "$1" appended)
    d_w=$(counter "$1" written_back)
    [ -n "$d_a" ] && [ "$d_a" = "$d_w" ] && return 0
    sleep 0.1; d_i=$((d_i+1))
  done
  echo "BENCH-NOTE $1: writeback did not drain within 60 s (appended $d_a, written back $d_w)"
}

# one LABEL DEV WORKLOAD: prints BENCH LABEL WORKLOAD VALUE UNIT. Its
# variables carry the prefix o_: sh has no local variables, and a plain
# `dev=$2` here once overwrote the caller's $dev, so that every "mars" run
# after a rublk run measured rublk's device (e2e/bench/README.md).
one() {
  o_label=$1 o_dev=$2 o_w=$3
  case $o_label in
    mars*) o_mars=1 ;;
    *) o_mars= ;;
  esac
  drain
  [ -z "$o_mars" ] || o_before=$(counter "$o_label" appended)
  sync; echo 3 >/proc/sys/vm/drop_caches
  case $o_w in
    seq-write-1M)
      o_s=$(now); dd if=/dev/zero of="$o_dev" bs=1M count=$MB oflag=direct conv=fsync 2>/dev/null; o_e=$(now)
      o_val=$(mbps "$o_s" "$o_e" $MB) o_unit=MiB/s o_secs=$(awk -v s="$o_s" -v e="$o_e" 'BEGIN{print e-s}')
      echo "BENCH $o_label $o_w $o_val $o_unit" ;;
    seq-read-1M)
      o_s=$(now); dd if="$o_dev" of=/dev/null bs=1M count=$MB iflag=direct 2>/dev/null; o_e=$(now)
      echo "BENCH $o_label $o_w $(mbps "$o_s" "$o_e" $MB) MiB/s" ;;
    rand-*)
      o_rw=${o_w#rand-}; o_rw=${o_rw%-4k-qd32}
      o_iops=$(rand_fio "$o_dev" $o_rw $FIO_S --output-format=terse --terse-version=3 2>/dev/null |
             awk -F';' -v rw=$o_rw '{print (rw=="randread") ? $8 : $49}')
      o_val=${o_iops:-0} o_unit=IOPS o_secs=$FIO_S
      echo "BENCH $o_label $o_w $o_val $o_unit" ;;
  esac
  # A write's figure with the writeback it left counted in
  # (WORKLOAD+tail): what the device sustains when the log may not grow.
  # rublk leaves none.
  if [ -z "$o_mars" ]; then
    case $o_w in *write*) echo "BENCH $o_label $o_w+tail $o_val $o_unit" ;; esac
    return 0
  fi
  case $o_w in
    *write*)
      # A write run on a mars device must reach that marsd's log: else the
      # figure is some other device's.
      o_a=$(counter "$o_label" appended)
      o_wb=$(counter "$o_label" written_back)
      if [ -z "$o_a" ] || [ "$o_a" = "$o_before" ]; then
        echo "BENCH-ERROR $o_label $o_w: $o_dev is not served by the $o_label marsd (its log did not grow)"
        exit 1
      fi
      # What the run left to write back, and how long that took (not in
      # its figure; `written_back` moves every 0.5 s, so up to that much
      # too high).
      o_s=$(now); drain1 "$o_label"; o_e=$(now)
      o_tail=$(awk -v s="$o_s" -v e="$o_e" 'BEGIN{printf "%.1f", e-s}')
      echo "BENCH-TAIL $o_label $o_w backlog $(( (o_a - o_wb) >> 20 )) MiB, written back $o_tail s later"
      echo "BENCH $o_label $o_w+tail $(awk -v v="$o_val" -v r="$o_secs" -v t="$o_tail" 'BEGIN{printf "%.1f", v*r/(r+t)}') $o_unit" ;;
  esac
}

# start_mars LABEL MARSD PORT QUEUES [ARGS]: prints the device path.
# Logfiles of 64M keep the log's share of the VM's tmpfs small; ARGS are
# more marsd flags (word-split).
start_mars() {
  mkdir -p /tmp/$1
  # shellcheck disable=SC2086
  $2 --root /tmp/$1/root --node bench --listen 127.0.0.1:$3 --startup-wait 0 --logfile-size 64M \
    --ublk-queues $4 ${5:-} >/tmp/$1/marsd.log 2>&1 &
  echo $! >/tmp/$1/marsd.pid
  i=0; while [ ! -S /tmp/$1/root/marsd.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
  adm $1 create-resource vol /tmp/$1.img --size ${SIZE_MB}M >/dev/null
  adm $1 up vol | grep -o '/dev/ublkb[0-9]*'
}

# The devices: per queue count N, rublk-qN, mars-qN (and mars-base-qN).
# `devices` lists "LABEL=DEV" in the order a round runs them.
devices="" mars_labels=""
for q in $QUEUES; do
  truncate -s ${SIZE_MB}M /tmp/rublk-q$q.img
  rublk add loop -n $((100 + q)) -q $q -f /tmp/rublk-q$q.img --quiet >/dev/null
  waitdev /dev/ublkb$((100 + q)) || { echo "BENCH-ERROR rublk device missing"; exit 1; }
  devices="$devices rublk-q$q=/dev/ublkb$((100 + q))"
  dev=$(start_mars mars-q$q marsd $((7000 + q)) $q)
  waitdev "$dev" || { echo "BENCH-ERROR mars-q$q device missing"; exit 1; }
  devices="$devices mars-q$q=$dev" mars_labels="$mars_labels mars-q$q"
  if command -v marsd-base >/dev/null; then
    dev=$(start_mars mars-base-q$q marsd-base $((7100 + q)) $q "${BENCH_BASE_ARGS:-}")
    waitdev "$dev" || { echo "BENCH-ERROR mars-base-q$q device missing"; exit 1; }
    devices="$devices mars-base-q$q=$dev" mars_labels="$mars_labels mars-base-q$q"
  fi
done

workloads=${BENCH_WORKLOADS:-"seq-write-1M seq-read-1M"}
[ -n "${BENCH_WORKLOADS:-}" ] || ! command -v fio >/dev/null ||
  workloads="$workloads rand-randwrite-4k-qd32 rand-randread-4k-qd32"
r=1
while [ "$r" -le "$ROUNDS" ]; do
  for w in $workloads; do
    for d in $devices; do one "${d%%=*}" "${d#*=}" "$w"; done
  done
  r=$((r+1))
done

# BENCH_PERF=1: where each mars-qN device's marsd spends its CPU in 4 KiB
# random writes and reads and 1 MiB sequential writes
# (BENCH_PERF_WORKLOADS, default "randwrite randread seqwrite"), per thread
# and per thread and function, as NOTE lines. perf samples 6 s in the
# middle of a 10 s run; it slows the run, so no figures come from it.
if [ "${BENCH_PERF:-0}" = 1 ] && command -v perf >/dev/null; then
  for d in $devices; do
    p_l=${d%%=*}
    case $p_l in mars-q*) ;; *) continue ;; esac
    p_pid=$(cat /tmp/$p_l/marsd.pid)
    for p_w in ${BENCH_PERF_WORKLOADS:-randwrite randread seqwrite}; do
      drain
      case $p_w in
        # 1 MiB O_DIRECT writes in a row, as the seq-write-1M runs, for 10 s.
        seqwrite)
          ( p_end=$(( $(cut -d. -f1 /proc/uptime) + 10 ))
            while [ "$(cut -d. -f1 /proc/uptime)" -lt $p_end ]; do
              dd if=/dev/zero of="${d#*=}" bs=1M count=$MB oflag=direct 2>/dev/null
            done ) & ;;
        *) rand_fio "${d#*=}" $p_w 10 >/dev/null 2>&1 & ;;
      esac
      sleep 2
      perf record -F 999 -p "$p_pid" -o /tmp/perf.data -- sleep 6 >/dev/null 2>&1
      wait
      perf report -i /tmp/perf.data --stdio --no-children --sort comm 2>/dev/null | grep '%' | head -8 |
        sed "s/^/NOTE perf $p_l $p_w thread /"
      perf report -i /tmp/perf.data --stdio --no-children --sort comm,sym 2>/dev/null | grep '%' | head -30 |
        sed "s/^/NOTE perf $p_l $p_w /"
    done
  done
fi

for l in $mars_labels; do adm "$l" down vol >/dev/null; done
for q in $QUEUES; do rublk del -n $((100 + q)) >/dev/null; done
for l in $mars_labels; do
  grep -iE ' (WARN|ERROR) ' /tmp/$l/marsd.log | head -5 | sed "s/^/BENCH-NOTE $l marsd: /"
done
echo "BENCH-END"
