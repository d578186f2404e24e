"""CNI config discovery, result parsing and the runner's exec protocol (with small recording plugins)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from virtlet import errors
from virtlet.network.cni import CniConfigStore, CniResult, CniRunner, NetworkConfig
from virtlet.network.model import SandboxNetSpec

RESULT_100 = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "cni0", "mac": "aa:aa:aa:aa:aa:aa"},
                   {"name": "veth1234", "mac": "bb:bb:bb:bb:bb:bb"},
                   {"name": "eth0", "mac": "0a:58:0a:58:00:05", "sandbox": "/var/run/netns/x"}],
    "ips": [{"interface": 2, "address": "10.88.0.5/24", "gateway": "10.88.0.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {"nameservers": ["10.88.0.53"]},
}


def _spec() -> SandboxNetSpec:
    return SandboxNetSpec(sandbox_id="f" * 32, netns_path="/var/run/netns/" + "f" * 32, pod_name="web-0",
                          pod_namespace="default", pod_uid="uid-1", hostname="web-0",
                          port_mappings=[{"container_port": 22, "host_port": 2222},
                                         {"protocol": "UDP", "container_port": 53, "host_port": 5353,
                                          "host_ip": "127.0.0.1"},
                                         {"container_port": 80}],
                          dns={"servers": ["10.96.0.10"], "searches": ["svc.cluster.local"],
                               "options": ["ndots:5"]})


# -- discovery ----------------------------------------------------------------------------------------
def test_first_valid_config_by_sorted_name(tmp_path: Path) -> None:
    (tmp_path / "05-broken.conflist").write_text("{not json")
    (tmp_path / "07-noversion.conflist").write_text(json.dumps({"cniVersion": "0.2.0", "name": "old",
                                                                 "plugins": [{"type": "bridge"}]}))
    (tmp_path / "10-b.conf").write_text(json.dumps({"cniVersion": "0.4.0", "name": "b", "type": "bridge",
                                                    "bridge": "cni0"}))
    (tmp_path / "20-a.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "a",
                                                        "plugins": [{"type": "ptp"}]}))
    (tmp_path / "00-ignored.txt").write_text("{}")
    net = CniConfigStore(tmp_path).load()
    assert net.name == "b" and net.cni_version == "0.4.0"
    assert net.plugins == [{"type": "bridge", "bridge": "cni0"}]  # a .conf becomes a list of one


@pytest.mark.parametrize("raw, why", [
    ({"cniVersion": "1.0.0", "plugins": [{"type": "x"}]}, "'name'"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": []}, "non-empty"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": [{"bridge": "x"}]}, "no 'type'"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../evil"}]}, "bare name"),
    ({"cniVersion": "9.9.9", "name": "n", "type": "bridge"}, "not supported"),
    ({"cniVersion": "1.0.0", "name": "n"}, "neither"),
])
def test_invalid_configs_say_why(raw: dict, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        NetworkConfig.from_dict(raw, "x.conflist")


def test_no_config_is_failed_precondition_and_not_ready(tmp_path: Path) -> None:
    store = CniConfigStore(tmp_path / "missing")
    with pytest.raises(errors.FailedPrecondition, match="no valid CNI network config"):
        store.load()
    ok, reason = store.status()
    assert not ok and "missing" in reason


def test_status_reports_missing_plugin(tmp_path: Path) -> None:
    (tmp_path / "10.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "n",
                                                      "plugins": [{"type": "nope-plugin"}]}))
    ok, reason = CniConfigStore(tmp_path, [tmp_path / "bin"]).status()
    assert not ok and "nope-plugin" in reason


# -- results ------------------------------------------------------------------------------------------
def test_parse_result_100() -> None:
    res = CniResult.parse(RESULT_100)
    assert [i for i, _ in res.sandbox_interfaces()] == [2]
    assert res.ips_of(2)[0]["address"] == "10.88.0.5/24"
    assert res.dns["nameservers"] == ["10.88.0.53"]


def test_loopback_is_not_a_sandbox_interface() -> None:
    res = CniResult.parse({"cniVersion": "1.0.0", "interfaces": [{"name": "lo", "sandbox": "/var/run/netns/x"}],
                               "ips": [{"address": "127.0.0.1/8", "interface": 0}]})
    assert res.sandbox_interfaces() == []


def test_parse_result_040_with_ip_versions() -> None:
    raw = dict(RESULT_100, cniVersion="0.4.0",
               ips=[{"version": "4", "interface": 2, "address": "10.88.0.5/24", "gateway": "10.88.0.1"}])
    res = CniResult.parse(raw)
    assert res.cni_version == "0.4.0" and res.ips_of(2)[0]["gateway"] == "10.88.0.1"


@pytest.mark.parametrize("raw", [[], {"cniVersion": "0.2.0", "ip4": {}}, {"cniVersion": "1.0.0", "ips": [{}]},
                                 {"cniVersion": "1.0.0", "interfaces": "eth0"}])
def test_bad_results_are_rejected(raw) -> None:
    with pytest.raises(ValueError):
        CniResult.parse(raw)


# -- runner -------------------------------------------------------------------------------------------
def _plugin(bin_dir: Path, name: str, log: Path, add_output: str = "", fail_add: str = "") -> None:
    """A plugin that appends {command, env, stdin} to ``log`` and prints ``add_output`` on ADD."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    fail = f"echo '{fail_add}'; exit 1" if fail_add else ""
    script.write_text(f"""#!/bin/sh
conf=$(cat)
printf '%s\\n' "{{\\"plugin\\": \\"{name}\\", \\"cmd\\": \\"$CNI_COMMAND\\", \\"args\\": \\"$CNI_ARGS\\", \
\\"netns\\": \\"$CNI_NETNS\\", \\"ifname\\": \\"$CNI_IFNAME\\", \\"conf\\": $conf}}" >> {log}
if [ "$CNI_COMMAND" = ADD ]; then
  {fail}
  echo '{add_output}'
fi
exit 0
""")
    script.chmod(0o755)


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _setup(tmp_path: Path, plugins: list[dict], fail_add: str = "") -> tuple[CniRunner, Path]:
    conf, bin_dir, log = tmp_path / "conf", tmp_path / "bin", tmp_path / "calls.log"
    conf.mkdir()
    (conf / "10.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "testnet",
                                                  "plugins": plugins}))
    _plugin(bin_dir, "first", log, json.dumps(RESULT_100))
    second = dict(RESULT_100, dns={"nameservers": ["10.88.0.54"]})
    _plugin(bin_dir, "second", log, json.dumps(second), fail_add=fail_add)
    store = CniConfigStore(conf, [tmp_path / "empty", bin_dir])
    return CniRunner(store, tmp_path / "cache", loopback=False), log


def test_add_chains_plugins_and_passes_pod_identity_and_capabilities(tmp_path: Path) -> None:
    runner, log = _setup(tmp_path, [{"type": "first"},
                                    {"type": "second", "capabilities": {"portMappings": True, "dns": True}}])
    result = runner.add(_spec())
    assert result.dns == {"nameservers": ["10.88.0.54"]}  # the last plugin's result wins
    first, second = _calls(log)
    assert first["cmd"] == "ADD" and first["ifname"] == "eth0" and first["netns"].endswith("f" * 32)
    assert first["args"].split(";") == ["IgnoreUnknown=1", "K8S_POD_NAMESPACE=default", "K8S_POD_NAME=web-0",
                                        f"K8S_POD_INFRA_CONTAINER_ID={'f' * 32}", "K8S_POD_UID=uid-1"]
    assert first["conf"]["name"] == "testnet" and first["conf"]["cniVersion"] == "1.0.0"
    assert "prevResult" not in first["conf"] and "runtimeConfig" not in first["conf"]
    assert second["conf"]["prevResult"] == RESULT_100
    assert second["conf"]["runtimeConfig"] == {
        "portMappings": [{"hostPort": 2222, "containerPort": 22, "protocol": "tcp"},
                         {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"}],
        "dns": {"servers": ["10.96.0.10"], "searches": ["svc.cluster.local"], "options": ["ndots:5"]}}
    assert runner.cached_result("f" * 32) is not None


def test_delete_runs_in_reverse_with_cached_config_and_is_idempotent(tmp_path: Path) -> None:
    runner, log = _setup(tmp_path, [{"type": "first"}, {"type": "second"}])
    runner.add(_spec())
    # the conf dir changes after ADD: DEL must still use the network the pod got
    for f in (tmp_path / "conf").iterdir():
        f.unlink()
    log.unlink()
    runner.delete(_spec())
    calls = _calls(log)
    assert [(c["plugin"], c["cmd"]) for c in calls] == [("second", "DEL"), ("first", "DEL")]
    assert calls[0]["conf"]["prevResult"]["dns"] == {"nameservers": ["10.88.0.54"]}
    log.unlink()
    runner.delete(_spec())
    assert _calls(log) == []


def test_failed_add_runs_del_and_carries_the_plugin_message(tmp_path: Path) -> None:
    err = json.dumps({"cniVersion": "1.0.0", "code": 7, "msg": "no more addresses", "details": "pool empty"})
    runner, log = _setup(tmp_path, [{"type": "first"}, {"type": "second"}], fail_add=err)
    with pytest.raises(errors.Internal, match="no more addresses: pool empty"):
        runner.add(_spec())
    assert [(c["plugin"], c["cmd"]) for c in _calls(log)] == [
        ("first", "ADD"), ("second", "ADD"), ("second", "DEL"), ("first", "DEL")]
    assert not (tmp_path / "cache" / f"{'f' * 32}.json").exists()


def test_missing_plugin_fails_before_anything_runs(tmp_path: Path) -> None:
    runner, log = _setup(tmp_path, [{"type": "first"}, {"type": "absent-plugin"}])
    with pytest.raises(errors.FailedPrecondition, match="absent-plugin"):
        runner.add(_spec())
    assert _calls(log) == []


def test_delete_passes_the_capability_args_of_the_add(tmp_path: Path) -> None:
    """portmap removes its rules only when DEL names the port mappings again; the teardown (also the one after a
    crash) knows nothing of the request, so the args come from the cache written before ADD."""
    runner, log = _setup(tmp_path, [{"type": "first", "capabilities": {"bandwidth": True, "ips": True}},
                                    {"type": "second", "capabilities": {"portMappings": True, "mac": True}}])
    caps = {"bandwidth": {"ingressRate": 1000000, "ingressBurst": 2**32 - 1}, "ips": ["10.1.2.3/24"],
            "mac": "02:00:00:00:00:05"}
    spec = SandboxNetSpec(**{**_spec().__dict__, "annotation_caps": caps})
    runner.add(spec)
    add_first, add_second = _calls(log)
    assert add_first["conf"]["runtimeConfig"] == {"bandwidth": caps["bandwidth"], "ips": caps["ips"]}
    assert add_second["conf"]["runtimeConfig"]["mac"] == caps["mac"]
    log.unlink()
    bare = SandboxNetSpec(sandbox_id="f" * 32, netns_path=_spec().netns_path, pod_name="web-0",
                          pod_namespace="default", pod_uid="uid-1")  # what a teardown has
    runner.delete(bare)
    del_second, del_first = _calls(log)
    assert del_second["cmd"] == "DEL" and del_second["conf"]["runtimeConfig"] == add_second["conf"]["runtimeConfig"]
    assert del_first["conf"]["runtimeConfig"] == add_first["conf"]["runtimeConfig"]


def test_delete_of_a_cache_without_capability_args_uses_the_callers(tmp_path: Path) -> None:
    runner, log = _setup(tmp_path, [{"type": "second", "capabilities": {"portMappings": True}}])
    runner.add(_spec())
    cache = tmp_path / "cache" / f"{'f' * 32}.json"
    old = json.loads(cache.read_text())
    del old["capabilityArgs"]  # written by an older virtletd
    cache.write_text(json.dumps(old))
    log.unlink()
    runner.delete(_spec())
    assert _calls(log)[0]["conf"]["runtimeConfig"]["portMappings"][0]["hostPort"] == 2222
