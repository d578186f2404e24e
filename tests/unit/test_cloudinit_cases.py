"""Requests shared by the cloud-init tests (no tests here): one per golden case, plus fixed key material."""

from __future__ import annotations

import base64
import struct

from virtlet.cloudinit import CloudInitRequest, NicConfig


def fake_ssh_key(key_type: str, seed: int, comment: str) -> str:
    """A well-formed OpenSSH public key line (type-tagged blob), deterministic so golden files stay stable."""

    def s(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    blob = s(key_type.encode()) + s(bytes((seed + i) % 256 for i in range(32)))
    return f"{key_type} {base64.b64encode(blob).decode()} {comment}"


KEY_A = fake_ssh_key("ssh-ed25519", 1, "alice@example")
KEY_B = fake_ssh_key("ecdsa-sha2-nistp256", 7, "bob@example")

NIC0 = NicConfig(
    mac="52:54:00:AA:00:01",
    mtu=1450,
    addresses=["10.244.1.5/24"],
    gateway="10.244.1.1",
    routes=[("0.0.0.0/0", "10.244.1.1")],
)
DNS = {"dns_servers": ["10.96.0.10"], "dns_search": ["default.svc.cluster.local", "svc.cluster.local"]}


def request(annotations: dict[str, str] | None = None, **kw: object) -> CloudInitRequest:
    base: dict[str, object] = {
        "pod_name": "vm-1",
        "pod_namespace": "default",
        "pod_uid": "0c1e8f4e-7a57-4d0a-9b1b-5d2f3c1a9e10",
        "hostname": "vm-1",
        "annotations": annotations or {},
        "nics": [NIC0],
        **DNS,
    }
    base.update(kw)
    return CloudInitRequest(**base)  # type: ignore[arg-type]


SEED_USER_DATA = f"""\
write_files:
- path: /usr/local/bin/provision.sh
  permissions: "0755"
  owner: root
  content: |
    #!/bin/bash
    set -u -e
    echo "provisioned $(hostname)"
users:
- name: root
  ssh-authorized-keys:
  - {KEY_B}
runcmd:
- /usr/local/bin/provision.sh
"""

CASES: dict[str, CloudInitRequest] = {
    "plain": request(),
    "ssh_keys": request({"VirtletSSHKeys": f"{KEY_A}\n\n  {KEY_B}  \n"}),
    "merged_user_data": request(
        {"VirtletSSHKeys": KEY_A, "VirtletCloudInitUserData": SEED_USER_DATA},
        env=[("ROLE", "master")],
    ),
    "script_user_data": request(
        {
            "VirtletSSHKeys": KEY_A,
            "VirtletCloudInitUserDataScript": "#!/bin/sh\necho 'hello from script' > /dev/console\n",
        },
        env=[("IGNORED", "not in a script")],
    ),
    "overwrite": request(
        {
            "VirtletSSHKeys": KEY_A,
            "VirtletCloudInitUserDataOverwrite": "true",
            "VirtletCloudInitUserData": "runcmd:\n- [touch, /tmp/only-this]\n",
        },
        env=[("IGNORED", "1")],
    ),
    "configdrive": request(
        {
            "VirtletCloudInitImageType": "configdrive",
            "VirtletSSHKeys": f"{KEY_A}\n{KEY_B}",
            "VirtletCloudInitMetaData": "availability_zone: zone-a\nlocal-hostname: custom-host\n",
            "VirtletCloudInitUserData": "runcmd:\n- echo configdrive\n",
        },
        env=[("MODE", "cd")],
    ),
    "two_interfaces": request(
        nics=[
            NIC0,
            NicConfig(
                mac="52:54:00:aa:00:02",
                mtu=None,
                addresses=["192.168.50.7/24", "fd00:50::7/64"],
                gateway="192.168.50.1",
                routes=[("0.0.0.0/0", "192.168.50.1"), ("172.16.0.0/12", ""), ("fd00:60::/64", "fd00:50::1")],
            ),
        ]
    ),
    "dhcp_fallback": request(
        nics=[NicConfig(mac="52:54:00:aa:00:03", mtu=1500, addresses=[], gateway=None, routes=[])]
    ),
    "force_dhcp": request({"VirtletForceDHCPNetworkConfig": "true"}),
    "configdrive_dhcp": request(
        {"VirtletCloudInitImageType": "configdrive"},
        nics=[NicConfig(mac="52:54:00:aa:00:04")],
    ),
    "env_vars": request(
        env=[
            ("PLAIN", "value"),
            ("SPACES", "a b  c"),
            ("QUOTES", 'it\'s "quoted"'),
            ("SHELLY", "$HOME `id` \\n $(reboot)"),
            ("MULTI", "line1\nline2"),
            ("EMPTY", ""),
        ]
    ),
    "no_network": request(nics=[], dns_servers=[], dns_search=[]),
}
