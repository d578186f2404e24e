"""The k8s.v1.cni.cncf.io/networks annotation (both Multus forms, hostile values) and the extra networks' CNI runs
(resolution, ADD with its own ifname and capability args, DEL in reverse from the cache, undo on failure) with
small recording plugins."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tests.unit.test_cni import _calls, _plugin, _spec
from virtlet import errors
from virtlet.network import attachments
from virtlet.network.attachments import ANNOTATION, Attachment
from virtlet.network.extra_networks import ExtraNetworks


def _parse(text: str) -> list[Attachment]:
    return attachments.parse({ANNOTATION: text})


def test_comma_form() -> None:
    assert _parse(" a, team/b@stor0 ,c.d") == [
        Attachment("a", "", "net1"), Attachment("b", "team", "stor0"), Attachment("c.d", "", "net3")]
    assert attachments.parse({}) == [] and _parse("  ") == []


def test_json_form() -> None:
    got = _parse(json.dumps([{"name": "a", "interface": "x1", "mac": "02:AA:bb:cc:dd:ee", "ips": ["10.1.2.3/24"]},
                             {"name": "b", "namespace": "team"}]))
    assert got == [Attachment("a", "", "x1", "02:aa:bb:cc:dd:ee", ("10.1.2.3/24",)),
                   Attachment("b", "team", "net2")]


@pytest.mark.parametrize("text, why", [
    ("A", "not a Kubernetes object name"),
    ("a,", "not a Kubernetes object name"),
    ("a@", "not an interface name"),
    ("a@eth0", "reserved"), ("a@lo", "reserved"), ("a@vmbr1", "reserved"), ("a@vtx", "reserved"),
    ("a@name-longer-than-15", "not an interface name"),
    ("a@x.1", "not an interface name"),
    ("a@x,b@x", "named twice"),
    ("Bad_NS/a", "not a Kubernetes namespace name"),
    (",".join("n" for _ in range(9)), "at most 8"),
    ("a" * 4097, "at most 4096"),
    ("[{", "not valid JSON"),
    ('{"name": "a"}', "not a Kubernetes object name"),
    ('[{"name": "a"}, 3]', "must be an object"),
    ('[{"interface": "x"}]', '"name" is missing'),
    ('[{"name": "a", "default-route": ["10.0.0.1"]}]', "default-route are not supported"),
    ('[{"name": "a", "mac": "01:00:00:00:00:01"}]', "multicast"),
    ('[{"name": "a", "mac": "zz"}]', "not a MAC address"),
    ('[{"name": "a", "ips": "10.0.0.1"}]', "must be a list"),
    ('[{"name": "a", "ips": ["10.0.0.1", "10.0.0.2"]}]', "more than one IPv4"),
    ('[{"name": "a", "ips": ["127.0.0.1"]}]', "not a usable address"),
    ('[{"name": 5}]', "not a Kubernetes object name"),
])
def test_hostile_values_are_invalid_argument(text: str, why: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=why) as exc:
        _parse(text)
    assert ANNOTATION in str(exc.value)
    assert len(str(exc.value)) < 600  # an echo of a huge value stays short


def test_other_namespace_is_refused() -> None:
    a = _parse("team/a")[0]
    assert attachments.resolve_namespace(a, "team") == "team"
    with pytest.raises(errors.InvalidArgument, match="its own namespace"):
        attachments.resolve_namespace(a, "default")


# -- the CNI runs --------------------------------------------------------------------------------------------
def _result(ifname: str, ip: str) -> str:
    return json.dumps({"cniVersion": "1.0.0", "interfaces": [{"name": ifname, "sandbox": "/x"}],
                       "ips": [{"interface": 0, "address": ip, "gateway": ip.rsplit(".", 1)[0] + ".1"}]})


def _extras(tmp_path: Path, fail_b: bool = False) -> tuple[ExtraNetworks, Path]:
    conf, bin_dir, log = tmp_path / "conf", tmp_path / "bin", tmp_path / "calls.log"
    (conf / "default").mkdir(parents=True)
    (conf / "10-a.conf").write_text(json.dumps({"cniVersion": "1.0.0", "name": "net-a", "type": "pa",
                                                "capabilities": {"mac": True, "ips": True}}))
    (conf / "20-b.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "net-b",
                                                    "plugins": [{"type": "pb"}]}))
    (conf / "default" / "10-a.conf").write_text(json.dumps({"cniVersion": "1.0.0", "name": "net-a-ns",
                                                            "type": "pa"}))
    (conf / "30-bad.conf").write_text("{not json")
    _plugin(bin_dir, "pa", log, _result("net1", "10.1.0.5/24"))
    _plugin(bin_dir, "pb", log, _result("stor0", "10.2.0.5/24"), fail_add="boom" if fail_b else "")
    return ExtraNetworks(conf, [bin_dir], tmp_path / "cache"), log


def test_resolve_by_name_field_namespace_dir_first(tmp_path: Path) -> None:
    extras, _ = _extras(tmp_path)
    spec = replace(_spec(), extra_networks=_parse("net-a-ns, net-b, default/net-a"))
    assert [(a.name, n.name, Path(n.source).parent.name) for a, n in extras.resolve(spec)] == [
        ("net-a-ns", "net-a-ns", "default"), ("net-b", "net-b", "conf"), ("net-a", "net-a", "conf")]
    with pytest.raises(errors.InvalidArgument, match="'nope' not found"):
        extras.resolve(replace(spec, extra_networks=_parse("net-b, nope")))
    unconfigured = ExtraNetworks(None, [], tmp_path / "c2")
    with pytest.raises(errors.InvalidArgument, match="no extra network conf dir"):
        unconfigured.resolve(replace(spec, extra_networks=_parse("net-b")))


def test_add_own_ifname_and_caps_then_delete_in_reverse(tmp_path: Path) -> None:
    extras, log = _extras(tmp_path)
    spec = replace(_spec(), extra_networks=_parse(json.dumps([
        {"name": "net-a", "mac": "02:00:00:00:00:05", "ips": ["10.1.0.5/24"]},
        {"name": "net-b", "interface": "stor0"}])))
    added = extras.add(spec, extras.resolve(spec), ["eth0"], 16)
    assert [a.result.ips[0]["address"] for a in added] == ["10.1.0.5/24", "10.2.0.5/24"]
    calls = _calls(log)
    assert [(c["plugin"], c["cmd"], c["ifname"]) for c in calls] == [("pa", "ADD", "net1"), ("pb", "ADD", "stor0")]
    assert calls[0]["conf"]["runtimeConfig"] == {"mac": "02:00:00:00:00:05", "ips": ["10.1.0.5/24"]}
    assert "runtimeConfig" not in calls[1]["conf"]  # no port mappings or DNS of the pod network
    assert "K8S_POD_NAME=web-0" in calls[0]["args"]
    # the DEL after a crash knows nothing but the sandbox id: the cache has the rest
    log.unlink()
    extras.delete(replace(spec, extra_networks=[]))
    assert [(c["plugin"], c["cmd"], c["ifname"]) for c in _calls(log)] == [
        ("pb", "DEL", "stor0"), ("pa", "DEL", "net1")]
    assert _calls(log)[1]["conf"]["runtimeConfig"] == {"mac": "02:00:00:00:00:05", "ips": ["10.1.0.5/24"]}
    assert list((tmp_path / "cache").iterdir()) == []
    log.unlink()
    extras.delete(spec)  # idempotent
    assert _calls(log) == []


def test_failed_add_dels_the_ones_done(tmp_path: Path) -> None:
    extras, log = _extras(tmp_path, fail_b=True)
    spec = replace(_spec(), extra_networks=_parse("net-a, net-b"))
    with pytest.raises(errors.VirtletError, match="boom"):
        extras.add(spec, extras.resolve(spec), ["eth0"], 16)
    assert [(c["plugin"], c["cmd"]) for c in _calls(log)] == [("pa", "ADD"), ("pb", "ADD"), ("pb", "DEL"),
                                                              ("pa", "DEL")]
    assert list((tmp_path / "cache").iterdir()) == []


def test_nic_limits_and_ifname_clash(tmp_path: Path) -> None:
    extras, log = _extras(tmp_path)
    spec = replace(_spec(), extra_networks=_parse("net-a, net-b"))
    with pytest.raises(errors.InvalidArgument, match="at most 16 interfaces"):
        extras.add(spec, extras.resolve(spec), [f"if{i}" for i in range(15)], 16)
    with pytest.raises(errors.InvalidArgument, match="'net1' is the pod network's"):
        extras.add(spec, extras.resolve(spec), ["eth0", "net1"], 16)
    assert _calls(log) == []
