"""Small helpers shared by the domain XML object modules (``domain_xml``, ``domain_devices``)."""

from __future__ import annotations

from xml.etree import ElementTree as ET


def sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    """A new child ``<tag attrs>text</tag>`` of ``parent``."""
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def req(parent: ET.Element, path: str) -> ET.Element:
    """The element at ``path``; ``ValueError`` naming it when it is missing."""
    el = parent.find(path)
    if el is None:
        raise ValueError(f"<{parent.tag}> has no <{path}>")
    return el


def text_of(parent: ET.Element, path: str) -> str | None:
    """The stripped text at ``path`` (``None`` when there is none)."""
    el = parent.find(path)
    return None if el is None or el.text is None else el.text.strip()


def int_of(parent: ET.Element, path: str) -> int | None:
    """The integer at ``path`` (``None`` when there is none)."""
    value = text_of(parent, path)
    return None if value is None else int(value)
