#!/usr/bin/env bash
# The test command: sets up a fresh Debian 12 machine (apt + venv), checks lint and generated code,
# builds the guest test images (cached in .cache/), starts libvirt's daemons if they are not running,
# and runs every test tier (the slow one includes `molecule test`).
#
# Usage: bash tools/test.sh [pytest selection and options]
#   With arguments, both tiers run only that selection (e.g. `bash tools/test.sh tests/unit -x`); a tier in
#   which the selection has no test is then not a failure.
#   VIRTLET_TEST_QUICK=1 skips the machine setup, the guest image builds and the slow tier: for re-running a
#   selection on a machine that is already set up.  VIRTLET_VENV names another virtualenv than .venv.
#
# Fresh machine check (tools/leftovers.py): before anything else it lists the state that the tests make
# (virtlet-* domains, virtlet/test network namespaces, /run/netns as a mount point, test bridges, taps and
# veths, loop devices, virtletd/containerd/DHCP-server processes, fixture temp dirs and mounts, molecule
# nodes) and says loudly when the machine is NOT fresh; at the end the run FAILS if any such state is there
# that was not there before (the run leaked it, or changed the fresh state, e.g. made /run/netns a mount
# point).  Assumes no other test run shares the machine meanwhile, as in CI.
#
# Decision: the tiers are NOT run inside a private mount namespace.  libvirtd (and virtlogd) would have to
# start inside it as well, since QEMU must see the same mounts as virtletd, and on a machine where libvirt's
# daemons already run (a dev machine, a real node) a second pair would fight over /run/libvirt; the molecule
# tier manages its own podman mounts.  Instead: virtletd never mounts anything on /run/netns (the bug that
# only showed on fresh hosts); tests/integration/test_fresh_netns.py builds the fresh-host condition itself
# (a private mount namespace with a plain /run/netns, a real containerd and a real virtletd) on every
# machine, with a control case proving that condition reproduces the failure; and the leftover check fails
# a run that turns a plain /run/netns into a mount point.
# The check runs after the fast tier (strict) and at the end; podman, which the slow tier's molecule and
# local-node nodes run on, makes /run/netns a shared mount point for its own containers, so the final check
# does not count that one (tools/leftovers.py after-podman).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VIRTLET_VENV:-.venv}
QUICK=${VIRTLET_TEST_QUICK:-0}
. tools/progress.sh  # phase/phase_end/quiet: every phase says what it does, how long it usually takes, and took
LOGS=${VIRTLET_LOG_DIR:-.cache/logs}
run_start=$(date +%s)
# ansible-core 2.19 imports cryptography's DSA module at start-up, and cryptography >= 46 warns about DSA on
# that import (twice per molecule run).  Nothing here uses DSA keys (every key we make is ed25519): silence
# exactly that message for the Ansible and molecule processes the tests start, nothing else.
export PYTHONWARNINGS=${PYTHONWARNINGS:+$PYTHONWARNINGS,}"ignore:DSA is deprecated"
# The slow tests' heartbeat (tests/heartbeat.py) writes to fd 3, which pytest does not capture.
exec 3>&1
export VIRTLET_HEARTBEAT_FD=3

state_before=$(mktemp /tmp/virtlet-leftovers.XXXXXX)
final_check=after
started_daemons=0
finish() {
  local rc=$?
  if [ "$rc" = 0 ]; then phase_end; else phase_stopped; fi
  echo "== leftovers after the run"
  python3 tools/leftovers.py "$final_check" "$state_before" || rc=1
  rm -f "$state_before"
  if [ "$started_daemons" = 1 ]; then bash tools/libvirt-daemons.sh stop; fi
  echo "== test command $([ "$rc" = 0 ] && echo passed || echo FAILED) in $(_elapsed $(($(date +%s) - run_start)))"
  exit "$rc"
}

echo "== leftovers before the run"
python3 tools/leftovers.py before "$state_before"
trap finish EXIT

if [ "$QUICK" != 1 ]; then
  phase "machine setup: Debian packages and the Python virtualenv" "usually 2-3 min on a fresh machine, seconds after"
  bash tools/setup-dev.sh
  phase_end
fi

phase "lint: ruff, mypy, generated protobuf code" "usually 30-60 s"
"$VENV/bin/ruff" check .
"$VENV/bin/mypy"  # strict on runtime/virtlet (except the generated CRI code), bench/ and tools/leftovers.py ([tool.mypy])
"$VENV/bin/python" tools/gen_protos.py --check
phase_end

guest_image() {  # the builder's ~900 lines of debootstrap go to a log; the terminal gets a heartbeat and a result
  quiet "guest image $1" "$LOGS/guest-image-$1.log" bash guest-images/build.sh "$1"
  grep -E '\] ([a-z]+ is up to date|[a-z]+ built in)' "$LOGS/guest-image-$1.log" | sed 's/^/   /' || true
}
if [ "$QUICK" != 1 ]; then
  phase "guest test images (tiny, full) into .cache/guest-images" \
    "seconds when cached; about 1 min (tiny) + 3-5 min (full) when their inputs changed"
  guest_image tiny
  guest_image full
  phase_end
fi

phase "libvirt daemons"
if ! bash tools/libvirt-daemons.sh running; then
  started_daemons=1  # only what this run started is stopped at the end
fi
bash tools/libvirt-daemons.sh start

# pytest exits 5 when a selection holds no test of a tier: fine when the caller chose a selection
tier() {
  local rc=0
  "$VENV/bin/pytest" -ra "$@" || rc=$?
  if [ "$rc" = 5 ] && [ "$selection" = 1 ]; then rc=0; fi
  return "$rc"
}
selection=$(( $# > 0 ))

phase_end
phase "fast tier: unit and integration tests on real libvirt/QEMU, netns, CNI" \
  "usually 20-25 min; a dot per test, tests running over 30 s report their progress"
tier -m "not slow" --durations=10 "$@"
phase_end
echo "== leftovers after the fast tier (no podman has run: /run/netns must still be a plain directory)"
python3 tools/leftovers.py after "$state_before"
if [ "$QUICK" != 1 ]; then
  final_check=after-podman  # podman makes /run/netns a shared mount point for its own containers
  phase "slow tier: full Debian guest with real cloud-init; molecule test (site.yml on two systemd nodes); the main job" \
    "usually 35-45 min: molecule about 17, the reset test 6, the local node 4, the full-image tests"
  tier -m slow -v --durations=10 "$@"
  phase_end
fi
