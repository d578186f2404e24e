#!/bin/sh
# Build the virtlet wheel on the controller from a clean copy of the source tree and print its path.
# Why a copy: building in place writes build/ and *.egg-info into the checkout.  SOURCE_DATE_EPOCH (the
# newest source file's time) makes the wheel byte-identical while the sources do not change, so copying it to
# the nodes is idempotent.
# Usage: build-wheel.sh SOURCE_DIR OUTPUT_DIR PYTHON
set -eu
src=$1 out=$2 python=$3
stage=$(mktemp -d "${TMPDIR:-/tmp}/virtlet-wheel-XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$out"
cd "$src"
tar --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' -cf - pyproject.toml runtime \
    $(test -f README.md && echo README.md) | tar -C "$stage" -xf -
test -f "$stage/README.md" || echo "virtlet" > "$stage/README.md"
SOURCE_DATE_EPOCH=$(find pyproject.toml runtime -type f ! -name '*.pyc' ! -path '*.egg-info/*' -printf '%T@\n' | sort -n | tail -1 | cut -d. -f1)
export SOURCE_DATE_EPOCH
isolation=--no-build-isolation
"$python" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' 2>/dev/null \
    || isolation=
rm -f "$out"/virtlet-*.whl
"$python" -m pip wheel --quiet --no-deps $isolation -w "$out" "$stage" >&2
ls "$out"/virtlet-*.whl
