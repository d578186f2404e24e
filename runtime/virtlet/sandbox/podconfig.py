"""Where a container's CRI log file lives, from the sandbox's ``log_directory`` (a fact of the sandbox record)
and the container's ``log_path``.  One place, so the VM manager and the CRI status replies agree."""

from __future__ import annotations


def container_log_path(log_dir: str, log_path: str) -> str:
    """The CRI log file of a container: ``log_path`` relative to the sandbox's ``log_dir`` ("" when unset)."""
    if log_dir and log_path and not log_path.startswith("/"):
        return f"{log_dir.rstrip('/')}/{log_path}"
    return log_path
