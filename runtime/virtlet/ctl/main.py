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
from typing import NoReturn

import virtlet
from virtlet.ctl import cluster
from virtlet.ctl.node import DEFAULT_ENDPOINT, CtlError, NodeClient, Pod
from virtlet.stream.client import UpgradeError
from virtlet.stream.spdy_conn import StreamClosed

# The kubectl plugin: kubectl runs ``kubectl-virt`` on PATH for ``kubectl virt ...`` (the entry point of the
# same name in pyproject.toml), passing every argument after ``virt`` as it is.
PLUGIN_PROG = "kubectl virt"


class KubectlStyleParser(argparse.ArgumentParser):
    """As ``kubectl virt``: usage errors print ``error: ...`` and exit 1, as kubectl's own commands do."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"error: {message}\n")


def build_parser(prog: str = "virtletctl") -> argparse.ArgumentParser:
    cls = KubectlStyleParser if prog == PLUGIN_PROG else argparse.ArgumentParser
    p = cls(prog=prog, description="ssh, VNC, console, diagnostics and node validation for VM pods")
    p.add_argument("-n", "--namespace", default=None,
                   help="namespace of the pods named without NS/ (default: the kubeconfig context's in cluster "
                        "mode, 'default' in node mode)")
    p.add_argument("--endpoint", default=None,
                   help=f"node mode: virtletd CRI socket (default {DEFAULT_ENDPOINT})")
    p.add_argument("--mode", choices=("auto", "node", "cluster"), default="auto",
                   help="node: talk to the CRI socket; cluster: kubectl with your kubeconfig (default: auto)")
    p.add_argument("--kubeconfig", default=None, help="cluster mode: kubeconfig file")
    p.add_argument("--context", default=None, help="cluster mode: kubeconfig context")
    # kubectl users put -n/--context/--kubeconfig after the command too (`kubectl virt ssh -n ns pod`): every
    # command also takes them; SUPPRESS keeps the value given before the command when they are not repeated
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--context", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--kubeconfig", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=cls)
    sub_add = sub.add_parser
    sub.add_parser = lambda name, **kw: sub_add(name, parents=[common], **kw)  # type: ignore[method-assign]

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

    val = sub.add_parser("validate", help="check that this node can run VM pods (one line per check; exit 1 on "
                                          "a failure)")
    val.add_argument("--config", type=Path, default=None,
                     help="virtletd's config file (default /etc/virtlet/virtlet.yaml when it exists)")
    val.add_argument("--proxy-config", type=Path, default=None,
                     help="virtlet-criproxy's config file (default /etc/virtlet/criproxy.yaml)")
    val.add_argument("--kubelet-dropin", type=Path, default=None,
                     help="the kubelet drop-in (default /etc/systemd/system/kubelet.service.d/"
                          "90-virtlet-criproxy.conf)")
    val.add_argument("--virtlogd-socket", type=Path, default=None, help="default /run/libvirt/virtlogd-sock")
    val.add_argument("--min-free", default="10Gi", help="free disk the image store and state dir need (10Gi)")
    val.add_argument("--kvm-timeout", type=float, default=5.0, help="seconds for the KVM probe guest (5)")
    val.add_argument("--skip", action="append", default=[], metavar="CHECK",
                     help="skip a check (repeatable): kvm, qemu, virtiofsd, libvirt, virtlogd, cni, virtletd, "
                          "criproxy, kubelet, disk")


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


def _ref(args: argparse.Namespace, ref: str) -> str:
    """A pod reference with ``-n`` applied: NS/NAME and sandbox ids stay as they are."""
    if args.namespace and "/" not in ref:
        return f"{args.namespace}/{ref}"
    return ref


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
    ref = _ref(args, ref)
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
    pod: Pod = client.find_pod(_ref(args, args.pod))
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
        return subprocess.call(cluster.attach_cmd(cluster.kubectl(args.kubeconfig, args.context),
                                                  _ref(args, args.pod)))
    from virtlet.ctl.console import run_console

    client = _node(args)
    pod = client.find_pod(_ref(args, args.pod))
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


def cmd_validate(args: argparse.Namespace) -> int:
    from virtlet import quantity
    from virtlet.ctl import validate

    try:
        min_free = quantity.parse_bytes(args.min_free, 2**63 - 1)
    except ValueError as exc:
        raise CtlError(f"--min-free: expected a size such as 10Gi: {exc}") from exc
    unknown = sorted(set(args.skip) - set(validate.CHECKS))
    if unknown:
        raise CtlError(f"--skip {unknown[0]}: no such check (known: {', '.join(validate.CHECKS)})")
    opts = validate.Options(config=args.config, proxy_config=args.proxy_config, min_free=min_free,
                            kvm_timeout=args.kvm_timeout, skip=set(args.skip))
    if args.kubelet_dropin is not None:
        opts.kubelet_dropin = args.kubelet_dropin
    if args.virtlogd_socket is not None:
        opts.virtlogd_socket = args.virtlogd_socket
    results = validate.run(opts)
    sys.stdout.write(validate.render(results))
    return 1 if any(r.status == validate.FAIL for r in results) else 0


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

COMMANDS["validate"] = cmd_validate


def main(argv: Sequence[str] | None = None, prog: str = "virtletctl") -> int:
    args = build_parser(prog).parse_args(argv)
    label = "error" if prog == PLUGIN_PROG else "virtletctl"  # kubectl prints "error: ..."
    if prog == PLUGIN_PROG and args.mode == "auto" and not args.endpoint:
        args.mode = "cluster"  # a kubectl user means the cluster of the kubeconfig, even on a node
    try:
        return COMMANDS[args.command](args)
    except CtlError as exc:
        print(f"{label}: {exc}", file=sys.stderr)
        return 1
    except UpgradeError as exc:
        print(f"{label}: the streaming server refused the connection: {exc}", file=sys.stderr)
        return 1
    except (StreamClosed, OSError) as exc:
        print(f"{label}: connection failed: {exc}", file=sys.stderr)
        return 1


def kubectl_plugin() -> int:
    """``kubectl-virt``: the same commands as ``kubectl virt COMMAND`` (cluster mode unless --endpoint)."""
    return main(sys.argv[1:], prog=PLUGIN_PROG)


def kubectl_complete() -> int:
    """``kubectl_complete-virt``: kubectl (1.26+) runs it for ``kubectl virt <TAB>`` (see docs/virtletctl.md)."""
    from virtlet.ctl.completion import complete

    sys.stdout.write(complete(sys.argv[1:], list(COMMANDS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
