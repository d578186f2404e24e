"""Failpoints: named places where a test can freeze virtletd (to SIGKILL it mid-operation) or slow it down.

Set ``VIRTLET_FAILPOINT=<name>`` in virtletd's environment; when execution reaches ``hit(<name>)`` it logs and
sleeps until killed.  ``VIRTLET_FAILPOINT=<name>:sleep=<seconds>`` sleeps that long and then goes on (a slow
step: for a SIGTERM or a concurrent call while a call is in flight).  Unset (production), ``hit`` is a
dictionary lookup and nothing else.

Every failpoint is listed in ``NAMES`` (one place): the crash matrix (``tests/integration/test_crash_matrix.py``)
is parametrised by it, and a unit test fails when a ``hit(...)`` in the code names a failpoint that is not listed
here (or a listed one is no longer hit anywhere).  A failpoint sits between two side effects of a mutating CRI
call, so that a SIGKILL there leaves the first done and the second not.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

# name -> the state a SIGKILL there leaves behind (what start-up recovery must finish or undo)
NAMES: dict[str, str] = {
    # RunPodSandbox
    "sandbox.run.after_record": "record CREATING, nothing on the host yet",
    "sandbox.after_netns": "record CREATING, netns made, no CNI ADD",
    "sandbox.network.after_cni_add": "record CREATING, CNI ADD of the pod network and every extra network done, "
                                     "no bridge, no DHCP server",
    "sandbox.after_network": "record CREATING, CNI ADD done, bridge and DHCP server running",
    # StopPodSandbox
    "sandbox.stop.after_containers": "containers stopped, pod network still up",
    "sandbox.stop.after_network": "CNI DEL done, record says network torn down, netns still there",
    "sandbox.stop.after_netns": "netns gone, record still READY",
    # RemovePodSandbox
    "sandbox.remove.after_stop": "sandbox stopped, containers and record still there",
    "sandbox.remove.after_containers": "containers removed, sandbox record still there",
    # CreateContainer
    "container.create.after_record": "record CREATED (incomplete), no files",
    "volumes.root_before_header": "persistent root: image written to the device, no header yet",
    "container.create.after_prepare": "record and config drive ISO made, overlay maybe still in the making, no domain",
    "container.before_define": "record and files made, exited domains of the pod undefined, no domain",
    "container.create.after_define": "domain defined, record not marked complete, kubelet has no id",
    # StartContainer
    "container.start.after_log_writer": "CRI log writer running, taps not made",
    "container.start.after_taps": "taps made in the host netns, domain not started",
    "container.start.after_domain_start": "QEMU running, taps in the host netns, record CREATED",
    "container.start.after_attach": "taps in the pod netns on the bridge, record CREATED",
    # StopContainer
    "container.stop.after_shutdown_request": "ACPI shutdown requested, record RUNNING",
    "container.stop.after_domain_stopped": "QEMU gone, record RUNNING",
    # RemoveContainer
    "container.remove.after_destroy": "domain undefined, files gone, record still there",
    # PullImage
    "image.pull.after_download": "download complete in tmp/, not validated, not in data/",
    "image.pull.after_rename": "data file in data/, not indexed",
    "image.pull.after_commit": "data indexed, name not pointing at it",
    # RemoveImage
    "image.remove.after_unname": "names removed, data and index row still there",
    # console log writer (not an RPC: the CRI log after a write, before its state file)
    "console_log_after_cri_write": "CRI log line written, log-writer state not saved",
}


def hit(name: str) -> None:
    value = os.environ.get("VIRTLET_FAILPOINT")
    if not value or not value.startswith(name):
        return
    if value == name:
        log.warning("failpoint %s reached: sleeping until killed", name)
        while True:
            time.sleep(3600)
    rest = value[len(name):]
    if rest.startswith(":sleep="):
        try:
            seconds = float(rest[len(":sleep="):])
        except ValueError:
            return
        log.warning("failpoint %s reached: sleeping %.1fs", name, seconds)
        time.sleep(max(0.0, min(seconds, 3600.0)))
