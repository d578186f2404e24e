"""Starts the example VM pod (examples/vm-pod.yaml) on this machine through virtletd's CRI socket, the way
the kubelet would, and shows its console log, IP and an SSH command.  A second run finds the running pod and
shows it again.  Used by tools/demo.sh and, inside its podman node against the node's CRI proxy socket, by
tools/local-node.sh (README's first command).

usage: python tools/demo_pod.py --socket /run/virtlet.sock --image NAME --key KEY.pub --log-dir DIR [--remove]
                                [--ssh-via "podman exec -it NODE"]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
import yaml

from virtlet.console.cri_format import read_cri_lines
from virtlet.cri import versions
from virtlet.cri.gen import api_pb2 as api

REPO = Path(__file__).resolve().parents[1]
MARKER = "VIRTLET-TINY-READY"


def load_example() -> dict:
    return next(d for d in yaml.safe_load_all((REPO / "examples" / "vm-pod.yaml").read_text()) if d["kind"] == "Pod")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", default="/run/virtlet.sock")
    parser.add_argument("--image", required=True,
                        help="image name as the socket takes it (virtletd: no virtlet.cloud/; the CRI proxy: with it)")
    parser.add_argument("--key", required=True, type=Path, help="SSH public key for the VM's root")
    parser.add_argument("--log-dir", required=True, type=Path)
    parser.add_argument("--remove", action="store_true", help="stop and remove the demo pod")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--ssh-via", default="", help="command prefix that reaches the pod network (shown only)")
    args = parser.parse_args()
    pod = load_example()
    name = pod["metadata"]["name"]
    annotations = dict(pod["metadata"]["annotations"])
    annotations["VirtletSSHKeys"] = args.key.read_text().strip()
    spec = pod["spec"]["containers"][0]
    channel = grpc.insecure_channel(f"unix://{args.socket}")
    rt = versions.runtime_stub(channel)
    images = versions.image_stub(channel)

    existing = [s for s in rt.ListPodSandbox(api.ListPodSandboxRequest(filter=api.PodSandboxFilter(
        label_selector={"virtlet-demo": name}))).items]
    if args.remove:
        for s in existing:
            rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=s.id), timeout=120)
            rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=s.id), timeout=120)
        print(f"removed {len(existing)} demo pod(s)")
        return 0
    ready = [s for s in existing if s.state == api.SANDBOX_READY]
    log_dir = args.log_dir / name
    sandbox_config = api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, namespace="default", uid=f"demo-{name}"), hostname=name,
        log_directory=str(log_dir), annotations=annotations, labels={"virtlet-demo": name})
    if ready:
        sandbox_id = ready[0].id
        print(f"pod {name} exists (sandbox {sandbox_id}); showing it")
    else:
        print(f"pulling {args.image} ...")
        ref = images.PullImage(api.PullImageRequest(image=api.ImageSpec(image=args.image)), timeout=600).image_ref
        print(f"  image ref {ref}")
        sandbox_id = rt.RunPodSandbox(api.RunPodSandboxRequest(config=sandbox_config, runtime_handler="virtlet"),
                                      timeout=120).pod_sandbox_id
        print(f"sandbox {sandbox_id} ready")
    containers = rt.ListContainers(api.ListContainersRequest(filter=api.ContainerFilter(
        pod_sandbox_id=sandbox_id))).containers
    running = [c for c in containers if c.state == api.CONTAINER_RUNNING]
    if running:
        cid = running[0].id
    else:
        cfg = api.ContainerConfig(metadata=api.ContainerMetadata(name=spec["name"], attempt=len(containers)),
                                  image=api.ImageSpec(image=args.image), log_path=f"{spec['name']}/0.log",
                                  annotations=annotations, tty=True, stdin=True)
        cfg.log_path = f"{spec['name']}/{len(containers)}.log"
        cfg.linux.resources.memory_limit_in_bytes = 256 << 20
        cid = rt.CreateContainer(api.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=cfg,
                                                            sandbox_config=sandbox_config), timeout=120).container_id
        rt.StartContainer(api.StartContainerRequest(container_id=cid), timeout=120)
        print(f"VM container {cid} started (QEMU; TCG if KVM does not work here)")
    status = rt.ContainerStatus(api.ContainerStatusRequest(container_id=cid)).status
    log_path = Path(status.log_path)
    deadline = time.monotonic() + args.timeout
    print(f"waiting for the guest to boot (console log: {log_path}) ...")
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = read_cri_lines(log_path) if log_path.exists() else []
        if any(MARKER in line for line in lines):
            break
        time.sleep(1)
    else:
        print("\n".join(lines[-30:]))
        print(f"the guest did not print {MARKER} within {args.timeout}s", file=sys.stderr)
        return 1
    ip = rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status.network.ip
    print("\n----- console log (kubectl logs) -----")
    print("\n".join(line for line in lines if not line.startswith("[")))
    print("--------------------------------------")
    print(f"pod {name}: sandbox {sandbox_id}, VM container {cid}, state RUNNING, pod IP {ip}")
    key = args.key.with_suffix("")
    via = f"{args.ssh_via} " if args.ssh_via else ""
    print(f"SSH into it:  {via}ssh -i {key} -o StrictHostKeyChecking=no root@{ip}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
