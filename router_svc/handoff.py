"""What a prefill hands a decode engine: the outcome of the prefill step, and its KV lease.

A disaggregated sequence's prefill leaves the prompt's KV on the prefill worker, held
for a decode engine to pull (a lease). The router frees it there as soon as it knows no
decode engine will collect it (docs/design.md, "A prefill no decode will collect is
released at once"); :class:`PrefillOutcome` carries that decision for the dispatcher,
so "go on aggregated" is one call, :meth:`PrefillOutcome.abandon`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from router_svc.metrics import KV_RELEASES, PREFILL_FALLBACKS
from router_svc.workers import Peer
from services.clients import EngineClient
from services.pb import common_pb2

log = logging.getLogger(__name__)


class KvReleases:
    """Releases on their way to prefill workers, sent off the request's path (kept here
    so they are not collected before they finish)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, lease: KvLease) -> None:
        """Tell ``lease``'s prefill worker that nobody will collect its KV."""
        task = asyncio.create_task(self._send(lease), name=f"release {lease.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _send(lease: KvLease) -> None:
        assert isinstance(lease.peer.client, EngineClient)
        try:
            released = await lease.peer.client.abort(lease.request_id)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as error:
            # Gone or closed: its lease ends it.
            log.debug("%s: KV release not delivered: %s", lease.request_id, error)
            return
        KV_RELEASES.labels("released" if released else "not_held").inc()


@dataclass
class KvLease:
    """A prefill's KV held for a decode engine on ``peer``, under ``request_id``."""

    peer: Peer
    request_id: str
    releases: KvReleases

    def release(self) -> None:
        """Free the KV on the prefill worker now, off the request's path."""
        self.releases.send(self)


@dataclass
class PrefillOutcome:
    """What the prefill step gave a sequence: a KV handle and its lease (disaggregated),
    or neither (the decode worker computes the prompt: aggregated)."""

    handle: common_pb2.KvTransferHandle | None = None
    lease: KvLease | None = None
    #: Prompt tokens the prefill worker found cached.
    cached_tokens: int = 0
    #: Prompt tokens the KV index predicted the prefill worker holds.
    predicted_hit: int = 0
    #: A decode engine may be pulling the KV now: releasing it could hand that engine
    #: blocks reused by another prompt, so the engine's own read notification (or the
    #: lease's end) frees it instead.
    reading: bool = False

    @property
    def disaggregated(self) -> bool:
        """Whether a decode engine is to collect the prefill's KV."""
        return self.handle is not None

    @property
    def prefill_instance(self) -> str:
        """The prefill worker's instance id ("" when aggregated)."""
        if self.handle is None or self.lease is None:
            return ""
        return self.lease.peer.member.instance_id

    def abandon(self, reason: str) -> None:
        """Go on aggregated: drop the handle, free its KV unless a decode engine may be
        reading it, and count the fallback under ``reason``."""
        PREFILL_FALLBACKS.labels(reason).inc()
        self.release()
        self.handle, self.lease, self.cached_tokens = None, None, 0

    def release(self) -> None:
        """Free the KV now if no decode engine can be reading it (the client left, no
        decode member was left, the decode side failed before it read)."""
        if self.handle is not None and self.lease is not None and not self.reading:
            self.lease.release()
            self.lease = None


def kv_mismatch(prefill: common_pb2.Member, decode: common_pb2.Member) -> str:
    """Why a decode engine could not take a prefill engine's KV over NIXL ("" if it can).

    The KV bytes must mean the same on both sides: the same KV dtype and block size and
    the same pipeline stages. Tensor-parallel sizes may differ when one divides the
    other (vLLM's NixlConnector splits or joins heads between ranks for dense models).
    Members that do not say (older engines) count as the defaults: TP 1, PP 1.
    """

    def size(member: common_pb2.Member, key: str) -> int:
        return int(member.labels.get(key, "1") or "1")

    if prefill.labels.get("kv_dtype", "") != decode.labels.get("kv_dtype", ""):
        return "kv_dtype"
    if (
        prefill.kv_block_size
        and decode.kv_block_size
        and prefill.kv_block_size != decode.kv_block_size
    ):
        return "block_size"
    if size(prefill, "pipeline_parallel_size") != size(decode, "pipeline_parallel_size"):
        return "pipeline_parallel"
    tp_p, tp_d = size(prefill, "tensor_parallel_size"), size(decode, "tensor_parallel_size")
    if tp_p % tp_d and tp_d % tp_p:
        return "tensor_parallel"
    return ""
