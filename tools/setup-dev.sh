#!/usr/bin/env bash
# Installs everything virtlet's tests and main job need on a fresh Debian 12 machine (root):
# Debian packages, then a Python virtualenv in .venv with the project and its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  # VMs: QEMU (TCG fallback when KVM does not work), libvirt, and libvirt-python's build needs
  qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc python3-dev
  # pod networking: CNI plugins, iproute2, iptables (bridge plugin, podman)
  containernetworking-plugins iproute2 iptables
  # the CRI proxy's primary runtime in tests
  containerd runc
  # registry pulls in tests: a real registry (distribution v2) and htpasswd with bcrypt
  docker-registry apache2-utils
  # guest image builds (tiny: mtools/syslinux/cpio/kmod; full: debootstrap/grub/e2fsprogs)
  mtools syslinux syslinux-common fdisk cpio kmod debootstrap grub-pc-bin e2fsprogs busybox-static
  # molecule: rootful podman nodes running systemd (iptables: podman's netavark needs it)
  podman
  # test clients and tools
  curl openssh-client sqlite3 procps psmisc openssl python3-venv
  # the stand-in for cluster DNS in the nested-Kubernetes example test
  dnsmasq-base
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
echo "setup: done ($(.venv/bin/python --version), virtlet $(.venv/bin/python -c 'import virtlet; print(virtlet.__version__)'))"
