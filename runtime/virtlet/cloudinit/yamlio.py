"""One YAML writer for every generated seed file, so the output is stable and easy for small readers.

Multi-line strings are written as ``|`` blocks (scripts stay readable in the seed), keys keep their insertion
order, lines are not wrapped and anchors/aliases are never emitted (guest-side readers such as the tiny
image's shell parser only understand plain YAML).
"""

from __future__ import annotations

from typing import Any

import yaml


class _SeedDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_SeedDumper.add_representer(str, _represent_str)


def dump(data: Any) -> str:
    """Serialise ``data`` as block-style YAML (PyYAML falls back to quoting where ``|`` cannot be used)."""
    return yaml.dump(
        data,
        Dumper=_SeedDumper,
        default_flow_style=False,
        sort_keys=False,
        allow_unicode=True,
        width=1 << 16,
    )
