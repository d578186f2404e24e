"""vCPU hot-plug for UpdateContainerResources: a CPU limit above the VM's vCPUs adds vCPUs live.

A VM is created with ``VirtletVCPUCount`` vCPUs and room to grow to ``VirtletMaxVCPUs`` (default: no room), as
libvirt's ``<vcpu current="N">MAX</vcpu>``.  A CPU limit (``cpu_quota``/``cpu_period``, the whole VM's) that
needs more CPUs than the VM has -- ceil(quota / period) -- hot-plugs vCPUs up to that number through libvirt
(``setVcpusFlags``, the running VM and its definition).  QEMU adds them at once, also under TCG (machine ``pc``);
Linux sees an ACPI hot-added CPU but leaves it offline until something onlines it (a udev rule in many cloud
images), so virtletd also asks the QEMU guest agent to online them (``online_in_guest``, best effort, bounded).

Never down: a lower limit keeps the vCPUs the VM has (the CFS quota already bounds what they use).  Removing a
vCPU needs the guest's cooperation (ACPI eject) and QEMU's ``pc`` machine refuses a vCPU unplug outright
("device unplug request for not supported device type"), so virtletd never asks.  A limit that needs more than
the maximum is ``FailedPrecondition`` before anything is changed, saying what to recreate the pod with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from virtlet import errors
from virtlet.vm import guest_agent as ga
from virtlet.vm.annotations import DEFAULT_CFS_PERIOD_US, MAX_VCPUS

log = logging.getLogger(__name__)


def vcpus_for(quota: int, period: int) -> int:
    """The whole CPUs a CFS limit of ``quota`` per ``period`` microseconds needs (rounded up)."""
    return -(-quota // period)


def plan(cid: str, extra: Mapping[str, Any], quota: int, period: int) -> int | None:
    """The vCPU count to hot-plug to for a new limit (``quota`` > 0), None when the VM has enough; raises
    ``FailedPrecondition`` when the limit needs more than the VM's maximum."""
    if quota <= 0:
        return None
    want = vcpus_for(quota, period or DEFAULT_CFS_PERIOD_US)
    have = int(extra.get("vcpus") or 1)
    if want <= have:
        return None
    maximum = int(extra.get("max_vcpus") or have)
    if want > maximum:
        room = (f"it was created with at most {maximum} vCPUs (annotation {MAX_VCPUS}; unset means no hot-plug)"
                if maximum > have else f"it was created with {have} vCPUs and no room to add more (annotation "
                f"{MAX_VCPUS} unset)")
        raise errors.FailedPrecondition(
            f"UpdateContainerResources: linux.cpu_quota {quota} per cpu_period {period or DEFAULT_CFS_PERIOD_US} "
            f"needs {want} vCPUs, more than container {cid}'s VM can have: {room}; recreate the pod with "
            f"{MAX_VCPUS}: \"{want}\" (or more) to resize it in place")
    return want


#: At most this long (inside UpdateContainerResources, under the container's lock) for the guest to online CPUs.
ONLINE_BUDGET = 3.0
#: Then, when the guest has not onlined them yet (it has not seen the CPU, or its agent has not connected yet:
#: qemu-ga starts late in a boot), at most this long more in a background thread, outside every lock, so the
#: call answers within ONLINE_BUDGET and the vCPUs still come up on a busy TCG guest.
LATER_BUDGET = 300.0
_ONLINE_POLL = 0.25
#: The background thread asks less often the longer it waits (0.25, 0.5, 1, 2, 2 ... s): a busy guest's agent
#: is not asked four times a second for minutes.
_LATER_MAX_POLL = 2.0


def online_in_guest(call: ga.Transport, count: int, pod: str, budget: float = ONLINE_BUDGET,
                    max_poll: float = _ONLINE_POLL, wait_for_agent: bool = False) -> int:
    """Best effort: bring the guest's vCPUs 0..count-1 online through its QEMU guest agent (``guest-get-vcpus``,
    ``guest-set-vcpus``), as a guest with a udev CPU hot-add rule would do itself.  A hot-added CPU shows up in the
    guest a moment after QEMU adds it, so this polls for up to ``budget`` seconds.  Returns how many vCPUs are
    online at the end (0 when the agent cannot say); never raises: a guest without an agent keeps its new vCPUs
    offline until it onlines them (logged).  ``wait_for_agent`` (the background thread): an agent that is not
    connected yet (qemu-ga starts late in a guest's boot, after the line a pod waits for) is asked again until
    the budget ends, instead of giving up at once."""
    deadline = time.monotonic() + budget
    online = 0
    poll = _ONLINE_POLL
    while True:
        try:
            vcpus = call({"execute": "guest-get-vcpus"}, max(0.5, deadline - time.monotonic()))
            if not isinstance(vcpus, list):
                raise ValueError(f"guest-get-vcpus answered {type(vcpus).__name__}, not a list")
            ids = {v.get("logical-id"): bool(v.get("online")) for v in vcpus[:1024] if isinstance(v, dict)}
            online = sum(1 for up in ids.values() if up)
            wanted = [{"logical-id": i, "online": True} for i in range(count) if ids.get(i) is False]
            if wanted:
                call({"execute": "guest-set-vcpus", "arguments": {"vcpus": wanted}},
                     max(0.5, deadline - time.monotonic()))
            elif all(ids.get(i) for i in range(count)):
                return online
        except ga.AgentUnavailable as exc:
            if not wait_for_agent or time.monotonic() + poll > deadline:
                log.info("VM pod %s: the guest agent did not online the hot-plugged vCPUs: %s", pod, exc)
                return online
        except (ga.AgentError, ga.AgentMisbehaved, ga.ReplyTooLarge, ValueError) as exc:
            log.info("VM pod %s: the guest agent did not online the hot-plugged vCPUs: %s", pod, exc)
            return online
        if time.monotonic() + poll > deadline:
            log.info("VM pod %s: %d of %d vCPUs online in the guest after %.1fs; the guest onlines the rest itself",
                     pod, online, count, budget)
            return online
        time.sleep(poll)
        poll = min(poll * 2, max_poll)


def online_in_background(call: ga.Transport, count: int, pod: str, budget: float = LATER_BUDGET) -> threading.Thread:
    """``online_in_guest`` in a daemon thread (bounded by ``budget``; an agent not connected yet is asked again,
    any other agent error ends it), for vCPUs the guest had not onlined within ``ONLINE_BUDGET``."""
    thread = threading.Thread(target=online_in_guest, args=(call, count, pod, budget, _LATER_MAX_POLL, True),
                              daemon=True, name=f"vcpu-online-{pod}"[:60])
    thread.start()
    return thread
