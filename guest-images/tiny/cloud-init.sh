#!/bin/sh
# The tiny guest's cloud-init: a documented subset of NoCloud (see guest-images/README.md).
# Finds the seed (label cidata or config-2 on a CD-ROM or disk), reads meta-data and user-data, and applies
# hostname, instance-id, SSH keys, write_files and runcmd.  A user-data starting with #! is run as a script.
SEED=/run/seed
T=/run/cloud
mkdir -p "$SEED" "$T"
# The volume label of a block device, read from the raw device (busybox's findfs does not know every layout):
# ISO 9660 keeps it at byte 40 of the primary volume descriptor (sector 16 of 2048 bytes), FAT12/16 at byte 43
# and FAT32 at byte 71 of the boot sector.
label_of() {
  if [ "$(dd if="$1" bs=2048 skip=16 count=1 2>/dev/null | dd bs=1 skip=1 count=5 2>/dev/null)" = CD001 ]; then
    dd if="$1" bs=2048 skip=16 count=1 2>/dev/null | dd bs=1 skip=40 count=32 2>/dev/null
    return
  fi
  b=$(dd if="$1" bs=512 count=1 2>/dev/null | dd bs=1 skip=82 count=5 2>/dev/null)
  if [ "$b" = FAT32 ]; then dd if="$1" bs=512 count=1 2>/dev/null | dd bs=1 skip=71 count=11 2>/dev/null
  else dd if="$1" bs=512 count=1 2>/dev/null | dd bs=1 skip=43 count=11 2>/dev/null; fi
}
find_seed() {
  for b in /sys/class/block/*; do
    d=/dev/${b##*/}
    [ -b "$d" ] || continue
    case "$(label_of "$d" | tr -d ' \000' | tr 'A-Z' 'a-z')" in
      cidata|config-2) echo "$d"; return 0 ;;
    esac
  done
  return 1
}
dev=""
# devices show up while the drivers probe (SCSI/IDE scans are slow under TCG): look for up to ~6 s
for _ in $(seq 1 30); do
  dev=$(find_seed) && break
  mdev -s 2>/dev/null; sleep 0.2
done
if [ -z "$dev" ]; then
  echo "virtlet tiny guest: no cloud-init seed found"
  exit 0
fi
if ! mount -o ro "$dev" "$SEED" 2>/dev/null && ! mount -t iso9660 -o ro "$dev" "$SEED" \
    && ! mount -t vfat -o ro "$dev" "$SEED"; then
  echo "virtlet tiny guest: cannot mount the cloud-init seed $dev"
  exit 0
fi
echo "virtlet tiny guest: cloud-init seed on $dev"
# pod volumes first, so write_files and runcmd below can use them
/etc/virtlet-mounts "$SEED"
# Block volumes (docs/volumes.md): virtlet/block-devices on the seed has one "<serial> <devicePath>" line per
# volume; the disk with that serial (virtio-blk: /sys/block/X/serial; virtio-scsi: VPD page 0x80) is linked
# at the devicePath.  No udev here, so this is the tiny image's /dev/disk/by-id.
if [ -f "$SEED/virtlet/block-devices" ]; then
  while read -r serial path; do
    [ -n "$serial" ] && [ -n "$path" ] || continue
    found=""
    for b in /sys/block/*; do
      s=$(cat "$b/serial" 2>/dev/null)
      [ -n "$s" ] || s=$(tr -dc 'A-Za-z0-9_.-' < "$b/device/vpd_pg80" 2>/dev/null)
      case "$s" in *"$serial") found=/dev/${b##*/}; break ;; esac
    done
    if [ -n "$found" ]; then
      mkdir -p "$(dirname "$path")" && ln -sfn "$found" "$path" && echo "virtlet tiny guest: block volume $found at $path"
    else
      echo "virtlet tiny guest: no disk with serial $serial for $path"
    fi
  done < "$SEED/virtlet/block-devices"
fi
if [ -f "$SEED/meta-data" ]; then
  awk -v out="$T/md" -f /etc/yaml2tree.awk "$SEED/meta-data"
elif [ -f "$SEED/openstack/latest/meta_data.json" ]; then
  # ConfigDrive: the JSON virtletd writes has one "key": "value" per line; pick what we apply
  J="$SEED/openstack/latest/meta_data.json"
  mkdir -p "$T/md/public-keys"
  sed -n 's/.*"uuid": *"\([^"]*\)".*/\1/p' "$J" | head -1 | tr -d '\n' > "$T/md/instance-id"
  sed -n 's/.*"hostname": *"\([^"]*\)".*/\1/p' "$J" | head -1 | tr -d '\n' > "$T/md/local-hostname"
  sed -n 's/.*"key-[0-9]*": *"\([^"]*\)".*/\1/p' "$J" | awk -v d="$T/md/public-keys" \
    '{ f = sprintf("%s/%03d", d, NR); printf "%s", $0 > f; close(f) }'
fi
set_hostname() {
  hostname "$1"
  echo "$1" > /etc/hostname
  touch /run/hostname-from-metadata   # the DHCP handler no longer overrides it
}
[ -s "$T/md/local-hostname" ] && set_hostname "$(cat "$T/md/local-hostname")"
[ -f "$T/md/instance-id" ] && cp "$T/md/instance-id" /run/instance-id
mkdir -p /root/.ssh
add_keys() {
  for k in "$1"/*; do
    [ -f "$k" ] && { cat "$k"; echo; } >> /root/.ssh/authorized_keys
  done
}
# meta-data public-keys: a list, or one key as a string
[ -d "$T/md/public-keys" ] && add_keys "$T/md/public-keys"
[ -f "$T/md/public-keys" ] && { cat "$T/md/public-keys"; echo; } >> /root/.ssh/authorized_keys
UD="$SEED/user-data"
[ -f "$UD" ] || UD="$SEED/openstack/latest/user_data"
if [ -f "$UD" ] && head -c 2 "$UD" | grep -q '^#!'; then
  echo "virtlet tiny guest: running the user-data script"
  cp "$UD" /run/user-script && chmod +x /run/user-script && /run/user-script
elif [ -f "$UD" ]; then
  awk -v out="$T/ud" -f /etc/yaml2tree.awk "$UD"
  [ -s "$T/ud/hostname" ] && set_hostname "$(cat "$T/ud/hostname")"
  [ -d "$T/ud/ssh_authorized_keys" ] && add_keys "$T/ud/ssh_authorized_keys"
  # tiny has one user, root: it is also the "default" user; other users are not created
  for u in "$T"/ud/users/*; do
    [ -d "$u" ] || continue
    name=$(cat "$u/name" 2>/dev/null)
    case "$name" in
      root | default) ;;
      *) echo "virtlet tiny guest: user '$name' not created (tiny only has root)"; continue ;;
    esac
    for d in "$u/ssh-authorized-keys" "$u/ssh_authorized_keys"; do [ -d "$d" ] && add_keys "$d"; done
  done
  for w in "$T"/ud/write_files/*; do
    [ -f "$w/path" ] || continue
    p=$(cat "$w/path")
    mkdir -p "$(dirname "$p")"
    src="$w/content"
    [ -f "$src" ] || src=/dev/null
    case "$(cat "$w/encoding" 2>/dev/null)" in
      b64 | base64) base64 -d < "$src" > /run/wf.tmp ;;
      ""| text/plain) cat "$src" > /run/wf.tmp ;;
      *) echo "virtlet tiny guest: $p: encoding '$(cat "$w/encoding")' not supported, skipped"; continue ;;
    esac
    if [ "$(cat "$w/append" 2>/dev/null)" = true ]; then cat /run/wf.tmp >> "$p"; else cat /run/wf.tmp > "$p"; fi
    rm -f /run/wf.tmp
    if [ -f "$w/permissions" ]; then chmod "$(cat "$w/permissions")" "$p"; else chmod 644 "$p"; fi
    echo "virtlet tiny guest: wrote $p"
  done
  # runcmd: a string runs through sh -c, a list is the argv of one command (no shell)
  for c in "$T"/ud/runcmd/*; do
    if [ -d "$c" ]; then
      set --
      for a in "$c"/*; do set -- "$@" "$(cat "$a")"; done
      "$@"
    elif [ -f "$c" ]; then
      sh -c "$(cat "$c")"
    fi
  done
fi
[ ! -f /root/.ssh/authorized_keys ] || chmod 600 /root/.ssh/authorized_keys
echo "virtlet tiny guest: cloud-init done"
