"""What an engine stage needs from the engine inside it, whichever engine that is.

Two engines implement it: :class:`services.engine.engine.EngineRunner` (vLLM, in
process) and :class:`services.engine.sim.runner.SimRunner` (the simulated engine, for
width). The servicer, the member record and the load metrics read only this, so a
simulated engine is indistinguishable from a vLLM one on the wire. Outputs keep vLLM's
``RequestOutput`` attribute names (the sim builds look-alikes), so the vLLM path pays
no conversion. No torch or vLLM here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol, TypeVar

from services.engine.adapters import Adapter, AdapterSet
from services.engine.config import EngineConfig
from services.kv.events import KvEventLog
from services.model import ModelSpec
from services.pb import common_pb2, engine_pb2


class EngineBackend(Protocol):
    """The engine behind one engine stage."""

    config: EngineConfig
    model: ModelSpec
    adapters: AdapterSet
    #: None until the engine has started.
    events: KvEventLog | None
    block_size: int
    total_blocks: int
    max_model_len: int

    @property
    def nixl_address(self) -> str: ...

    @property
    def uses_kvstore(self) -> bool: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def failure(self) -> str | None:
        """Why the engine can no longer serve, or None while it can."""

    def check_prompt(self, prompt_token_ids: Sequence[int]) -> None: ...

    def sampling(
        self,
        params: common_pb2.SamplingParams,
        prompt_tokens: int,
        kv_transfer_params: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        session_id: str = "",
    ) -> Any:
        """The engine's own form of a request's sampling parameters, checked; ``session_id``
        names the agent session for the KV store (an engine without one ignores it)."""

    def stream(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: Any,
        loading_kv: bool = False,
        cache_salt: str = "",
        adapter: str = "",
    ) -> AsyncIterator[list[Any]]:
        """Run one request, yielding its delta outputs (shaped like vLLM's RequestOutput)
        in batches: every output made since the caller last took one (see :func:`batches`)."""

    async def abort(self, request_id: str) -> bool: ...

    async def release_kv(self, request_ids: Sequence[str], attempts: int = 5) -> list[str]: ...

    def load(self, pending_transfers: int) -> engine_pb2.Load: ...

    def layout_labels(self) -> dict[str, str]: ...

    async def load_adapter(self, name: str, path: str) -> Adapter: ...

    async def withdraw_adapter(self, name: str) -> Adapter: ...

    def finish_unload(self, adapter: Adapter) -> Any: ...


T = TypeVar("T")


async def batches(queue: asyncio.Queue[T | BaseException | None]) -> AsyncIterator[list[T]]:
    """A request's outputs from its queue (an exception is raised, None ends it), each
    batch holding every output already queued when the caller asks again.

    This is how an engine stage coalesces: while the router reads promptly, every batch
    is one output and nothing waits; while it is behind (its gRPC stream's window is
    full, so the servicer's send waits), outputs pile up here and the next message
    carries them all. No latency is added to keep up, and no message is sent per token
    to a consumer that cannot take them.
    """
    while True:
        item = await queue.get()
        batch: list[T] = []
        while True:
            if item is None:
                if batch:
                    yield batch
                return
            if isinstance(item, BaseException):
                if batch:
                    yield batch
                raise item
            batch.append(item)
            if queue.empty():
                break
            item = queue.get_nowait()
        yield batch
