"""Failpoints: named places where a test can freeze virtletd (to SIGKILL it mid-operation).

Set ``VIRTLET_FAILPOINT=<name>`` in virtletd's environment; when execution reaches ``hit(<name>)`` it logs and
sleeps until killed.  Unset (production), ``hit`` is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


def hit(name: str) -> None:
    if os.environ.get("VIRTLET_FAILPOINT") == name:
        log.warning("failpoint %s reached: sleeping until killed", name)
        while True:
            time.sleep(3600)
