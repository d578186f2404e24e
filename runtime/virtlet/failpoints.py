"""Failpoints: named places where a test can freeze virtletd (to SIGKILL it mid-operation) or slow it down.

Set ``VIRTLET_FAILPOINT=<name>`` in virtletd's environment; when execution reaches ``hit(<name>)`` it logs and
sleeps until killed.  ``VIRTLET_FAILPOINT=<name>:sleep=<seconds>`` sleeps that long and then goes on (a slow
step: for a SIGTERM or a concurrent call while a call is in flight).  Unset (production), ``hit`` is a
dictionary lookup and nothing else.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


def hit(name: str) -> None:
    value = os.environ.get("VIRTLET_FAILPOINT")
    if not value or not value.startswith(name):
        return
    if value == name:
        log.warning("failpoint %s reached: sleeping until killed", name)
        while True:
            time.sleep(3600)
    rest = value[len(name):]
    if rest.startswith(":sleep="):
        try:
            seconds = float(rest[len(":sleep="):])
        except ValueError:
            return
        log.warning("failpoint %s reached: sleeping %.1fs", name, seconds)
        time.sleep(max(0.0, min(seconds, 3600.0)))
