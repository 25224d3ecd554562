# The ublk benchmark, run inside the VM by `e2e/vm/run --bench`: our
# /dev/ublkbN against rublk's loop target on the same kind of backing file
# (a tmpfs file in the VM), same workloads, same run. TCG emulation makes
# absolute figures meaningless; only the ratios mean something. mars writes
# every byte twice (log + writeback), rublk once.
#
# Both devices exist for the whole run and every workload runs on rublk and
# then right away on mars, BENCH_ROUNDS times, so that the two figures of a
# ratio are taken under the same load of the host (other builds and VMs on a
# shared machine change qemu's share of the CPUs from minute to minute).
# Before each run mars's writeback backlog is drained (bounded wait), so no
# run pays for the previous one's writeback; each mars write run still pays
# for the writeback that runs during it.
#
# With marsd-base/marsadm-base in the VM (MARS_VM_BENCH_BASELINE, see
# e2e/vm/run), that build serves a third device, "mars-base", run right
# after the other two: before/after figures under the same load.
set -e
SIZE_MB=${BENCH_SIZE_MB:-256}
ROUNDS=${BENCH_ROUNDS:-3}
FIO_S=${BENCH_FIO_SECONDS:-5}
MB=$((SIZE_MB / 2))
now() { cut -d' ' -f1 /proc/uptime; }
mbps() { awk -v s="$1" -v e="$2" -v m="$3" 'BEGIN{d=e-s; if (d<0.01) d=0.01; printf "%.1f", m/d}'; }
waitdev() { i=0; while [ ! -b "$1" ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done; [ -b "$1" ]; }
adm() { marsadm --root /tmp/mars/root "$@"; }
adm_base() { marsadm-base --root /tmp/mars-base/root "$@"; }

# Until mars (and mars-base) have written back everything they logged.
drain() {
  drain1 adm
  [ -z "$base_dev" ] || drain1 adm_base
}

# counter ADM NAME: that marsd's log counter NAME ("appended", "written_back").
counter() {
  $1 view vol --json | grep -o "\"$2\": *[0-9]*" | head -1 | grep -o '[0-9]*$'
}

# drain1 ADM: until that marsd has written back everything (at most 60 s).
drain1() {
  # (sh has no local variables: each function's names carry its prefix)
  d_i=0
  while [ $d_i -lt 600 ]; do
    d_a=$(counter $1 appended)
    d_w=$(counter $1 written_back)
    [ -n "$d_a" ] && [ "$d_a" = "$d_w" ] && return 0
    sleep 0.1; d_i=$((d_i+1))
  done
  echo "BENCH-NOTE writeback did not drain within 60 s (appended $d_a, written back $d_w)"
}

# one LABEL DEV WORKLOAD: prints BENCH LABEL WORKLOAD VALUE UNIT. Its
# variables carry the prefix o_: sh has no local variables, and a plain
# `dev=$2` here once overwrote the caller's $dev, so that every "mars" run
# after a rublk run measured rublk's device (e2e/bench/README.md).
one() {
  o_label=$1 o_dev=$2 o_w=$3
  case $o_label in
    mars) o_adm=adm ;;
    mars-base) o_adm=adm_base ;;
    *) o_adm= ;;
  esac
  drain
  [ -z "$o_adm" ] || o_before=$(counter $o_adm appended)
  sync; echo 3 >/proc/sys/vm/drop_caches
  case $o_w in
    seq-write-1M)
      o_s=$(now); dd if=/dev/zero of="$o_dev" bs=1M count=$MB oflag=direct conv=fsync 2>/dev/null; o_e=$(now)
      echo "BENCH $o_label $o_w $(mbps "$o_s" "$o_e" $MB) MiB/s" ;;
    seq-read-1M)
      o_s=$(now); dd if="$o_dev" of=/dev/null bs=1M count=$MB iflag=direct 2>/dev/null; o_e=$(now)
      echo "BENCH $o_label $o_w $(mbps "$o_s" "$o_e" $MB) MiB/s" ;;
    rand-*)
      o_rw=${o_w#rand-}; o_rw=${o_rw%-4k-qd32}
      o_iops=$(fio --name=b --filename="$o_dev" --direct=1 --ioengine=libaio --iodepth=32 --rw=$o_rw --bs=4k \
               --size=${MB}M --time_based --runtime=$FIO_S --output-format=terse --terse-version=3 2>/dev/null |
             awk -F';' -v rw=$o_rw '{print (rw=="randread") ? $8 : $49}')
      echo "BENCH $o_label $o_w ${o_iops:-0} IOPS" ;;
  esac
  [ -n "$o_adm" ] || return 0
  case $o_w in
    *write*)
      # A write run on a mars device must reach that marsd's log: else the
      # figure is some other device's.
      o_a=$(counter $o_adm appended)
      o_wb=$(counter $o_adm written_back)
      if [ -z "$o_a" ] || [ "$o_a" = "$o_before" ]; then
        echo "BENCH-ERROR $o_label $o_w: $o_dev is not served by the $o_label marsd (its log did not grow)"
        exit 1
      fi
      # What the run left to write back, and how long that took (not in
      # its figure; `written_back` moves every 0.5 s, so up to that much
      # too high).
      o_s=$(now); drain1 $o_adm; o_e=$(now)
      echo "BENCH-TAIL $o_label $o_w backlog $(( (o_a - o_wb) >> 20 )) MiB, written back $(awk -v s="$o_s" -v e="$o_e" 'BEGIN{printf "%.1f", e-s}') s later" ;;
  esac
}

truncate -s ${SIZE_MB}M /tmp/rublk.img
rublk add loop -n 5 -f /tmp/rublk.img --quiet >/dev/null
waitdev /dev/ublkb5 || { echo "BENCH-ERROR rublk device missing"; exit 1; }

# start_mars NAME MARSD ADM PORT: prints the device path. Logfiles of 64M
# keep the log's share of the VM's tmpfs small.
start_mars() {
  mkdir -p /tmp/$1
  $2 --root /tmp/$1/root --node bench --listen 127.0.0.1:$4 --startup-wait 0 --logfile-size 64M \
    >/tmp/$1/marsd.log 2>&1 &
  i=0; while [ ! -S /tmp/$1/root/marsd.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
  $3 --root /tmp/$1/root create-resource vol /tmp/$1.img --size ${SIZE_MB}M >/dev/null
  $3 --root /tmp/$1/root up vol | grep -o '/dev/ublkb[0-9]*'
}
base_dev=""
mars_dev=$(start_mars mars marsd marsadm 7000)
waitdev "$mars_dev" || { echo "BENCH-ERROR mars device missing"; exit 1; }
if command -v marsd-base >/dev/null; then
  base_dev=$(start_mars mars-base marsd-base marsadm-base 7001)
  waitdev "$base_dev" || { echo "BENCH-ERROR mars-base device missing"; exit 1; }
fi

workloads="seq-write-1M seq-read-1M"
command -v fio >/dev/null && workloads="$workloads rand-randwrite-4k-qd32 rand-randread-4k-qd32"
r=1
while [ $r -le "$ROUNDS" ]; do
  for w in $workloads; do
    one rublk-loop /dev/ublkb5 "$w"
    # mars and mars-base take turns at going first.
    if [ $((r % 2)) = 0 ] && [ -n "$base_dev" ]; then
      one mars-base "$base_dev" "$w"; one mars "$mars_dev" "$w"
    else
      one mars "$mars_dev" "$w"; [ -z "$base_dev" ] || one mars-base "$base_dev" "$w"
    fi
  done
  r=$((r+1))
done

adm down vol >/dev/null
[ -z "$base_dev" ] || adm_base down vol >/dev/null
rublk del -n 5 >/dev/null
grep -iE ' (WARN|ERROR) ' /tmp/mars/marsd.log | head -5 | sed 's/^/BENCH-NOTE marsd: /'
echo "BENCH-END"
