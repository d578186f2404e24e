"""kubectl attach / port-forward / virtletctl against a real tiny VM: typing on the serial console in two attach
sessions, SSH through a port-forward, 20 parallel forwarded connections, `virtletctl ssh hostname`,
`virtletctl vnc` speaking RFB, `virtletctl diag dump`."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_vm_lifecycle import MARKER, Pod, _pull
from tests.integration.test_vm_network import ssh_key as ssh_key
from virtlet.cri.gen import api_pb2 as api
from virtlet.stream.client import AttachClient, PortForwardClient

pytestmark = [pytest.mark.libvirt, pytest.mark.network]


def _read_until(client: AttachClient, needle: bytes, timeout: float = 60) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not seen on the console; got {buf[-500:]!r}")
        chunk = client.read(timeout=1)
        if chunk:
            buf += chunk
        elif chunk == b"":
            raise AssertionError(f"console ended early; got {buf[-500:]!r}")
    return buf


def _ctl(vm_virtletd: VirtletdProcess, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virtlet.ctl.main", "--endpoint", f"unix://{vm_virtletd.socket}",
                           *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def running_vm(vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any, tiny_image: Path,
               ssh_key: tuple[Path, str]) -> Any:
    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    name = image_server.name("files/tiny.qcow2")
    _pull(vm_virtletd, name)
    user_data = {"write_files": [{"path": "/www/index.html", "content": "hello through port-forward\n"}],
                 "runcmd": ["httpd -p 8080 -h /www"]}
    pod = Pod(vm_virtletd, world_dir, "vm-stream", image=name, annotations={
        "VirtletSSHKeys": ssh_key[1], "VirtletCloudInitUserData": json.dumps(user_data)})
    pod.run_sandbox()
    pod.create()
    pod.start()
    pod.wait_log(MARKER)
    yield pod
    pod.stop_and_remove()


def test_attach_two_sessions(running_vm: Pod) -> None:
    rt = running_vm.rt
    sessions = []
    for _ in range(2):
        url = rt.Attach(api.AttachRequest(container_id=running_vm.container_id, stdin=True, stdout=True,
                                          tty=True)).url
        assert url.startswith("http://127.0.0.1:")
        sessions.append(AttachClient(url, stdin=True, tty=True))
    try:
        sessions[0].write(b"\n")
        for s in sessions:
            _read_until(s, b"login:")
        sessions[0].write(b"root\n")
        time.sleep(2)
        sessions[1].write(b"echo ATTACH-$((6*7))\n")
        for s in sessions:
            _read_until(s, b"ATTACH-42")
        sessions[0].send_resize(120, 40)  # accepted and ignored
    finally:
        for s in sessions:
            s.close()
    assert running_vm.status().status.state == api.CONTAINER_RUNNING  # detach leaves the VM running
    running_vm.wait_log("ATTACH-42", timeout=30)  # the log keeps being written meanwhile


def test_port_forward_ssh_and_parallel(running_vm: Pod, ssh_key: tuple[Path, str],
                                       vm_virtletd: VirtletdProcess) -> None:
    rt = running_vm.rt
    url = rt.PortForward(api.PortForwardRequest(pod_sandbox_id=running_vm.sandbox_id, port=[22])).url
    client = PortForwardClient(url)
    try:
        # 20 parallel connections (to busybox httpd in the guest: dropbear allows only 5 unauthenticated
        # connections per peer, which would be testing dropbear, not the forwarder)
        bodies: list[bytes] = []

        def fetch() -> None:
            data, _error = client.open(8080)
            data.write(b"GET /index.html HTTP/1.0\r\n\r\n")
            got = b""
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                chunk = data.read(timeout=5)
                if not chunk:
                    break
                got += chunk
            data.close()
            bodies.append(got)

        threads = [threading.Thread(target=fetch) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        bad = [b[:60] for b in bodies if b"hello through port-forward" not in b]
        assert len(bodies) == 20 and not bad, bad
        # a closed port: an error on that stream only, the connection keeps working
        data, error = client.open(1)
        err = b""
        while chunk := error.read(timeout=30):
            err += chunk
        assert err, "no error for a closed port"
        data2, _ = client.open(22)
        assert (data2.read(timeout=30) or b"").startswith(b"SSH-2.0-")
        data2.close()
        # a complete SSH session through a local listener that forwards each connection
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]

        def accept_one() -> None:
            conn, _ = listener.accept()
            client.serve_local(conn, 22)

        threading.Thread(target=accept_one, daemon=True).start()
        key = ssh_key[0]
        out = subprocess.run(
            ["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no", "-o",
             "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "root@127.0.0.1",
             "hostname"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "vm-stream"
        listener.close()
    finally:
        client.close()


def test_virtletctl_ssh_vnc_diag(running_vm: Pod, ssh_key: tuple[Path, str], vm_virtletd: VirtletdProcess,
                                 world_dir: Path) -> None:
    res = _ctl(vm_virtletd, "ssh", "root@default/vm-stream", "--", "-i", str(ssh_key[0]), "hostname")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "vm-stream"
    # vnc: a local port that speaks RFB
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    local = port.getsockname()[1]
    port.close()
    proc = subprocess.Popen([sys.executable, "-m", "virtlet.ctl.main", "--endpoint",
                             f"unix://{vm_virtletd.socket}", "vnc", "vm-stream", str(local)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        greeting = b""
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", local), timeout=5) as s:
                    greeting = s.recv(12)
                break
            except OSError:
                time.sleep(0.5)
        assert greeting.startswith(b"RFB 003.00"), greeting
    finally:
        proc.terminate()
        proc.wait(30)
    dump = world_dir / "diag"
    res = _ctl(vm_virtletd, "diag", "dump", str(dump))
    assert res.returncode == 0, res.stderr
    assert (dump / "versions.json").exists() and (dump / "metadata.yaml").exists()
    assert (dump / "domains" / f"{running_vm.container_id}.xml").exists()
    meta = _ctl(vm_virtletd, "dump-metadata")
    assert running_vm.sandbox_id in meta.stdout
    # errors a user can act on
    res = _ctl(vm_virtletd, "ssh", "root@default/no-such-pod", "--", "true")
    assert res.returncode != 0 and "no-such-pod" in res.stderr
    assert json.loads(_ctl(vm_virtletd, "diag", "dump", "--json").stdout)
