#!/usr/bin/env bash
# The main job without podman or Ansible (README's first command, tools/local-node.sh, does it on a node made
# with site.yml): installs what virtlet needs, builds the tiny guest image, starts libvirt's
# daemons and virtletd (unless they run already), then starts the example VM pod (examples/vm-pod.yaml)
# through CRI, the way the kubelet would, and shows its console log, its pod IP and an SSH command.
# A second run reuses everything that exists.   Stop it all:  bash tools/demo.sh --down
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DEMO=/var/lib/virtlet-demo
RUN=/run/virtlet-demo
SOCK=$RUN/virtlet.sock
PORT=18080
mkdir -p "$DEMO" "$RUN"

down() {
  if [ -S "$SOCK" ]; then
    .venv/bin/python tools/demo_pod.py --socket "$SOCK" --image x --key "$DEMO/id_ed25519.pub" \
      --log-dir "$DEMO/logs" --remove || true
  fi
  for p in virtletd http; do
    [ -f "$RUN/$p.pid" ] && kill "$(cat "$RUN/$p.pid")" 2>/dev/null || true
    rm -f "$RUN/$p.pid"
  done
  ip link del virtlet-demo0 2>/dev/null || true
  rm -rf /var/lib/cni/networks/virtlet-demo
  bash tools/libvirt-daemons.sh stop
  echo "demo stopped (state kept in $DEMO)"
}
if [ "${1:-}" = "--down" ]; then down; exit 0; fi

echo "== 1/5 installing packages and the Python environment"
bash tools/setup-dev.sh
echo "== 2/5 building the tiny guest image (cached)"
IMAGE=$(bash guest-images/build.sh tiny | tail -1)
echo "== 3/5 libvirt daemons"
bash tools/libvirt-daemons.sh start

echo "== 4/5 virtletd"
mkdir -p "$DEMO/cni" "$DEMO/images.d" "$DEMO/logs" "$DEMO/www"
cp -u "$IMAGE" "$DEMO/www/tiny.qcow2"
if ! { [ -f "$RUN/http.pid" ] && kill -0 "$(cat "$RUN/http.pid")" 2>/dev/null; }; then
  (cd "$DEMO/www" && exec setsid "$REPO/.venv/bin/python" -m http.server --bind 127.0.0.1 "$PORT" \
    >/dev/null 2>&1 < /dev/null) &
  echo $! > "$RUN/http.pid"
fi
cat > "$DEMO/images.d/demo.yaml" <<YAML
# image name translation: the example's image name -> the local HTTP server
translations:
  - name: images.example.com/tiny.qcow2
    url: http://127.0.0.1:$PORT/tiny.qcow2
YAML
[ -f "$DEMO/cni/10-demo.conflist" ] || cat > "$DEMO/cni/10-demo.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "virtlet-demo", "plugins": [
  {"type": "bridge", "bridge": "virtlet-demo0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.213.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "loopback"}]}
JSON
[ -f "$DEMO/id_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -C virtlet-demo -f "$DEMO/id_ed25519"
if ! { [ -f "$RUN/virtletd.pid" ] && kill -0 "$(cat "$RUN/virtletd.pid")" 2>/dev/null; }; then
  setsid .venv/bin/virtletd --listen "$SOCK" --state-dir "$DEMO/state" --run-dir "$RUN/state" \
    --image-dir "$DEMO/image-store" --image-translations-dir "$DEMO/images.d" --cni-conf-dir "$DEMO/cni" \
    >> "$DEMO/virtletd.log" 2>&1 < /dev/null &
  echo $! > "$RUN/virtletd.pid"
  for _ in $(seq 1 120); do [ -S "$SOCK" ] && break; sleep 0.5; done
fi
[ -S "$SOCK" ] || { echo "virtletd did not start; see $DEMO/virtletd.log" >&2; tail -20 "$DEMO/virtletd.log" >&2; exit 1; }
.venv/bin/python - "$SOCK" <<'PY'
import sys, grpc
from virtlet.cri import versions
from virtlet.cri.gen import api_pb2 as api
rt = versions.runtime_stub(grpc.insecure_channel(f"unix://{sys.argv[1]}"))
v = rt.Version(api.VersionRequest(), timeout=10)
print(f"virtletd {v.runtime_version} (CRI {v.runtime_api_version}) on {sys.argv[1]}")
for c in rt.Status(api.StatusRequest(), timeout=10).status.conditions:
    print(f"  {c.type}: {c.status} {c.reason} {c.message}")
PY

echo "== 5/5 the example VM pod (examples/vm-pod.yaml)"
.venv/bin/python tools/demo_pod.py --socket "$SOCK" --image images.example.com/tiny.qcow2 \
  --key "$DEMO/id_ed25519.pub" --log-dir "$DEMO/logs"
echo "stop everything with: bash tools/demo.sh --down"
