#!/usr/bin/env bash
# Start (or stop) virtlogd and libvirtd as plain background processes, for machines without systemd
# (CI, containers, these development machines).  On real nodes the Ansible `libvirt` role runs them
# under systemd instead.  `start` is a no-op for a daemon that already runs; `stop` only stops daemons
# that this script started (it records their pids in /run/virtlet-dev/).  `running` exits 0 when both run
# (tools/test.sh asks first, and stops at the end only daemons that its own run started).
set -euo pipefail
RUN=/run/virtlet-dev
mkdir -p "$RUN"

# A daemon runs when its pid file (in this mount namespace's /run) names a live process.  `pgrep -x` is not
# enough: it also sees the libvirtd/virtlogd of containers (molecule nodes) that serve no socket here.
running() { [ -f "/run/$1.pid" ] && kill -0 "$(cat "/run/$1.pid")" 2>/dev/null; }

wait_pidfile() {
  for _ in $(seq 1 50); do
    if running "$1"; then return 0; fi
    sleep 0.1
  done
  echo "$1 did not write /run/$1.pid" >&2
  return 1
}

start() {
  # What udev does on a normal Debian host: /dev/kvm belongs to group kvm (libvirt-qemu is a member), mode
  # 0660.  Without it libvirtd probes QEMU as root *with* KVM, then finds KVM "not available now" for the
  # libvirt-qemu user, throws its capability cache away and probes again on every define (30-80 s each here).
  if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
  fi
  if ! running virtlogd; then
    virtlogd -d
    wait_pidfile virtlogd && cat /run/virtlogd.pid > "$RUN/virtlogd.started"
  fi
  if ! running libvirtd; then
    libvirtd -d
    wait_pidfile libvirtd && cat /run/libvirtd.pid > "$RUN/libvirtd.started"
  fi
  for _ in $(seq 1 100); do
    if virsh -c qemu:///system version >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "libvirtd did not answer on qemu:///system" >&2
  return 1
}

stop() {
  for d in libvirtd virtlogd; do
    if [ -f "$RUN/$d.started" ]; then
      kill "$(cat "$RUN/$d.started")" 2>/dev/null || true
      rm -f "$RUN/$d.started"
    fi
  done
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  running) running virtlogd && running libvirtd ;;
  *) echo "usage: $0 start|stop|running" >&2; exit 2 ;;
esac
