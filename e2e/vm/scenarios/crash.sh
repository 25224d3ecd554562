# kill -9 of the primary's marsd under file-system load, forced failover on
# B: B's device holds a file system that mounts (journal replay) and that
# e2fsck then finds clean. A, restarted, reports split brain; its old device
# (still mounted, its I/O held by the kernel) now fails every request, so it
# can be unmounted and removed.
host A 1 --ublk
host B 2 --ublk
adm B join-cluster "$(addr A)"
adm A create-resource vol /tmp/s/A/vol.img --size 64M >/dev/null
adm B join-resource vol /tmp/s/B/vol.img
adm A wait vol --timeout 120
devA=$(json A vol device); wait_dev "$devA"
mke2fs -q -F -t ext4 "$devA"
mkdir -p /tmp/s/mnt && mount -t ext4 "$devA" /tmp/s/mnt
( i=0; while true; do
    dd if=/dev/urandom of=/tmp/s/mnt/w$((i % 40)) bs=16k count=$((1 + i % 8)) 2>/dev/null
    [ $((i % 5)) = 0 ] && sync
    i=$((i + 1)); done ) >/dev/null 2>&1 &
load=$!
sleep 3
# B stops fetching a second before the crash, so that A has logged writes
# B never got: the forced failover then always forks A's history (without
# this, B may have fetched all of A's durable log, and A rightly reports no
# split brain).
adm B pause-fetch vol >/dev/null
sleep 1
kill9 A
note "killed A's marsd under load"
sleep 1
out=$(adm B primary vol 2>&1) && fail "a normal primary succeeded with A unreachable"
out=$(adm B primary vol --force) || fail "primary --force on B: $out"
note "$out"
kill -9 $load 2>/dev/null || true
devB=$(json B vol device); wait_dev "$devB"
mkdir -p /tmp/s/mntB
step "mounting $devB"
mount -t ext4 "$devB" /tmp/s/mntB || fail "B's file system does not mount"
step "mounted"
ls /tmp/s/mntB | grep -q w || fail "none of the files written before the crash is on B"
note "B has $(ls /tmp/s/mntB | grep -c w) of the files"
umount /tmp/s/mntB
e2fsck -fn "$devB" >/tmp/s/fsck.log 2>&1 || { cat /tmp/s/fsck.log; fail "e2fsck on B after the failover"; }
step "restarting A"
start_marsd A
i=0
while [ "$(json A vol split_brain)" != true ]; do
  i=$((i + 1)); [ $i -lt 300 ] || fail "A does not report split brain: $(adm A view vol --json)"
  sleep 0.1
done
[ "$(json A vol role)" = secondary ] || fail "A is still primary after the failover"
step "unmounting A's file system (its I/O fails now)"
umount /tmp/s/mnt 2>/dev/null || umount -l /tmp/s/mnt || fail "A's file system cannot be unmounted"
i=0
until adm A down vol >/dev/null 2>&1; do
  i=$((i + 1)); [ $i -lt 100 ] || fail "A's old device cannot be removed: $(adm A down vol 2>&1)"
  sleep 0.2
done
[ ! -b "$devA" ] || { sleep 1; [ ! -b "$devA" ] || fail "$devA still there after down"; }
