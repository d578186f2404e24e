"""Every layer of ``runtime/virtlet`` imports only from its own layer or the layers below (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[2] / "runtime" / "virtlet"

# docs/architecture.md's table, bottom (1) to top (8); a module is named by its first part under virtlet/
LAYERS: dict[str, int] = {
    "__init__": 1, "errors": 1, "config": 1, "quantity": 1, "failpoints": 1, "locks": 1, "procs": 1,
    "network": 2, "images": 2, "cloudinit": 2, "console": 2,
    "state": 3, "preconditions": 3,
    "sandbox": 4,
    "vm": 5, "volumes": 5,
    "stream": 6,
    "cri": 7,
    "daemon": 8, "proxy": 8, "ctl": 8,
}


def _unit(path: Path) -> str:
    rel = path.relative_to(RUNTIME)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[str, int]]:
    """(virtlet unit imported, line) for every import of virtlet code in ``path``, type-checking-only ones too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.split(".")[0] == "virtlet":
            parts = node.module.split(".")
            if len(parts) > 1:
                out.append((parts[1], node.lineno))
            else:
                out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.Import):
            out.extend((a.name.split(".")[1], node.lineno) for a in node.names
                       if a.name.startswith("virtlet.") and a.name.count(".") >= 1)
    return out


def test_every_unit_has_a_layer() -> None:
    units = {_unit(p) for p in RUNTIME.rglob("*.py")} | {p.name for p in RUNTIME.iterdir() if p.is_dir()}
    units -= {"__pycache__"}
    assert units <= set(LAYERS), f"put these in docs/architecture.md's layers and here: {units - set(LAYERS)}"


@pytest.mark.parametrize("path", sorted(p for p in RUNTIME.rglob("*.py") if "/cri/gen/" not in str(p)),
                         ids=lambda p: str(p.relative_to(RUNTIME)))
def test_imports_only_go_down(path: Path) -> None:
    unit = _unit(path)
    upward = [f"line {line}: virtlet.{target} (layer {LAYERS.get(target)})" for target, line in _imports(path)
              if target != "__version__" and LAYERS.get(target, 0) > LAYERS[unit]]
    assert not upward, f"{path.relative_to(RUNTIME)} (layer {LAYERS[unit]}) imports upward: {upward}"
