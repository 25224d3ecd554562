# Remote device through a forced failover: C has no replica and uses the
# volume through `attach --remote`. A's marsd is killed (B had everything A
# acknowledged: `wait` ran first), B takes over by force, and C's device
# goes on: a write after the failover lands on B, and what C wrote before
# is there too, on C's device and on B's. Then the same with a loss: A,
# back as B's secondary, stops fetching, C writes (B acknowledges), B's
# marsd is killed and A takes over by force without C's last writes: C's
# device must fail from then on instead of going on over data that changed
# under it.
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
step "restarting A as B's secondary"
start_marsd A
adm B wait vol --timeout 120 >/dev/null || fail "A did not catch up with B"
adm A pause-fetch vol >/dev/null
dd if=/dev/urandom of="$dev" bs=1M seek=20 count=2 oflag=direct conv=fsync 2>/dev/null \
  || fail "write through C's device before the second failover"
kill9 B
note "killed B's marsd with writes of C that A never fetched"
sleep 1
out=$(adm A primary vol --force) || fail "primary --force on A: $out"
note "$out"
if dd if=/tmp/s/after of="$dev" bs=4k count=1 seek=100 oflag=direct conv=fsync 2>/dev/null; then
  fail "C's device took a write after a failover that lost its acknowledged writes"
fi
grep -q "may be lost" /tmp/s/C/marsd.log || fail "C's marsd does not say why its device fails"
note "$(grep -o 'the new primary.*may be lost' /tmp/s/C/marsd.log | head -1)"
adm C detach vol >/dev/null || fail "detach of the failed remote device"
devA=$(adm A up vol | grep -o '/dev/ublkb[0-9]*'); wait_dev "$devA"
[ "$(dd if="$devA" bs=1M skip=10 count=4 2>/dev/null | md5sum | cut -d' ' -f1)" = "$(md5 /tmp/s/after)" ] \
  || fail "the write C made after the first failover is not on A"
[ "$(dd if="$devA" bs=1M skip=2 count=4 2>/dev/null | md5sum | cut -d' ' -f1)" = "$(md5 /tmp/s/before)" ] \
  || fail "the write C made before the first failover is not on A"
adm A down vol >/dev/null
