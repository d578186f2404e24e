#!/usr/bin/env python3
"""Generate the Python CRI bindings from ``protos/runtime/v1/api.proto`` (the one documented command).

    .venv/bin/python tools/gen_protos.py           # (re)write runtime/virtlet/cri/gen/
    .venv/bin/python tools/gen_protos.py --check   # CI: exit 1 when the committed files are stale

Why a script and not a bare protoc line: grpc_tools names modules after the proto path (``runtime.v1``),
which is not where they live; we move the files into the package and rewrite the gRPC module's import to a
package-relative one (and the message classes' module name), so ``from virtlet.cri.gen import api_pb2,
api_pb2_grpc`` works anywhere.  The proto keeps the path ``runtime/v1/api.proto`` in the descriptor pool.

The output depends only on the proto and the grpcio-tools version, so ``--check`` compares bytes; a different
grpcio-tools version is reported as such, because it changes the generated headers while the proto did not.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "protos"
PROTO = "runtime/v1/api.proto"  # also the file's name in the descriptor pool, so keep it this specific
OUT_DIR = REPO / "runtime" / "virtlet" / "cri" / "gen"
GENERATED = ("__init__.py", "api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")
INIT_TEXT = '"""CRI runtime.v1 bindings made by tools/gen_protos.py from protos/runtime/v1/api.proto."""\n'
MODULE = "virtlet.cri.gen.api_pb2"
# (file, what protoc writes, what we need): the package-relative import and the real module name
_REWRITES = (
    ("api_pb2_grpc.py", "from runtime.v1 import api_pb2 as runtime_dot_v1_dot_api__pb2\n",
     "from . import api_pb2 as runtime_dot_v1_dot_api__pb2\n"),
    ("api_pb2.py", "'runtime.v1.api_pb2'", f"'{MODULE}'"),
)


class GenerationError(RuntimeError):
    pass


def generate(dest: Path) -> None:
    """Run protoc for the CRI proto into ``dest`` and make the result an importable package."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="virtlet-protoc-") as tmp:
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}",
               f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", PROTO]
        done = subprocess.run(cmd, cwd=PROTO_ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise GenerationError(f"protoc failed ({done.returncode}):\n{done.stderr.strip()}")
        made = Path(tmp) / Path(PROTO).parent
        for name in ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"):
            text = (made / name).read_text()
            for target, before, after in _REWRITES:
                if target != name:
                    continue
                if text.count(before) != 1:
                    raise GenerationError(f"expected {before.strip()!r} once in {name}; grpc_tools changed "
                                          "its output, update _REWRITES in tools/gen_protos.py")
                text = text.replace(before, after)
            (dest / name).write_text(text)
    (dest / "__init__.py").write_text(INIT_TEXT)


def _tool_versions(directory: Path) -> tuple[str | None, str | None]:
    """(protobuf gencode version, grpc gencode version) recorded in generated files, if present."""
    def find(name: str, pattern: str) -> str | None:
        try:
            match = re.search(pattern, (directory / name).read_text())
        except FileNotFoundError:
            return None
        return match.group(1) if match else None

    return (find("api_pb2.py", r"# Protobuf Python Version: (\S+)"),
            find("api_pb2_grpc.py", r"GRPC_GENERATED_VERSION = '([^']+)'"))


def _clip(line: str, width: int = 160) -> str:
    return line if len(line) <= width else line[:width] + f"... ({len(line)} chars)"


def check() -> int:
    """Regenerate into a temporary directory and compare with the committed files."""
    with tempfile.TemporaryDirectory(prefix="virtlet-gen-protos-") as tmp:
        fresh = Path(tmp)
        generate(fresh)
        problems: list[str] = []
        for name in GENERATED:
            committed = OUT_DIR / name
            if not committed.exists():
                problems.append(f"{committed.relative_to(REPO)} is missing")
                continue
            want, have = (fresh / name).read_text(), committed.read_text()
            if want != have:
                diff = list(difflib.unified_diff(have.splitlines(), want.splitlines(), f"committed/{name}",
                                                 f"regenerated/{name}", lineterm="", n=1))
                shown = "\n".join(_clip(line) for line in diff[:40]) + ("\n    ..." if len(diff) > 40 else "")
                problems.append(f"{committed.relative_to(REPO)} differs from a fresh generation:\n{shown}")
        extra = sorted(p.name for p in OUT_DIR.glob("*") if p.is_file() and p.name not in GENERATED)
        if extra:
            problems.append(f"unexpected files in {OUT_DIR.relative_to(REPO)}: {', '.join(extra)}")
        if not problems:
            print(f"gen_protos: {OUT_DIR.relative_to(REPO)} is up to date with protos/{PROTO}")
            return 0
        tools_now, tools_then = _tool_versions(fresh), _tool_versions(OUT_DIR)
    print("gen_protos: the generated CRI code is STALE:", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)
    if tools_then != tools_now and None not in tools_then:
        print(f"  note: committed files were made with protobuf/grpc gencode {tools_then}, this machine "
              f"makes {tools_now}; install the grpcio-tools pinned in pyproject.toml", file=sys.stderr)
    print("  fix: .venv/bin/python tools/gen_protos.py  (then commit runtime/virtlet/cri/gen/)",
          file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 when runtime/virtlet/cri/gen/ is stale")
    args = parser.parse_args(argv)
    try:
        if args.check:
            return check()
        generate(OUT_DIR)
    except GenerationError as exc:
        print(f"gen_protos: {exc}", file=sys.stderr)
        return 2
    print(f"gen_protos: wrote {', '.join(GENERATED)} to {OUT_DIR.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
