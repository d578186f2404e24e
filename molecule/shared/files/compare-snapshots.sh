#!/bin/sh
# Compares two node snapshots (node-snapshot.sh) and prints every difference that the allow-list does not
# excuse; exits 1 when any is left.  Why an allow-list at all: `apt-get purge` keeps a few things by Debian
# policy (system users, catalog entries...), which no reset can remove safely.  Only additions after reset
# can be excused; anything that disappeared is always reported.
#   compare-snapshots.sh BEFORE_DIR AFTER_DIR ALLOW_LIST
set -eu
before=$1 after=$2 allow=$3
patterns=$(mktemp)
report=$(mktemp)
trap 'rm -f "$patterns" "$report"' EXIT
# Allow-list lines are "aspect regexp"; comments and blank lines are dropped.
sed -e 's/[[:space:]]*#.*$//' -e '/^[[:space:]]*$/d' "$allow" \
  | awk '{a=$1; $1=""; sub(/^ /, ""); print "^" a " \\+ " $0 "$"}' >"$patterns"
for f in "$before"/*; do
  aspect=$(basename "$f")
  diff "$f" "$after/$aspect" | sed -n -e "s|^< |$aspect - |p" -e "s|^> |$aspect + |p" || true
done >"$report"
left=$(grep -vE -f "$patterns" "$report" || true)
excused=$(grep -cE -f "$patterns" "$report" || true)
echo "excused by the allow-list: $excused"
if [ -n "$left" ]; then
  echo "differences after reset.yml (- gone, + new):"
  echo "$left"
  exit 1
fi
