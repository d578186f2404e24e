#!/usr/bin/env bash
# Builds full.qcow2: Debian bookworm (debootstrap minbase) with systemd, real cloud-init and OpenSSH, booting
# from its own disk through SeaBIOS -> GRUB (i386-pc) -> kernel + Debian initramfs, root ext4 found by label.
# Called by guest-images/build.sh as: build-full.sh CACHE_DIR  (leaves CACHE_DIR/full.qcow2).
#
# Why no loop mounts: the filesystem is filled from a directory (mkfs.ext4 -d) and GRUB's core image is written
# into the gap before the first partition with dd, so the only privileged step is debootstrap itself.
# The debootstrap tree is cached (CACHE_DIR/full-debootstrap): it takes minutes and changes only with the
# package list, while the customisation below takes seconds.
# Host packages: debootstrap grub-pc-bin e2fsprogs fdisk qemu-utils gcc libc6-dev.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/../lib/common.sh"
CACHE=$1
SUITE=bookworm
MIRROR=${VIRTLET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Root filesystem size: room for growpart tests to start from and for apt-free test workloads.
ROOT_MB=${VIRTLET_FULL_ROOT_MB:-1536}

[ "$(id -u)" = 0 ] || die "the full image needs root (debootstrap)"
for tool in debootstrap grub-mkimage mkfs.ext4 sfdisk qemu-img; do
    command -v "$tool" >/dev/null || die "missing $tool (apt-get install debootstrap grub-pc-bin e2fsprogs fdisk qemu-utils)"
done

# --- debootstrap tree (cached) -----------------------------------------------------------------------------
INCLUDE=$(sed -e 's/#.*//' "$HERE/packages.txt" | awk 'NF && $1 != "depends-of" {print $1}' | paste -sd, -)
TREE=$CACHE/full-debootstrap
# The tree is redone when the suite, the mirror, the package list or a pinned version changes (not when only
# the customisation below changes).
TREE_KEY=$(printf '%s\n' "$SUITE" "$MIRROR" "$INCLUDE" "$VIRTLET_GUEST_PINS" | sha256sum | cut -c1-64)
if [ "$(cat "$TREE/.virtlet-tree-key" 2>/dev/null)" != "$TREE_KEY" ]; then
    log "debootstrap $SUITE minbase (a few minutes on a cold package cache)"
    rm -rf "$TREE" "$TREE.tmp"
    mkdir -p "$CACHE/debs-full"
    debootstrap --variant=minbase --include="$INCLUDE" --cache-dir="$CACHE/debs-full" \
        "$SUITE" "$TREE.tmp" "$MIRROR" >&2 || { rm -rf "$TREE.tmp"; die "debootstrap failed"; }
    rm -rf "$TREE.tmp/var/cache/apt/archives/"*.deb
    printf '%s\n' "$TREE_KEY" >"$TREE.tmp/.virtlet-tree-key"
    mv "$TREE.tmp" "$TREE"
else
    log "reusing the cached debootstrap tree $TREE"
fi

WORK=$(mktemp -d "$CACHE/.work-full.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
cp -a "$TREE" "$ROOT"
rm -f "$ROOT/.virtlet-tree-key"

# --- customisation ----------------------------------------------------------------------------------------
cp -a "$HERE/rootfs/." "$ROOT/"
chown -R 0:0 "$ROOT/etc/cloud/cloud.cfg.d" "$ROOT/boot/grub" "$ROOT/etc/fstab" "$ROOT/etc/udev/rules.d" \
    "$ROOT/etc/systemd/system/virtlet-exec-agent.service"
# the interactive-exec agent (docs/vm-pods.md), static: started by udev + systemd when its port appears
mkdir -p "$ROOT/usr/local/sbin"
gcc -static -Os -o "$ROOT/usr/local/sbin/virtlet-exec-agent" "$HERE/../lib/virtlet-exec-agent.c"
strip "$ROOT/usr/local/sbin/virtlet-exec-agent"
# every VM is a new machine: systemd makes a machine-id, cloud-init makes SSH host keys per instance
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id" "$ROOT"/etc/ssh/ssh_host_*
rm -f "$ROOT/etc/hostname"
# systemd-networkd renders cloud-init's network config (no ifupdown in minbase); quiet boots without apt timers
chroot "$ROOT" systemctl enable systemd-networkd.service >&2
for timer in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
    [ ! -e "$ROOT/lib/systemd/system/$timer" ] || chroot "$ROOT" systemctl mask "$timer" >&2
done
# a getty on the serial console even before cloud-init finishes (the kernel's console= enables it too)
chroot "$ROOT" systemctl enable serial-getty@ttyS0.service >&2
rm -rf "$ROOT/var/lib/apt/lists/"* "$ROOT/var/cache/apt/"*.bin "$ROOT/var/log/"*.log
[ -e "$ROOT/vmlinuz" ] && [ -e "$ROOT/initrd.img" ] || die "the tree has no /vmlinuz or /initrd.img"

# --- filesystem and disk ----------------------------------------------------------------------------------
used_mb=$(du -sm "$ROOT" | cut -f1)
[ "$ROOT_MB" -gt $((used_mb + 200)) ] || ROOT_MB=$((used_mb + 400))
mkfs.ext4 -q -F -L root -d "$ROOT" -E root_owner=0:0 "$WORK/root.ext4" "${ROOT_MB}M" >&2
DISK=$WORK/disk.raw
truncate -s $(((2048 * 512) + ROOT_MB * 1024 * 1024)) "$DISK"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$DISK" >&2
dd if="$WORK/root.ext4" of="$DISK" bs=1M seek=1 conv=notrunc,sparse status=none
# GRUB for BIOS: boot.img's code (not its partition table) in sector 0, the core image from sector 1
grub-mkimage -O i386-pc -o "$WORK/core.img" -p '(hd0,msdos1)/boot/grub' \
    biosdisk part_msdos ext2 normal linux search search_label serial terminal configfile boot
[ "$(stat -c %s "$WORK/core.img")" -lt $((2047 * 512)) ] || die "GRUB core image does not fit before sector 2048"
dd if=/usr/lib/grub/i386-pc/boot.img of="$DISK" bs=440 count=1 conv=notrunc status=none
dd if="$WORK/core.img" of="$DISK" bs=512 seek=1 conv=notrunc status=none
# boot.img must know where core.img starts (sector 1) and that it boots from the first hard disk: the
# defaults compiled into boot.img (kernel sector 1, boot drive 0x80 via "drive check") are what we need.
# Uncompressed qcow2: booting a compressed one costs ~25 s more under TCG (decompression of every read).
qemu-img convert -q -O qcow2 "$DISK" "$CACHE/full.qcow2.tmp"
mv -f "$CACHE/full.qcow2.tmp" "$CACHE/full.qcow2"
