# Resize under a mounted file system: the device grows (online where the
# kernel has UBLK_U_CMD_UPDATE_SIZE, else after down/up), resize2fs grows
# the file system, files intact.
host A 1
adm A create-resource vol /tmp/s/A/vol.img --size 64M
dev=$(adm A up vol | grep -o '/dev/ublkb[0-9]*'); wait_dev "$dev"
mke2fs -q -F -t ext4 "$dev"
mkdir -p /tmp/s/mnt && mount -t ext4 "$dev" /tmp/s/mnt
write_files /tmp/s/mnt 10
out=$(adm A resize vol 128M); note "$out"
if echo "$out" | grep -q "keeps its old size"; then
  umount /tmp/s/mnt
  adm A down vol; dev=$(adm A up vol | grep -o '/dev/ublkb[0-9]*'); wait_dev "$dev"
  mount -t ext4 "$dev" /tmp/s/mnt
  note "offline resize (down/up)"
fi
i=0
while [ "$(blockdev --getsize64 "$dev")" != $((128 << 20)) ]; do
  i=$((i + 1)); [ $i -lt 50 ] || fail "device size $(blockdev --getsize64 "$dev") after resize"
  sleep 0.1
done
resize2fs "$dev" >/tmp/s/resize.log 2>&1 || { cat /tmp/s/resize.log; fail "resize2fs"; }
blocks=$(df -k /tmp/s/mnt | tail -1 | awk '{print $2}')
[ "$blocks" -gt 100000 ] || fail "file system did not grow ($blocks KiB)"
check_files /tmp/s/mnt mnt
umount /tmp/s/mnt
e2fsck -fn "$dev" >/tmp/s/fsck.log 2>&1 || { cat /tmp/s/fsck.log; fail "e2fsck after resize"; }
