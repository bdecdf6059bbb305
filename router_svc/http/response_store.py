"""The router's store of recent responses (OpenAI's Responses API), in memory.

Bounded in number, age and bytes (``--responses-max``, ``--responses-ttl``,
``--responses-max-mib``, and ``--responses-key-mib`` for each API key): the oldest
entries go first, an owner's own before anyone else's, and expired ones are swept as
entries are stored and periodically. A router restart forgets them (they are a
convenience, not a database).

A stored response belongs to the API key that created it: retrieval, deletion, cancel
and ``previous_response_id`` under any other key answer 404, exactly as for an id never
stored, so ids cannot be probed across keys.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from router_svc.http.protocol import ChatMessage
from services.errors import InvalidRequest, NotFound

#: What one stored message is counted as beyond its text (the objects around it).
_MESSAGE_BYTES = 512


@dataclass
class Stored:
    """A stored response: the object answered, and the conversation it continues."""

    response: dict[str, Any]
    conversation: list[ChatMessage]
    stored_at: float
    #: The id of the API key that created it (empty on an open API).
    owner: str = ""
    #: A background response's generation, while it runs (cancel cancels it).
    task: asyncio.Task[None] | None = None
    #: What the store counts it as, in bytes (:meth:`ResponseStore.put` sets it).
    size: int = 0
    #: The id of its chain's first response: the session key of every turn of the chain
    #: (the store keeps a session's blocks, the router sends it back to its engine).
    chain: str = ""

    def measure(self) -> int:
        """An estimate of the memory it holds: its JSON twice (Python objects are larger
        than their text) and each message's text with a fixed overhead. Messages shared
        with an earlier response of the same conversation are counted again, which only
        errs on the safe side."""
        text = sum(
            len(m.text())
            + sum(len(c.function.arguments) + len(c.function.name) for c in m.tool_calls or [])
            for m in self.conversation
        )
        return 2 * len(json.dumps(self.response)) + text + _MESSAGE_BYTES * len(self.conversation)


class ResponseStore:
    """Recent responses by id, for ``previous_response_id``, retrieval and cancel;
    bounded in entries and bytes, all together and per owner (oldest go first)."""

    def __init__(
        self, max_entries: int, ttl: float, max_bytes: int = 512 << 20, owner_bytes: int = 64 << 20
    ) -> None:
        self._entries: OrderedDict[str, Stored] = OrderedDict()
        self._max = max_entries
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._owner_bytes = owner_bytes
        self._bytes = 0
        self._by_owner: dict[str, int] = {}

    @property
    def bytes(self) -> int:
        """What the stored responses are counted as, in bytes."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entry: Stored) -> None:
        """Store ``entry``, then drop the oldest entries past the bounds, the owner's own
        first. A response larger than one owner's bound is refused before anything is
        stored or dropped."""
        size = self.fits(entry)
        response_id = entry.response["id"]
        if response_id in self._entries:
            self._forget(response_id)
        self.sweep()
        self._entries[response_id] = entry
        self._count(entry, size)

    def update(self, entry: Stored) -> None:
        """Count a stored entry again after it changed (a background response got its
        output); one that no longer fits its owner's bound is dropped. One deleted
        meanwhile stays deleted."""
        if self._entries.get(entry.response["id"]) is not entry:
            return
        try:
            size = self.fits(entry)
        except InvalidRequest:
            self._forget(entry.response["id"])
            return
        self._bytes -= entry.size  # counted again in place: it keeps its age and order
        self._by_owner[entry.owner] -= entry.size
        self._count(entry, size)

    def fits(self, entry: Stored) -> int:
        """What ``entry`` counts as; raise :class:`InvalidRequest` if it is more than one
        owner may keep (checked before a request is served, and again when stored)."""
        size = entry.measure()
        bound = min(self._owner_bytes, self._max_bytes)
        if size > bound:
            raise InvalidRequest(
                f"the response would take {size >> 20} MiB in the store, more than one key "
                f"may keep ({bound >> 20} MiB); send it with store: false"
            )
        return size

    def _count(self, entry: Stored, size: int) -> None:
        """Count a just-stored entry, then drop what is past the bounds."""
        entry.size = size
        self._bytes += size
        self._by_owner[entry.owner] = self._by_owner.get(entry.owner, 0) + size
        for stored_id in [i for i, e in self._entries.items() if e.owner == entry.owner]:
            if self._by_owner[entry.owner] <= self._owner_bytes:
                break
            self._forget(stored_id)
        while len(self._entries) > self._max or self._bytes > self._max_bytes:
            self._forget(next(iter(self._entries)))

    def _forget(self, response_id: str) -> None:
        entry = self._entries.pop(response_id)
        self._bytes -= entry.size
        self._by_owner[entry.owner] -= entry.size
        if not self._by_owner[entry.owner]:
            del self._by_owner[entry.owner]

    def sweep(self) -> None:
        """Drop the expired entries (they are kept in the order they were stored)."""
        horizon = time.monotonic() - self._ttl
        while self._entries:
            response_id, entry = next(iter(self._entries.items()))
            if entry.stored_at > horizon:
                break
            if entry.task is not None:
                entry.task.cancel()
            self._forget(response_id)

    def get(self, response_id: str, owner: str) -> Stored:
        """The entry, for its owner only: any other key is told it is not stored."""
        entry = self._entries.get(response_id)
        if entry is not None and time.monotonic() - entry.stored_at > self._ttl:
            self._forget(response_id)
            entry = None
        if entry is None or not hmac.compare_digest(entry.owner, owner):
            raise NotFound(
                f"response {response_id!r} is not stored here (never stored, expired, or deleted)",
                "response_id",
            )
        return entry

    def continued(self, response_id: str | None, owner: str) -> Stored | None:
        """The finished response a ``previous_response_id`` names (None for none)."""
        if response_id is None:
            return None
        entry = self.get(response_id, owner)
        if entry.response["status"] not in ("completed", "incomplete"):
            raise InvalidRequest(
                f"response {response_id!r} is {entry.response['status']}; it cannot be continued"
            )
        return entry

    def delete(self, response_id: str, owner: str) -> None:
        entry = self.get(response_id, owner)
        if entry.task is not None:
            entry.task.cancel()
        self._forget(response_id)
