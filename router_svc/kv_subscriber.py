"""Follows every engine's and KV store's KV-event stream into the router's :class:`KvIndex`.

One task per engine or store member, started and stopped with its etcd membership: it resumes
the stream from the last ``(epoch, sequence)`` it applied, and when the engine says it
cannot (a gap, a restart, a first subscription) it rebuilds the worker's blocks from a
snapshot and resumes after the snapshot's position. When the member leaves etcd its
blocks leave the index. Prefill and decode workers are separate entries, so their
pools never share a tree.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from router_svc.kv_index import KvIndex
from services.aio import cancel_and_wait
from services.clients import EngineClient, KvStoreClient
from services.pb import common_pb2

log = logging.getLogger(__name__)

#: Seconds between attempts to reach an engine's stream after a failure.
RETRY_SECONDS = 1.0


def apply_snapshot(index: KvIndex, worker: str, snapshot: common_pb2.KvSnapshot) -> None:
    """Replace ``worker``'s blocks with a snapshot's (parents first, whatever their order)."""
    index.cleared(worker)
    pending = list(snapshot.blocks)
    known: set[bytes] = set()
    while pending:
        deferred = []
        for record in pending:
            if record.parent_block_hash and bytes(record.parent_block_hash) not in known:
                deferred.append(record)
                continue
            index.stored(worker, record)
            known.update(bytes(h) for h in record.block_hashes)
        if len(deferred) == len(pending):
            break  # orphans: their parents were evicted; they cannot be named
        pending = deferred


def index_event(index: KvIndex, worker: str, event: common_pb2.KvEvent) -> None:
    """Apply one engine or store KV event to the router's index under ``worker``."""
    kind = event.WhichOneof("event")
    if kind == "block_stored":
        index.stored(worker, event.block_stored)
    elif kind == "block_removed":
        index.removed(worker, event.block_removed.block_hashes)
    elif kind == "all_blocks_cleared":
        index.cleared(worker)


class KvSubscriber:
    """Keeps one follower task per engine member, keyed like the router's peers."""

    def __init__(self, index: KvIndex) -> None:
        self.index = index
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def follow(self, worker: str, client: EngineClient | KvStoreClient) -> None:
        if worker not in self._tasks:
            self._tasks[worker] = asyncio.create_task(
                self._follow(worker, client), name=f"kv events {worker}"
            )

    async def forget(self, worker: str) -> None:
        await cancel_and_wait(self._tasks.pop(worker, None))
        self.index.cleared(worker)

    async def close(self) -> None:
        for worker in list(self._tasks):
            await self.forget(worker)

    async def _follow(self, worker: str, client: EngineClient | KvStoreClient) -> None:
        epoch = sequence = 0
        while True:
            call = client.kv_events(epoch, sequence)
            try:
                async for reply in call:
                    if reply.resync_required:
                        snapshot = await client.kv_snapshot()
                        apply_snapshot(self.index, worker, snapshot)
                        epoch, sequence = snapshot.epoch, snapshot.sequence
                        log.debug(
                            "%s: KV index resynced, %d blocks", worker, self.index.blocks_of(worker)
                        )
                        break  # resume the stream after the snapshot
                    for event in reply.events:
                        index_event(self.index, worker, event)
                        epoch, sequence = event.epoch, event.sequence
                else:
                    await asyncio.sleep(RETRY_SECONDS)  # the engine ended the stream (draining)
            except grpc.aio.AioRpcError as error:
                log.debug("%s: KV-event stream failed (%s); retrying", worker, error.code().name)
                await asyncio.sleep(RETRY_SECONDS)
            finally:
                call.cancel()
