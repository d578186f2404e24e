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
  # guest image builds (tiny: mtools/syslinux/cpio/kmod; full: debootstrap/grub/e2fsprogs; both: the static
  # exec agent, gcc and libc6-dev)
  mtools syslinux syslinux-common fdisk cpio kmod debootstrap grub-pc-bin e2fsprogs busybox-static libc6-dev
  # molecule: rootful podman nodes running systemd (iptables: podman's netavark needs it)
  podman
  # test clients and tools
  curl openssh-client sqlite3 procps psmisc openssl python3-venv
  # a DHCPv6/router-advertisement client for the IPv6 pod network tests
  dhcpcd-base
  # the stand-in for cluster DNS in the nested-Kubernetes example test
  dnsmasq-base
)

. tools/progress.sh
LOGS=${VIRTLET_LOG_DIR:-.cache/logs}  # full output of the installs; a failure prints its tail

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${#missing[@]} Debian packages (usually 1-2 min on a fresh machine; log: $LOGS/apt.log)"
  t0=$(date +%s)
  quiet "apt-get install" "$LOGS/apt.log" bash -c 'apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"' apt "${missing[@]}"
  echo "setup: installed ${missing[*]} in $(_elapsed $(($(date +%s) - t0)))"
else
  echo "setup: all ${#APT_PACKAGES[@]} Debian packages already installed"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# The package is installed editable, so code changes need no reinstall: only a changed pyproject.toml (its
# dependencies, entry points) or a new Python does.  The stamp saves ~30 s and pip's noise on every run.
stamp=$({ cat pyproject.toml; .venv/bin/python --version; } | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.virtlet-setup-stamp 2>/dev/null)" = "$stamp" ] && .venv/bin/python -c 'import virtlet' 2>/dev/null
then
  echo "setup: Python environment .venv is up to date (pyproject.toml unchanged)"
else
  echo "setup: installing virtlet and its dev tools into .venv (usually 1 min fresh, 15 s after a change; log: $LOGS/pip.log)"
  t0=$(date +%s)
  quiet "pip install" "$LOGS/pip.log" bash -c '.venv/bin/python -m pip install --upgrade pip &&
    .venv/bin/python -m pip install -e ".[dev]"'
  printf '%s\n' "$stamp" >.venv/.virtlet-setup-stamp
  echo "setup: .venv ready in $(_elapsed $(($(date +%s) - t0)))"
fi
echo "setup: done ($(.venv/bin/python --version), virtlet $(.venv/bin/python -c 'import virtlet; print(virtlet.__version__)'))"
