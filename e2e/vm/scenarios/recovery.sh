# A crash of marsd with a mounted device: the kernel keeps the device
# (ublk user recovery), the restarted marsd resumes it, I/O goes on; the
# writer's data is all there; e2fsck clean.
host A 1
adm A create-resource vol /tmp/s/A/vol.img --size 64M
dev=$(adm A up vol | grep -o '/dev/ublkb[0-9]*'); wait_dev "$dev"
mke2fs -q -F -t ext4 "$dev"
mkdir -p /tmp/s/mnt && mount -t ext4 "$dev" /tmp/s/mnt
write_files /tmp/s/mnt 10
dd if=/dev/urandom of=/tmp/s/big bs=1M count=4 2>/dev/null
# 10 x 4 MiB into the 64 MiB file system, through the crash.
( i=0; while [ $i -lt 10 ]; do cp /tmp/s/big /tmp/s/mnt/big$i; i=$((i + 1)); done; sync
  echo done >/tmp/s/writer.done ) >/tmp/s/writer.log 2>&1 &
sleep 2
kill9 A
note "killed marsd with $dev mounted and a writer running"
sleep 2
start_marsd A
i=0
while [ "$(json A vol device)" != "$dev" ]; do
  i=$((i + 1)); [ $i -lt 300 ] || fail "view shows no device 30 s after the restart: $(adm A view vol --json)"
  sleep 0.1
done
note "device back $((i / 10)) s after the restart"
i=0
while [ ! -f /tmp/s/writer.done ]; do
  i=$((i + 1)); [ $i -lt 1200 ] || fail "the writer did not finish after recovery: $(cat /tmp/s/writer.log)"
  sleep 0.1
done
sum=$(md5 /tmp/s/big)
for f in /tmp/s/mnt/big*; do [ "$(md5 "$f")" = "$sum" ] || fail "$f differs after recovery"; done
check_files /tmp/s/mnt mnt
umount /tmp/s/mnt
e2fsck -fn "$dev" >/tmp/s/fsck.log 2>&1 || { cat /tmp/s/fsck.log; fail "e2fsck after recovery"; }
