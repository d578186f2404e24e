"""``dump-metadata`` and ``diag dump``: everything a bug report about a node needs, in one tree (or JSON).

Why both from here: a user who hits a problem runs one command and attaches one directory; nothing in it
needs a running cluster, and missing parts (no libvirt, no log file) are noted instead of failing the dump.
"""

from __future__ import annotations

import glob
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import yaml

import virtlet
from virtlet.cri.gen import api_pb2 as api
from virtlet.ctl.node import CtlError, NodeClient, message_dict

LOG_GLOBS = ("/var/log/libvirt/libvirtd.log", "/var/log/libvirt/qemu/virtlet-*.log", "/var/log/virtlet*.log",
             "/var/log/virtletd*.log")
TAIL_BYTES = 512 * 1024


def metadata(client: NodeClient) -> dict[str, Any]:
    """Sandboxes, containers (with their domain), images as plain data."""
    sandboxes = [message_dict(s) for s in client.sandboxes()]
    containers = []
    domains = {}
    for c in client.containers():
        item = message_dict(c)
        try:
            info = client.container_info(c.id)
        except CtlError as exc:
            info = {"error": str(exc)}
        item["runtime_info"] = {k: v for k, v in info.items() if k != "domain_xml"}
        if info.get("domain_xml"):
            domains[c.id] = info["domain_xml"]
        containers.append(item)
    images = [message_dict(i) for i in client.call(client.image, "ListImages", api.ListImagesRequest()).images]
    return {"sandboxes": sandboxes, "containers": containers, "images": images,
            "domains": {cid: {"xml": xml} for cid, xml in domains.items()}}


def dump_metadata_yaml(client: NodeClient) -> str:
    return yaml.safe_dump(metadata(client), sort_keys=False, default_flow_style=False)


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"$ {' '.join(cmd)}\n(not run: {exc})\n"
    return f"$ {' '.join(cmd)}\n{out.stdout}{out.stderr}" + (f"(exit {out.returncode})\n" if out.returncode else "")


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"(unreadable: {exc})\n"


def collect(client: NodeClient | None, extra_logs: list[str] | None = None) -> dict[str, str]:
    """The dump as ``{relative path: text}``."""
    files: dict[str, str] = {}
    versions = {"virtletctl": virtlet.__version__, "python": platform.python_version(),
                "kernel": platform.release()}
    if client is not None:
        try:
            v = client.version()
            versions["runtime"] = f"{v.runtime_name} {v.runtime_version} (CRI {v.runtime_api_version})"
            status = client.call(client.runtime, "Status", api.StatusRequest(verbose=True))
            files["status.json"] = json.dumps(message_dict(status), indent=2, sort_keys=True) + "\n"
            if "config" in status.info:
                files["config.json"] = json.dumps(json.loads(status.info["config"]), indent=2) + "\n"
            meta = metadata(client)
            for cid, dom in meta["domains"].items():
                files[f"domains/{cid}.xml"] = dom["xml"]
            meta["domains"] = sorted(meta["domains"])
            files["metadata.yaml"] = yaml.safe_dump(meta, sort_keys=False)
        except CtlError as exc:
            files["runtime-error.txt"] = f"{exc}\n"
    for cmd in (["virsh", "--version"], ["qemu-system-x86_64", "--version"]):
        lines = _run(cmd).splitlines()
        versions[cmd[0]] = lines[1] if len(lines) > 1 else "unknown"
    files["versions.json"] = json.dumps(versions, indent=2) + "\n"
    files["network/netns.txt"] = _run(["ip", "netns", "list"])
    files["network/links.txt"] = _run(["ip", "-d", "link", "show"])
    files["network/addresses.txt"] = _run(["ip", "addr", "show"])
    netns_text = _run(["ip", "netns", "list"]).splitlines()[1:]
    for line in netns_text:
        name = line.split()[0] if line.split() else ""
        if name and not name.startswith("("):
            files[f"network/netns/{name}.txt"] = _run(["ip", "-n", name, "-d", "addr", "show"])
    files["libvirt/domains.txt"] = _run(["virsh", "-c", "qemu:///system", "list", "--all"])
    for pattern in (*LOG_GLOBS, *(extra_logs or [])):
        for path in sorted(glob.glob(pattern)):
            files["logs/" + path.strip("/").replace("/", "_")] = _tail(Path(path))
    return files


def write_tree(files: dict[str, str], target: Path) -> list[Path]:
    written = []
    for rel, text in sorted(files.items()):
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
