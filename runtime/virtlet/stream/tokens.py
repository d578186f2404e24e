"""Single-use, short-lived tokens that stand for one CRI streaming request.

Why: the streaming URL is handed to the kubelet and then proxied from the user; anyone holding it may open a
console or a port.  So a URL is only good once (the first upgrade consumes it) and only for ``ttl`` seconds
after it was issued.  A spent, expired or unknown token answers 403 and opens nothing.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from virtlet import errors

DEFAULT_TTL = 60.0
MAX_PENDING = 1000


@dataclass(frozen=True)
class Pending:
    kind: str  # "attach" or "portforward"
    request: Any
    expires: float


class TokenStore:
    """Tokens issued for requests; ``consume`` hands a request out once, before it expires."""

    def __init__(self, ttl: float = DEFAULT_TTL, clock: Callable[[], float] = time.monotonic,
                 max_pending: int = MAX_PENDING) -> None:
        self.ttl = ttl
        self._clock = clock
        self._max = max_pending
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}

    def _expire(self, now: float) -> None:
        for token in [t for t, p in self._pending.items() if p.expires <= now]:
            del self._pending[token]

    def issue(self, kind: str, request: Any) -> str:
        """A new URL-safe token for ``request``; RESOURCE_EXHAUSTED when too many are unused."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            if len(self._pending) >= self._max:
                raise errors.ResourceExhausted(
                    f"{len(self._pending)} streaming URLs are issued and unused; try again within "
                    f"{self.ttl:.0f}s")
            token = secrets.token_urlsafe(18)
            self._pending[token] = Pending(kind, request, now + self.ttl)
            return token

    def consume(self, token: str, kind: str) -> Any | None:
        """The request of ``token`` when it is live and of ``kind``; ``None`` otherwise.  Spent either way."""
        now = self._clock()
        with self._lock:
            pending = self._pending.pop(token, None)
        if pending is None or pending.expires <= now or pending.kind != kind:
            return None
        return pending.request

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._pending)
