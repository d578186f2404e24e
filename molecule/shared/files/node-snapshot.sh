#!/bin/sh
# Writes what site.yml may change on a node into DIR (one sorted list per aspect), so that the state after
# reset.yml can be compared with the state before site.yml by `diff -r`.
# Left out on purpose: caches and logs, and files every package operation touches (ld.so.cache, ...).
set -eu
dir=$1
rm -rf "$dir"
mkdir -p "$dir"
dpkg-query -W -f '${db:Status-Abbrev} ${Package}\n' | sort >"$dir/packages"
find /etc /opt /usr/local /var/lib/virtlet /run/virtlet* /run/criproxy.sock 2>/dev/null \
  | grep -vE '^/etc/(ld\.so\.cache|machine-id|hostname|hosts|resolv\.conf|mtab|\.pwd\.lock|apt/.*|ssl/certs/.*)$' \
  | sort >"$dir/files"
# Users and groups by name (group members too), so the allow-list can name the ones packages keep.
cut -d: -f1 /etc/passwd | sort >"$dir/users"
cut -d: -f1,4 /etc/group | sort >"$dir/groups"
for f in /etc/libvirt/qemu.conf /etc/containerd/config.toml; do
  if [ -f "$f" ]; then sha256sum "$f"; else echo "absent $f"; fi
done >"$dir/contents"
systemctl list-unit-files --no-legend --no-pager | awk '{print $1, $2}' | sort >"$dir/unit-files"
systemctl list-units --plain --no-legend --no-pager --state=active --type=service | awk '{print $1}' | sort >"$dir/services"
ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort >"$dir/links"
ip netns list | sort >"$dir/netns"
