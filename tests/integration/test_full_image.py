"""The slow tier: the `full` Debian guest with real cloud-init, driven through virtletd like a kubelet would.

The seed's pattern: `write_files` of an executable script plus `runcmd` running it, and
`users: [{name: root, ssh-authorized-keys: [...]}]` -> the script's output on the serial console (so in the CRI
log) and root SSH access with the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.conftest import guest_image
from tests.integration.test_vm_exec import _exec, _wait_for_agent
from tests.integration.test_vm_exec_tty import _read_until, _url
from tests.integration.test_vm_lifecycle import Pod, _pull
from tests.integration.test_vm_network import pod_ip, ssh, wait_ssh
from tests.integration.test_vm_network import ssh_key as ssh_key
from virtlet.stream.client import AttachClient

pytestmark = [pytest.mark.slow, pytest.mark.libvirt, pytest.mark.network]

FULL_BOOT_TIMEOUT = 600.0


def test_full_image_real_cloud_init(vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any,
                                    ssh_key: tuple[Path, str]) -> None:
    shutil.copy(guest_image("full"), image_server.root / "full.qcow2")
    name = image_server.name("files/full.qcow2")
    _pull(vm_virtletd, name)
    user_data = {
        "write_files": [{"path": "/usr/local/bin/provision.sh", "permissions": "0755", "owner": "root",
                         "content": "#!/bin/bash\nset -eu\necho \"PROVISIONED $(hostname) $(cat /etc/cloud/environment"
                                    " | tr '\\n' ' ')\"\n"}],
        "users": [{"name": "root", "ssh-authorized-keys": [ssh_key[1]]}],
        "runcmd": ["/usr/local/bin/provision.sh"],
    }
    pod = Pod(vm_virtletd, world_dir, "full-vm", image=name, memory=1 << 30, annotations={
        "VirtletVCPUCount": "2", "VirtletRootVolumeSize": "4Gi",
        "VirtletCloudInitUserData": json.dumps(user_data)})
    pod.run_sandbox()
    pod.create()
    pod.start()
    line = pod.wait_log("PROVISIONED", timeout=FULL_BOOT_TIMEOUT)
    assert "PROVISIONED full-vm" in line and "GREETING='hello'" in line, line
    ip = pod_ip(pod)
    wait_ssh(ssh_key[0], ip, timeout=180)
    assert ssh(ssh_key[0], ip, "hostname").strip() == "full-vm"
    assert ssh(ssh_key[0], ip, "cloud-init status --wait >/dev/null; cloud-init status").find("done") >= 0
    # the root filesystem was grown to the 4Gi root volume by cloud-init
    size_kb = int(ssh(ssh_key[0], ip, "df -k --output=size / | tail -1").strip())
    assert size_kb > 3 * 1024 * 1024, size_kb
    # exec probes: the guest agent is started by systemd when udev sees its virtio-serial port
    _wait_for_agent(pod)
    res = _exec(pod, "cat", "/etc/hostname")
    assert (res.exit_code, res.stdout) == (0, b"full-vm\n"), res
    # kubectl exec -it: virtlet-exec-agent started by udev + systemd on its port (cloud.virtlet.exec)
    shell = AttachClient(_url(pod, "bash", stdin=True, tty=True), stdin=True, tty=True)
    try:
        shell.send_resize(90, 31)
        shell.write(b"stty size; exit 3\r")
        _read_until(shell, b"31 90", timeout=180)
        status = shell.status(timeout=60)
        assert isinstance(status, dict) and status["details"]["causes"][0]["message"] == "3", status
    finally:
        shell.close()
    pod.stop_and_remove()
