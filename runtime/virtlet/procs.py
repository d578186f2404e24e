"""Host processes as ``/proc`` shows them: whether a pid still runs (a zombie does not) and its stat fields."""

from __future__ import annotations


def stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` from field 3 (the state) on; the command name before it may hold spaces and ``)``.

    Raises ``OSError`` when there is no such process.
    """
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text.rsplit(")", 1)[1].split()


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (a dead child its parent has not reaped yet, or an adopted daemon's)."""
    try:
        return stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False
