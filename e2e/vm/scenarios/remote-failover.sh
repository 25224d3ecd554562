# Remote device through a forced failover: C has no replica and uses the
# volume through `attach --remote`. A's marsd is killed (B had everything A
# acknowledged: `wait` ran first), B takes over by force, and C's device
# goes on: a write after the failover lands on B, and what C wrote before
# is there too, on C's device and on B's.
host A 1
host B 2
host C 3
adm B join-cluster "$(addr A)"
adm C join-cluster "$(addr A)"
adm A create-resource vol /tmp/s/A/vol.img --size 32M >/dev/null
adm B join-resource vol /tmp/s/B/vol.img
dev=$(adm C attach vol --remote | grep -o '/dev/ublkb[0-9]*'); wait_dev "$dev"
dd if=/dev/urandom of=/tmp/s/before bs=1M count=4 2>/dev/null
dd if=/dev/urandom of=/tmp/s/after bs=1M count=4 2>/dev/null
dd if=/tmp/s/before of="$dev" bs=1M seek=2 oflag=direct conv=fsync 2>/dev/null || fail "write through the remote device"
adm A wait vol --timeout 120 >/dev/null || fail "B did not catch up"
kill9 A
note "killed A's marsd"
sleep 1
out=$(adm B primary vol --force) || fail "primary --force on B: $out"
note "$out"
step "writing through C's remote device after the failover"
dd if=/tmp/s/after of="$dev" bs=1M seek=10 oflag=direct conv=fsync 2>/dev/null \
  || fail "C's remote device does not take writes after the failover"
[ "$(dd if="$dev" bs=1M skip=2 count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" = "$(md5 /tmp/s/before)" ] \
  || fail "C's device lost what it wrote before the failover"
[ "$(dd if="$dev" bs=1M skip=10 count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" = "$(md5 /tmp/s/after)" ] \
  || fail "C's device does not read back its write after the failover"
adm C detach vol >/dev/null
devB=$(adm B up vol | grep -o '/dev/ublkb[0-9]*'); wait_dev "$devB"
[ "$(dd if="$devB" bs=1M skip=10 count=4 2>/dev/null | md5sum | cut -d' ' -f1)" = "$(md5 /tmp/s/after)" ] \
  || fail "the write C made after the failover is not on B"
[ "$(dd if="$devB" bs=1M skip=2 count=4 2>/dev/null | md5sum | cut -d' ' -f1)" = "$(md5 /tmp/s/before)" ] \
  || fail "the write C made before the failover is not on B"
adm B down vol >/dev/null
