"""Rendering rules beyond the golden files: merging, env quoting through a real shell, network plan."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.unit.test_cloudinit_cases import KEY_A, request
from virtlet import errors
from virtlet.cloudinit import NicConfig, render
from virtlet.cloudinit.userdata import environment_file, merge


def test_merge_rules() -> None:
    base = {"a": {"x": 1, "l": [1]}, "l": [1, 2], "s": "old", "t": [1]}
    extra = {"a": {"y": 2, "l": [2]}, "l": [3], "s": "new", "t": "scalar wins", "n": None}
    assert merge(base, extra) == {
        "a": {"x": 1, "l": [1, 2], "y": 2},
        "l": [1, 2, 3],
        "s": "new",
        "t": "scalar wins",
        "n": None,
    }
    assert base["l"] == [1, 2]  # inputs untouched


def test_users_keep_default_when_ssh_keys_given() -> None:
    ud = "users:\n- name: root\n"
    with_keys = yaml.safe_load(
        render(request({"VirtletSSHKeys": KEY_A, "VirtletCloudInitUserData": ud})).files["user-data"]
    )
    assert with_keys["users"] == ["default", {"name": "root"}]
    without = yaml.safe_load(render(request({"VirtletCloudInitUserData": ud})).files["user-data"])
    assert without["users"] == [{"name": "root"}]


def test_environment_file_round_trips_through_a_real_shell() -> None:
    env = [("A", "it's"), ("B", "$HOME `id` $(false)"), ("C", "two\nlines"), ("D", ""), ("E", '\\ " ;|&')]
    script = environment_file(env) + "".join(f'printf "%s\\0" "${name}"\n' for name, _ in env)
    out = subprocess.run(["/bin/sh", "-c", script], check=True, capture_output=True, timeout=30).stdout
    assert out.decode().split("\0")[:-1] == [value for _, value in env]


def test_bad_env_name_is_refused() -> None:
    with pytest.raises(errors.InvalidArgument, match="environment variable 'A-B'"):
        render(request(env=[("A-B", "1")]))


def test_empty_hostname_falls_back_to_pod_name() -> None:
    meta = yaml.safe_load(render(request(hostname="")).files["meta-data"])
    assert meta["local-hostname"] == "vm-1"


def test_meta_data_override() -> None:
    meta = yaml.safe_load(
        render(request({"VirtletCloudInitMetaData": "instance-id: fixed\nextra: [1]\n"})).files["meta-data"]
    )
    assert meta == {"instance-id": "fixed", "local-hostname": "vm-1", "extra": [1]}


@pytest.mark.parametrize(
    ("nic", "message"),
    [
        (NicConfig(mac="52:54:00:zz:00:01"), "MAC address"),
        (NicConfig(mac="52:54:00:aa:00:01", addresses=["10.0.0.300/24"]), "not an IP address with prefix"),
        (NicConfig(mac="52:54:00:aa:00:01", addresses=["10.0.0.3/24"], gateway="gw"), "gateway 'gw'"),
        (
            NicConfig(mac="52:54:00:aa:00:01", addresses=["10.0.0.3/24"], routes=[("x", "")]),
            "route destination",
        ),
        (NicConfig(mac="52:54:00:aa:00:01", mtu=20), "MTU 20"),
    ],
)
def test_bad_nic_config(nic: NicConfig, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        render(request(nics=[nic]))


def test_default_route_without_gateway_field() -> None:
    """A CNI result may give the default route only in ``routes``; it still becomes eth0's gateway."""
    nic = NicConfig(mac="52:54:00:aa:00:01", addresses=["10.0.0.3/24"], routes=[("0.0.0.0/0", "10.0.0.1")])
    net = yaml.safe_load(render(request(nics=[nic])).files["network-config"])
    assert net["config"][0]["subnets"] == [
        {"type": "static", "address": "10.0.0.3", "netmask": "255.255.255.0", "gateway": "10.0.0.1"}
    ]


def test_user_data_yaml_stays_plain() -> None:
    """Repeated values are written out in full: guest-side readers of the seed need not know aliases."""
    ud = "a: [1, 2]\nb: [1, 2]\n"
    text = render(request({"VirtletCloudInitUserData": ud})).files["user-data"].decode()
    assert "&" not in text and "*" not in text
    assert yaml.safe_load(text) == {"a": [1, 2], "b": [1, 2]}


def test_unknown_mtu_and_empty_gateway_are_left_out() -> None:
    """The network helper's NicInfo uses 0 and "" for "not known"; those must not reach the guest."""
    nic = NicConfig(mac="52:54:00:aa:00:01", mtu=0, addresses=["10.0.0.3/24"], gateway="")
    eth0 = yaml.safe_load(render(request(nics=[nic])).files["network-config"])["config"][0]
    assert "mtu" not in eth0 and "gateway" not in eth0["subnets"][0]


def test_environment_file_is_private() -> None:
    text = render(request(env=[("TOKEN", "s3cret")])).files["user-data"].decode()
    entry = yaml.safe_load(text)["write_files"][0]
    assert entry["path"] == "/etc/cloud/environment" and entry["permissions"] == "0600"


def test_rendered_seed_is_bounded() -> None:
    big = [(f"V{i}", "x" * 1024) for i in range(1100)]  # 1.1 MiB of environment
    with pytest.raises(errors.InvalidArgument, match=r"environment is \d+ bytes .*1 MiB"):
        render(request(env=big))
    # environment and user-data each within bounds, together over
    ud = "a: " + "x" * (120 * 1024)
    with pytest.raises(errors.InvalidArgument, match=r"seed would be \d+ bytes \(.*user-data .*1 MiB"):
        render(request({"VirtletCloudInitUserData": ud}, env=big[:1000]))
    render(request(env=big[:500]))


def test_deep_yaml_cannot_blow_up_the_seed_unnoticed() -> None:
    """Block style indents each level: the largest accepted annotation still renders within bounds or is
    refused with the seed-size message, never slower than a second's work."""
    ud = "x: " + "[" * 63 + ",".join(["a"] * 9_900) + "]" * 63
    try:
        seed = render(request({"VirtletCloudInitUserData": ud}))
    except errors.InvalidArgument as exc:
        assert "cloud-init seed would be" in str(exc)
    else:
        assert sum(len(v) for v in seed.files.values()) <= 1024 * 1024


def test_infinite_numbers_in_configdrive_meta_data_are_refused() -> None:
    with pytest.raises(errors.InvalidArgument, match="VirtletCloudInitMetaData.*inf"):
        render(request({"VirtletCloudInitMetaData": "x: .inf\n", "VirtletCloudInitImageType": "configdrive"}))
