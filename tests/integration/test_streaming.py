"""The streaming server through its real parts: the VM backend on a real state database, a console socket
(a unix socket server standing in for QEMU's serial port), a TCP server inside a real network namespace
standing in for the VM, the ``kubernetes`` package's WebSocket client and our SPDY client, and virtletd's CRI
``Attach``/``PortForward`` calls.  Every namespace, socket and thread made here is removed, also on failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from virtlet import errors
from virtlet.cri.gen import api_pb2 as api
from virtlet.network import netns as vnetns
from virtlet.network.model import NicInfo, PodNetworkInfo
from virtlet.network.nssocket import socket_in_netns
from virtlet.state import store as st
from virtlet.stream.client import AttachClient, PortForwardClient, UpgradeError
from virtlet.stream.service import StreamingService

pytestmark = pytest.mark.network
VM_PORT = 2222
CLOSED_PORT = 2223


class FakeQemuConsole:
    """A unix stream socket like QEMU's ``<serial type='unix'>`` server: one client at a time; every line the
    client sends comes back as ``guest: <line>`` (a shell echoing commands)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.clients: list[socket.socket] = []
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.clients.append(conn)
            buf = b""
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    break
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    conn.sendall(b"guest: " + line + b"\r\n")
            conn.close()

    def hang_up(self) -> None:
        """The VM stops: its console goes away."""
        for c in self.clients:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.hang_up()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        except OSError:
            pass
        self.sock.close()
        self.path.unlink(missing_ok=True)
        self._thread.join(5)


@dataclass
class World:
    service: StreamingService
    store: st.StateStore
    sandbox_id: str
    container_id: str
    console: FakeQemuConsole
    vm_ip: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    tag = uuid.uuid4().hex[:8]
    netns = f"vstream-{tag}"
    vm_ip = f"10.251.{int(tag[:2], 16)}.{int(tag[2:4], 16) % 250 + 2}"
    vnetns.create(netns)  # not `ip netns add`: that remounts /run/netns over other runtimes' namespaces
    stack: list[object] = []
    listener: socket.socket | None = None
    store = st.StateStore(tmp_path / "virtlet.db")
    try:
        _ip("-n", netns, "link", "add", "vm0", "type", "veth", "peer", "name", "vm1")  # no dummy module here
        _ip("-n", netns, "addr", "add", f"{vm_ip}/32", "dev", "vm0")
        _ip("-n", netns, "link", "set", "vm0", "up")
        listener = socket_in_netns(netns, socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((vm_ip, VM_PORT))
        listener.listen(64)
        threading.Thread(target=_echo_server, args=(listener,), daemon=True).start()

        sid, cid = uuid.uuid4().hex, str(uuid.uuid4())
        store.add_sandbox(st.SandboxRecord(
            id=sid, name="vm", namespace="default", uid=tag, attempt=0, state=st.SANDBOX_READY, created_at=1,
            runtime_handler="virtlet", netns=f"/var/run/netns/{netns}", hostname="vm",
            network=PodNetworkInfo(
                sandbox_id=sid, netns_path=f"/var/run/netns/{netns}", dns_servers=[], dns_searches=[],
                dns_options=[], nics=[NicInfo(index=0, mac="02:00:00:00:00:02", mtu=1500, ip=vm_ip, prefix=32,
                                              gateway="", routes=[], veth="vm0", bridge="", tap="")])))
        store.add_container(st.ContainerRecord(
            id=cid, sandbox_id=sid, name="vm", attempt=0, state=st.CONTAINER_RUNNING, created_at=1, image="x",
            image_ref="x", log_path=""))
        console_dir = Path(tempfile.mkdtemp(prefix="vst-", dir="/tmp"))  # unix socket paths are short
        stack.append(console_dir)
        console = FakeQemuConsole(console_dir / f"{cid}.sock")
        stack.append(console)
        service = StreamingService("127.0.0.1:0", store, console_dir)
        service.start()
        stack.append(service)
        yield World(service, store, sid, cid, console, vm_ip)
    finally:
        for part in reversed(stack):
            if isinstance(part, FakeQemuConsole):
                part.close()
            elif isinstance(part, Path):
                shutil.rmtree(part, ignore_errors=True)
            else:
                part.stop()  # type: ignore[attr-defined]
        if listener is not None:
            listener.close()
        store.close()
        vnetns.delete(netns)
    assert not os.path.exists(vnetns.path(netns))


def _echo_server(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_echo, args=(conn,), daemon=True).start()


def _echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


def _read_until(client: AttachClient, needle: bytes) -> bytes:
    got = b""
    deadline = time.monotonic() + 10
    while needle not in got:
        assert time.monotonic() < deadline, f"no {needle!r} in {got!r}"
        data = client.read(1)
        assert data != b"", f"session ended; got {got!r}"
        got += data or b""
    return got


def _attach_url(w: World) -> str:
    return w.service.attach_url(w.container_id, stdin=True, stdout=True, stderr=False, tty=True)


# -- attach ---------------------------------------------------------------------------------------------------
def test_two_spdy_sessions_share_the_console_and_detach_keeps_it(world: World) -> None:
    a = AttachClient(_attach_url(world))
    b = AttachClient(_attach_url(world))
    try:
        for client, name in ((a, b"a"), (b, b"b")):  # both sessions are surely attached after a round trip
            client.write(name + b" ready\n")
            _read_until(client, b"guest: " + name + b" ready")
        a.write(b"uname -n\n")
        _read_until(a, b"guest: uname -n")
        _read_until(b, b"guest: uname -n")  # the second session sees the same output
        b.write(b"from b\n")
        _read_until(a, b"guest: from b")
    finally:
        b.close()
    a.write(b"still here\n")  # b detached; a and the console go on
    _read_until(a, b"guest: still here")
    a.close()
    assert world.console.accepted == 1  # one connection to "QEMU" for both sessions
    c = AttachClient(_attach_url(world))  # attach again after everyone left
    c.write(b"again\n")
    _read_until(c, b"guest: again")
    world.console.hang_up()  # the VM stops: the session ends with a Success status
    assert c.status() == {"metadata": {}, "status": "Success"}
    c.close()


def test_kubernetes_python_websocket_client_attach(world: World) -> None:
    from kubernetes.client import Configuration
    from kubernetes.stream.ws_client import WSClient

    url = _attach_url(world).replace("http://", "ws://")
    ws = WSClient(Configuration(), url, headers=None, capture_all=True, binary=True)
    try:
        assert ws.subprotocol == "v5.channel.k8s.io"
        ws.write_stdin(b"hostname\n")
        got = b""
        deadline = time.monotonic() + 10
        while b"guest: hostname" not in got and time.monotonic() < deadline:
            ws.update(timeout=1)
            got += ws.read_stdout(timeout=0) or b""
        assert b"guest: hostname" in got
        world.console.hang_up()
        ws.run_forever(timeout=10)
        assert ws.returncode == 0  # the v4/v5 Success status on the error channel
    finally:
        ws.close()


def test_attach_checks_at_cri_time(world: World) -> None:
    with pytest.raises(errors.NotFound):
        world.service.attach_url("no-such-id", stdin=True, stdout=True, stderr=False, tty=True)
    world.store.update_container(world.container_id, state=st.CONTAINER_EXITED)
    with pytest.raises(errors.FailedPrecondition, match="only a running VM"):
        _attach_url(world)
    with pytest.raises(errors.InvalidArgument):
        world.service.attach_url(world.container_id, stdin=False, stdout=False, stderr=False, tty=False)


# -- port-forward -------------------------------------------------------------------------------------------
def test_twenty_parallel_spdy_connections_and_a_closed_port(world: World) -> None:
    pf = PortForwardClient(world.service.port_forward_url(world.sandbox_id, [VM_PORT]))
    failures: list[str] = []

    def one(i: int) -> None:
        try:
            data, _ = pf.open(VM_PORT)
            payload = f"conn {i} ".encode() * 2000
            data.write(payload)
            data.close()
            got = b""
            while chunk := data.read(10):
                got += chunk
            if got != payload:
                failures.append(f"{i}: {len(got)} of {len(payload)} bytes")
        except Exception as exc:  # collected: asserted below
            failures.append(f"{i}: {exc!r}")

    closed_data, closed_err = pf.open(CLOSED_PORT)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    message = closed_err.read(10) or b""
    assert b"error forwarding port 2223" in message and b"refused" in message
    assert closed_data.read(10) == b""
    pf.close()


def test_kubernetes_python_websocket_port_forward(world: World) -> None:
    from kubernetes.client import Configuration
    from kubernetes.stream.ws_client import PortForward, create_websocket

    url = world.service.port_forward_url(world.sandbox_id, [VM_PORT]).replace("http://", "ws://")
    ws = create_websocket(Configuration(), f"{url}?port={VM_PORT}&port={CLOSED_PORT}",
                          headers={"sec-websocket-protocol": "v4.channel.k8s.io"})
    pf = PortForward(ws, [VM_PORT, CLOSED_PORT])
    try:
        s = pf.socket(VM_PORT)
        s.settimeout(10)
        s.sendall(b"SSH-2.0-test\r\n")
        assert s.recv(100) == b"SSH-2.0-test\r\n"
        deadline = time.monotonic() + 10
        while pf.error(CLOSED_PORT) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "refused" in (pf.error(CLOSED_PORT) or "")
        assert pf.error(VM_PORT) is None  # the error was on the closed port's channel only
        s.close()
    finally:
        pf.close()


def test_expired_and_reused_tokens_are_403(world: World, tmp_path: Path) -> None:
    url = world.service.port_forward_url(world.sandbox_id, [VM_PORT])
    PortForwardClient(url).close()
    with pytest.raises(UpgradeError) as exc:
        PortForwardClient(url)
    assert exc.value.status == 403
    quick = StreamingService("127.0.0.1:0", world.store, tmp_path, ttl=0.2)
    quick.start()
    try:
        url = quick.port_forward_url(world.sandbox_id, [VM_PORT])
        time.sleep(0.5)
        with pytest.raises(UpgradeError) as exc:
            PortForwardClient(url)
        assert exc.value.status == 403
    finally:
        quick.stop()


def test_malformed_upgrades_do_not_hurt_the_server(world: World) -> None:
    port = world.service.server.port
    for raw in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),  # a TLS hello
                b"POST /portforward/x HTTP/1.1\r\nUpgrade: SPDY/3.1\r\n\r\n\x80\x03\x00\x01garbage",
                b"GET /attach/" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            answer = s.recv(100)
        except OSError:
            answer = b""  # the server may reset a connection it refused
        finally:
            s.close()
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4")
    # a SPDY peer that sends garbage after a valid upgrade loses only its own connection
    url = world.service.port_forward_url(world.sandbox_id, [VM_PORT])
    from virtlet.stream.client import upgrade

    up = upgrade(url, ["portforward.k8s.io"])
    up.sock.sendall(b"\x80\x02\x00\x01\x00\x00\x00\x00")  # SPDY version 2: a protocol error
    up.sock.settimeout(10)
    while up.sock.recv(4096):
        pass
    up.sock.close()
    pf = PortForwardClient(world.service.port_forward_url(world.sandbox_id, [VM_PORT]))
    data, _ = pf.open(VM_PORT)
    data.write(b"ok")
    assert data.read(10) == b"ok"
    pf.close()


# -- through virtletd's CRI ---------------------------------------------------------------------------------
@pytest.fixture
def streaming_virtletd(world_dir: Path, loopback_cni: Path) -> Iterator[VirtletdProcess]:
    daemon = VirtletdProcess(world_dir, ["--libvirt-uri", "test:///default", "--kvm", "off", "--cni-conf-dir",
                                         str(loopback_cni), "--stream-address", "127.0.0.1:0",
                                         "--image-dir", str(world_dir / "images")])
    daemon.start()
    try:
        yield daemon
    finally:
        rt = daemon.runtime()
        for sb in rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=10).items:
            rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sb.id), timeout=60)
            rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=60)
        daemon.stop()


def test_cri_attach_and_port_forward_are_wired(streaming_virtletd: VirtletdProcess) -> None:
    rt = streaming_virtletd.runtime()
    with pytest.raises(grpc.RpcError) as exc:
        rt.Attach(api.AttachRequest(container_id="nope", stdout=True), timeout=10)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        rt.PortForward(api.PortForwardRequest(pod_sandbox_id="nope", port=[22]), timeout=10)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as exc:
        rt.Exec(api.ExecRequest(container_id="x", cmd=["ls"], stdout=True), timeout=10)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND and "x" in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        rt.Exec(api.ExecRequest(container_id="x", cmd=["sh"], stdin=True, stdout=True, tty=True), timeout=10)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND and "x" in exc.value.details()  # a tty: checked alike
    assert "streaming server listening on http://127.0.0.1:" in streaming_virtletd.log()


# -- bounds (issue 13) ----------------------------------------------------------------------------------------
def test_slowloris_and_connection_limit_against_the_service(world: World, tmp_path: Path) -> None:
    """A client trickling its head is cut off after the total head time while a port-forward to the VM is
    served; the connection past the limit gets 503; a huge SPDY frame length ends only its own connection."""
    from virtlet.stream.client import upgrade
    from virtlet.stream.limits import Limits

    svc = StreamingService("127.0.0.1:0", world.store, tmp_path, limits=Limits(head_timeout=4, max_connections=3))
    svc.start()
    slow = socket.create_connection(("127.0.0.1", svc.server.port))
    stop = threading.Event()
    try:
        def trickle() -> None:
            for b in b"GET /portforward/x HTTP/1.1\r\nX: " + b"a" * 100:
                try:
                    slow.send(bytes([b]))
                except OSError:
                    return
                if stop.wait(1.0):
                    return

        threading.Thread(target=trickle, daemon=True).start()
        start = time.monotonic()
        pf = PortForwardClient(svc.port_forward_url(world.sandbox_id, [VM_PORT]))
        data, _ = pf.open(VM_PORT)
        data.write(b"served")
        assert data.read(10) == b"served"
        # two connections are open (slowloris, pf); a third fits, the fourth is refused
        third = socket.create_connection(("127.0.0.1", svc.server.port))
        time.sleep(0.5)
        fourth = socket.create_connection(("127.0.0.1", svc.server.port), timeout=10)
        refused = b""
        try:
            while chunk := fourth.recv(4096):
                refused += chunk
        except ConnectionResetError:
            pass
        fourth.close()
        third.close()
        assert refused.startswith(b"HTTP/1.1 503"), refused
        slow.settimeout(30)
        answer = slow.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400") and b"within 4s" in answer
        assert time.monotonic() - start < 20
        pf.close()
        # a SPDY frame head promising 16 MiB: GOAWAY and close, nothing read
        up = upgrade(svc.port_forward_url(world.sandbox_id, [VM_PORT]), ["portforward.k8s.io"])
        up.sock.sendall(b"\x00\x00\x00\x01\x00\xff\xff\xff")
        up.sock.settimeout(10)
        got = b""
        while chunk := up.sock.recv(4096):
            got += chunk
        assert got[:4] == b"\x80\x03\x00\x07"
        up.sock.close()
        pf = PortForwardClient(svc.port_forward_url(world.sandbox_id, [VM_PORT]))
        data, _ = pf.open(VM_PORT)
        data.write(b"still")
        assert data.read(10) == b"still"
        pf.close()
    finally:
        stop.set()
        slow.close()
        svc.stop()
