# One host: `up` gives /dev/ublkbN; mkfs.ext4, mount, write files, umount;
# files intact after remount; `view --json` shows the device once, at
# resource level; `down` refused while mounted, then works; the backing
# file alone holds a clean file system after `down` and SIGTERM.
host A 1
adm A create-resource vol /tmp/s/A/vol.img --size 96M
dev=$(adm A up vol | grep -o '/dev/ublkb[0-9]*')
wait_dev "$dev"
[ "$(adm A up vol | grep -o '/dev/ublkb[0-9]*')" = "$dev" ] || fail "up is not idempotent"
[ "$(json A vol device)" = "$dev" ] || fail "view --json does not show device $dev: $(adm A view vol --json)"
[ "$(blockdev --getsize64 "$dev")" = $((96 << 20)) ] || fail "device size $(blockdev --getsize64 "$dev")"
mke2fs -q -F -t ext4 "$dev" || fail "mkfs.ext4"
mkdir -p /tmp/s/mnt && mount -t ext4 "$dev" /tmp/s/mnt || fail "mount"
write_files /tmp/s/mnt 40
sync
out=$(adm A down vol 2>&1) && fail "down succeeded while mounted"
echo "$out" | grep -q "in use" || fail "down while mounted: $out"
out=$(adm A secondary vol 2>&1) && fail "secondary succeeded while mounted"
echo "$out" | grep -q "in use" || fail "secondary while mounted: $out"
umount /tmp/s/mnt
echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 -o ro "$dev" /tmp/s/mnt && check_files /tmp/s/mnt mnt && umount /tmp/s/mnt
adm A down vol
[ ! -b "$dev" ] || { sleep 1; [ ! -b "$dev" ] || fail "$dev still exists after down"; }
[ -z "$(json A vol device)" ] || [ "$(json A vol device)" = null ] || fail "view still shows a device"
adm A down vol >/dev/null || fail "down is not idempotent"
term A
e2fsck -fn /tmp/s/A/vol.img >/tmp/s/fsck.log 2>&1 || { cat /tmp/s/fsck.log; fail "e2fsck on the backing file"; }
mount -o loop,ro /tmp/s/A/vol.img /tmp/s/mnt 2>/dev/null && { check_files /tmp/s/mnt mnt; umount /tmp/s/mnt; } || true
