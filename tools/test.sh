#!/usr/bin/env bash
# The test command: sets up a fresh Debian 12 machine (apt + venv), checks lint and generated code,
# builds the guest test images (cached in .cache/), starts libvirt's daemons if they are not running,
# and runs every test tier (the slow one includes `molecule test`).  Usage: bash tools/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/setup-dev.sh

echo "== lint"
.venv/bin/ruff check .
.venv/bin/python tools/gen_protos.py --check

echo "== guest images"
bash guest-images/build.sh tiny
bash guest-images/build.sh full

echo "== libvirt daemons"
bash tools/libvirt-daemons.sh start
trap 'bash tools/libvirt-daemons.sh stop' EXIT

echo "== tests"
.venv/bin/pytest -ra -m "not slow" "$@"
echo "== slow tier (full Debian guest with real cloud-init; molecule test: site.yml on two systemd nodes)"
.venv/bin/pytest -ra -m slow "$@"
