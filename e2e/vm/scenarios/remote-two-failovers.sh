# Remote device away during two primary changes: C's device has writes
# acknowledged by A that D never fetched. A dies, D takes over by force
# (C's last writes are lost), writes enough that its log passes where C's
# writes reached, and hands over to B (which resynced from D). B's own
# history starts after C's writes, so only B's lineage (where its log left
# A's history: at D's takeover) tells that they are lost: C's device must
# fail instead of going on over data that changed under it.
host A 1
host B 2
host C 3
host D 4
adm B join-cluster "$(addr A)"
adm C join-cluster "$(addr A)"
adm D join-cluster "$(addr A)"
adm A create-resource vol /tmp/s/A/vol.img --size 32M >/dev/null
adm B join-resource vol /tmp/s/B/vol.img
adm D join-resource vol /tmp/s/D/vol.img
dev=$(adm C attach vol --remote | grep -o '/dev/ublkb[0-9]*'); wait_dev "$dev"
dd if=/dev/urandom of="$dev" bs=1M seek=2 count=2 oflag=direct conv=fsync 2>/dev/null || fail "write through the remote device"
adm A wait vol --timeout 120 >/dev/null || fail "B and D did not catch up"
adm D pause-fetch vol >/dev/null
dd if=/dev/urandom of="$dev" bs=1M seek=20 count=2 oflag=direct conv=fsync 2>/dev/null \
  || fail "write through C's device that D does not fetch"
note "C's writes acknowledged up to A's log position $(json A vol appended)"
kill9 A
note "killed A's marsd"
out=$(adm D primary vol --force) || fail "primary --force on D: $out"
note "$out"
step "D writes past the position C's writes reached"
devD=$(adm D up vol | grep -o '/dev/ublkb[0-9]*'); wait_dev "$devD"
dd if=/dev/urandom of="$devD" bs=1M seek=8 count=8 oflag=direct conv=fsync 2>/dev/null || fail "write on D"
adm D down vol >/dev/null
step "B (it holds A's lost tail) resyncs from D and takes over"
adm B invalidate vol >/dev/null || fail "invalidate on B"
# (`wait` on D would wait for the dead A too.)
i=0
until [ "$(json B vol disk_state)" = UpToDate ]; do
  i=$((i + 1)); [ $i -lt 600 ] || fail "B not UpToDate 120 s after invalidate: $(adm B view vol)"
  sleep 0.2
done
out=$(adm B primary vol) || fail "handover D to B: $out"
note "$out"
if dd if=/dev/urandom of="$dev" bs=4k count=1 seek=100 oflag=direct conv=fsync 2>/dev/null; then
  fail "C's device took a write after two primary changes that lost its acknowledged writes"
fi
grep -q "may be lost" /tmp/s/C/marsd.log || fail "C's marsd does not say why its device fails"
note "$(grep -o 'the new primary.*may be lost' /tmp/s/C/marsd.log | head -1)"
adm C detach vol >/dev/null || fail "detach of the failed remote device"
