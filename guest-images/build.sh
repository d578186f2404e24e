#!/usr/bin/env bash
# Builds one guest test image: guest-images/build.sh tiny|full [--force]
#
# The image is rebuilt only when its inputs change: the stamp is a hash of every file under guest-images/lib,
# guest-images/<image>/ and this script, plus the exact Debian package versions the image is made of.
# Progress goes to stderr; the last (only) line on stdout is the path of the finished qcow2.
# Environment: VIRTLET_GUEST_CACHE overrides the output/cache folder (default <repo>/.cache/guest-images).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${VIRTLET_GUEST_CACHE:-$REPO/.cache/guest-images}
. "$HERE/lib/common.sh"

usage() { echo "usage: $0 tiny|full [--force]" >&2; exit 2; }
[ $# -ge 1 ] || usage
IMAGE=$1
FORCE=${2:-}
case "$IMAGE" in tiny | full) ;; *) usage ;; esac
[ -z "$FORCE" ] || [ "$FORCE" = --force ] || usage

mkdir -p "$CACHE"
OUT=$CACHE/$IMAGE.qcow2
STAMP_FILE=$CACHE/$IMAGE.stamp

# One build of an image at a time (tests and helpers may call this concurrently); the loser reuses the result.
exec 9>"$CACHE/$IMAGE.lock"
flock 9

PINS=""
[ ! -f "$HERE/$IMAGE/packages.txt" ] || PINS=$(resolve_packages "$HERE/$IMAGE/packages.txt")
STAMP=$({
    cd "$HERE"
    find build.sh lib "$IMAGE" -type f ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    find lib "$IMAGE" -type f -perm -u+x | LC_ALL=C sort   # the mode of scripts matters too
    printf '%s\n' "$PINS"
} | sha256sum | cut -d' ' -f1)

if [ -z "$FORCE" ] && [ -s "$OUT" ] && [ "$(cat "$STAMP_FILE" 2>/dev/null)" = "$STAMP" ]; then
    log "$IMAGE is up to date"
    printf '%s\n' "$OUT"
    exit 0
fi

start=$(date +%s)
rm -f "$STAMP_FILE"
# Contract with the image builders: build-<image>.sh CACHE_DIR leaves CACHE_DIR/<image>.qcow2 (atomically);
# CACHE_DIR/debs is the shared .deb cache; the pinned package versions are passed in VIRTLET_GUEST_PINS.
VIRTLET_GUEST_PINS=$(printf '%s' "$PINS" | tr '\n' ' ') "$HERE/$IMAGE/build-$IMAGE.sh" "$CACHE" >&2
[ -s "$OUT" ] || die "build-$IMAGE.sh did not produce $OUT"
printf '%s\n' "$STAMP" >"$STAMP_FILE"
log "$IMAGE built in $(($(date +%s) - start)) s: $(du -h "$OUT" | cut -f1)"
printf '%s\n' "$OUT"
