"""Annotation validation: each bad value is InvalidArgument naming the annotation, never echoing secrets."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_cloudinit_cases import KEY_A, KEY_B, request
from virtlet import errors
from virtlet.cloudinit import CloudInitOptions, parse_cloudinit_options, render


def test_defaults_without_annotations() -> None:
    opts = parse_cloudinit_options({"unrelated": "x"})
    assert opts == CloudInitOptions()
    assert opts.image_type == "nocloud" and not opts.force_dhcp and opts.ssh_keys == []


def test_all_annotations_parsed() -> None:
    opts = parse_cloudinit_options(
        {
            "VirtletCloudInitImageType": "ConfigDrive",
            "VirtletForceDHCPNetworkConfig": "TRUE",
            "VirtletCloudInitUserDataOverwrite": "true",
            "VirtletCloudInitUserData": "#cloud-config\nruncmd: [ls]\n",
            "VirtletCloudInitMetaData": "foo: bar\n",
            "VirtletSSHKeys": f"{KEY_A}\n{KEY_B}\n",
        }
    )
    assert opts.image_type == "configdrive"
    assert opts.force_dhcp and opts.user_data_overwrite
    assert opts.user_data == {"runcmd": ["ls"]}
    assert opts.meta_data == {"foo": "bar"}
    assert opts.ssh_keys == [KEY_A, KEY_B]


def test_repr_hides_user_data() -> None:
    opts = parse_cloudinit_options(
        {"VirtletCloudInitUserData": "password: hunter2\n", "VirtletCloudInitMetaData": "token: s3cret\n"}
    )
    assert "hunter2" not in repr(opts) and "s3cret" not in repr(opts)
    seed = render(request({"VirtletCloudInitUserData": "password: hunter2\n"}))
    assert "hunter2" not in repr(seed)


BAD = [
    ("VirtletCloudInitUserData", "write_files: [\n  - path: /x\n  content: {", "not valid YAML: "),
    ("VirtletCloudInitUserData", "- a\n- b\n", "must be a YAML map"),
    ("VirtletCloudInitUserData", "just a string", "must be a YAML map"),
    ("VirtletCloudInitMetaData", "[1, 2]", "must be a YAML map"),
    ("VirtletCloudInitMetaData", "a: [", "not valid YAML"),
    ("VirtletCloudInitImageType", "iso", "allowed: nocloud, configdrive"),
    ("VirtletCloudInitUserDataOverwrite", "yes", 'expected "true" or "false"'),
    ("VirtletForceDHCPNetworkConfig", "1", 'expected "true" or "false"'),
    ("VirtletSSHKeys", "not a key", "line 1 is not an OpenSSH public key"),
    (
        "VirtletSSHKeys",
        f"{KEY_A}\nssh-rsa",
        "line 2 is not an OpenSSH public key (the base64 key data is missing",
    ),
    ("VirtletSSHKeys", "ssh-rsa !!!notbase64", "not valid base64"),
    ("VirtletSSHKeys", "ssh-rsa " + KEY_A.split()[1], "does not match the key type"),
    ("VirtletSSHKeys", 'command="ls" ' + KEY_A, "authorized_keys options"),
    ("VirtletSSHKeys", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n", "private key"),
    ("VirtletCloudInitUserDataScript", "   \n", "is empty"),
    # hostile YAML: aliases and anchors (billion laughs, self-reference), deep nesting, too many values
    ("VirtletCloudInitUserData", "x: &a [*a]\n", "anchors (&name) are not allowed"),
    ("VirtletCloudInitUserData", "a: [1]\nb: *a\n", "aliases (*name) are not allowed"),
    ("VirtletCloudInitMetaData", "a: &a [x, x]\nb: &b [*a, *a]\n", "anchors (&name) are not allowed"),
    ("VirtletCloudInitUserData", "a: !!str &x b\n", "anchors"),
    ("VirtletCloudInitUserData", "x: " + "[" * 65 + "]" * 65, "nested more than 64 deep"),
    ("VirtletCloudInitUserData", "x: " + "[" * 5000 + "]" * 5000, "not valid YAML"),
    ("VirtletCloudInitUserData", "".join("  " * i + f"k{i}:\n" for i in range(100)) + "  " * 100 + "v\n",
     "nested more than 64 deep"),
    ("VirtletCloudInitMetaData", "x: [" + ",".join(["a"] * 10_001) + "]", "more than 10000 values"),
    ("VirtletCloudInitUserData", "x: " + "9" * 5000, "cannot be read"),
    # sizes
    ("VirtletCloudInitUserData", "a: " + "x" * (128 * 1024), "more than the 131072 bytes"),
    ("VirtletCloudInitUserDataScript", "#!/bin/sh\n" + "#" * (128 * 1024), "more than the 131072 bytes"),
    ("VirtletSSHKeys", "\n" * (128 * 1024 + 1), "more than the 131072 bytes"),
    ("VirtletCloudInitImageType", "nocloud" + " " * 300, "too long"),
    ("VirtletForceDHCPNetworkConfig", "t" * 257, "too long"),
]


@pytest.mark.parametrize(
    ("name", "value", "message"), BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)]
)
def test_bad_values_name_the_annotation(name: str, value: str, message: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        parse_cloudinit_options({name: value})
    text = str(info.value)
    assert name in text and message in text
    assert info.value.code.name == "INVALID_ARGUMENT"


def test_largest_values_are_accepted() -> None:
    opts = parse_cloudinit_options({"VirtletCloudInitUserData": "a: " + "x" * (128 * 1024 - 3),
                                    "VirtletCloudInitMetaData": "x: [" + ",".join(["a"] * 9_997) + "]",
                                    "VirtletCloudInitImageType": "nocloud" + " " * 249})
    assert opts.user_data is not None and len(opts.user_data["a"]) == 128 * 1024 - 3
    assert opts.meta_data is not None and len(opts.meta_data["x"]) == 9_997
    deep = "x: " + "[" * 63 + "1" + "]" * 63
    assert parse_cloudinit_options({"VirtletCloudInitUserData": deep}).user_data is not None


def test_python_tags_are_refused() -> None:
    with pytest.raises(errors.InvalidArgument, match="VirtletCloudInitUserData is not valid YAML"):
        parse_cloudinit_options({"VirtletCloudInitUserData": "x: !!python/object/apply:os.system [ls]\n"})


def test_yaml_error_does_not_echo_the_document() -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        parse_cloudinit_options({"VirtletCloudInitUserData": "password: hunter2\nbad: [unclosed\n"})
    assert "hunter2" not in str(info.value) and "line " in str(info.value)


def test_private_key_is_not_echoed() -> None:
    secret = "-----BEGIN OPENSSH PRIVATE KEY-----\nSECRETSECRET\n-----END OPENSSH PRIVATE KEY-----"
    with pytest.raises(errors.InvalidArgument) as info:
        parse_cloudinit_options({"VirtletSSHKeys": secret})
    assert "SECRETSECRET" not in str(info.value)


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"VirtletCloudInitUserDataOverwrite": "true"}, "VirtletCloudInitUserData is not set"),
        (
            {"VirtletCloudInitUserDataScript": "#!/bin/sh\n", "VirtletCloudInitUserData": "a: 1"},
            "are both set",
        ),
    ],
)
def test_conflicting_annotations(annotations: dict[str, str], message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        parse_cloudinit_options(annotations)


def test_empty_map_annotations_count_as_absent() -> None:
    opts = parse_cloudinit_options(
        {"VirtletCloudInitUserData": "  \n", "VirtletCloudInitMetaData": "# nothing"}
    )
    assert opts.user_data is None and opts.meta_data is None


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen (openssh-client)")
@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa", "rsa"])
def test_real_ssh_keygen_keys_are_accepted(tmp_path: Path, key_type: str) -> None:
    """Keys made by the real OpenSSH tool pass validation (it must not be stricter than OpenSSH)."""
    key = tmp_path / "id"
    bits = ["-b", "1024"] if key_type == "rsa" else []
    subprocess.run(
        ["ssh-keygen", "-q", "-t", key_type, *bits, "-N", "", "-C", "me@host", "-f", str(key)],
        check=True,
        timeout=60,
    )
    pub = key.with_suffix(".pub").read_text()
    assert parse_cloudinit_options({"VirtletSSHKeys": pub}).ssh_keys == [pub.strip()]
    with pytest.raises(errors.InvalidArgument, match="private key"):
        parse_cloudinit_options({"VirtletSSHKeys": key.read_text()})
