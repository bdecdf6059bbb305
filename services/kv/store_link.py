"""A synchronous link to the KV stores: gRPC for control, NIXL for the bytes.

Used where the caller is not asyncio code: vLLM's scheduler and worker (the engines'
store connector), the benchmark and the tests. It speaks the store's protocol:

- read: ``Lookup`` on each owning store (hits pinned) -> NIXL READ of the slots ->
  ``Release``, which tells each store how long its part of the read took (the store
  counts it in its load time, kvstore_svc/loads.py);
- write: ``Reserve`` (only blocks nobody stores or writes yet are granted) -> NIXL
  WRITE into the granted slots -> ``Commit`` (or ``Commit(abort)`` when the write failed).

A block's bytes are the caller's *regions* for it (for an engine, one per layer and K/V)
laid end to end in the slot, so any reader with the same layout gets them back in the
same places. Every failure is an exception the caller turns into "recompute": a
store is a cache, never a dependency of a correct answer.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from services import credentials
from services.kv.hashing import from_wire, to_wire
from services.kv.nixl import TransferError, transfer
from services.kv.shards import ShardMap
from services.pb import kvstore_pb2, kvstore_pb2_grpc

log = logging.getLogger(__name__)

#: (address, bytes) of one contiguous piece of a block in the caller's memory.
Region = tuple[int, int]


#: What a writer's NIXL WRITE notifies the store with, before the reservation id.
WRITTEN_NOTICE = b"stagemesh/kvstore/written:"


def written_notice(reservation_id: str) -> bytes:
    """The notification that proves to the store that a reservation's write landed."""
    return WRITTEN_NOTICE + reservation_id.encode()


class StoreError(RuntimeError):
    """The store could not be asked or the bytes could not be moved."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A store's pool as NIXL reaches it (plain data: it crosses vLLM's processes)."""

    agent_name: str
    agent_metadata: bytes
    base_address: int
    slot_bytes: int
    device_id: int

    @classmethod
    def of(cls, target: kvstore_pb2.NixlTarget) -> Target:
        return cls(
            target.agent_name,
            bytes(target.agent_metadata),
            target.base_address,
            target.slot_bytes,
            target.device_id,
        )


@dataclasses.dataclass
class Hit:
    """One stored block of a looked-up prefix: where it lives."""

    chain_hash: int
    address: str
    slot: int
    target: Target


@dataclasses.dataclass
class Prefix:
    """The stored prefix of a hash chain, with the pins to release after reading it."""

    hits: list[Hit]
    pins: list[tuple[str, str]]  # (store address, pin id)
    #: Per store address: seconds its NIXL reads took and the blocks they moved, noted by
    #: :meth:`StoreLink.read` and reported to the store with the Release.
    reads: dict[str, tuple[float, int]] = dataclasses.field(default_factory=dict)


def remote_regions(
    target: Target, slot: int, regions: Sequence[Region]
) -> list[tuple[int, int, int]]:
    """NIXL descriptors in the store's pool matching a block's local ``regions``."""
    base = target.base_address + slot * target.slot_bytes
    out = []
    offset = 0
    for _, length in regions:
        out.append((base + offset, length, target.device_id))
        offset += length
    if offset != target.slot_bytes:
        raise StoreError(
            f"a block of {offset} bytes does not match the store's {target.slot_bytes}-byte slots"
        )
    return out


class StoreLink:
    """Control channels to every store and one NIXL agent for the data."""

    def __init__(
        self, agent: Any, rpc_timeout: float = 2.0, transfer_timeout: float = 10.0
    ) -> None:
        self.agent = agent
        self.rpc_timeout = rpc_timeout
        self.transfer_timeout = transfer_timeout
        self._stubs: dict[str, kvstore_pb2_grpc.KvStoreServiceStub] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._peers: set[str] = set()
        self._lock = threading.Lock()  # the link is shared by a reading and a writing thread

    def close(self) -> None:
        for chan in self._channels.values():
            chan.close()
        self._channels.clear()
        self._stubs.clear()

    def stub(self, address: str) -> kvstore_pb2_grpc.KvStoreServiceStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                chan = credentials.current().dial(grpc, address, "kvstore")
                self._channels[address] = chan
                stub = self._stubs[address] = kvstore_pb2_grpc.KvStoreServiceStub(chan)
            return stub

    def _call(self, address: str, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub(address), method)(
                request, timeout=self.rpc_timeout, metadata=credentials.current().call_metadata
            )
        except grpc.RpcError as exc:
            raise StoreError(
                f"KV store {address} {method}: {exc.code().name} {exc.details()}"
            ) from exc

    def _peer(self, target: Target) -> str:
        """Load the store agent's metadata once (a restarted store has a new name)."""
        with self._lock:
            if target.agent_name not in self._peers:
                self.agent.add_remote_agent(target.agent_metadata)
                self._peers.add(target.agent_name)
        return target.agent_name

    # -- read -------------------------------------------------------------------------

    def lookup(
        self,
        shards: ShardMap,
        layout: str,
        hashes: Sequence[int],
        pin_seconds: float = 0.0,
        session_id: str = "",
    ) -> Prefix:
        """The longest prefix of ``hashes`` the stores hold, pinned.

        Each owning store is asked for the hashes it owns; the chain's stored prefix
        ends at its first block some owner lacks. Pins past that point are released
        at once. ``session_id`` names the agent session asking (its blocks are kept).
        """
        found: dict[int, Hit] = {}
        pins: list[tuple[str, str]] = []
        for address, owned in shards.split(hashes).items():
            reply = self._call(
                address,
                "Lookup",
                kvstore_pb2.LookupRequest(
                    layout=layout,
                    chain_names=map(to_wire, owned),
                    pin_seconds=pin_seconds,
                    session_id=session_id,
                ),
            )
            if reply.pin_id:
                pins.append((address, reply.pin_id))
            target = Target.of(reply.target)
            for slot in reply.hits:
                chain_hash = from_wire(slot.chain_name)
                found[chain_hash] = Hit(chain_hash, address, slot.slot, target)
        hits = []
        for chain_hash in hashes:
            hit = found.get(chain_hash)
            if hit is None:
                break
            hits.append(hit)
        return Prefix(hits, pins)

    def read(
        self,
        hits: Sequence[Hit],
        regions: Sequence[Sequence[Region]],
        prefix: Prefix | None = None,
    ) -> int:
        """NIXL READ of each hit's slot into its block's local ``regions``; the bytes read.

        With ``prefix`` (the lookup the hits came from), each store's read seconds and
        blocks are noted on it for its Release: the stores measure their load time so.
        """
        moved = 0
        for address in dict.fromkeys(hit.address for hit in hits):
            mine = [(hit, regs) for hit, regs in zip(hits, regions) if hit.address == address]
            peer = self._peer(mine[0][0].target)  # once per store agent: not a load's cost
            local = [(a, n, 0) for _, regs in mine for a, n in regs]
            remote = [d for hit, regs in mine for d in remote_regions(hit.target, hit.slot, regs)]
            started = time.monotonic()
            moved += transfer(self.agent, "READ", local, remote, peer, self.transfer_timeout)
            if prefix is not None:
                seconds, blocks = prefix.reads.get(address, (0.0, 0))
                prefix.reads[address] = (seconds + time.monotonic() - started, blocks + len(mine))
        return moved

    def release(self, prefix: Prefix) -> None:
        """Unpin a prefix's blocks, telling each store what reading its blocks took
        (:meth:`read`); failures are only logged (pins also expire)."""
        for address, pin_id in prefix.pins:
            seconds, blocks = prefix.reads.get(address, (0.0, 0))
            request = kvstore_pb2.ReleaseRequest(
                pin_id=pin_id, read_seconds=seconds, read_blocks=blocks
            )
            try:
                self._call(address, "Release", request)
            except StoreError as exc:
                log.debug("release failed (the pin expires on its own): %s", exc)
        prefix.pins = []
        prefix.reads.clear()

    # -- write ------------------------------------------------------------------------

    def store(
        self,
        shards: ShardMap,
        layout: str,
        hashes: Sequence[int],
        block_bytes: int,
        regions: Callable[[int], Sequence[Region]],
        session_id: str = "",
    ) -> int:
        """Write the blocks of ``hashes`` that no store holds or is being written yet.

        ``regions(i)`` gives the local pieces of the block named ``hashes[i]``. Each
        owning store is asked to ``Reserve``; what it grants is written and committed.
        Returns the blocks committed. ``session_id`` marks them as an agent session's.
        """
        position = {chain_hash: i for i, chain_hash in enumerate(hashes)}
        committed = 0
        for address, owned in shards.split(hashes).items():
            reservation = self._call(
                address,
                "Reserve",
                kvstore_pb2.ReserveRequest(
                    layout=layout,
                    chain_names=map(to_wire, owned),
                    block_bytes=block_bytes,
                    session_id=session_id,
                ),
            )
            if reservation.granted:
                committed += self._write_and_commit(
                    address,
                    reservation,
                    [regions(position[from_wire(slot.chain_name)]) for slot in reservation.granted],
                )
        return committed

    def _write_and_commit(
        self,
        address: str,
        reservation: kvstore_pb2.ReserveResponse,
        regions: Sequence[Sequence[Region]],
    ) -> int:
        """NIXL WRITE of the granted blocks (``regions`` in grant order), then Commit.

        On a failed write the reservation is abandoned, so no half-written block is
        ever served. Returns the blocks committed.
        """
        target = Target.of(reservation.target)
        try:
            local = [(a, n, 0) for regs in regions for a, n in regs]
            remote = [
                d
                for slot, regs in zip(reservation.granted, regions)
                for d in remote_regions(target, slot.slot, regs)
            ]
            # The notification is the store's proof that the write landed (see Commit).
            transfer(
                self.agent,
                "WRITE",
                local,
                remote,
                self._peer(target),
                self.transfer_timeout,
                notify=written_notice(reservation.reservation_id),
            )
        except Exception as exc:
            if isinstance(exc, TransferError) and not exc.settled:
                # The write may still land: the slots stay reserved until the reservation
                # expires.
                raise
            try:
                self._call(
                    address,
                    "Commit",
                    kvstore_pb2.CommitRequest(
                        reservation_id=reservation.reservation_id, abort=True
                    ),
                )
            except StoreError:
                pass  # the reservation expires on its own
            raise
        reply = self._call(
            address, "Commit", kvstore_pb2.CommitRequest(reservation_id=reservation.reservation_id)
        )
        return int(reply.committed)


class HostBlocks:
    """Blocks in this process's own host memory, registered with a NIXL agent: a store
    client without an engine (the benchmark, the tests, a tool warming a store)."""

    def __init__(self, agent: Any, blocks: int, block_bytes: int, pieces: int = 1) -> None:
        import numpy as np

        self.agent = agent
        self.block_bytes = block_bytes
        self.pieces = pieces
        self.memory = np.zeros(blocks * block_bytes, dtype=np.uint8)
        self._registration = agent.register_memory(
            [(self.memory.ctypes.data, self.memory.nbytes, 0, "host-blocks")], "DRAM"
        )

    def regions(self, index: int) -> list[Region]:
        """Block ``index``, cut in ``pieces`` equal parts (an engine has one per layer and K/V)."""
        base = self.memory.ctypes.data + index * self.block_bytes
        piece = self.block_bytes // self.pieces
        return [(base + i * piece, piece) for i in range(self.pieces)]

    def block(self, index: int) -> Any:
        return self.memory[index * self.block_bytes : (index + 1) * self.block_bytes]

    def close(self) -> None:
        self.agent.deregister_memory(self._registration)
