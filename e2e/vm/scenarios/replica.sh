# Two hosts: files written through A's device are on B's backing file,
# byte for byte, once `marsadm wait` returns.
host A 1
host B 2
adm B join-cluster "$(addr A)"
adm A create-resource vol /tmp/s/A/vol.img --size 64M
adm B join-resource vol /tmp/s/B/vol.img
dev=$(adm A up vol | grep -o '/dev/ublkb[0-9]*'); wait_dev "$dev"
mke2fs -q -F -t ext4 "$dev"
mkdir -p /tmp/s/mnt && mount -t ext4 "$dev" /tmp/s/mnt
write_files /tmp/s/mnt 30
umount /tmp/s/mnt
adm A wait vol --timeout 120 || fail "wait"
a=$(md5_head "$dev" $((64 << 20))); b=$(md5_head /tmp/s/B/vol.img $((64 << 20)))
[ "$a" = "$b" ] || fail "B's backing file differs from A's device ($a vs $b)"
e2fsck -fn /tmp/s/B/vol.img >/tmp/s/fsck.log 2>&1 || { cat /tmp/s/fsck.log; fail "e2fsck on B's copy"; }
