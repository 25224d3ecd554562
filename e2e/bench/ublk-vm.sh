# The ublk benchmark, run inside the VM by `e2e/vm/run --bench`: our
# /dev/ublkbN against rublk's loop target on the same kind of backing file
# (a tmpfs file in the VM), same workloads, same run. TCG emulation makes
# absolute figures meaningless; only the ratios mean something. mars writes
# every byte twice (log + writeback), rublk once.
set -e
SIZE_MB=${BENCH_SIZE_MB:-256}
now() { cut -d' ' -f1 /proc/uptime; }
mbps() { awk -v s="$1" -v e="$2" -v m="$3" 'BEGIN{d=e-s; if (d<0.01) d=0.01; printf "%.1f", m/d}'; }
waitdev() { i=0; while [ ! -b "$1" ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done; [ -b "$1" ]; }

# run_set LABEL DEV: prints BENCH LABEL WORKLOAD VALUE lines
run_set() {
  label=$1 dev=$2 mb=$((SIZE_MB / 2))
  s=$(now); dd if=/dev/zero of="$dev" bs=1M count=$mb oflag=direct conv=fsync 2>/dev/null; e=$(now)
  echo "BENCH $label seq-write-1M $(mbps "$s" "$e" $mb) MiB/s"
  echo 3 >/proc/sys/vm/drop_caches
  s=$(now); dd if="$dev" of=/dev/null bs=1M count=$mb iflag=direct 2>/dev/null; e=$(now)
  echo "BENCH $label seq-read-1M $(mbps "$s" "$e" $mb) MiB/s"
  if command -v fio >/dev/null; then
    for rw in randwrite randread; do
      iops=$(fio --name=b --filename="$dev" --direct=1 --ioengine=libaio --iodepth=32 --rw=$rw --bs=4k \
               --size=${mb}M --time_based --runtime=8 --output-format=terse --terse-version=3 2>/dev/null |
             awk -F';' -v rw=$rw '{print (rw=="randread") ? $8 : $49}')
      echo "BENCH $label rand-$rw-4k-qd32 ${iops:-0} IOPS"
    done
  fi
}

truncate -s ${SIZE_MB}M /tmp/rublk.img
rublk add loop -n 5 -f /tmp/rublk.img --quiet >/dev/null
waitdev /dev/ublkb5 || { echo "BENCH-ERROR rublk device missing"; exit 1; }
run_set rublk-loop /dev/ublkb5
rublk del -n 5 >/dev/null
rm -f /tmp/rublk.img

mkdir -p /tmp/mars
marsd --root /tmp/mars/root --node bench --listen 127.0.0.1:7000 --startup-wait 0 >/tmp/mars/marsd.log 2>&1 &
i=0; while [ ! -S /tmp/mars/root/marsd.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
marsadm --root /tmp/mars/root create-resource vol /tmp/mars.img --size ${SIZE_MB}M >/dev/null
dev=$(marsadm --root /tmp/mars/root up vol | grep -o '/dev/ublkb[0-9]*')
waitdev "$dev" || { echo "BENCH-ERROR mars device missing"; exit 1; }
run_set mars "$dev"
marsadm --root /tmp/mars/root down vol >/dev/null
echo "BENCH-END"
