# --ublk-block-size 4096: the device reports 4096-byte logical blocks, a
# file system on it works, and a volume whose size is not a multiple of
# 4096 is refused with a clear message (and nothing is left open).
host A 1 --ublk-block-size 4096
adm A create-resource vol /tmp/s/A/vol.img --size 64M
dev=$(adm A up vol | grep -o '/dev/ublkb[0-9]*'); wait_dev "$dev"
[ "$(blockdev --getss "$dev")" = 4096 ] || fail "logical block size $(blockdev --getss "$dev"), not 4096"
mke2fs -q -F -t ext4 "$dev"
mkdir -p /tmp/s/mnt && mount -t ext4 "$dev" /tmp/s/mnt
write_files /tmp/s/mnt 10
umount /tmp/s/mnt
mount -t ext4 -o ro "$dev" /tmp/s/mnt && check_files /tmp/s/mnt mnt && umount /tmp/s/mnt
adm A create-resource odd /tmp/s/A/odd.img --size 66048
out=$(adm A up odd 2>&1) && fail "up of a 66048-byte volume with 4096-byte blocks succeeded"
echo "$out" | grep -q "must be a multiple" || fail "unclear refusal: $out"
[ "$(json A odd open_count)" = 0 ] || fail "a refused up left the volume open"
