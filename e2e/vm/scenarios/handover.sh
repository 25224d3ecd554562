# Handover with a file system: refused while A's device is mounted (nothing
# changes), then umount on A, `primary` on B, mount on B: files intact.
host A 1 --ublk
host B 2 --ublk
adm B join-cluster "$(addr A)"
adm A create-resource vol /tmp/s/A/vol.img --size 64M | grep -q '/dev/ublkb' || fail "--ublk: no device on create"
adm B join-resource vol /tmp/s/B/vol.img
adm A wait vol --timeout 120
devA=$(json A vol device); wait_dev "$devA"
mke2fs -q -F -t ext4 "$devA"
mkdir -p /tmp/s/mnt && mount -t ext4 "$devA" /tmp/s/mnt
write_files /tmp/s/mnt 20
sync
out=$(adm B primary vol 2>&1) && fail "handover succeeded while A's device is mounted"
echo "$out" | grep -q "in use" || fail "handover while mounted: $out"
[ "$(json A vol role)" = primary ] || fail "A is no longer primary after a refused handover"
[ "$(json A vol device)" = "$devA" ] || fail "A's device changed after a refused handover"
echo more >/tmp/s/mnt/after-refusal; sync
umount /tmp/s/mnt
out=$(adm B primary vol) || fail "handover: $out"
note "$out"
[ "$(json A vol role)" = secondary ] || fail "A is not secondary after the handover"
[ -z "$(json A vol device)" ] || [ "$(json A vol device)" = null ] || fail "A still has a device"
devB=$(json B vol device); [ -n "$devB" ] && [ "$devB" != null ] || fail "B has no device after the handover"
wait_dev "$devB"
mount -t ext4 "$devB" /tmp/s/mnt || fail "mount on B"
check_files /tmp/s/mnt mnt
[ "$(cat /tmp/s/mnt/after-refusal)" = more ] || fail "write after the refused handover is missing"
echo onB >/tmp/s/mnt/onB
umount /tmp/s/mnt
e2fsck -fn "$devB" >/tmp/s/fsck.log 2>&1 || { cat /tmp/s/fsck.log; fail "e2fsck on B"; }
