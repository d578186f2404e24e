#!/usr/bin/env bash
# Removes the host bridge podman's default network made for the node containers, once no podman container is
# left: podman makes it again for the next container, and a test run must leave no link behind.  Prints
# "removed" when it did something (molecule's destroy reports a change then).
set -euo pipefail
bridge=${1:-cni-podman0}
if [ -z "$(podman ps -aq)" ] && ip link show "$bridge" >/dev/null 2>&1; then
  ip link del "$bridge"
  echo removed
fi
