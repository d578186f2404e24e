"""Drives a node's CRI socket (the CRI proxy) the way the kubelet would, to prove a node works end to end.

Runs ON the node with virtletd's own virtualenv (``/opt/virtlet/venv/bin/python``), whose ``virtlet`` package
carries the generated CRI stubs, so no Kubernetes and no crictl are needed.  Used by molecule's verify step and
by tools/local-node.sh.

  up-vm NAME --image virtlet.cloud/tiny --ssh-key ~/.ssh/id.pub [--ssh-identity KEY]
      start a VM pod (RuntimeClass handler "virtlet"), wait for the marker line in its CRI log, print a JSON
      summary (ids, pod IP, log path) and, with --ssh-identity, prove SSH into the guest with that key.
  up-container NAME --image localhost/virtlet-test/busybox:1
      start an ordinary pod (no handler: the proxy sends it to containerd) and wait until it runs.
  down [NAME ...]
      stop and remove the pods this tool made (label virtlet-check=NAME; all of them without names).
  clean
      fail unless no pod, libvirt domain, network namespace or tap device is left on the node.
  status NAME
      print the JSON summary of a running pod.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from virtlet.cri.gen import api_pb2 as api
from virtlet.cri.gen import api_pb2_grpc as api_grpc

LABEL = "virtlet-check"
MARKER = "VIRTLET-TINY-READY"
LOG_ROOT = Path("/var/log/pods")


class Node:
    """The CRI services behind one socket."""

    def __init__(self, socket: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.rt = api_grpc.RuntimeServiceStub(self.channel)
        self.img = api_grpc.ImageServiceStub(self.channel)

    def sandbox_config(self, name: str, vm: bool, annotations: dict[str, str]) -> api.PodSandboxConfig:
        uid = f"{name}-uid"
        log_dir = LOG_ROOT / f"default_{name}_{uid}"
        # A fresh directory: logs of an earlier pod with this name (a re-used node) must not count as this one's.
        shutil.rmtree(log_dir, ignore_errors=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        if vm:
            annotations = {"kubernetes.io/target-runtime": "virtlet.cloud", **annotations}
        return api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, namespace="default", uid=uid),
            hostname=name, log_directory=str(log_dir), labels={LABEL: name}, annotations=annotations,
            linux=api.LinuxPodSandboxConfig())

    def run(self, name: str, image: str, vm: bool, annotations: dict[str, str],
            command: list[str] | None = None) -> tuple[str, str]:
        """RunPodSandbox, PullImage (VM images only), CreateContainer, StartContainer: (sandbox, container)."""
        config = self.sandbox_config(name, vm, annotations)
        sandbox = self.rt.RunPodSandbox(api.RunPodSandboxRequest(
            config=config, runtime_handler="virtlet" if vm else ""), timeout=180).pod_sandbox_id
        ref = image
        if vm:
            ref = self.img.PullImage(api.PullImageRequest(image=api.ImageSpec(image=image),
                                                          sandbox_config=config), timeout=300).image_ref
        container_config = api.ContainerConfig(
            metadata=api.ContainerMetadata(name="main"), image=api.ImageSpec(image=image),
            command=command or [], log_path="main/0.log", labels={LABEL: name},
            annotations=config.annotations)
        container = self.rt.CreateContainer(api.CreateContainerRequest(
            pod_sandbox_id=sandbox, config=container_config, sandbox_config=config), timeout=180).container_id
        self.rt.StartContainer(api.StartContainerRequest(container_id=container), timeout=180)
        print(f"{name}: sandbox {sandbox[:13]} container {container[:13]} image {ref}", file=sys.stderr)
        return sandbox, container

    def summary(self, name: str) -> dict[str, Any]:
        sandboxes = self.sandboxes([name])
        if not sandboxes:
            raise SystemExit(f"no pod named {name} (label {LABEL}={name})")
        sandbox = sandboxes[0]
        status = self.rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sandbox.id), timeout=30)
        containers = self.rt.ListContainers(api.ListContainersRequest(
            filter=api.ContainerFilter(pod_sandbox_id=sandbox.id)), timeout=30).containers
        out: dict[str, Any] = {"name": name, "sandbox": sandbox.id, "ip": status.status.network.ip,
                               "runtime_handler": sandbox.runtime_handler}
        if containers:
            cstatus = self.rt.ContainerStatus(api.ContainerStatusRequest(container_id=containers[0].id),
                                              timeout=30).status
            out.update(container=cstatus.id, state=api.ContainerState.Name(cstatus.state),
                       log_path=cstatus.log_path)
        return out

    def sandboxes(self, names: list[str]) -> list[api.PodSandbox]:
        found = self.rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=30).items
        return [s for s in found if LABEL in s.labels and (not names or s.labels[LABEL] in names)]

    def remove(self, names: list[str]) -> list[str]:
        """Remove every matching pod; one failing pod does not keep the others.  Returns the errors."""
        errors: list[str] = []
        for sandbox in self.sandboxes(names):
            try:
                containers = self.rt.ListContainers(api.ListContainersRequest(
                    filter=api.ContainerFilter(pod_sandbox_id=sandbox.id)), timeout=30).containers
                for c in containers:
                    self.rt.StopContainer(api.StopContainerRequest(container_id=c.id, timeout=10), timeout=120)
                    self.rt.RemoveContainer(api.RemoveContainerRequest(container_id=c.id), timeout=120)
                self.rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sandbox.id), timeout=120)
                self.rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sandbox.id), timeout=120)
                print(f"removed pod {sandbox.labels[LABEL]} ({sandbox.id[:13]})", file=sys.stderr)
            except grpc.RpcError as e:
                errors.append(f"{sandbox.labels[LABEL]}: {e.code().name}: {e.details()}")  # type: ignore[attr-defined]
        return errors


def wait_for(what: str, timeout: float, probe: Any, interval: float = 2.0) -> Any:
    """Call ``probe`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def log_text(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def ssh_ok(ip: str, identity: str) -> bool:
    proc = subprocess.run(
        ["ssh", "-i", identity, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "ConnectTimeout=5", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"root@{ip}",
         "cat /run/instance-id; hostname"], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode == 0:
        print(f"ssh root@{ip}: {proc.stdout.strip()!r}", file=sys.stderr)
    return proc.returncode == 0


def up_vm(node: Node, args: argparse.Namespace) -> dict[str, Any]:
    annotations = {"VirtletSSHKeys": Path(args.ssh_key).read_text().strip()}
    if not node.sandboxes([args.name]):
        node.run(args.name, args.image, True, annotations)
    info = node.summary(args.name)
    wait_for(f"{MARKER} in {info['log_path']}", args.timeout, lambda: MARKER in log_text(info["log_path"]))
    marker = next(line for line in log_text(info["log_path"]).splitlines() if MARKER in line)
    info["marker"] = marker
    if not info["ip"]:
        raise SystemExit(f"pod {args.name} has no IP address: {info}")
    # The guest leases its address from virtletd's DHCP server: the marker line shows what it got.
    match = re.search(r"ip=([0-9.]+)/", marker)
    if not match or match.group(1) != info["ip"]:
        raise SystemExit(f"the guest's address ({marker!r}) is not the pod IP {info['ip']}")
    if args.ssh_identity:
        wait_for(f"ssh root@{info['ip']}", 60, lambda: ssh_ok(info["ip"], args.ssh_identity), 3)
        info["ssh"] = "ok"
    return info


def up_container(node: Node, args: argparse.Namespace) -> dict[str, Any]:
    if not node.sandboxes([args.name]):
        node.run(args.name, args.image, False, {}, ["/bin/sleep", "3600"])
    return wait_for(f"container pod {args.name} to run", args.timeout,
                    lambda: (s := node.summary(args.name)).get("state") == "CONTAINER_RUNNING" and s, 1)


def leftovers(node: Node) -> list[str]:
    found: list[str] = []
    sandboxes = node.rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=30).items
    found += [f"pod sandbox {s.metadata.name} ({s.id[:13]})" for s in sandboxes]
    virsh = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                           text=True, timeout=30, check=True).stdout.split()
    found += [f"libvirt domain {d}" for d in virsh]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30,
                           check=True).stdout.split("\n")
    found += [f"netns {n.split()[0]}" for n in netns if n.strip()]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30,
                           check=True).stdout.splitlines()
    for line in links:
        name = line.split(": ")[1].split("@")[0]
        if re.match(r"^(tap|vt|veth)", name):
            found.append(f"link {name}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", default="/run/criproxy.sock")
    sub = parser.add_subparsers(dest="cmd", required=True)
    vm = sub.add_parser("up-vm")
    vm.add_argument("name")
    vm.add_argument("--image", default="virtlet.cloud/tiny")
    vm.add_argument("--ssh-key", required=True, help="public key file given by annotation VirtletSSHKeys")
    vm.add_argument("--ssh-identity", default="", help="private key: also check that SSH works")
    vm.add_argument("--timeout", type=float, default=300)
    ct = sub.add_parser("up-container")
    ct.add_argument("name")
    ct.add_argument("--image", default="localhost/virtlet-test/busybox:1")
    ct.add_argument("--timeout", type=float, default=120)
    down = sub.add_parser("down")
    down.add_argument("names", nargs="*")
    sub.add_parser("clean")
    st = sub.add_parser("status")
    st.add_argument("name")
    args = parser.parse_args(argv)
    try:
        return run_command(Node(args.socket), args)
    except grpc.RpcError as e:
        print(f"{args.cmd}: CRI call failed: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1


def run_command(node: Node, args: argparse.Namespace) -> int:
    if args.cmd == "up-vm":
        print(json.dumps(up_vm(node, args)))
    elif args.cmd == "up-container":
        print(json.dumps(up_container(node, args)))
    elif args.cmd == "down":
        errors = node.remove(args.names)
        if errors:
            print("could not remove: " + "; ".join(errors), file=sys.stderr)
            return 1
    elif args.cmd == "status":
        print(json.dumps(node.summary(args.name)))
    elif args.cmd == "clean":
        left = leftovers(node)
        if left:
            print("left behind: " + ", ".join(left), file=sys.stderr)
            return 1
        print("nothing left behind", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
