"""The KV store's shard map: which store instance owns which chain hashes.

Each store publishes a :class:`~services.pb.kvstore_pb2.ShardEntry` with its points on
a 64-bit ring (``/stagemesh/v1/kvstore/shards/<instance_id>``, under its lease). A block
belongs to the store owning the first point at or after its chain hash, wrapping around:
consistent hashing, so a store that joins or leaves takes or gives back only the ranges
next to its own points, and every other block keeps its home. Points come from the
instance id, so a restarted store (new id) gets fresh ranges and nobody trusts blocks it
no longer has.

:class:`ShardMap` is the pure lookup; :class:`ShardMapFollower` keeps one current from
etcd on a background thread, for synchronous callers (vLLM's scheduler and workers).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import threading
from collections.abc import Iterable, Sequence

from services.etcd import EtcdSession
from services.membership import ROOT, MemberWatcher
from services.pb import kvstore_pb2

log = logging.getLogger(__name__)

SHARDS_PREFIX = ROOT + "kvstore/shards/"

#: Ring points per store: enough that ranges come out within a few percent of even.
DEFAULT_VNODES = 64
#: The ring is 64 bits; a (128-bit) chain hash sits at its low 64 bits, as even as the rest.
RING_MASK = (1 << 64) - 1


def ring_points(instance_id: str, vnodes: int = DEFAULT_VNODES) -> list[int]:
    """A store's points on the ring, derived from its instance id."""
    return sorted(
        int.from_bytes(hashlib.sha256(f"{instance_id}#{i}".encode()).digest()[:8], "little")
        for i in range(vnodes)
    )


def shard_key(instance_id: str) -> str:
    """The etcd key of a store's entry in the shard map."""
    return SHARDS_PREFIX + instance_id


class ShardMap:
    """Owner lookup over the ring made of every store's points.

    Plain Python data (it travels from vLLM's scheduler to its workers by pickle).
    """

    def __init__(self, entries: Iterable[kvstore_pb2.ShardEntry] = ()) -> None:
        entries = list(entries)
        ring = sorted(
            (point, entry.instance_id) for entry in entries for point in entry.ring_points
        )
        self._points = [point for point, _ in ring]
        self._owners = [owner for _, owner in ring]
        #: instance id -> gRPC address of each store.
        self.addresses = {entry.instance_id: entry.grpc_address for entry in entries}

    def __bool__(self) -> bool:
        return bool(self._points)

    def owner(self, chain_hash: int) -> str:
        """The instance id of the store that owns ``chain_hash``; LookupError on an empty map."""
        if not self._points:
            raise LookupError("no KV store in the shard map")
        index = bisect.bisect_left(self._points, chain_hash & RING_MASK)
        return self._owners[index % len(self._points)]

    def split(self, hashes: Sequence[int]) -> dict[str, list[int]]:
        """``hashes`` grouped by owning store's gRPC address, each group in the order given."""
        groups: dict[str, list[int]] = {}
        for chain_hash in hashes:
            groups.setdefault(self.addresses[self.owner(chain_hash)], []).append(chain_hash)
        return groups


class ShardMapFollower:
    """The current :class:`ShardMap`, followed from etcd by a watch on its own thread.

    ``current`` is replaced whole on every change, so a reader on another thread always
    sees a consistent map without locks.
    """

    def __init__(self, etcd_endpoints: list[tuple[str, int]]) -> None:
        self.current = ShardMap()
        self._endpoints = etcd_endpoints
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="kvstore-shards", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.run(self._follow())

    async def _follow(self) -> None:
        self._stopping = asyncio.Event()
        self._loop = asyncio.get_running_loop()  # last: stop() uses both once this is set
        session = EtcdSession(self._endpoints)
        watcher: MemberWatcher[kvstore_pb2.ShardEntry] = MemberWatcher(
            session, SHARDS_PREFIX, on_change=self._changed, parse=kvstore_pb2.ShardEntry.FromString
        )
        self._watcher = watcher
        watcher.start()
        try:
            await self._stopping.wait()
        finally:
            await watcher.close()
            await session.close()

    def _changed(self, key: str, entry: kvstore_pb2.ShardEntry | None) -> None:
        self.current = ShardMap(self._watcher.members.values())
        log.info(
            "KV store shard map: %s",
            ", ".join(f"{i}@{a}" for i, a in self.current.addresses.items()) or "empty",
        )
