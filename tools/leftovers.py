#!/usr/bin/env python3
"""Find host state that virtlet's tests make and must remove: the "fresh machine" check of tools/test.sh.

    python3 tools/leftovers.py                  list what is there now; exit 1 if anything
    python3 tools/leftovers.py before FILE      list it, say loudly that the machine is not fresh, save it to FILE
                                                (exit 0: a dirty machine is reported, the run still goes on)
    python3 tools/leftovers.py after FILE       exit 1 if anything is there that FILE did not list (the run
                                                leaked it, or broke the fresh state); also lists what was
                                                already there before
    python3 tools/leftovers.py after-podman FILE    the same, but /run/netns as a mount point is podman's
                                                (the slow tier's molecule and local-node nodes), not a leak

What counts (the names the tests and virtletd use; see tests/integration/conftest.py,
tests/helpers/containerd.py, runtime/virtlet/network/plumbing.py and netns.py):
- libvirt domains named ``virtlet-*`` (``virsh list --all`` on qemu:///system, when libvirtd answers);
- network namespaces named like virtlet's (32 hex characters) or the tests' (``cni-*`` of the test containerd,
  ``vtvm*``, ``vstream-*``, ``vtfresh-*``);
- ``/run/netns`` being a mount point: after a boot it is a plain directory, and only ``ip netns add`` (which
  virtlet no longer uses) makes it one; a run that makes it one would hide other runtimes' namespaces;
- links: the tests' bridges (``vtb*``, ``vtcni*``, ``vtcd*``), virtlet's taps (``vt`` + 12 hex), veths that
  are ports of those bridges;
- attached loop devices;
- processes the tests start: virtletd, the CRI proxy, the per-pod DHCP server, the test containerd and its
  shims, QEMU of ``virtlet-*`` domains, dnsmasq, the fresh-host test's mount-namespace holder;
- temp dirs and mounts of the test fixtures (``/var/tmp/virtlet-test-*``, ``/var/tmp/vtcd-*``, …), host-local
  IPAM dirs of the test networks, the molecule and reset-test podman nodes (``virtlet-mol-*``, ``virtlet-reset-*``);
- what the benches (``bench/``) make, so a bench that leaked shows up before the next test run: their
  ``vmboot-*`` domains, the QEMU ``vm_boot`` starts by hand (``-name vmboot-*``, outside libvirt, so no
  domain list shows it), their bridges (``vtbench*``, ``vbb*``), temp dirs (``/var/tmp/virtlet-bench*``,
  ``virtlet-vmboot-*``, ``virtlet-podstart-*``, ``virtlet-density-*``) and IPAM dirs.

It reads only; it removes nothing (what is found says which test or earlier run to look at).  The ``after``
comparison assumes no other test run shares the machine meanwhile, as in CI.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

NETNS_DIR = Path("/run/netns")
NETNS_NAME = re.compile(r"^([0-9a-f]{32}|cni-[0-9a-f-]{36}|vtvm.*|vstream-.*|vtfresh-.*)$")
BRIDGE_NAME = re.compile(r"^(vtb|vtcni|vtcd|vbb)")  # vtb also covers the benches' vtbench*
TAP_NAME = re.compile(r"^vt[0-9a-f]{12,13}$")
PROCESS = re.compile(
    r"virtlet\.daemon|virtlet\.proxy\.main|virtlet\.network\.dhcp_server|containerd --config /var/tmp/vtcd-"
    r"|containerd-shim.*/var/tmp/vtcd-|qemu-system.*guest=(virtlet|vmboot)-|qemu-system.* -name vmboot-"
    r"|(^|/)dnsmasq |virtlet-test-mntns")
TEMP_GLOBS = ["/var/tmp/virtlet-test-*", "/var/tmp/vtcd-*", "/var/tmp/vcl-test-*", "/var/tmp/virtlet-guestimg-*",
              "/tmp/vst-*", "/tmp/vl-criver-*", "/var/lib/cni/networks/vtest-*", "/var/lib/cni/networks/vtcd-*",
              "/var/lib/cni/networks/virtlet-test-*",
              # the benches'
              "/var/tmp/virtlet-bench*", "/var/tmp/virtlet-vmboot-*", "/var/tmp/virtlet-podstart-*",
              "/var/tmp/virtlet-density-*", "/var/lib/cni/networks/vbench-*", "/var/lib/cni/networks/virtlet-bench-*"]
MOUNT_PREFIXES = ("/var/tmp/virtlet-test-", "/var/tmp/vtcd-", "/var/tmp/vcl-test-", "/var/tmp/virtlet-guestimg-")


def _run(*cmd: str) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return None
    return res.stdout if res.returncode == 0 else None


def _mount_points() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def domains() -> list[str]:
    out = _run("virsh", "-c", "qemu:///system", "list", "--all", "--name")
    return sorted(n for n in (out or "").split() if n.startswith(("virtlet-", "vmboot-")))


def namespaces() -> list[str]:
    found = sorted(p.name for p in NETNS_DIR.iterdir() if NETNS_NAME.match(p.name)) if NETNS_DIR.is_dir() else []
    if str(NETNS_DIR) in _mount_points():
        found.append(f"{NETNS_DIR} is a mount point (ip netns add made it one; a fresh host has a plain directory)")
    return found


def links() -> list[str]:
    out = _run("ip", "-o", "link", "show")
    found = []
    for line in (out or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) < 3:
            continue
        name = parts[1].strip().split("@", 1)[0]
        master = re.search(r" master (\S+)", line)
        if BRIDGE_NAME.match(name) or TAP_NAME.match(name):
            found.append(name)
        elif master and BRIDGE_NAME.match(master.group(1)):
            found.append(f"{name} (port of {master.group(1)})")
    return sorted(found)


def loop_devices() -> list[str]:
    out = _run("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE")
    return sorted(" ".join(line.split()) for line in (out or "").splitlines() if line.strip())


def processes() -> list[str]:
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if "tools/leftovers.py" in cmdline or "/var/lib/libvirt/dnsmasq/" in cmdline:  # libvirt's own networks
            continue
        if cmdline and PROCESS.search(cmdline):
            found.append(f"{cmdline[:160]}")  # no pid: a restarted daemon is the same leftover
    return sorted(found)


def files_and_mounts() -> list[str]:
    found = sorted(p for pattern in TEMP_GLOBS for p in glob.glob(pattern))
    found += sorted(f"mount {m}" for m in _mount_points() if m.startswith(MOUNT_PREFIXES))
    return found


def podman_nodes() -> list[str]:
    out = _run("podman", "ps", "--all", "--format", "{{.Names}}")
    return sorted(n for n in (out or "").split() if n.startswith(("virtlet-mol-", "virtlet-reset-")))


CHECKS = {
    "libvirt domains": domains, "network namespaces": namespaces, "links": links, "loop devices": loop_devices,
    "processes": processes, "temp dirs and mounts": files_and_mounts, "molecule nodes": podman_nodes,
}


def snapshot() -> dict[str, list[str]]:
    return {kind: check() for kind, check in CHECKS.items()}


def _print(title: str, state: dict[str, list[str]]) -> None:
    print(title, file=sys.stderr)
    for kind, items in state.items():
        for item in items:
            print(f"  {kind}: {item}", file=sys.stderr)


def main(argv: list[str]) -> int:
    now = snapshot()
    dirty = {k: v for k, v in now.items() if v}
    if not argv:
        if dirty:
            _print("leftovers: found state that virtlet's tests make:", dirty)
            return 1
        print("leftovers: none")
        return 0
    if len(argv) != 2 or argv[0] not in ("before", "after", "after-podman"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, path = argv
    if mode == "before":
        Path(path).write_text(json.dumps(now))
        if dirty:
            _print("leftovers: THIS MACHINE IS NOT FRESH — an earlier run (or another one now) left:", dirty)
            print("leftovers: a green run here does not prove a fresh node; clean these up to be sure",
                  file=sys.stderr)
        else:
            print("leftovers: the machine is fresh (none of the tests' state is present)")
        return 0
    before = json.loads(Path(path).read_text())
    if mode == "after-podman":
        # podman (the molecule and local-node tiers' driver) makes /run/netns a shared mount point for its own
        # containers' namespaces, as `ip netns add` does: that is podman's doing, not a virtlet leak.  The
        # fast tier, which runs no podman, is checked with plain `after`, mount point included.
        now = {k: [i for i in v if not i.startswith(f"{NETNS_DIR} is a mount point")] for k, v in now.items()}
    leaked = {k: [i for i in v if i not in set(before.get(k, []))] for k, v in now.items()}
    leaked = {k: v for k, v in leaked.items() if v}
    if leaked:
        _print("leftovers: THE TEST RUN LEFT STATE BEHIND (not there before it started):", leaked)
        return 1
    print("leftovers: the test run left nothing behind" + (" (state from before the run is still there)"
                                                           if dirty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
