"""examples/k8s.yaml, the nested-Kubernetes StatefulSet of the original VM-pod description (issue 17 item 7).

- The example (and examples/vm-pod.yaml) validate against the Kubernetes API schema (kubernetes-validate's
  bundled OpenAPI schemas, strict: unknown fields fail).
- The parts that depend on virtlet run: the StatefulSet's three pods are made the way a kubelet makes them
  (sandbox hostname ``k8s-N``, the cluster's DNS search domains, pod annotations on the sandbox only, the
  kubelet's own labels and container annotations, its /etc/hosts with the FQDN from hostname and subdomain),
  from the example's own template, with two substitutions the test needs: the tiny guest image instead of the
  Ubuntu cloud image, and a marker script instead of the provisioning script (which needs the internet)
  through the same annotation.  A real DNS server (dnsmasq on the test bridge, the stand-in for cluster DNS)
  holds the headless Service's records, so the VMs resolve each other as ``k8s-N.k8s``.  Checked in every
  guest: the host name and FQDN ``k8s-N.k8s.<ns>.svc.<cluster domain>``, the user-data applied (files
  written, the runcmd ran the script, root's SSH key from ``users``), the 4 GiB root disk, port 22 answering
  (the readiness probe), and the peers' names resolving to their pod IPs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml

from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_vm_lifecycle import BOOT_TIMEOUT, _pull
from virtlet.cri.gen import api_pb2 as api

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "k8s.yaml"
K8S_VERSION = "1.32.0"  # the package repository the example installs from
NAMESPACE = "nested"
CLUSTER_DOMAIN = "cluster.local"
MARKER_SCRIPT = """#!/bin/sh
echo "K8S-EXAMPLE-PROVISIONED $(hostname)" > /dev/console
touch /run/provisioned
"""


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("name", ["k8s.yaml", "vm-pod.yaml"])
def test_examples_validate_against_the_kubernetes_schema(name: str) -> None:
    for doc in _docs(REPO / "examples" / name):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_check_catches_a_misspelt_field() -> None:
    """The validation above is not vacuous: a typo in a pod template field fails it."""
    sts = next(d for d in _docs(EXAMPLE) if d["kind"] == "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"tcpSocket": {"port": 22}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)


def test_example_is_faithful_to_the_original() -> None:
    service, sts = _docs(EXAMPLE)
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["name"] == sts["spec"]["serviceName"] == "k8s"
    assert sts["spec"]["replicas"] == 3
    tmpl = sts["spec"]["template"]
    ann = tmpl["metadata"]["annotations"]
    assert ann["kubernetes.io/target-runtime"] == "virtlet.cloud" and ann["VirtletRootVolumeSize"] == "4Gi"
    user_data = yaml.safe_load(ann["VirtletCloudInitUserData"])
    assert {"write_files", "users", "runcmd"} <= set(user_data)
    container = tmpl["spec"]["containers"][0]
    assert container["tty"] and container["stdin"]
    assert container["readinessProbe"]["tcpSocket"]["port"] == 22


# -- the StatefulSet's pods as a kubelet makes them ----------------------------------------------------------

@contextlib.contextmanager
def dnsmasq(listen: str, records: dict[str, str], world: Path) -> Iterator[None]:
    """dnsmasq answering only ``records`` (name -> IPv4) on ``listen``:53, no DHCP, no upstream."""
    args = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
            f"--listen-address={listen}", "--port=53", f"--pid-file={world / 'dnsmasq.pid'}",
            "--log-facility=-", "--log-queries"]
    args += [f"--host-record={name},{ip}" for name, ip in records.items()]
    log = open(world / "dnsmasq.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not _answers_dns(listen):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq did not start: {(world / 'dnsmasq.log').read_text()}")
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _answers_dns(addr: str) -> bool:
    """A TCP connection to port 53 (dnsmasq serves TCP too) tells it is listening."""
    with contextlib.suppress(OSError), socket.create_connection((addr, 53), timeout=0.5):
        return True
    return False


class KubeletLikePod:
    """One StatefulSet pod driven through CRI as the kubelet drives it."""

    def __init__(self, daemon: VirtletdProcess, world: Path, template: dict[str, Any], index: int, image: str,
                 dns_server: str) -> None:
        self.rt = daemon.runtime()
        self.daemon = daemon
        self.name = f"k8s-{index}"
        self.uid = f"uid-nested-{index}-{world.name}"
        self.log_dir = world / "pods" / self.name
        self.log_dir.mkdir(parents=True)
        meta = template["metadata"]
        self.container = template["spec"]["containers"][0]
        self.image = image
        labels = {**meta["labels"], "statefulset.kubernetes.io/pod-name": self.name,
                  "io.kubernetes.pod.name": self.name, "io.kubernetes.pod.namespace": NAMESPACE,
                  "io.kubernetes.pod.uid": self.uid}
        annotations = {**meta["annotations"], "kubernetes.io/config.source": "api"}
        self.sandbox_config = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=self.name, namespace=NAMESPACE, uid=self.uid),
            hostname=self.name, log_directory=str(self.log_dir), labels=labels, annotations=annotations,
            dns_config=api.DNSConfig(servers=[dns_server], options=["ndots:5"], searches=[
                f"{NAMESPACE}.svc.{CLUSTER_DOMAIN}", f"svc.{CLUSTER_DOMAIN}", CLUSTER_DOMAIN]))
        self.pod_dir = world / "kubelet-pods" / self.uid
        self.sandbox_id = ""
        self.container_id = ""

    @property
    def fqdn(self) -> str:
        return f"{self.name}.k8s.{NAMESPACE}.svc.{CLUSTER_DOMAIN}"

    def kubelet_mounts(self, ip: str) -> list[api.Mount]:
        """The files the kubelet mounts into every container: its /etc/hosts (with the pod's FQDN, from the
        pod's hostname and subdomain) and the termination log."""
        self.pod_dir.mkdir(parents=True)
        hosts = self.pod_dir / "etc-hosts"
        hosts.write_text("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"
                         "::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\n"
                         f"{ip}\t{self.fqdn}\t{self.name}\n")
        term = self.pod_dir / "containers" / self.container["name"] / "0a1b2c3d"
        term.parent.mkdir(parents=True)
        term.touch()
        return [api.Mount(container_path="/etc/hosts", host_path=str(hosts)),
                api.Mount(container_path="/dev/termination-log", host_path=str(term))]

    def run_sandbox(self) -> str:
        self.sandbox_id = self.rt.RunPodSandbox(api.RunPodSandboxRequest(
            config=self.sandbox_config, runtime_handler="virtlet"), timeout=120).pod_sandbox_id
        st = self.rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=self.sandbox_id), timeout=30)
        return st.status.network.ip

    def create_and_start(self, memory: int, ip: str) -> None:
        c = self.container
        cfg = api.ContainerConfig(
            metadata=api.ContainerMetadata(name=c["name"]), image=api.ImageSpec(image=self.image),
            log_path=f"{c['name']}/0.log", tty=c["tty"], stdin=c["stdin"], mounts=self.kubelet_mounts(ip),
            labels={"io.kubernetes.container.name": c["name"], "io.kubernetes.pod.name": self.name,
                    "io.kubernetes.pod.namespace": NAMESPACE, "io.kubernetes.pod.uid": self.uid},
            annotations={"io.kubernetes.container.hash": "1", "io.kubernetes.container.restartCount": "0",
                         "io.kubernetes.pod.terminationGracePeriod": "30"})
        cfg.linux.resources.memory_limit_in_bytes = memory
        self.container_id = self.rt.CreateContainer(api.CreateContainerRequest(
            pod_sandbox_id=self.sandbox_id, config=cfg, sandbox_config=self.sandbox_config),
            timeout=120).container_id
        self.rt.StartContainer(api.StartContainerRequest(container_id=self.container_id), timeout=120)

    def exec(self, *cmd: str, timeout: int = 30) -> str:
        resp = self.rt.ExecSync(api.ExecSyncRequest(container_id=self.container_id, cmd=list(cmd),
                                                    timeout=timeout), timeout=timeout + 30)
        assert resp.exit_code == 0, f"{cmd} in {self.name}: {resp.exit_code} {resp.stderr!r} {resp.stdout!r}"
        return resp.stdout.decode()

    def wait_exec_ready(self, deadline: float) -> None:
        while True:
            try:
                self.exec("true", timeout=5)
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                    raise
            time.sleep(1)

    def remove(self) -> None:
        if self.container_id:
            self.rt.StopContainer(api.StopContainerRequest(container_id=self.container_id, timeout=5), timeout=120)
            self.rt.RemoveContainer(api.RemoveContainerRequest(container_id=self.container_id), timeout=120)
        if self.sandbox_id:
            self.rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=self.sandbox_id), timeout=120)
            self.rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=self.sandbox_id), timeout=120)


def _wait_port(ip: str, port: int, deadline: float) -> None:
    while True:
        with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=2):
            return
        assert time.monotonic() < deadline, f"{ip}:{port} never answered"
        time.sleep(1)


def _test_template(world: Path) -> tuple[dict[str, Any], str]:
    """The example's pod template with the marker script and a fresh SSH key; returns it and the key file."""
    sts = next(d for d in _docs(EXAMPLE) if d["kind"] == "StatefulSet")
    tmpl = sts["spec"]["template"]
    ann = tmpl["metadata"]["annotations"]
    user_data = yaml.safe_load(ann["VirtletCloudInitUserData"])
    script = next(f for f in user_data["write_files"] if f["path"] == "/usr/local/bin/provision.sh")
    script["content"] = MARKER_SCRIPT
    key = world / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    root = next(u for u in user_data["users"] if u["name"] == "root")
    root["ssh-authorized-keys"] = [(world / "id_ed25519.pub").read_text().strip()]
    ann["VirtletCloudInitUserData"] = yaml.safe_dump(user_data, sort_keys=False)
    return tmpl, str(key)


@pytest.mark.libvirt
@pytest.mark.network
def test_statefulset_pods_run_as_vm_pods(vm_virtletd: VirtletdProcess, world_dir: Path, bridge_cni: Path,
                                          image_server: Any, tiny_image: Path) -> None:
    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    image = "virtlet.cloud/" + image_server.name("files/tiny.qcow2")
    _pull(vm_virtletd, image)
    template, key = _test_template(world_dir)
    subnet = json.loads(next(bridge_cni.iterdir()).read_text())["plugins"][0]["ipam"]["ranges"][0][0]["subnet"]
    gateway = str(next(ipaddress.ip_network(subnet).hosts()))  # host-local's default gateway: the bridge
    pods = [KubeletLikePod(vm_virtletd, world_dir, template, i, image, gateway) for i in range(3)]
    try:
        ips = {p.name: p.run_sandbox() for p in pods}
        records = {f"{name}.k8s.{NAMESPACE}.svc.{CLUSTER_DOMAIN}": ip for name, ip in ips.items()}
        with dnsmasq(gateway, records, world_dir):
            for p in pods:
                p.create_and_start(memory=256 * 2**20, ip=ips[p.name])
            deadline = time.monotonic() + BOOT_TIMEOUT * 2  # three TCG guests with 2 vCPUs each on this machine
            for p in pods:
                _wait_port(ips[p.name], 22, deadline)  # the readiness probe
                p.wait_exec_ready(deadline)
            for p in pods:
                assert p.exec("hostname").strip() == p.name
                assert p.exec("hostname", "-f").strip() == p.fqdn  # the kubelet's /etc/hosts, applied
                assert p.exec("cat", "/sys/block/vda/size").strip() == str(4 * 2**30 // 512)
                assert p.exec("cat", "/etc/modules-load.d/k8s.conf").split() == ["overlay", "br_netfilter"]
                p.exec("test", "-e", "/run/provisioned")  # runcmd ran the (replaced) provisioning script
                for peer, ip in ips.items():
                    out = p.exec("ping", "-c", "1", "-W", "2", f"{peer}.k8s")
                    assert f"({ip})" in out, f"{p.name} resolved {peer}.k8s wrongly: {out}"
            ssh = subprocess.run(["ssh", "-i", key, "-o", "StrictHostKeyChecking=no", "-o",
                                  "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20",
                                  f"root@{ips['k8s-0']}", "hostname"], capture_output=True, text=True, timeout=60)
            assert ssh.stdout.strip() == "k8s-0", ssh.stderr
    finally:
        for p in reversed(pods):
            p.remove()
