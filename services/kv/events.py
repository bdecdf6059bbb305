"""A publisher's KV-event log: sequence numbers, a replay window, a live fan-out to
subscribers, and the block set for snapshots.

Engines and the KV store feed it the blocks they store and remove; it serves
the ``StreamKvEvents`` / ``GetKvSnapshot`` RPCs. A subscriber resumes with
``(epoch, after_sequence)``: when that position is still in the replay window it gets
every event after it, otherwise it is told to resync from a snapshot first. A
subscriber that falls too far behind is cut off with the same instruction rather than
letting its queue grow without bound. No torch or vLLM here: light stages use it too.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from services.kv.hashing import to_wire
from services.pb import common_pb2

#: Batch of events sent per stream message at most.
_MAX_BATCH = 256


@dataclass
class _Block:
    parent: bytes
    token_ids: list[int]
    chain_hash: int | None = None
    #: The cache_salt and LoRA adapter of a chain's first block.
    salt: str = ""
    adapter: str = ""


def chain_name(chain_hash: int) -> bytes:
    """The publisher hash a chain-hash-addressed block goes by in events: its wire name."""
    return to_wire(chain_hash)


class KvEventLog:
    """Sequenced KV events of one publisher, with replay and snapshot support."""

    def __init__(
        self, block_size: int, replay_window: int = 10_000, queue_limit: int = 10_000
    ) -> None:
        # A random epoch per process: sequence numbers of a restarted publisher are new.
        self.epoch = random.getrandbits(63) or 1
        self.block_size = block_size
        self.sequence = 0
        self._window: collections.deque[common_pb2.KvEvent] = collections.deque(
            maxlen=replay_window
        )
        self._blocks: dict[bytes, _Block] = {}
        self._subscribers: set[asyncio.Queue[common_pb2.KvEvent | None]] = set()
        self._queue_limit = queue_limit

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def stored(
        self,
        block_hashes: list[bytes],
        parent: bytes,
        token_ids: list[int],
        salt: str = "",
        adapter: str = "",
    ) -> None:
        """Record full blocks stored, in chain order (``token_ids``: block_size per block);
        ``salt`` and ``adapter`` are the cache_salt and LoRA adapter of a chain's first
        block (``parent`` empty): later blocks inherit them through the chain."""
        size = self.block_size
        previous = parent
        salt, adapter = ("", "") if parent else (salt, adapter)
        for index, block_hash in enumerate(block_hashes):
            first = not index
            self._blocks[block_hash] = _Block(
                previous,
                token_ids[index * size : (index + 1) * size],
                salt=salt if first else "",
                adapter=adapter if first else "",
            )
            previous = block_hash
        self._append(
            common_pb2.KvEvent(
                block_stored=common_pb2.BlockStored(
                    block_hashes=block_hashes,
                    parent_block_hash=parent,
                    token_ids=token_ids,
                    block_size=size,
                    cache_salt=salt,
                    adapter=adapter,
                )
            )
        )

    def stored_chains(self, chain_hashes: list[int]) -> None:
        """Record blocks known by their chain hashes only (the KV store's), one event each
        way: the publisher's hash is the chain hash's wire name (16 little-endian bytes)."""
        names = [chain_name(h) for h in chain_hashes]
        for name, chain_hash in zip(names, chain_hashes):
            self._blocks[name] = _Block(b"", [], chain_hash)
        self._append(
            common_pb2.KvEvent(
                block_stored=common_pb2.BlockStored(
                    block_hashes=names, chain_names=names, block_size=self.block_size
                )
            )
        )

    def removed(self, block_hashes: list[bytes]) -> None:
        for block_hash in block_hashes:
            self._blocks.pop(block_hash, None)
        self._append(
            common_pb2.KvEvent(block_removed=common_pb2.BlockRemoved(block_hashes=block_hashes))
        )

    def cleared(self) -> None:
        self._blocks.clear()
        self._append(common_pb2.KvEvent(all_blocks_cleared=common_pb2.AllBlocksCleared()))

    def snapshot(self) -> common_pb2.KvSnapshot:
        """Every held block (one record each, with its parent), consistent at ``sequence``."""
        return common_pb2.KvSnapshot(
            epoch=self.epoch,
            sequence=self.sequence,
            block_size=self.block_size,
            blocks=[
                common_pb2.BlockStored(
                    block_hashes=[block_hash],
                    parent_block_hash=block.parent,
                    token_ids=block.token_ids,
                    block_size=self.block_size,
                    chain_names=[] if block.chain_hash is None else [to_wire(block.chain_hash)],
                    cache_salt=block.salt,
                    adapter=block.adapter,
                )
                for block_hash, block in self._blocks.items()
            ],
        )

    async def subscribe(
        self, epoch: int, after_sequence: int
    ) -> AsyncGenerator[common_pb2.KvEventsResponse, None]:
        """Stream events after ``(epoch, after_sequence)``; starts with resync when needed."""
        queue: asyncio.Queue[common_pb2.KvEvent | None] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            oldest = self._window[0].sequence if self._window else self.sequence + 1
            resumable = epoch == self.epoch and oldest - 1 <= after_sequence <= self.sequence
            if not resumable and not (epoch == 0 and after_sequence == 0 and self.sequence == 0):
                yield common_pb2.KvEventsResponse(resync_required=True)
            else:
                backlog = [e for e in self._window if e.sequence > after_sequence]
                for start in range(0, len(backlog), _MAX_BATCH):
                    yield common_pb2.KvEventsResponse(events=backlog[start : start + _MAX_BATCH])
            while True:
                event = await queue.get()
                if event is None:  # fell behind: the subscriber must resync
                    yield common_pb2.KvEventsResponse(resync_required=True)
                    return
                batch = [event]
                while not queue.empty() and len(batch) < _MAX_BATCH:
                    queued = queue.get_nowait()
                    if queued is None:
                        yield common_pb2.KvEventsResponse(events=batch)
                        yield common_pb2.KvEventsResponse(resync_required=True)
                        return
                    batch.append(queued)
                yield common_pb2.KvEventsResponse(events=batch)
        finally:
            self._subscribers.discard(queue)

    def _append(self, event: common_pb2.KvEvent) -> None:
        self.sequence += 1
        event.sequence = self.sequence
        event.epoch = self.epoch
        event.timestamp = time.time()
        self._window.append(event)
        for queue in list(self._subscribers):
            if queue.qsize() >= self._queue_limit:
                self._subscribers.discard(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(event)
