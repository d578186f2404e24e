"""VM annotations and CRI resources -> VmOptions: defaults, accepted forms, and every refusal."""

from __future__ import annotations

import uuid

import pytest

from virtlet import errors
from virtlet.vm import annotations as ann
from virtlet.vm.annotations import CpuResources, check_annotation_sizes, parse_vm_options

POD_UID = "0b9c3f5e-1111-4222-8333-944455556666"
GiB = 1024**3
MiB = 1024**2


def opts(annotations: dict[str, str] | None = None, memory: int = 0, cpu: CpuResources | None = None,
         host_cpus: int = 4, pod_uid: str = POD_UID, max_root: int = 2**40) -> ann.VmOptions:
    return parse_vm_options(annotations or {}, memory, cpu or CpuResources(), pod_uid, host_cpus, max_root)


def test_defaults() -> None:
    o = opts()
    assert o.vcpus == 1
    assert o.memory_bytes == GiB
    assert o.disk_driver == "virtio"
    assert o.root_volume_size is None
    assert o.cpu_model is None
    assert (o.cpu_shares, o.cpu_quota, o.cpu_period, o.cpuset) == (None, None, None, "")
    assert o.system_uuid == str(uuid.uuid5(ann.SYSTEM_UUID_NAMESPACE, POD_UID))


def test_derived_uuid_is_stable_per_pod() -> None:
    assert opts().system_uuid == opts().system_uuid
    assert opts().system_uuid != opts(pod_uid="another-pod").system_uuid


def test_all_annotations() -> None:
    o = opts({"VirtletVCPUCount": "4", "VirtletRootVolumeSize": "4Gi", "VirtletDiskDriver": "scsi",
              "VirtletSystemUUID": "{123E4567-E89B-12D3-A456-426614174000}", "VirtletCPUModel": "host-model"},
             memory=512 * MiB, cpu=CpuResources(shares=512, quota=50000, period=100000, cpuset="0-1, 3"))
    assert o == ann.VmOptions(vcpus=4, memory_bytes=512 * MiB, disk_driver="scsi",
                              system_uuid="123e4567-e89b-12d3-a456-426614174000", root_volume_size=4 * GiB,
                              cpu_model="host-model", cpu_shares=512, cpu_quota=50000, cpu_period=100000,
                              cpuset="0-1,3", max_vcpus=4)  # no VirtletMaxVCPUs: no room to grow


def test_unknown_virtlet_annotations_are_ignored() -> None:
    o = opts({"VirtletCloudInitUserData": "#cloud-config\n", "VirtletSSHKeys": "ssh-ed25519 AAAA",
              "VirtletSomethingNew": "x", "kubernetes.io/target-runtime": "virtlet.cloud"})
    assert o == opts()


def test_unset_cri_cpu_values() -> None:
    o = opts(cpu=CpuResources(shares=0, quota=-1, period=0, cpuset="  "))
    assert (o.cpu_shares, o.cpu_quota, o.cpu_period, o.cpuset) == (None, None, None, "")


def test_cpu_resources_from_cri() -> None:
    from virtlet.cri.gen import api_pb2

    res = api_pb2.LinuxContainerResources(cpu_shares=256, cpu_quota=20000, cpu_period=100000, cpuset_cpus="1")
    assert CpuResources.from_cri(res) == CpuResources(256, 20000, 100000, "1")
    assert CpuResources.from_cri(None) == CpuResources()


BAD = [
    # (annotations, memory, cpu, fragments the message must contain)
    ({"VirtletVCPUCount": "0"}, 0, None, ["VirtletVCPUCount", "'0'", "1 to 4"]),
    ({"VirtletVCPUCount": "1000"}, 0, None, ["VirtletVCPUCount", "'1000'", "1 to 4"]),
    ({"VirtletVCPUCount": "two"}, 0, None, ["VirtletVCPUCount", "'two'", "whole number"]),
    ({"VirtletVCPUCount": "-1"}, 0, None, ["VirtletVCPUCount", "'-1'"]),
    ({"VirtletVCPUCount": "1.5"}, 0, None, ["VirtletVCPUCount", "'1.5'"]),
    ({"VirtletRootVolumeSize": "lots"}, 0, None, ["VirtletRootVolumeSize", "'lots'", "4Gi"]),
    ({"VirtletRootVolumeSize": "0"}, 0, None, ["VirtletRootVolumeSize", "'0'", "positive"]),
    ({"VirtletRootVolumeSize": "-4Gi"}, 0, None, ["VirtletRootVolumeSize", "'-4Gi'"]),
    # the review's findings: a huge exponent (was 20 s of CPU), one that overflowed later, no upper bound
    ({"VirtletRootVolumeSize": "1e99999999"}, 0, None, ["VirtletRootVolumeSize", "exponent", "1Ti"]),
    ({"VirtletRootVolumeSize": "1e5000"}, 0, None, ["VirtletRootVolumeSize", "exponent"]),
    ({"VirtletRootVolumeSize": "8Ei"}, 0, None, ["VirtletRootVolumeSize", "largest allowed, 1Ti",
                                                 "max_root_volume_size"]),
    ({"VirtletRootVolumeSize": "1Ti1"}, 0, None, ["VirtletRootVolumeSize"]),
    ({"VirtletRootVolumeSize": "4Gi" + " " * 300}, 0, None, ["VirtletRootVolumeSize", "too long"]),
    # Unicode digits pass str.isdigit() and int(); only ASCII digits are numbers here
    ({"VirtletVCPUCount": "\u00b2"}, 0, None, ["VirtletVCPUCount", "whole number"]),
    ({"VirtletVCPUCount": "\u0663"}, 0, None, ["VirtletVCPUCount", "whole number"]),
    ({"VirtletVCPUCount": "1" * 5000}, 0, None, ["VirtletVCPUCount", "too long"]),
    ({"VirtletVCPUCount": "0" * 200 + "1"}, 0, None, ["VirtletVCPUCount"]),
    ({"VirtletVCPUCount": "2\n3"}, 0, None, ["VirtletVCPUCount"]),
    ({"VirtletRootVolumeSize": "\u00b2Gi"}, 0, None, ["VirtletRootVolumeSize"]),
    ({"VirtletSystemUUID": "\u0663" * 32}, 0, None, ["VirtletSystemUUID", "UUID"]),
    ({"VirtletSystemUUID": "urn:uuid:123e4567-e89b-12d3-a456-426614174000"}, 0, None, ["VirtletSystemUUID"]),
    ({"VirtletDiskDriver": "ide"}, 0, None, ["VirtletDiskDriver", "'ide'", "virtio, scsi"]),
    ({"VirtletSystemUUID": "not-a-uuid"}, 0, None, ["VirtletSystemUUID", "'not-a-uuid'", "UUID"]),
    ({"VirtletSystemUUID": str(uuid.UUID(int=0))}, 0, None, ["VirtletSystemUUID", "non-nil"]),
    ({"VirtletCPUModel": "host-passthrough"}, 0, None,
     ["VirtletCPUModel", "'host-passthrough'", "host-model"]),
    ({"VirtletLibvirtCPUSetting": "mode: host-model"}, 0, None,
     ["VirtletLibvirtCPUSetting", "not supported"]),
    ({}, 32 * MiB - 1, None, ["resources.limits.memory", "32Mi"]),
    ({}, 1, None, ["resources.limits.memory", "1 bytes"]),
    ({}, 0, CpuResources(shares=1), ["cpu_shares", "2..262144"]),
    ({}, 0, CpuResources(quota=999), ["cpu_quota", "999"]),
    ({}, 0, CpuResources(period=10**7), ["cpu_period", "1000..1000000"]),
    ({}, 0, CpuResources(cpuset="0-4"), ["cpuset_cpus", "'0-4'", "0 to 3"]),
    ({}, 0, CpuResources(cpuset="3-1"), ["cpuset_cpus", "'3-1'"]),
    ({}, 0, CpuResources(cpuset="a"), ["cpuset_cpus", "'a'"]),
    ({}, 0, CpuResources(cpuset="0,,1"), ["cpuset_cpus"]),
    ({}, 0, CpuResources(cpuset="\u00b9"), ["cpuset_cpus"]),
    ({}, 0, CpuResources(cpuset="0," * 5000), ["cpuset_cpus", "too long"]),
]


@pytest.mark.parametrize(("annotations", "memory", "cpu", "fragments"), BAD)
def test_refusals_name_the_annotation_and_allowed_values(
        annotations: dict[str, str], memory: int, cpu: CpuResources | None, fragments: list[str]) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        opts(annotations, memory=memory, cpu=cpu)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_vcpu_bound_is_the_host() -> None:
    assert opts({"VirtletVCPUCount": "2"}, host_cpus=2).vcpus == 2
    with pytest.raises(errors.InvalidArgument, match="1 to 2"):
        opts({"VirtletVCPUCount": "3"}, host_cpus=2)


def test_minimum_memory_is_accepted() -> None:
    assert opts(memory=32 * MiB).memory_bytes == 32 * MiB


def test_missing_pod_uid_without_annotation() -> None:
    with pytest.raises(errors.InvalidArgument, match="VirtletSystemUUID"):
        opts(pod_uid="")
    assert opts({"VirtletSystemUUID": "123e4567-e89b-12d3-a456-426614174000"}, pod_uid="").system_uuid


def test_root_volume_size_bound_is_the_node_setting() -> None:
    assert opts({"VirtletRootVolumeSize": "1Ti"}).root_volume_size == 2**40
    assert opts({"VirtletRootVolumeSize": "1.5Gi"}).root_volume_size == 3 * GiB // 2
    assert opts({"VirtletRootVolumeSize": "2Gi"}, max_root=2 * GiB).root_volume_size == 2 * GiB
    with pytest.raises(errors.InvalidArgument, match="at most 2Gi on this node"):
        opts({"VirtletRootVolumeSize": "2049Mi"}, max_root=2 * GiB)


def test_annotations_size_is_bounded_like_kubernetes() -> None:
    check_annotation_sizes({"a": "x" * (256 * 1024 - 1)}, "pod")
    with pytest.raises(errors.InvalidArgument, match=r"pod's annotations are 262145 bytes.*256 KiB"):
        check_annotation_sizes({"a": "x" * (256 * 1024)}, "pod")
    # bytes, as Kubernetes counts them, not characters
    with pytest.raises(errors.InvalidArgument, match="container's annotations"):
        check_annotation_sizes({"a": "\u00e9" * (128 * 1024)}, "container")
