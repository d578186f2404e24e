"""virtlet.volumes: CRI mounts -> a validated plan -> share devices and the guest's mount instructions."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtlet import errors
from virtlet.vm import designer
from virtlet.vm import domain_xml as dx
from virtlet.volumes import mounts as vm
from virtlet.volumes import shares


def _dir(tmp: Path, name: str) -> str:
    (tmp / name).mkdir(parents=True, exist_ok=True)
    return str(tmp / name)


def test_tags_are_stable_unique_and_short() -> None:
    a, b = vm.share_tag("/etc/config"), vm.share_tag("/srv/config")
    assert a == vm.share_tag("/etc/config") and a != b
    assert a.startswith("vl:") and len(a) <= 36 and "config" not in a


def test_plan_sorts_directories_and_files(tmp_path: Path) -> None:
    hosts = tmp_path / "etc-hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    term = tmp_path / "containers" / "vm" / "abc"
    term.parent.mkdir(parents=True)
    term.write_text("")
    plan = vm.plan_mounts([vm.CriMount("/data/", _dir(tmp_path, "d")),
                           vm.CriMount("/ro", _dir(tmp_path, "r"), readonly=True),
                           vm.CriMount("/etc/hosts", str(hosts)),
                           vm.CriMount("/dev/termination-log", str(term))])
    assert [(s.guest_path, s.readonly) for s in plan.shares] == [("/data", False), ("/ro", True)]
    assert [(f.guest_path, f.kind) for f in plan.files] == [("/etc/hosts", "hosts"),
                                                             ("/dev/termination-log", "termination-log")]


@pytest.mark.parametrize(("path", "word"), [
    ("", "1..4096"), ("data", "absolute"), ("/a/../b", ".."), ("/a b", "whitespace"), ("/a\nb", "whitespace"),
    ("/a\\b", "backslash"), ("/" + "x" * 5000, "4096"),
])
def test_bad_container_paths(tmp_path: Path, path: str, word: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=word if word != ".." else r"\.\."):
        vm.plan_mounts([vm.CriMount(path, _dir(tmp_path, "d"))])


def test_bad_host_paths_and_bounds(tmp_path: Path) -> None:
    d = _dir(tmp_path, "d")
    with pytest.raises(errors.InvalidArgument, match="'/x'.*does not exist"):
        vm.plan_mounts([vm.CriMount("/x", str(tmp_path / "nope"))])
    with pytest.raises(errors.InvalidArgument, match="two mounts"):
        vm.plan_mounts([vm.CriMount("/x", d), vm.CriMount("/x/.", d)])
    with pytest.raises(errors.InvalidArgument, match="absolute"):
        vm.plan_mounts([vm.CriMount("/x", "relative/dir")])
    with pytest.raises(errors.InvalidArgument, match="guest needs this path"):
        vm.plan_mounts([vm.CriMount("/proc", d)])
    with pytest.raises(errors.InvalidArgument, match="neither"):
        vm.plan_mounts([vm.CriMount("/x", "/dev/null")])
    with pytest.raises(errors.InvalidArgument, match="17 directory volumes"):
        vm.plan_mounts([vm.CriMount(f"/v{i}", d) for i in range(17)])
    with pytest.raises(errors.InvalidArgument, match="65 mounts"):
        vm.plan_mounts([vm.CriMount(f"/v{i}", d) for i in range(65)])
    big = tmp_path / "big"
    big.write_bytes(b"x" * (vm.MAX_FILE_BYTES + 1))
    with pytest.raises(errors.InvalidArgument, match="'/big'.*at most"):
        vm.plan_mounts([vm.CriMount("/big", str(big))])


def test_mounts_file_and_cloud_config(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"\x00bin")
    plan = vm.plan_mounts([vm.CriMount("/data", _dir(tmp_path, "d")),
                           vm.CriMount("/etc/cfg", _dir(tmp_path, "c"), readonly=True),
                           vm.CriMount("/etc/hosts", str(f))])
    guest = shares.guest_shares(plan, "virtiofs")
    tag_d, tag_c = vm.share_tag("/data"), vm.share_tag("/etc/cfg")
    assert shares.mounts_file(guest).decode().splitlines() == [
        f"share {tag_d} virtiofs defaults,nofail /data", f"share {tag_c} virtiofs defaults,ro,nofail /etc/cfg"]
    data = shares.cloud_config(guest, shares.read_file_copies(plan))
    assert data["mounts"][1] == [tag_c, "/etc/cfg", "virtiofs", "defaults,ro,nofail", "0", "0"]
    assert data["write_files"] == [{"path": "/etc/hosts", "encoding": "b64", "owner": "root:root",
                                    "permissions": "0644", "content": "AGJpbg=="}]
    assert data["manage_etc_hosts"] is False
    ninep = shares.guest_shares(plan, "9p")[0]
    assert ninep.options == shares.NINEP_OPTIONS + ",nofail"


def test_devices_and_domain_xml(tmp_path: Path) -> None:
    plan = vm.plan_mounts([vm.CriMount("/data", _dir(tmp_path, "d")),
                           vm.CriMount("/ro", _dir(tmp_path, "r"), readonly=True)])
    assert [shares.needs_ro_bind(s, "virtiofs") for s in plan.shares] == [False, True]
    assert not shares.needs_ro_bind(plan.shares[1], "9p")
    devs = shares.filesystem_devices(plan, "virtiofs", "/usr/lib/qemu/virtiofsd",
                                     {plan.shares[1].tag: "/bind/ro"})
    assert [(d.source, d.driver, d.readonly) for d in devs] == [
        (str(tmp_path / "d"), "virtiofs", False), ("/bind/ro", "virtiofs", False)]
    ninep = shares.filesystem_devices(plan, "9p", "/nope")
    assert [(d.driver, d.readonly) for d in ninep] == [("path", False), ("path", True)]
    for fs in [*devs, *ninep]:
        assert dx.Filesystem.from_xml(fs.to_xml()) == fs
    dom = dx.Domain(name="d", uuid="00000000-0000-0000-0000-000000000001", memory_bytes=2**27, vcpus=1,
                    devices=dx.Devices(emulator="/q", filesystems=devs), memory_backing=dx.MemoryBacking())
    back = dx.from_string(dx.to_string(dom))
    assert back.devices.filesystems == devs and back.memory_backing == dx.MemoryBacking("memfd", "shared")
    xml = dx.to_string(dom)
    assert "<binary path=\"/usr/lib/qemu/virtiofsd\" />" in xml and "<target dir=\"vl:" in xml


def test_designer_adds_memory_backing_only_for_virtiofs() -> None:
    fs = dx.Filesystem(source="/s", target="vl:x", driver="path")
    req = _request((fs,))
    assert designer.design_domain(req).memory_backing is None
    req = _request((dx.Filesystem(source="/s", target="vl:x"),))
    assert designer.design_domain(req).memory_backing == dx.MemoryBacking("memfd", "shared")


def test_pick_driver(tmp_path: Path) -> None:
    assert shares.pick_driver("virtiofs", str(tmp_path / "missing")) == "9p"
    assert shares.pick_driver("9p", "/bin/true") == "9p"
    assert shares.pick_driver("virtiofs", "/bin/true") == "virtiofs"


def _request(fss: tuple[dx.Filesystem, ...]) -> designer.DomainRequest:
    from virtlet.vm.annotations import CpuResources, parse_vm_options

    opts = parse_vm_options({}, 0, CpuResources(), "uid-1", 2, 2**40)
    return designer.DomainRequest(container_id="c", sandbox_id="s", pod_name="p", pod_namespace="n", pod_uid="u",
                                  options=opts, domain_type="qemu", overlay=Path("/o"), console_socket=Path("/c"),
                                  console_log=Path("/l"), emulator="/q", shares=fss)
