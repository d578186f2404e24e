#!/usr/bin/env bash
# Builds tiny.qcow2: a BIOS-bootable disk (MBR + syslinux on a FAT partition) holding Debian's cloud kernel
# and an initramfs with busybox, dropbear and the boot scripts of this folder.  No root filesystem: the whole
# guest lives in RAM.  Needs: apt-get, dpkg-deb, mtools, syslinux, fdisk (sfdisk), cpio, kmod, qemu-utils,
# gcc and libc6-dev (the static exec agent).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/../lib/common.sh"
OUT="$1"
WORK="$(mktemp -d "$OUT/.work-tiny.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# -- packages (downloaded once into .cache, never installed on the host) --------------------------------
# build.sh passes the pinned name=version list; run standalone, the script resolves it itself.
PINS=${VIRTLET_GUEST_PINS:-$(resolve_packages "$HERE/packages.txt" | tr '\n' ' ')}
X="$WORK/x"
mkdir -p "$X"
# shellcheck disable=SC2086
for deb in $(fetch_debs "$OUT/debs" $PINS); do
  dpkg-deb -x "$deb" "$X"
done
KVER=$(ls "$X/lib/modules" | head -1)

# -- initramfs tree -----------------------------------------------------------------------------------------
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,run,tmp,root/.ssh,var/log,lib/modules,usr/bin,usr/sbin,etc/dropbear}
ln -s ../run "$R/var/run"  # qemu-ga keeps its pid file and state in /var/run
cp "$X/bin/busybox" "$R/bin/busybox"
for applet in $("$R/bin/busybox" --list); do
  [ "$applet" = busybox ] || { ln -sf busybox "$R/bin/$applet"; ln -sf ../bin/busybox "$R/sbin/$applet"; }
done
# dropbear, the QEMU guest agent and the shared libraries they need (resolved against the unpacked tree; a
# library missing there is an error: add its package to packages.txt rather than copy the host's)
cp "$X/usr/sbin/dropbear" "$R/usr/sbin/"
cp "$X/usr/bin/dropbearkey" "$R/usr/bin/"
cp "$X/usr/sbin/qemu-ga" "$R/usr/sbin/"
# dhcpcd for IPv6 (router advertisements + DHCPv6 from the per-pod server); its privilege-separation user
# chroots into an empty /usr/lib/dhcpcd
cp "$X/usr/sbin/dhcpcd" "$R/usr/sbin/"
mkdir -p "$R/usr/lib/dhcpcd" "$R/var/lib/dhcpcd"
mkdir -p "$R/lib64" "$R/lib/x86_64-linux-gnu"
cp -L "$X/lib64/ld-linux-x86-64.so.2" "$R/lib64/" 2>/dev/null || cp -L "$X/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$R/lib64/"
for bin in "$R/usr/sbin/dropbear" "$R/usr/bin/dropbearkey" "$R/usr/sbin/qemu-ga" "$R/usr/sbin/dhcpcd"; do
  for lib in $(LD_LIBRARY_PATH="$X/lib/x86_64-linux-gnu:$X/usr/lib/x86_64-linux-gnu" ldd "$bin" | awk '/=>/ {print $1}'); do
    src=$(find "$X/lib/x86_64-linux-gnu" "$X/usr/lib/x86_64-linux-gnu" -name "$lib" 2>/dev/null | head -1)
    [ -n "$src" ] || die "tiny: $lib (needed by ${bin##*/}) is in none of the packages of packages.txt"
    cp -L "$src" "$R/lib/x86_64-linux-gnu/"
  done
done
# kernel modules for virtio/SCSI/IDE disks, CD-ROMs, ISO9660/FAT config drives, NICs, the ACPI power button,
# the memory balloon (UpdateContainerResources shrinks and grows a VM's memory through it)
# (the cloud kernel has them as modules; the i440fx "pc" machine libvirt uses by default has IDE, no AHCI)
# virtiofs (and fuse, its base) for directory volumes; 9p/9pnet_virtio too when the kernel has them (Debian's
# cloud kernel does not: a missing module is skipped)
MODS="virtio_pci virtio_blk virtio_scsi virtio_net virtio_console virtio_balloon sd_mod sr_mod ata_piix isofs vfat nls_cp437 nls_ascii nls_iso8859_1 nls_utf8 button evdev fuse virtiofs 9pnet_virtio 9p"
depmod -b "$X" "$KVER"
: > "$R/etc/modules.order"
for m in $MODS; do
  modprobe -d "$X" -S "$KVER" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" {print $2}' || \
    echo "tiny: kernel module $m not found, skipped" >&2

done | awk '!seen[$0]++' | while read -r ko; do
  cp "$ko" "$R/lib/modules/"
  echo "/lib/modules/$(basename "$ko")" >> "$R/etc/modules.order"
done
install -m 0755 "$HERE/init" "$R/init"
install -m 0755 "$HERE/rcS" "$R/etc/rcS"
install -m 0755 "$HERE/udhcpc.script" "$R/etc/udhcpc.script"
install -m 0755 "$HERE/cloud-init.sh" "$R/etc/cloud-init.sh"
install -m 0755 "$HERE/virtlet-mounts" "$R/etc/virtlet-mounts"
install -m 0644 "$HERE/yaml2tree.awk" "$R/etc/yaml2tree.awk"
install -m 0644 "$HERE/inittab" "$R/etc/inittab"
install -m 0644 "$HERE/dhcpcd.conf" "$R/etc/dhcpcd.conf"
install -m 0755 "$HERE/power-button" "$R/etc/acpi/PWRF/00000080" 2>/dev/null || {
  mkdir -p "$R/etc/acpi/PWRF"; install -m 0755 "$HERE/power-button" "$R/etc/acpi/PWRF/00000080"; }
printf 'PWRF PWRF/00000080\n' > "$R/etc/acpid.conf"
install -m 0755 "$HERE/virtlet-ignore-acpi" "$R/usr/bin/virtlet-ignore-acpi"
printf 'root:x:0:0:root:/root:/bin/sh\ndhcpcd:x:101:65534:dhcpcd:/usr/lib/dhcpcd:/bin/false\n' > "$R/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$R/etc/group"
printf 'root::19000:0:99999:7:::\n' > "$R/etc/shadow"
printf '/bin/sh\n' > "$R/etc/shells"
install -m 0755 "$HERE/virtlet-sysinfo" "$R/usr/bin/virtlet-sysinfo"
install -m 0755 "$HERE/virtlet-exit" "$R/usr/bin/virtlet-exit"
# the interactive-exec agent: static, built from source here (needs gcc and libc6-dev on the build host)
gcc -static -Os -o "$R/usr/sbin/virtlet-exec-agent" "$HERE/../lib/virtlet-exec-agent.c"
strip "$R/usr/sbin/virtlet-exec-agent"
install -m 0755 "$HERE/virtlet-exec-start" "$R/etc/virtlet-exec-start"
install -m 0644 "$HERE/issue" "$R/etc/issue"
chmod 700 "$R/root" "$R/root/.ssh"
# the kernel opens /dev/console before /init mounts devtmpfs: without the node, early output is lost
if [ "$(id -u)" = 0 ]; then mknod -m 600 "$R/dev/console" c 5 1; fi
(cd "$R" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -9) > "$WORK/initrd.gz"

# -- bootable disk: MBR + one FAT partition with syslinux, kernel and initramfs -----------------------------
PART="$WORK/part.img"
SECTORS=$(( 40 * 1024 * 1024 / 512 ))
truncate -s $(( SECTORS * 512 )) "$PART"
mformat -i "$PART" -v TINYBOOT ::
mcopy -i "$PART" "$X/boot/vmlinuz-$KVER" ::/vmlinuz
mcopy -i "$PART" "$WORK/initrd.gz" ::/initrd.gz
mcopy -i "$PART" "$HERE/syslinux.cfg" ::/syslinux.cfg
syslinux --install "$PART"
DISK="$WORK/disk.raw"
truncate -s $(( (2048 + SECTORS) * 512 )) "$DISK"
printf 'label: dos\nstart=2048, size=%d, type=c, bootable\n' "$SECTORS" | sfdisk -q "$DISK"
dd if="$PART" of="$DISK" bs=512 seek=2048 conv=notrunc status=none
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$DISK" bs=440 count=1 conv=notrunc status=none
qemu-img convert -q -c -O qcow2 "$DISK" "$OUT/tiny.qcow2.tmp"
mv "$OUT/tiny.qcow2.tmp" "$OUT/tiny.qcow2"
