#!/usr/bin/env bash
# The main job: a local VM-pod node in a podman container, provisioned with exactly site.yml, running a VM pod.
#
# Like kind does for Kubernetes nodes, the "node" is a privileged podman container running systemd (image from
# molecule/shared/build-node-image.sh).  It gets containerd first (the stand-in for a kubeadm node, as in
# molecule), then `ansible-playbook -i inventories/local site.yml`, then the example VM pod (examples/vm-pod.yaml,
# the "tiny" guest image served inside the node) through the node's CRI proxy socket.  It prints the VM's console
# log, its IP and the command to SSH into it.  The machine itself needs only what tools/setup-dev.sh installs.
# A second run reuses the container, skips site.yml when nothing it depends on changed, and reuses the pod.
#
# Usage: tools/local-node.sh [up]      create/reuse the node and the VM pod (default)
#        tools/local-node.sh status    show the VM pod (console log, IP, SSH command)
#        tools/local-node.sh down      remove the VM pod and the node container
# Environment: VIRTLET_LOCAL_NODE (container name, default virtlet-local-node; the inventory expects it),
#              VIRTLET_LOCAL_FORCE=1 (run site.yml even when nothing changed)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
node=${VIRTLET_LOCAL_NODE:-virtlet-local-node}
state=$repo/.cache/local-node
image_name=images.example.com/tiny.qcow2
export PATH=$repo/.venv/bin:$PATH ANSIBLE_CONFIG=$repo/ansible.cfg
python_on_node=/opt/virtlet/venv/bin/python

say() { printf '\n== %s\n' "$*" >&2; }
in_node() { podman exec "$node" "$@"; }

start_node() {
  local image
  image=$(molecule/shared/build-node-image.sh)
  mkdir -p "$state/apt"
  if ! podman container exists "$node"; then
    say "creating node container $node from $image"
    # Same settings as the molecule nodes (molecule/shared/create.yml explains each one).
    podman run -d --name "$node" --hostname "$node" --privileged --cgroupns=private \
      --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 \
      --tmpfs /var/lib/containerd:rw,exec,mode=0700 \
      -v "$state/apt:/var/cache/apt/archives" \
      --label owner=virtlet-local-node "$image" /sbin/init >/dev/null
    rm -f "$state/provisioned"
  elif [ "$(podman container inspect -f '{{.State.Running}}' "$node")" != true ]; then
    say "starting the existing node container $node"
    podman start "$node" >/dev/null
  else
    say "reusing the running node container $node"
  fi
  local i
  for i in $(seq 60); do
    case $(in_node systemctl is-system-running 2>/dev/null || true) in
      running|degraded) return 0 ;;
    esac
    sleep 1
  done
  echo "local-node: systemd in $node did not come up within 60 s" >&2
  exit 1
}

# A hash of everything site.yml's result depends on: when it is unchanged, site.yml would change nothing.
# (Not the egg-info: wheel builds rewrite it.)
inputs_hash() {
  { find roles playbooks inventories/local site.yml runtime pyproject.toml -type f \
      ! -name '*.pyc' ! -path '*/__pycache__/*' ! -path '*.egg-info/*' -print0 | sort -z | xargs -0 sha256sum
    cat "$state/vars.yml"; } | sha256sum | cut -c1-16
}

provision() {
  local wheelhouse
  wheelhouse=$(molecule/shared/build-wheelhouse.sh)
  # Settings the local node needs on top of inventories/local: the offline wheelhouse (the node is a container
  # that may not reach PyPI) and a name for the tiny image, served inside the node.
  cat >"$state/vars.yml" <<EOF
virtlet_runtime_wheelhouse: $wheelhouse
virtlet_runtime_image_translations:
  - name: local-node
    translations:
      - name: $image_name
        url: http://127.0.0.1:18080/tiny.qcow2
EOF
  local hash
  hash=$(inputs_hash)
  if [ "${VIRTLET_LOCAL_FORCE:-0}" != 1 ] && [ "$(cat "$state/provisioned" 2>/dev/null)" = "$hash" ] \
     && in_node systemctl is-active --quiet virtletd virtlet-criproxy containerd; then
    say "site.yml already applied with these sources ($hash): skipped (VIRTLET_LOCAL_FORCE=1 runs it)"
    return 0
  fi
  if ! in_node systemctl is-active --quiet containerd; then
    say "installing containerd in the node (stand-in for a kubeadm node's runtime)"
    MOLECULE_EPHEMERAL_DIRECTORY=$state ansible-playbook -i inventories/local molecule/shared/prepare.yml >&2
  fi
  say "ansible-playbook -i inventories/local site.yml"
  ansible-playbook -i inventories/local site.yml -e "@$state/vars.yml" >&2
  # containerd started before the cni role wrote the pod network and does not reload it here (see verify.yml).
  in_node systemctl restart containerd
  echo "$hash" >"$state/provisioned"
}

# The example pod (examples/vm-pod.yaml) is started by the same script as tools/demo.sh, run inside the node
# with virtletd's virtualenv, through the node's CRI proxy socket (the kubelet's endpoint after site.yml).
demo_pod() {
  in_node "$python_on_node" /root/virtlet-demo/tools/demo_pod.py --socket /run/criproxy.sock \
    --image "virtlet.cloud/$image_name" --key /root/virtlet-demo/id_ed25519.pub --log-dir /var/log/pods \
    --ssh-via "podman exec -it $node" "$@"
}

start_pod() {
  guest-images/build.sh tiny >&2
  say "serving the tiny image inside the node (as $image_name)"
  in_node mkdir -p /root/images /root/virtlet-demo/tools /root/virtlet-demo/examples
  podman cp .cache/guest-images/tiny.qcow2 "$node:/root/images/tiny.qcow2"
  podman cp tools/demo_pod.py "$node:/root/virtlet-demo/tools/demo_pod.py"
  podman cp examples/vm-pod.yaml "$node:/root/virtlet-demo/examples/vm-pod.yaml"
  in_node systemctl is-active --quiet virtlet-local-images \
    || in_node systemd-run --unit=virtlet-local-images --collect \
         python3 -m http.server 18080 --bind 127.0.0.1 --directory /root/images >/dev/null
  in_node test -f /root/virtlet-demo/id_ed25519 \
    || in_node ssh-keygen -q -t ed25519 -N "" -C virtlet-local-node -f /root/virtlet-demo/id_ed25519
  say "the example VM pod (examples/vm-pod.yaml) through the node's CRI proxy"
  demo_pod
  echo "status: tools/local-node.sh status      remove: tools/local-node.sh down"
}

down() {
  if podman container exists "$node"; then
    if [ "$(podman container inspect -f '{{.State.Running}}' "$node")" = true ]; then
      demo_pod --remove || true
    fi
    podman rm --force --volumes "$node" >/dev/null
    say "removed $node"
  fi
  molecule/shared/files/podman-bridge-cleanup.sh >/dev/null
  rm -f "$state/provisioned"
}

case ${1:-up} in
  up) bash tools/setup-dev.sh >&2; start_node; provision; start_pod ;;
  status) demo_pod ;;
  down) down ;;
  *) sed -n '2,/^set -e/p' "$0" | sed 's/^# \{0,1\}//' | head -n -1 >&2; exit 2 ;;
esac
