"""virtletctl pieces that need no running daemon: argument handling, ssh command line, VNC port, kubectl
commands (cluster mode is only testable this far without a cluster)."""

from __future__ import annotations

import socket
import threading

import pytest

from virtlet.ctl import cluster
from virtlet.ctl.forward import TcpRelay
from virtlet.ctl.main import _split_target, build_parser, main, ssh_command, vnc_port
from virtlet.ctl.node import CtlError


def test_split_target() -> None:
    assert _split_target("root@default/vm") == ("root", "default/vm")
    assert _split_target("vm") == ("", "vm")


def test_ssh_command_keeps_user_options_first_and_the_remote_command_last() -> None:
    cmd = ssh_command("root", 40022, ["--", "-i", "key", "-v", "hostname", "-f"], "default-vm")
    assert cmd[1:4] == ["-i", "key", "-v"]
    assert cmd[-3:] == ["root@127.0.0.1", "hostname", "-f"]
    assert cmd[cmd.index("-p") + 1] == "40022"
    assert "HostKeyAlias=virtlet-default-vm" in cmd


def test_vnc_port_from_domain_xml() -> None:
    assert vnc_port("<domain><devices><graphics type='vnc' port='5901' autoport='yes'/></devices></domain>") == 5901
    with pytest.raises(CtlError, match="no port"):
        vnc_port("<domain><devices><graphics type='vnc' port='-1'/></devices></domain>")
    with pytest.raises(CtlError, match="no VNC"):
        vnc_port("<domain/>")


def test_cluster_commands() -> None:
    assert cluster.port_forward_cmd(["kubectl"], "ns1/vm", 22) == ["kubectl", "-n", "ns1", "port-forward",
                                                                  "pod/vm", ":22"]
    # a bare name: kubectl's own default, the kubeconfig context's namespace
    assert cluster.attach_cmd(["kubectl"], "vm") == ["kubectl", "attach", "-it", "pod/vm"]


def test_parser_and_unreachable_endpoint(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    args = build_parser().parse_args(["ssh", "root@vm", "--", "-i", "k", "uptime"])
    assert args.target == "root@vm" and args.ssh_args == ["-i", "k", "uptime"]
    rc = main(["--endpoint", f"unix://{tmp_path}/none.sock", "dump-metadata"])
    assert rc == 1
    assert "cannot reach the runtime" in capsys.readouterr().err


def test_tcp_relay_carries_bytes() -> None:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()

    def serve() -> None:
        conn, _ = ls.accept()
        with conn:
            conn.sendall(b"RFB 003.008\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    relay = TcpRelay(("127.0.0.1", ls.getsockname()[1]))
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as c:
            assert c.recv(12) == b"RFB 003.008\n"
    finally:
        relay.close()
        ls.close()
        t.join(5)


def test_vnc_target_socket_or_port() -> None:
    from virtlet.ctl.main import vnc_target

    xml = ("<domain><devices><graphics type='vnc' socket='/var/lib/libvirt/qemu/domain-1-x/vnc.sock'>"
           "<listen type='socket' socket='/var/lib/libvirt/qemu/domain-1-x/vnc.sock'/></graphics></devices></domain>")
    assert vnc_target(xml) == ("unix", "/var/lib/libvirt/qemu/domain-1-x/vnc.sock")
    with pytest.raises(CtlError, match="no path yet"):
        vnc_target("<domain><devices><graphics type='vnc'><listen type='socket'/></graphics></devices></domain>")
    assert vnc_target("<domain><devices><graphics type='vnc' port='5902'/></devices></domain>") == ("tcp", 5902)


def test_loopback_peer_uid_is_the_connecting_user() -> None:
    import os
    import socket

    from virtlet.ctl.forward import loopback_peer_uid

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname()) as _client:
            conn, _ = server.accept()
            with conn:
                assert loopback_peer_uid(conn) == os.geteuid()
