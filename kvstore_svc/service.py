"""The KV store stage: a NIXL-registered host-memory pool behind a gRPC control API.

The store never moves a byte itself. Engines read and write its pool with NIXL (one
transfer per batch of blocks, straight between their KV cache and the pool); gRPC only
decides *which* slots: ``Lookup`` (pinning hits) then a NIXL READ then ``Release``, and
``Reserve`` then a NIXL WRITE then ``Commit``. Keeping the bytes off gRPC is what makes
loading a prefix faster than computing it. The bookkeeping (LRU, pins, reservations)
is :class:`~kvstore_svc.blocks.BlockTable`, what loads cost its readers
:class:`~kvstore_svc.loads.LoadMeter`; this module owns the memory, the NIXL agent, the
KV events and the shard entry. No torch or vLLM here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import grpc
import numpy as np
from google.protobuf import descriptor

from kvstore_svc.blocks import BlockTable, LayoutMismatch, NotWritten
from kvstore_svc.config import KvStoreConfig
from kvstore_svc.disk import DiskTier, open_disk_tier
from kvstore_svc.disk_files import BlockDirectory, DiskSetupError, FileMover
from kvstore_svc.loads import LoadMeter
from kvstore_svc.metrics import CALLS, watch
from services.aio import cancel_and_wait
from services.errors import FailedPrecondition, InvalidRequest, NotFound, Unavailable
from services.kv.events import KvEventLog, chain_name
from services.kv.hashing import from_wire, to_wire
from services.kv.nixl import limit_progress_poll, nixl_api
from services.kv.shards import ring_points, shard_key
from services.kv.store_link import WRITTEN_NOTICE
from services.net import free_port
from services.pb import common_pb2, kvstore_pb2
from services.server import Stage

log = logging.getLogger(__name__)

#: Most hashes one call may name: a 128k-token prompt in 16-token blocks.
MAX_HASHES = 8192


def _hashes(names: Any) -> list[int]:
    """The chain hashes a request names (``chain_names``); InvalidRequest for too many,
    or for a name that is not 16 bytes."""
    if len(names) > MAX_HASHES:
        raise InvalidRequest(f"{len(names)} hashes in one call; at most {MAX_HASHES}")
    try:
        return [from_wire(name) for name in names]
    except ValueError as exc:
        raise InvalidRequest(f"chain_names: {exc}") from None


class KvStoreServicer:
    """KvStoreService over one pool."""

    def __init__(self, config: KvStoreConfig) -> None:
        self._config = config
        self.table: BlockTable | None = None
        self.disk: DiskTier | None = None
        self.events = KvEventLog(block_size=0, replay_window=config.kv_event_window)
        self.loads = LoadMeter()
        self._target: kvstore_pb2.NixlTarget | None = None
        self._notices: Callable[[], dict[str, list[bytes]]] = dict

    def attach(
        self,
        table: BlockTable,
        target: kvstore_pb2.NixlTarget,
        notices: Callable[[], dict[str, list[bytes]]],
        disk: DiskTier | None = None,
    ) -> None:
        """Serve ``table``'s pool at ``target``, with ``disk`` behind it; ``notices``
        drains the NIXL agent's new notifications (by sending agent)."""
        self.table = table
        self.disk = disk
        self._target = target
        self._notices = notices

    def _ready(self) -> BlockTable:
        if self.table is None:
            raise Unavailable("the KV store is still starting")
        return self.table

    def _target_for(self, table: BlockTable) -> kvstore_pb2.NixlTarget:
        assert self._target is not None
        target = kvstore_pb2.NixlTarget()
        target.CopyFrom(self._target)
        target.slot_bytes = table.slot_bytes
        return target

    async def Lookup(
        self, request: kvstore_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.LookupResponse:
        """The longest stored prefix of a hash chain, pinned for the reader. Its time
        (disk reads included) is kept for the reader's Release (kvstore_svc/loads.py)."""
        started = time.monotonic()
        table = self._ready()
        hashes = _hashes(request.chain_names)
        pin_seconds = request.pin_seconds if request.pin_seconds > 0 else self._config.pin_seconds
        if self.disk is not None:
            await self.disk.promote(request.layout, hashes, time.monotonic())
        hits, pin_id = table.lookup(request.layout, hashes, pin_seconds, time.monotonic())
        if self.disk is not None:
            keys = [(request.layout, h) for h, _ in hits]
            self.disk.touch(keys)
            self.disk.sessions.seen(request.session_id, keys, time.monotonic())
        now = time.monotonic()
        self.loads.looked_up(pin_id, now - started, len(hits), now + pin_seconds)
        CALLS.labels("hit").inc(len(hits))
        CALLS.labels("miss").inc(len(hashes) - len(hits))
        return kvstore_pb2.LookupResponse(
            hits=[kvstore_pb2.BlockSlot(chain_name=to_wire(h), slot=s) for h, s in hits],
            pin_id=pin_id,
            target=self._target_for(table) if hits else None,
        )

    async def Release(
        self, request: kvstore_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.ReleaseResponse:
        """Unpin a lookup's hits; an unknown pin (expired already) is not an error. The
        reader's read figures count as a load (kvstore_svc/loads.py)."""
        table = self._ready()
        try:
            self.loads.released(request.pin_id, request.read_seconds, request.read_blocks)
        except ValueError as exc:
            raise InvalidRequest(f"Release: {exc}") from None
        table.release(request.pin_id)
        return kvstore_pb2.ReleaseResponse()

    async def Reserve(
        self, request: kvstore_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.ReserveResponse:
        """Slots for the blocks nobody stores or writes yet; the writer fills them over NIXL."""
        table = self._ready()
        hashes = _hashes(request.chain_names)
        if not request.layout:
            raise InvalidRequest("Reserve needs the KV layout's name in `layout`")
        try:
            reservation_id, granted = table.reserve(
                request.layout,
                hashes,
                request.block_bytes,
                self._config.reservation_seconds,
                time.monotonic(),
            )
        except LayoutMismatch as exc:
            raise InvalidRequest(str(exc)) from exc
        if self.disk is not None:
            keys = [(request.layout, h) for h, _ in granted]
            self.disk.sessions.seen(request.session_id, keys, time.monotonic())
        CALLS.labels("reserved").inc(len(granted))
        CALLS.labels("not_granted").inc(len(hashes) - len(granted))
        return kvstore_pb2.ReserveResponse(
            granted=[kvstore_pb2.BlockSlot(chain_name=to_wire(h), slot=s) for h, s in granted],
            reservation_id=reservation_id,
            target=self._target_for(table) if granted else None,
        )

    async def Commit(
        self, request: kvstore_pb2.CommitRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.CommitResponse:
        """Make written blocks readable, or abandon the reservation.

        Blocks become readable only once the store's NIXL agent has the writer's
        notification that the WRITE landed (sent with the transfer, delivered after its
        data): a Commit without a completed write would publish whatever the slots held.
        The notification may trail the writer's own "done" a little, so it is awaited.
        """
        table = self._ready()
        hashes = _hashes(request.chain_names)
        try:
            if not request.abort:
                await self._await_written(table, request.reservation_id)
            committed = table.commit(request.reservation_id, hashes, request.abort)
        except KeyError:
            raise NotFound(
                f"reservation {request.reservation_id!r} is unknown: it was committed already "
                f"or ran past {self._config.reservation_seconds:g}s and its slots were taken back"
            ) from None
        except NotWritten:
            CALLS.labels("refused_unwritten").inc(1)
            raise FailedPrecondition(
                f"reservation {request.reservation_id!r}: no completed NIXL write into its slots "
                f"reached the store within {self._config.commit_wait_seconds:g}s; its slots were "
                "freed and nothing was stored (write with the store's notification, then Commit)"
            ) from None
        CALLS.labels("committed").inc(committed)
        return kvstore_pb2.CommitResponse(committed=committed)

    async def _await_written(self, table: BlockTable, reservation_id: str) -> None:
        """Take the agent's new notifications until the reservation's write is seen or
        ``commit_wait_seconds`` pass (KeyError at once for an unknown reservation)."""
        deadline = time.monotonic() + self._config.commit_wait_seconds
        pause = 0.001
        while not table.is_written(reservation_id):
            for notices in self._notices().values():
                for notice in notices:
                    if notice.startswith(WRITTEN_NOTICE):
                        table.written(notice[len(WRITTEN_NOTICE) :].decode(errors="replace"))
            if table.is_written(reservation_id) or time.monotonic() >= deadline:
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def Evict(
        self, request: kvstore_pb2.EvictRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.EvictResponse:
        """Drop stored blocks (pinned blocks and blocks being written stay in the pool);
        ``memory_only`` leaves the disk tier's copies."""
        table = self._ready()
        hashes = _hashes(request.chain_names)
        evicted = table.evict(hashes, request.all)
        if self.disk is not None and not request.memory_only:
            evicted += self.disk.evict(hashes, request.all)
        return kvstore_pb2.EvictResponse(evicted=evicted)

    async def GetStats(
        self, request: kvstore_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.Stats:
        """The pool's and the disk tier's figures."""
        table = self._ready()
        stats = table.snapshot()
        reply = kvstore_pb2.Stats(
            capacity_blocks=stats.capacity_blocks,
            used_blocks=stats.used_blocks,
            pinned_blocks=stats.pinned_blocks,
            lookups=stats.lookups,
            hit_blocks=stats.hit_blocks,
            miss_blocks=stats.miss_blocks,
            evictions=stats.evictions,
            block_bytes=table.slot_bytes,
            load_seconds=self.loads.load_seconds,
            loaded_blocks=self.loads.loaded_blocks,
        )
        if self.disk is not None:
            reply.MergeFrom(self.disk.stats())
        return reply

    async def StreamKvEvents(
        self, request: common_pb2.KvEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.KvEventsResponse]:
        """The store's block events, shaped like an engine's, with chain hashes filled in."""
        async for reply in self.events.subscribe(request.epoch, request.after_sequence):
            yield reply

    async def GetKvSnapshot(
        self, request: common_pb2.KvSnapshotRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.KvSnapshot:
        return self.events.snapshot()


class KvStoreStage(Stage):
    """The KV store: pool memory registered with a NIXL agent, the servicer, expiry."""

    role: ClassVar[common_pb2.Role] = common_pb2.ROLE_KVSTORE

    def __init__(self, config: KvStoreConfig) -> None:
        self._config = config
        self._servicer = KvStoreServicer(config)
        self._agent: Any = None
        self._registration: Any = None
        self._pool: np.ndarray | None = None
        self._expiry: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        #: Where the store sits on the shard ring: its disk tier's id when it has one,
        #: so a restarted store owns the blocks its disk holds.
        self._ring_id = config.instance_id

    @property
    def agent_name(self) -> str:
        return f"kvstore-{self._config.instance_id}"

    def services(self) -> list[tuple[descriptor.ServiceDescriptor, object]]:
        return [(kvstore_pb2.DESCRIPTOR.services_by_name["KvStoreService"], self._servicer)]

    async def start(self) -> None:
        region_bytes = self._config.capacity_mib << 20
        if region_bytes <= 0:
            raise SystemExit("--capacity-mib must be positive")
        directory = self._open_directory()
        if not self._config.nixl_port:
            self._config.nixl_port = free_port(self._config.nixl_host)
        api = nixl_api()
        limit_progress_poll(api, self._config.nixl_poll_ms)
        # The listener lets a peer fetch the agent's metadata over NIXL's own side
        # channel (what an LMCache-style client does); mesh engines get it in replies.
        self._agent = api.nixl_agent(
            self.agent_name,
            api.nixl_agent_config(
                backends=["UCX"], enable_listen_thread=True, listen_port=self._config.nixl_port
            ),
        )
        self._pool = np.empty(region_bytes, dtype=np.uint8)
        address = int(self._pool.ctypes.data)
        self._registration = self._agent.register_memory(
            [(address, region_bytes, 0, "kvstore")], "DRAM"
        )
        target = kvstore_pb2.NixlTarget(
            agent_name=self.agent_name,
            agent_metadata=self._agent.get_agent_metadata(),
            base_address=address,
            region_bytes=region_bytes,
            device_id=0,
        )
        events = self._servicer.events
        table = BlockTable(
            region_bytes,
            on_stored=lambda keys: events.stored_chains([h for _, h in keys]),
            on_removed=lambda keys: events.removed([chain_name(h) for _, h in keys]),
        )
        disk = self._open_disk(directory, api, table) if directory is not None else None
        self._servicer.attach(table, target, self._agent.get_new_notifs, disk)
        watch(table, disk)
        self._expiry = asyncio.create_task(self._expire(table, disk), name="kvstore-expiry")
        log.info(
            "KV store pool: %d MiB at 0x%x, NIXL agent %s",
            self._config.capacity_mib,
            address,
            self.agent_name,
        )

    def _open_directory(self) -> BlockDirectory | None:
        """``--disk-dir`` checked and locked, before anything is allocated (None: no disk)."""
        if not self._config.disk_dir:
            return None
        if self._config.disk_gib <= 0:
            raise SystemExit("--disk-gib must be positive")
        try:
            return BlockDirectory(self._config.disk_dir)
        except DiskSetupError as exc:
            raise SystemExit(str(exc)) from None

    def _open_disk(self, directory: BlockDirectory, api: Any, table: BlockTable) -> DiskTier:
        """The disk tier behind ``table``, with what a previous run left in it."""
        assert self._pool is not None
        try:
            mover = FileMover(api, f"{self.agent_name}-disk", self._pool, directory)
            disk = open_disk_tier(
                directory,
                self._config.disk_gib,
                mover,
                table,
                self._servicer.events,
                self._config.session_retention,
            )
        except DiskSetupError as exc:
            directory.close()
            raise SystemExit(str(exc)) from None
        self._ring_id = disk.directory.store_id
        self._writer = asyncio.create_task(disk.run_writer(), name="kvstore-disk-writer")
        return disk

    async def _expire(self, table: BlockTable, disk: DiskTier | None) -> None:
        while True:
            await asyncio.sleep(1.0)
            table.expire(time.monotonic())
            self._servicer.loads.expire(time.monotonic())
            if disk is not None:
                disk.tick(time.monotonic())

    async def stop(self) -> None:
        await cancel_and_wait(self._expiry)
        await cancel_and_wait(self._writer)
        if self._servicer.disk is not None:
            self._servicer.disk.close()
        if self._agent is not None and self._registration is not None:
            self._agent.deregister_memory(self._registration)
            self._registration = None

    @property
    def nixl_address(self) -> str:
        return f"{self._config.nixl_host}:{self._config.nixl_port}"

    def describe(self, member: common_pb2.Member) -> None:
        member.nixl_address = self.nixl_address
        member.kv_event_epoch = self._servicer.events.epoch
        member.labels["nixl_agent"] = self.agent_name
        table = self._servicer.table
        member.kv_capacity_blocks = table.capacity if table is not None else 0

    def etcd_entries(self, member: common_pb2.Member) -> dict[str, bytes]:
        """The store's shard entry: its ring points, under its membership lease."""
        entry = kvstore_pb2.ShardEntry(
            instance_id=member.instance_id,
            grpc_address=member.grpc_address,
            nixl_address=member.nixl_address,
            ring_points=ring_points(self._ring_id, self._config.vnodes),
            capacity_bytes=self._config.capacity_mib << 20,
        )
        return {shard_key(member.instance_id): entry.SerializeToString()}
