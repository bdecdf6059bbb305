"""Session affinity: requests carrying the same session key go back to the worker that
served the session last, per role.

A conversation's next turn extends the previous prompt, so the worker that ran the last
turn holds most of the next one's KV, often before the router's KV index has heard
of it (events arrive after the engine stores blocks). The key comes from the client
(``session_id`` in the gRPC request or ``x-session-id`` metadata, the ``X-Session-Id``
HTTP header), or from a Responses chain: a response that continues
``previous_response_id`` carries the id of the chain's first response. The router
never makes one up for a request that gives neither. Entries expire after ``--session-ttl``
seconds without use, and the table is capped, least recently used first out.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

#: Metadata key / HTTP header that carries the session key (HTTP headers match case-blind).
SESSION_HEADER = "x-session-id"


class SessionAffinity:
    """Remembers, per (session, role), the key of the worker last chosen."""

    def __init__(
        self, ttl: float, capacity: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._clock = clock
        self._pins: OrderedDict[tuple[str, int], tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pins)

    def get(self, session: str, role: int) -> str | None:
        """The worker key pinned for the session and role, if it has not expired."""
        if not session or self.ttl <= 0:
            return None
        entry = self._pins.get((session, role))
        if entry is None:
            return None
        key, used = entry
        if self._clock() - used > self.ttl:
            del self._pins[(session, role)]
            return None
        return key

    def remember(self, session: str, role: int, key: str) -> None:
        """Pin the session to ``key`` for the role (refreshing its expiry)."""
        if not session or self.ttl <= 0:
            return
        self._pins[(session, role)] = (key, self._clock())
        self._pins.move_to_end((session, role))
        while len(self._pins) > self.capacity:
            self._pins.popitem(last=False)
