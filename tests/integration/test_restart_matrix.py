"""containerd's restart matrix on virtletd: sandboxes READY and NOTREADY with containers CREATED, RUNNING and
EXITED (the combinations the CRI allows: StopPodSandbox stops every container, so a NOTREADY sandbox holds only
EXITED ones, or none), all present across a SIGKILL and restart of virtletd on the same state dir.  List* and
Status* answer exactly as before (states, ids, IPs, timestamps, exit codes, reasons, log paths), the log files are
unchanged (the running VM's log only grows), and the running VM is the same QEMU process."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_vm_lifecycle import MARKER, Pod, _pull
from virtlet.cri.gen import api_pb2 as api
from virtlet.network import netns

pytestmark = [pytest.mark.libvirt, pytest.mark.network]


@pytest.fixture
def tiny_served(image_server: Any, tiny_image: Path) -> str:
    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    return image_server.name("files/tiny.qcow2")


def _snapshot(daemon: VirtletdProcess) -> dict[str, Any]:
    rt = daemon.runtime()
    as_dict = json_format.MessageToDict
    sandboxes = {s.id: as_dict(s) for s in rt.ListPodSandbox(api.ListPodSandboxRequest()).items}
    statuses = {sid: as_dict(rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid)).status)
                for sid in sandboxes}
    containers = {c.id: as_dict(c) for c in rt.ListContainers(api.ListContainersRequest()).containers}
    cstatuses = {cid: as_dict(rt.ContainerStatus(api.ContainerStatusRequest(container_id=cid)).status)
                 for cid in containers}
    logs = {}
    for cid, status in cstatuses.items():
        path = Path(status.get("logPath", ""))
        logs[cid] = path.read_bytes() if path.is_file() else None
    return {"sandboxes": sandboxes, "sandbox_status": statuses, "containers": containers,
            "container_status": cstatuses, "logs": logs}


def _qemu_pid(daemon: VirtletdProcess, cid: str) -> int:
    info = daemon.runtime().ContainerStatus(api.ContainerStatusRequest(container_id=cid, verbose=True)).info["info"]
    return int(json.loads(info)["qemu_pid"])


def test_everything_survives_sigkill(vm_virtletd: VirtletdProcess, world_dir: Path, tiny_served: str) -> None:
    daemon = vm_virtletd
    _pull(daemon, tiny_served)
    pods = {name: Pod(daemon, world_dir, name, image=tiny_served) for name in (
        "ready-created", "ready-running", "ready-exited", "notready-exited", "notready-never-started",
        "notready-empty")}
    for pod in pods.values():
        pod.run_sandbox()
    for name in ("ready-created", "ready-running", "ready-exited", "notready-exited", "notready-never-started"):
        pods[name].create()
    for name in ("ready-running", "ready-exited", "notready-exited"):
        pods[name].start()
    # EXITED by StopContainer (destroyed at once, no grace) and by StopPodSandbox (which stops its containers)
    pods["ready-exited"].rt.StopContainer(api.StopContainerRequest(
        container_id=pods["ready-exited"].container_id, timeout=0), timeout=120)
    for name in ("notready-exited", "notready-never-started", "notready-empty"):
        pods[name].rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=pods[name].sandbox_id), timeout=120)
    running = pods["ready-running"]
    running.wait_log(MARKER)
    qemu_pid = _qemu_pid(daemon, running.container_id)
    assert qemu_pid > 0

    before = _snapshot(daemon)
    # MessageToDict leaves out enum values 0 (SANDBOX_READY, CONTAINER_CREATED)
    states = {(s.get("state", "SANDBOX_READY"),
               before["container_status"][c].get("state", "CONTAINER_CREATED") if c else None)
              for name, pod in pods.items()
              for s, c in [(before["sandboxes"][pod.sandbox_id], pod.container_id)]}
    assert states == {("SANDBOX_READY", "CONTAINER_CREATED"), ("SANDBOX_READY", "CONTAINER_RUNNING"),
                      ("SANDBOX_READY", "CONTAINER_EXITED"), ("SANDBOX_NOTREADY", "CONTAINER_EXITED"),
                      ("SANDBOX_NOTREADY", None)}, states
    assert before["sandbox_status"][running.sandbox_id]["network"]["ip"]

    daemon.kill()
    time.sleep(1)
    daemon.start()
    for pod in pods.values():
        pod.rt = daemon.runtime()
    after = _snapshot(daemon)

    assert after["sandboxes"] == before["sandboxes"]
    assert after["sandbox_status"] == before["sandbox_status"]
    for key in ("containers", "container_status"):
        for cid, was in before[key].items():
            now = after[key].get(cid)
            assert now == was, (key, cid, {k: (was.get(k), (now or {}).get(k)) for k in {*was, *(now or {})}
                                           if was.get(k) != (now or {}).get(k)})
        assert set(after[key]) == set(before[key])
    for cid, content in before["logs"].items():
        if cid == running.container_id:
            assert content and after["logs"][cid].startswith(content)  # the VM writes on
        else:
            assert after["logs"][cid] == content, cid
    for name, pod in pods.items():
        assert netns.exists(pod.sandbox_id) == name.startswith("ready-"), name
    pid_after = _qemu_pid(daemon, running.container_id)
    assert pid_after == qemu_pid, "the running VM is not the same QEMU process after the restart"
