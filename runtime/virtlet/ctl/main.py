"""virtletctl: command line for VM pods (argparse).  ``virtletctl --help`` lists the commands.

Mode: ``--endpoint`` (or an existing ``/run/virtlet.sock``) means node mode, straight to virtletd's CRI
socket; otherwise cluster mode through the user's kubeconfig and ``kubectl``.  ``--mode`` forces one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import virtlet
from virtlet.ctl import cluster
from virtlet.ctl.node import DEFAULT_ENDPOINT, CtlError, NodeClient, Pod
from virtlet.stream.client import UpgradeError
from virtlet.stream.spdy_conn import StreamClosed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virtletctl", description="ssh, VNC, console and diagnostics for VM pods")
    p.add_argument("--endpoint", default=None,
                   help=f"node mode: virtletd CRI socket (default {DEFAULT_ENDPOINT})")
    p.add_argument("--mode", choices=("auto", "node", "cluster"), default="auto",
                   help="node: talk to the CRI socket; cluster: kubectl with your kubeconfig (default: auto)")
    p.add_argument("--kubeconfig", default=None, help="cluster mode: kubeconfig file")
    p.add_argument("--context", default=None, help="cluster mode: kubeconfig context")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ssh = sub.add_parser("ssh", help="ssh into the VM of a pod: ssh [user@]POD [-- ssh args]")
    ssh.add_argument("target", metavar="[USER@]POD")
    ssh.add_argument("ssh_args", nargs=argparse.REMAINDER, help="after --: arguments for ssh (options, command)")
    ssh.add_argument("--port", type=int, default=22, help="SSH port in the VM (default 22)")

    vnc = sub.add_parser("vnc", help="forward the VM's VNC display to a local port")
    vnc.add_argument("pod", metavar="POD")
    vnc.add_argument("local_port", nargs="?", type=int, default=0, help="local port (default: a free one)")

    con = sub.add_parser("console", help="attach to the VM's serial console (Ctrl-] detaches)")
    con.add_argument("pod", metavar="POD")

    sub.add_parser("dump-metadata", help="sandboxes, containers, images and domains as YAML")

    diag = sub.add_parser("diag", help="diagnostics")
    dsub = diag.add_subparsers(dest="diag_command", required=True, metavar="SUBCOMMAND")
    dump = dsub.add_parser("dump", help="write versions, config, state, domain XML, logs, network to DIR")
    dump.add_argument("dir", nargs="?", metavar="DIR")
    dump.add_argument("--json", action="store_true", help="print the dump as one JSON object instead")
    dump.add_argument("--log", action="append", default=[], metavar="GLOB", help="extra log files to include")

    sub.add_parser("version", help="print versions")

    image = sub.add_parser("image", help="VM disk images")
    isub = image.add_subparsers(dest="image_command", required=True, metavar="SUBCOMMAND")
    push = isub.add_parser("push", help="publish a qcow2/raw disk as a containerDisk image: push FILE REF")
    push.add_argument("file", metavar="FILE")
    push.add_argument("ref", metavar="REF", help="host[:port]/repository[:tag]")
    push.add_argument("--username", default="", help="registry user (password: VIRTLET_REGISTRY_PASSWORD or "
                                                     "--password-stdin)")
    push.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    push.add_argument("--insecure", action="store_true", help="plain HTTP (loopback registries always use it)")
    push.add_argument("--ca-file", default=None, help="PEM CA to trust for the registry")
    return p


def _mode(args: argparse.Namespace) -> str:
    if args.mode != "auto":
        mode: str = args.mode
        return mode
    if args.endpoint or Path(DEFAULT_ENDPOINT.removeprefix("unix://")).exists():
        return "node"
    kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if Path(kubeconfig.split(":")[0]).exists():
        return "cluster"
    return "node"


def _node(args: argparse.Namespace) -> NodeClient:
    return NodeClient(args.endpoint or DEFAULT_ENDPOINT)


def _split_target(target: str) -> tuple[str, str]:
    user, sep, pod = target.rpartition("@")
    return (user if sep else ""), pod


def ssh_command(user: str, port: int, ssh_args: list[str], alias: str) -> list[str]:
    """The system ssh to run against a local forwarded port (the user's options come first and win)."""
    exe = shutil.which("ssh") or "ssh"
    extra = ssh_args[1:] if ssh_args[:1] == ["--"] else ssh_args
    opts: list[str] = []
    command: list[str] = []
    i = 0
    while i < len(extra):  # options (with their values) until the first non-option: the remote command
        a = extra[i]
        if a.startswith("-") and command == []:
            opts.append(a)
            if a in ("-i", "-o", "-l", "-F", "-J", "-L", "-R", "-D", "-E", "-c", "-m", "-b", "-W") and \
                    i + 1 < len(extra):
                opts.append(extra[i + 1])
                i += 1
        else:
            command = extra[i:]
            break
        i += 1
    dest = f"{user}@127.0.0.1" if user else "127.0.0.1"
    return [exe, *opts, "-p", str(port), "-o", f"HostKeyAlias=virtlet-{alias}", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", dest, *command]


def cmd_ssh(args: argparse.Namespace) -> int:
    user, ref = _split_target(args.target)
    if _mode(args) == "cluster":
        proc, port = cluster.start_port_forward(
            cluster.port_forward_cmd(cluster.kubectl(args.kubeconfig, args.context), ref, args.port))
        try:
            return subprocess.call(ssh_command(user, port, args.ssh_args, ref.replace("/", "-")))
        finally:
            proc.terminate()
            proc.wait(10)
    from virtlet.ctl.forward import PortForwardListener

    client = _node(args)
    pod = client.find_pod(ref)
    listener = PortForwardListener(client.port_forward_url(pod.sandbox_id, [args.port]), args.port)
    try:
        return subprocess.call(ssh_command(user, listener.port, args.ssh_args, f"{pod.namespace}-{pod.name}"))
    finally:
        listener.close()
        client.close()


def vnc_target(domain_xml: str) -> tuple[str, str | int]:
    """Where the live domain serves VNC: ``("unix", path)`` (libvirt's socket in the domain's private
    directory) or ``("tcp", port)`` (a loopback port: domains defined by older versions)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as exc:
        raise CtlError(f"cannot read the domain XML: {exc}") from exc
    for g in root.iter("graphics"):
        if g.get("type") != "vnc":
            continue
        listen = g.find("listen")
        if listen is not None and listen.get("type") == "socket":
            path = listen.get("socket") or g.get("socket") or ""
            if not path:
                raise CtlError("the VM's VNC socket has no path yet (is the VM running?)")
            return "unix", path
        port = int(g.get("port", "-1"))
        if port > 0:
            return "tcp", port
        raise CtlError("the VM's VNC display has no port yet (is the VM running?)")
    raise CtlError("the VM has no VNC display")


def vnc_port(domain_xml: str) -> int:
    """The VNC TCP port of a domain that listens on TCP (older versions)."""
    kind, where = vnc_target(domain_xml)
    if kind != "tcp":
        raise CtlError("the VM's VNC display is a unix socket, not a TCP port")
    return int(where)


def cmd_vnc(args: argparse.Namespace) -> int:
    if _mode(args) == "cluster":
        raise CtlError("vnc needs node mode: libvirt serves the VM's VNC display on a unix socket on the node, "
                       "which kubectl port-forward cannot reach; run virtletctl on the node (--endpoint)")
    from virtlet.ctl.forward import TcpRelay, UnixRelay

    client = _node(args)
    pod: Pod = client.find_pod(args.pod)
    kind, where = vnc_target(client.domain_xml(pod.container_id))
    relay: UnixRelay | TcpRelay
    if kind == "unix":
        path = str(where)
        if not os.access(path, os.R_OK | os.W_OK):
            raise CtlError(f"cannot use the VM's VNC socket {path}: only root (and QEMU's user) may; run "
                           "virtletctl vnc as root on the node")
        relay = UnixRelay(path, args.local_port)
        print(f"VNC of {pod.namespace}/{pod.name} at 127.0.0.1:{relay.port} (for uid {relay.allowed_uid} only, "
              "while this runs); Ctrl-C stops", flush=True)
    else:
        relay = TcpRelay(("127.0.0.1", int(where)), args.local_port)
        print(f"VNC of {pod.namespace}/{pod.name} (display :{int(where) - 5900}) at 127.0.0.1:{relay.port}; "
              "Ctrl-C stops", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        relay.close()
        client.close()
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    if _mode(args) == "cluster":
        return subprocess.call(cluster.attach_cmd(cluster.kubectl(args.kubeconfig, args.context), args.pod))
    from virtlet.ctl.console import run_console

    client = _node(args)
    pod = client.find_pod(args.pod)
    try:
        return run_console(client.attach_url(pod.container_id))
    finally:
        client.close()


def cmd_dump_metadata(args: argparse.Namespace) -> int:
    from virtlet.ctl.diag import dump_metadata_yaml

    client = _node(args)
    try:
        sys.stdout.write(dump_metadata_yaml(client))
    finally:
        client.close()
    return 0


def cmd_diag(args: argparse.Namespace) -> int:
    from virtlet.ctl.diag import collect, write_tree

    if not args.json and not args.dir:
        raise CtlError("diag dump needs DIR (or --json to print to stdout)")
    client = _node(args)
    try:
        files = collect(client, args.log)
    finally:
        client.close()
    if args.json:
        json.dump(files, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
    else:
        written = write_tree(files, Path(args.dir))
        print(f"wrote {len(written)} files to {args.dir}")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"virtletctl {virtlet.__version__}")
    if _mode(args) == "node":
        client = _node(args)
        try:
            v = client.version()
            print(f"runtime {v.runtime_name} {v.runtime_version} (CRI {v.runtime_api_version}) at {client.endpoint}")
        except CtlError as exc:
            print(f"runtime: {exc}")
        finally:
            client.close()
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    from virtlet import errors
    from virtlet.images.push import Pusher
    from virtlet.images.registry import Credentials

    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else \
        os.environ.get("VIRTLET_REGISTRY_PASSWORD", "")
    ca = Path(args.ca_file).read_text() if args.ca_file else None
    try:
        pusher = Pusher(args.ref, Credentials.build(args.username, password), args.insecure, ca)
        digest = pusher.push(Path(args.file))
    except errors.VirtletError as exc:
        raise CtlError(str(exc)) from exc
    print(f"{pusher.ref.name}@{digest}")
    return 0


COMMANDS = {"ssh": cmd_ssh, "image": cmd_image, "vnc": cmd_vnc, "console": cmd_console,
            "dump-metadata": cmd_dump_metadata, "diag": cmd_diag, "version": cmd_version}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CtlError as exc:
        print(f"virtletctl: {exc}", file=sys.stderr)
        return 1
    except UpgradeError as exc:
        print(f"virtletctl: the streaming server refused the connection: {exc}", file=sys.stderr)
        return 1
    except (StreamClosed, OSError) as exc:
        print(f"virtletctl: connection failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
