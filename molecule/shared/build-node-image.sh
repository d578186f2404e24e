#!/usr/bin/env bash
# Builds the local "node" image the molecule scenarios and tools/local-node.sh run as privileged podman
# containers: Debian bookworm (debootstrap minbase) with systemd as PID 1, like a kubeadm node before
# Kubernetes is installed.
#
# Why local and debootstrapped: no container registry is reachable from the build machines, and the roles
# need a real systemd (units, restarts, readiness waits), which stock container images do not run.
# Why cached: debootstrap takes a minute or more; the image is rebuilt only when this script (its package
# list and settings) changes.  The hash of the inputs is stored as an image label and in .cache/.
#
# Usage: molecule/shared/build-node-image.sh [--force]        prints the image reference on stdout
# Environment: VIRTLET_NODE_IMAGE (default localhost/virtlet-node:bookworm), VIRTLET_CACHE (default .cache/)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
image=${VIRTLET_NODE_IMAGE:-localhost/virtlet-node:bookworm}
cache=${VIRTLET_CACHE:-$repo/.cache}/node-image
suite=bookworm
mirror=${VIRTLET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# What a kubeadm-style node has before Kubernetes: systemd, dbus, python3 for Ansible (python3-apt for its
# apt module), sudo, iproute2, CA certificates, procps.
packages=systemd-sysv,dbus,python3,python3-apt,sudo,iproute2,ca-certificates,procps,kmod,gnupg,less

log() { echo "build-node-image: $*" >&2; }

inputs=$(printf '%s\n' "$suite" "$mirror" "$packages" | cat - "$0" | sha256sum | cut -c1-16)
label=virtlet.node-image.inputs

if [ "${1:-}" != "--force" ] \
   && [ "$(podman image inspect --format "{{ index .Labels \"$label\" }}" "$image" 2>/dev/null)" = "$inputs" ]; then
  log "$image is up to date ($inputs)"
  echo "$image"
  exit 0
fi

mkdir -p "$cache/debs"
tarball=$cache/node-$inputs.tar
if [ ! -s "$tarball" ] || [ "${1:-}" = "--force" ]; then
  root=$(mktemp -d "$cache/rootfs-XXXXXX")
  trap 'rm -rf "$root"' EXIT
  log "debootstrap $suite ($packages) into $root (usually 1-2 min; log: $cache/debootstrap.log)"
  . "$repo/tools/progress.sh"  # heartbeat every 30 s on stderr, the log's tail on failure
  quiet "debootstrap of the node image" "$cache/debootstrap.log" \
    debootstrap --variant=minbase --include="$packages" --cache-dir="$cache/debs" "$suite" "$root" "$mirror" \
    || exit 1

  # Same archive as the host, with updates and security, for the roles' apt tasks.
  cat >"$root/etc/apt/sources.list" <<LIST
deb $mirror $suite main
deb $mirror $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
LIST
  # Lists older than any cache_valid_time, so the roles' first apt task refreshes them.
  rm -rf "$root/var/lib/apt/lists/"*
  touch -d @0 "$root/var/lib/apt/lists"
  # Keep downloaded packages out of the image; no recommends, like a lean node.
  echo 'APT::Install-Recommends "false";' >"$root/etc/apt/apt.conf.d/90virtlet-node"
  rm -f "$root/var/cache/apt/archives/"*.deb
  # A container has no consoles, no hardware clock, no udev to wait for: mask what would only fail or wait.
  for unit in getty@tty1.service console-getty.service systemd-udevd.service systemd-udev-trigger.service \
              systemd-modules-load.service sys-kernel-config.mount systemd-remount-fs.service \
              apt-daily.timer apt-daily-upgrade.timer systemd-timesyncd.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
  done
  # systemd makes / shared on real hosts but not in a container.  Without it, mounts made later (containerd's
  # /run/netns/cni-* files) stay pinned in QEMU's private mount namespace and pod removal fails with EBUSY.
  cat >"$root/etc/systemd/system/virtlet-node-rshared.service" <<UNIT
[Unit]
Description=Make / a shared mount, as systemd does on a real host
DefaultDependencies=no
Before=local-fs.target sysinit.target

[Service]
Type=oneshot
ExecStart=/bin/mount --make-rshared /

[Install]
WantedBy=sysinit.target
UNIT
  mkdir -p "$root/etc/systemd/system/sysinit.target.wants"
  ln -sf ../virtlet-node-rshared.service "$root/etc/systemd/system/sysinit.target.wants/"
  : >"$root/etc/machine-id"
  echo virtlet-node >"$root/etc/hostname"
  tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  rm -rf "$root"
  trap - EXIT
  # Older tarballs are of no use any more.
  find "$cache" -maxdepth 1 -name 'node-*.tar' ! -name "node-$inputs.tar" -delete
fi

log "importing $tarball as $image"
podman import \
  --change 'CMD ["/sbin/init"]' \
  --change 'ENV container=podman' \
  --change 'STOPSIGNAL SIGRTMIN+3' \
  --change "LABEL $label=$inputs" \
  --quiet "$tarball" "$image" >/dev/null
echo "$image"
