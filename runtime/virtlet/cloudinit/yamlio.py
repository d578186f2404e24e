"""YAML in and out of cloud-init seeds.

Writing: one writer for every generated seed file, so the output is stable and easy for small readers.
Multi-line strings are written as ``|`` blocks (scripts stay readable in the seed), keys keep their insertion
order, lines are not wrapped and anchors/aliases are never emitted (guest-side readers such as the tiny
image's shell parser only understand plain YAML).

Reading: ``load_annotation`` is the only way YAML written by a pod author (``VirtletCloudInitUserData``,
``VirtletCloudInitMetaData``) is read.  Pod authors are not trusted, so the reader does bounded work:

* **Anchors and aliases are refused.**  An alias is a reference; expanding it while rendering the seed turns a
  340-byte document ("billion laughs") into gigabytes, and a self-referencing one (``x: &a [*a]``) into a cycle
  no writer can serialise.  Bounding the expansion instead would keep a feature cloud-init configs rarely need
  at the price of a second, subtler limit; refusing is simple and the message says how to rewrite.
* Nesting is at most ``MAX_DEPTH`` collections deep (the composer is recursive; thousands of ``[`` would end in
  a ``RecursionError``).
* At most ``MAX_NODES`` values (maps, lists and scalars): reading and re-writing stay well under a second even
  for the largest annotation, and deep indentation cannot multiply the size of the rendered seed unchecked.
* Numbers that Python cannot build (integers over 4300 digits) are refused instead of failing later.

The text size is bounded by the caller (``options.MAX_YAML_ANNOTATION``).
"""

from __future__ import annotations

from typing import Any

import yaml

#: Deepest nesting of maps and lists accepted in an annotation (cloud-init configs need fewer than 10).
MAX_DEPTH = 64
#: Most values (maps, lists, scalars) accepted in an annotation; real cloud-init configs have a few hundred.
MAX_NODES = 10_000

_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: 5x faster


class YamlRefused(ValueError):
    """The YAML is well-formed but uses something annotations may not (aliases, deep nesting...)."""


def load_annotation(text: str) -> Any:
    """Parse untrusted YAML into plain data; ``yaml.YAMLError`` when malformed, ``YamlRefused`` when refused.

    The events are checked first (a linear, non-recursive pass), so nothing is composed or constructed from a
    document that would be refused.
    """
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            raise YamlRefused(f"{_where(event)}: YAML aliases (*name) are not allowed in annotations; "
                              "write the repeated value out in full")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise YamlRefused(f"{_where(event)}: YAML anchors (&name) are not allowed in annotations; "
                              "remove the anchor and write repeated values out in full")
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_NODES:
                raise YamlRefused(f"{_where(event)}: more than {MAX_NODES} values (maps, lists and scalars)")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise YamlRefused(f"{_where(event)}: maps and lists are nested more than {MAX_DEPTH} deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    try:
        return yaml.load(text, Loader=_Loader)  # a safe loader: CSafeLoader or SafeLoader
    except ValueError as exc:  # int() of a number with more digits than Python converts
        raise YamlRefused(f"a value cannot be read: {_short(exc)}") from None
    except RecursionError:  # not reached with MAX_DEPTH; kept so it can never become INTERNAL
        raise YamlRefused(f"maps and lists are nested more than {MAX_DEPTH} deep") from None


def _where(event: Any) -> str:
    mark = getattr(event, "start_mark", None)
    if mark is None:
        return "in the document"
    return f"at line {mark.line + 1}, column {mark.column + 1}"


def _short(exc: BaseException) -> str:
    text = str(exc).split(";")[0]
    return text if len(text) <= 120 else text[:117] + "..."


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
