# Remote device: C has no replica; `attach --remote` gives it a device
# served by the primary A over the network: a file system made and written
# through it is A's data; it follows a handover to B.
host A 1
host B 2
host C 3
adm B join-cluster "$(addr A)"
adm C join-cluster "$(addr A)"
adm A create-resource vol /tmp/s/A/vol.img --size 64M
adm B join-resource vol /tmp/s/B/vol.img
dev=$(adm C attach vol --remote | grep -o '/dev/ublkb[0-9]*'); wait_dev "$dev"
[ "$(json C vol device)" = "$dev" ] || fail "view on C does not show the remote device"
mke2fs -q -F -t ext4 "$dev"
mkdir -p /tmp/s/mnt && mount -t ext4 "$dev" /tmp/s/mnt
write_files /tmp/s/mnt 20
sync
adm A wait vol --timeout 120
out=$(adm B primary vol) || fail "handover A to B under a remote device: $out"
note "$out"
echo afterhandover >/tmp/s/mnt/x; sync
check_files /tmp/s/mnt mnt
umount /tmp/s/mnt
adm C detach vol
[ ! -b "$dev" ] || { sleep 1; [ ! -b "$dev" ] || fail "$dev still there after detach"; }
adm B wait vol --timeout 120
e2fsck -fn /tmp/s/A/vol.img >/tmp/s/fsck.log 2>&1 || { cat /tmp/s/fsck.log; fail "e2fsck on A's copy"; }
mkdir -p /tmp/s/chk
devB=$(adm B up vol | grep -o '/dev/ublkb[0-9]*'); wait_dev "$devB"
mount -t ext4 -o ro "$devB" /tmp/s/chk && check_files /tmp/s/chk mnt
[ "$(cat /tmp/s/chk/x)" = afterhandover ] || fail "write after the handover is missing on B"
umount /tmp/s/chk
