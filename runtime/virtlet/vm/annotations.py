"""Pod annotations and CRI resources -> validated ``VmOptions`` for one VM.

Everything a user can get wrong about a VM's shape is checked here, once, at CreateContainer, so the designer
and the manager only ever see valid values.  Every error is ``errors.InvalidArgument`` naming the annotation
(or CRI field), the value that was given and the values that are allowed.

Annotations handled here: ``VirtletVCPUCount``, ``VirtletMaxVCPUs``, ``VirtletRootVolumeSize``, ``VirtletDiskDriver``,
``VirtletSystemUUID``, ``VirtletCPUModel``; ``VirtletLibvirtCPUSetting`` is refused (not supported).
Other ``Virtlet*`` annotations are ignored here on purpose: cloud-init's (``VirtletCloudInit*``,
``VirtletSSHKeys``...) are parsed by ``virtlet.cloudinit``, and unknown ones must not break manifests
written for other versions.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from virtlet import errors, quantity

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DEFAULT_MEMORY_BYTES = 1 * GiB
MIN_MEMORY_BYTES = 32 * MiB
DEFAULT_VCPUS = 1
DEFAULT_CFS_PERIOD_US = 100000  # the kernel's default CFS period: a quota without a period uses it

VCPU_COUNT = "VirtletVCPUCount"
#: The most vCPUs UpdateContainerResources may hot-plug up to (default: VirtletVCPUCount, no hot-plug).
MAX_VCPUS = "VirtletMaxVCPUs"
ROOT_VOLUME_SIZE = "VirtletRootVolumeSize"
DISK_DRIVER = "VirtletDiskDriver"
SYSTEM_UUID = "VirtletSystemUUID"
CPU_MODEL = "VirtletCPUModel"
LIBVIRT_CPU_SETTING = "VirtletLibvirtCPUSetting"

DISK_DRIVERS = ("virtio", "scsi")
CPU_MODELS = ("host-model",)

# uuid5 namespace for SMBIOS system UUIDs derived from pod uids: the same pod always gets the same UUID.
SYSTEM_UUID_NAMESPACE = uuid.UUID("3f8a1c52-8d0e-5b7a-9c41-0b6e2f7d9a10")

# Limits libvirt/the kernel accept for CFS settings (libvirt's cputune ranges).
MIN_CPU_SHARES, MAX_CPU_SHARES = 2, 262144
MIN_CPU_PERIOD, MAX_CPU_PERIOD = 1000, 1000000
MIN_CPU_QUOTA, MAX_CPU_QUOTA = 1000, 17592186044415

#: Default of the ``max_root_volume_size`` setting (``runtime/virtlet/config.py``): 1Ti.
DEFAULT_MAX_ROOT_VOLUME_SIZE = 2**40

#: Kubernetes refuses a pod whose annotations (keys and values, in bytes) exceed 256 KiB together; virtletd
#: applies the same bound to the pod's and to the container's annotations, since a CRI client is not always
#: a kubelet that checked.
MAX_ANNOTATIONS_TOTAL = 256 * KiB
#: Longest value of a one-word VM annotation (VirtletVCPUCount, VirtletSystemUUID...): enough for any valid
#: value, short enough to quote back in an error message.
MAX_SCALAR_VALUE = 256

# ASCII only (re.ASCII, explicit [0-9]): \d, str.isdigit() and int() also accept "²", "٣" and other Unicode
# digits.  fullmatch, because "$" also matches before a trailing newline.
_WHOLE_NUMBER = re.compile(r"[0-9]{1,6}", re.ASCII)
_CPU_LIST_ITEM = re.compile(r"([0-9]{1,6})(?:-([0-9]{1,6}))?", re.ASCII)
_UUID = re.compile(r"\{?[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\}?",
                   re.ASCII)


@dataclass(frozen=True)
class CpuResources:
    """The CPU part of CRI ``LinuxContainerResources``; 0 (and -1 for quota) mean "not set"."""

    shares: int = 0
    quota: int = 0
    period: int = 0
    cpuset: str = ""

    @classmethod
    def from_cri(cls, resources: Any) -> CpuResources:
        """From a CRI ``LinuxContainerResources`` message (or None), without importing the CRI stubs."""
        if resources is None:
            return cls()
        return cls(shares=int(resources.cpu_shares), quota=int(resources.cpu_quota),
                   period=int(resources.cpu_period), cpuset=str(resources.cpuset_cpus))


@dataclass(frozen=True)
class VmOptions:
    """A VM's validated shape; ``cpu`` fields that were unset are None / ""."""

    vcpus: int
    memory_bytes: int
    disk_driver: str  # "virtio" | "scsi"
    system_uuid: str  # canonical lower-case 8-4-4-4-12 form
    root_volume_size: int | None = None  # bytes; None = keep the image's size
    cpu_model: str | None = None  # None = QEMU's default model; "host-model"
    cpu_shares: int | None = None
    cpu_quota: int | None = None  # microseconds per period for the whole VM
    cpu_period: int | None = None  # microseconds
    cpuset: str = ""  # normalised host CPU list, "" = any CPU
    max_vcpus: int = 0  # vCPUs the VM may grow to live (hot-plug); 0 = vcpus


def check_annotation_sizes(annotations: Mapping[str, str], where: str) -> None:
    """Refuse ``annotations`` whose keys and values together exceed Kubernetes' own 256 KiB limit.

    ``where`` says whose annotations they are ("pod", "container") for the message.  Counted as Kubernetes
    counts: the UTF-8 bytes of every key and value.
    """
    total = 0
    for key, value in annotations.items():
        total += len(key.encode("utf-8", "surrogatepass")) + len(value.encode("utf-8", "surrogatepass"))
    if total > MAX_ANNOTATIONS_TOTAL:
        raise errors.InvalidArgument(
            f"the {where}'s annotations are {total} bytes together, more than the {MAX_ANNOTATIONS_TOTAL} bytes "
            f"(256 KiB) Kubernetes allows; make VirtletCloudInitUserData or other large annotations smaller")


def parse_vm_options(annotations: Mapping[str, str], memory_limit_bytes: int, cpu: CpuResources,
                     pod_uid: str, host_cpus: int,
                     max_root_volume_size: int = DEFAULT_MAX_ROOT_VOLUME_SIZE) -> VmOptions:
    """Validate a VM pod's annotations and resources; ``host_cpus`` bounds ``VirtletVCPUCount`` and
    ``max_root_volume_size`` (the node's ``max_root_volume_size`` setting) bounds ``VirtletRootVolumeSize``.

    ``memory_limit_bytes`` is the container's ``resources.limits.memory`` (0 = unset -> 1 GiB).
    """
    for name in (VCPU_COUNT, MAX_VCPUS, ROOT_VOLUME_SIZE, DISK_DRIVER, SYSTEM_UUID, CPU_MODEL):
        value = annotations.get(name)
        if value is not None and len(value) > MAX_SCALAR_VALUE:
            raise errors.InvalidArgument(
                f"annotation {name}: a value of {len(value)} characters is too long (at most {MAX_SCALAR_VALUE})")
    if LIBVIRT_CPU_SETTING in annotations:
        raise errors.InvalidArgument(
            f"annotation {LIBVIRT_CPU_SETTING} is not supported by this virtlet; remove it and use "
            f"{CPU_MODEL}: host-model (or nothing, for QEMU's default CPU model)")
    cpus = _cpu_resources(cpu, max(host_cpus, 1))
    vcpus = _vcpus(annotations.get(VCPU_COUNT), max(host_cpus, 1))
    max_vcpus = _max_vcpus(annotations.get(MAX_VCPUS), vcpus, max(host_cpus, 1))
    if cpus["cpu_quota"]:  # with room to grow, a CPU limit above VirtletVCPUCount starts with the vCPUs it needs
        # (so a container restarted after an in-place resize keeps the vCPUs the resize gave it)
        needed = -(-cpus["cpu_quota"] // (cpus["cpu_period"] or DEFAULT_CFS_PERIOD_US))
        vcpus = max(vcpus, min(max_vcpus, needed))
    return VmOptions(
        vcpus=vcpus,
        max_vcpus=max_vcpus,
        memory_bytes=_memory(memory_limit_bytes),
        disk_driver=_choice(annotations, DISK_DRIVER, DISK_DRIVERS, "virtio"),
        system_uuid=_system_uuid(annotations.get(SYSTEM_UUID), pod_uid),
        root_volume_size=_root_volume_size(annotations.get(ROOT_VOLUME_SIZE), max_root_volume_size),
        cpu_model=_cpu_model(annotations.get(CPU_MODEL)),
        **cpus,
    )


def _vcpus(value: str | None, host_cpus: int) -> int:
    if value is None:
        return DEFAULT_VCPUS
    text = value.strip()
    if not _WHOLE_NUMBER.fullmatch(text) or not 1 <= int(text) <= host_cpus:
        raise errors.InvalidArgument(
            f"annotation {VCPU_COUNT}: {value!r} is not allowed; expected a whole number from 1 to "
            f"{host_cpus} (this node has {host_cpus} CPUs); default {DEFAULT_VCPUS}")
    return int(text)


def _max_vcpus(value: str | None, vcpus: int, host_cpus: int) -> int:
    """``VirtletMaxVCPUs``: from ``VirtletVCPUCount`` to the node's CPU count; unset -> no room to grow."""
    if value is None:
        return vcpus
    text = value.strip()
    if not _WHOLE_NUMBER.fullmatch(text) or not vcpus <= int(text) <= host_cpus:
        raise errors.InvalidArgument(
            f"annotation {MAX_VCPUS}: {value!r} is not allowed; expected a whole number from {VCPU_COUNT} "
            f"({vcpus}) to {host_cpus} (this node has {host_cpus} CPUs); default {VCPU_COUNT}, no vCPU hot-plug")
    return int(text)


def _memory(limit: int) -> int:
    if limit == 0:
        return DEFAULT_MEMORY_BYTES
    if limit < MIN_MEMORY_BYTES:
        raise errors.InvalidArgument(
            f"resources.limits.memory: {limit} bytes is too little for a VM; set at least 32Mi "
            f"({MIN_MEMORY_BYTES} bytes), or leave it unset for the default 1Gi")
    return limit


def _choice(annotations: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = annotations.get(name)
    if value is None:
        return default
    if value.strip() not in allowed:
        raise errors.InvalidArgument(
            f"annotation {name}: {value!r} is not allowed; expected one of {', '.join(allowed)} "
            f"(default {default})")
    return value.strip()


def _system_uuid(value: str | None, pod_uid: str) -> str:
    if value is None:
        if not pod_uid:
            raise errors.InvalidArgument(
                f"the pod has no uid to derive the VM's system UUID from; set annotation {SYSTEM_UUID} "
                f"or metadata.uid")
        return str(uuid.uuid5(SYSTEM_UUID_NAMESPACE, pod_uid))
    parsed = None
    if _UUID.fullmatch(value.strip()):  # uuid.UUID alone would take Unicode digits and "urn:uuid:"
        parsed = uuid.UUID(value.strip())
    if parsed is None or parsed.int == 0:
        raise errors.InvalidArgument(
            f"annotation {SYSTEM_UUID}: {value!r} is not allowed; expected a non-nil UUID such as "
            f"123e4567-e89b-12d3-a456-426614174000 (default: derived from the pod uid)")
    return str(parsed)


def _root_volume_size(value: str | None, maximum: int) -> int | None:
    if value is None:
        return None
    try:
        return quantity.parse_bytes(value, maximum)
    except ValueError as exc:
        raise errors.InvalidArgument(
            f"annotation {ROOT_VOLUME_SIZE}: {exc}; expected a positive size such as 4Gi, at most "
            f"{quantity.format_bytes(maximum)} on this node (its max_root_volume_size)") from None


def _cpu_model(value: str | None) -> str | None:
    if value is None or value.strip() == "":
        return None
    if value.strip() not in CPU_MODELS:
        raise errors.InvalidArgument(
            f"annotation {CPU_MODEL}: {value!r} is not allowed; expected one of {', '.join(CPU_MODELS)} "
            f"(or no annotation for QEMU's default CPU model)")
    return value.strip()


def _cpu_resources(cpu: CpuResources, host_cpus: int) -> dict[str, Any]:
    out: dict[str, Any] = {"cpu_shares": None, "cpu_quota": None, "cpu_period": None, "cpuset": ""}
    if cpu.shares:
        _check_range("linux.resources.cpu_shares", cpu.shares, MIN_CPU_SHARES, MAX_CPU_SHARES)
        out["cpu_shares"] = cpu.shares
    if cpu.quota not in (0, -1):
        _check_range("linux.resources.cpu_quota", cpu.quota, MIN_CPU_QUOTA, MAX_CPU_QUOTA)
        out["cpu_quota"] = cpu.quota
    if cpu.period:
        _check_range("linux.resources.cpu_period", cpu.period, MIN_CPU_PERIOD, MAX_CPU_PERIOD)
        out["cpu_period"] = cpu.period
    if cpu.cpuset.strip():
        out["cpuset"] = parse_cpu_list(cpu.cpuset, host_cpus)
    return out


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise errors.InvalidArgument(
            f"{name}: {value} is not allowed; expected {low}..{high} (or 0 for unset)")


def parse_cpu_list(text: str, host_cpus: int) -> str:
    """Validate a cpuset list (``0-3,6``) against the host's CPU count; returns it without spaces."""
    if len(text) > 4096:
        raise errors.InvalidArgument(
            f"linux.resources.cpuset_cpus: a list of {len(text)} characters is too long (at most 4096)")
    items = [part.strip() for part in text.split(",")]
    for part in items:
        match = _CPU_LIST_ITEM.fullmatch(part)
        low, high = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (1, 0)
        if not match or low > high or high >= host_cpus:
            raise errors.InvalidArgument(
                f"linux.resources.cpuset_cpus: {text!r} is not allowed; expected a list of CPU numbers or "
                f"ranges from 0 to {host_cpus - 1} such as 0-1,3")
    return ",".join(items)


def cpu_set(normalised: str) -> frozenset[int]:
    """The CPU numbers of a list ``parse_cpu_list`` accepted."""
    cpus: set[int] = set()
    for part in normalised.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return frozenset(cpus)
