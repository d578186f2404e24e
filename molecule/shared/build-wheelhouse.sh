#!/usr/bin/env bash
# Downloads virtletd's Python dependencies as wheels into a cached directory on the controller, for the
# virtlet_runtime role's offline mode (virtlet_runtime_wheelhouse).
# Why: test nodes are containers that may not reach PyPI the way the controller does (proxies, private CAs),
# and two nodes downloading the same wheels on every run is slow.  Offline install is also what operators
# with air-gapped nodes use, so molecule exercises it.
# libvirt-python is left out: nodes use Debian's python3-libvirt through --system-site-packages.
# Usage: molecule/shared/build-wheelhouse.sh   prints the wheelhouse directory
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
out=${VIRTLET_CACHE:-$repo/.cache}/wheelhouse

mapfile -t deps < <("$python" - "$repo/pyproject.toml" <<'PY'
import re, sys, tomllib
with open(sys.argv[1], "rb") as f:
    for dep in tomllib.load(f)["project"]["dependencies"]:
        if re.split(r"[<>=!~ ;\[]", dep, maxsplit=1)[0].lower() != "libvirt-python":
            print(dep)
PY
)
stamp=$(printf '%s\n' "${deps[@]}" | sha256sum | cut -c1-16)
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ]; then
  echo "$out"
  exit 0
fi
rm -rf "$out"
mkdir -p "$out"
# Nodes run Debian 12's CPython 3.11 on x86-64.
"$python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
  --python-version 3.11 --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -d "$out" "${deps[@]}" >&2
echo "$stamp" >"$out/.stamp"
echo "$out"
