"""Which disk blocks belong to agent sessions likely to come back.

An agent session idles between turns (a tool call, a human, a long think) and then
returns with its whole context. Plain LRU would give its blocks to whatever ran in
between. Readers and writers may name a session (``session_id`` on Lookup and Reserve);
a block is then that session's (the last session to use it), and the session is seen.
For ``--session-retention`` seconds after a session was last seen, its blocks are
protected on disk: eviction takes blocks of no session, or of sessions idle past their
retention, first (least recently used first), and a protected block only when nothing
else is left, the blocks of the session idle longest first.

Pure bookkeeping; the marks live in memory (a restarted store starts with none, so its
blocks are then plain LRU until sessions come back).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

Key = tuple[str, int]


class SessionRetention:
    """Session marks on blocks, and the order in which to evict them."""

    def __init__(self, retention_seconds: float) -> None:
        self.retention_seconds = retention_seconds
        self._last_seen: dict[str, float] = {}
        self._owner: dict[Key, str] = {}

    def seen(self, session_id: str, keys: Iterable[Key], now: float) -> None:
        """A session used (read or wrote) these blocks now; no session, no mark."""
        if not session_id:
            return
        self._last_seen[session_id] = now
        for key in keys:
            self._owner[key] = session_id

    def forget(self, key: Key) -> None:
        """The block left the disk."""
        self._owner.pop(key, None)

    def protected(self, key: Key, now: float) -> bool:
        """Whether a block's session was seen within the retention."""
        session = self._owner.get(key)
        last = self._last_seen.get(session, -math.inf) if session else -math.inf
        return now - last <= self.retention_seconds

    def victims(self, lru: Iterable[Key], count: int, now: float) -> list[Key]:
        """``count`` blocks to evict from ``lru`` (least recently used first)."""
        free: list[Key] = []
        kept: list[Key] = []
        for key in lru:
            if not self.protected(key, now):
                free.append(key)
                if len(free) == count:
                    return free
            else:
                kept.append(key)
        kept.sort(key=lambda key: self._last_seen[self._owner[key]])  # stable: LRU within
        return free + kept[: count - len(free)]

    def figures(self) -> tuple[int, int]:
        """(sessions seen within the retention at the last prune, blocks marked), for Stats."""
        return len(self._last_seen), len(self._owner)

    def prune(self, now: float) -> None:
        """Forget sessions idle past their retention (their blocks are plain LRU now)."""
        for session in [s for s, t in self._last_seen.items() if now - t > self.retention_seconds]:
            del self._last_seen[session]
