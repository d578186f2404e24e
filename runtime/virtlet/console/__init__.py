"""A VM's serial console: the CRI log writer behind ``kubectl logs`` and the attach hub behind ``kubectl attach``.

- ``cri_format``: the CRI log line format (write and parse).
- ``state``: the writer's exactly-once state file.
- ``rotation``: following virtlogd's RAW generations and the kubelet's CRI log rotation.
- ``writer``: ``ConsoleLogWriter``, RAW -> CRI log exactly once across restarts (``python -m virtlet.console``).
- ``attach``: ``ConsoleHub``/``ConsoleSession``, one QEMU console connection shared by attach sessions.

Used by ``vm/`` (one writer per running container) and ``stream/`` (attach); it imports neither.
"""
