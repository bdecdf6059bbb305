"""What both engine roles serve: the shared EngineService calls and the engine Stage.

Each role's own calls live in its folder: ``prefill_svc/handlers.py`` computes prompts
for another engine and keeps their KV until it is pulled (``Prefill``, the lease book,
release on ``Abort``); ``decode_svc/handlers.py`` collects a prefill's KV through a
handle (the signer check, the issuer watch). What is left here is the same for both:
``Generate`` without a handle, aborts, load, adapters and KV events. The engine inside
is vLLM or the simulated engine (``--engine``), behind
:class:`~services.engine.backend.EngineBackend`; nothing here imports vLLM.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import grpc
from google.protobuf import descriptor

from services.engine.backend import EngineBackend
from services.engine.config import EngineConfig
from services.engine.metrics import ENGINE_LOADS
from services.engine.replies import MAX_IDS_PER_MESSAGE, Reply
from services.errors import InvalidRequest, KvNotCollected, Unavailable
from services.model import ModelSpec, resolve_model
from services.pb import common_pb2, engine_pb2
from services.server import Stage


class EngineServicer:
    """EngineService over an :class:`~services.engine.backend.EngineBackend`: the calls
    every engine answers alike. A role's servicer overrides :meth:`Prefill` (a prefill
    member) or :meth:`kv_params` (a decode member); here both refuse, so a call sent to
    the wrong role gets a clear INVALID_ARGUMENT rather than UNIMPLEMENTED."""

    def __init__(
        self, runner: EngineBackend, publish: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self._runner = runner
        #: Publishes the member record again (its adapter list changed).
        self.publish = publish

    def _ready(self) -> EngineBackend:
        if self._runner.events is None:
            raise Unavailable("the engine is still starting")
        return self._runner

    async def Prefill(
        self, request: engine_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.PrefillResponse:
        """Refused: only a prefill member computes a prompt for another engine."""
        self._ready()
        raise InvalidRequest("Prefill goes to a prefill member; this is a decode member")

    async def kv_params(self, request: engine_pb2.GenerateRequest) -> dict[str, Any]:
        """The kv_transfer_params that pull ``request``'s KV handle; refused here: only a
        decode member collects KV from another engine."""
        raise InvalidRequest("a KV handle can only be collected by a decode member")

    async def Generate(
        self, request: engine_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        """Stream generated ids; with a handle the prompt's KV comes from the prefill engine."""
        runner = self._ready()
        runner.check_prompt(request.prompt_token_ids)
        if request.min_ids_per_message > MAX_IDS_PER_MESSAGE:
            raise InvalidRequest(
                f"min_ids_per_message is {request.min_ids_per_message}; at most "
                f"{MAX_IDS_PER_MESSAGE} ids are held back per message"
            )
        kv_params = await self.kv_params(request) if request.HasField("kv_handle") else None
        sampling = runner.sampling(
            request.sampling,
            len(request.prompt_token_ids),
            kv_params,
            session_id=request.session_id,
        )
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        reply = Reply(request)
        interval = max(runner.config.stream_interval, request.min_ids_per_message)
        async for batch in runner.stream(
            request_id,
            request.prompt_token_ids,
            sampling,
            loading_kv=kv_params is not None,
            cache_salt=request.sampling.cache_salt,
            adapter=request.adapter,
        ):
            sequence = batch[0].outputs[0]
            if (
                sequence.finish_reason == "error"
                and kv_params is not None
                and not reply.completion_tokens
            ):
                raise _not_collected(request.kv_handle)
            for output in batch:
                reply.add(output)
            # --stream-interval (or the router, while it is behind) holds ids back until
            # that many are ready (not the first, nor the last).
            if reply.sent and not batch[-1].finished and len(reply.message.token_ids) < interval:
                continue
            yield reply.take()

    async def Abort(
        self, request: engine_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.AbortResponse:
        """Abort requests by id; unknown ids are skipped (they may have finished)."""
        runner = self._ready()
        aborted = [rid for rid in request.request_ids if await runner.abort(rid)]
        return engine_pb2.AbortResponse(aborted=aborted)

    def pending_transfers(self) -> int:
        """Finished prefills whose KV waits for a decode engine (none but on a prefill
        member): part of the load figures."""
        return 0

    async def GetLoad(
        self, request: engine_pb2.LoadRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.Load:
        """Running and waiting requests, KV use, prefix-cache hit rate, block size."""
        return self._ready().load(pending_transfers=self.pending_transfers())

    async def LoadAdapter(
        self, request: engine_pb2.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Adapter:
        """Load a LoRA adapter and list it in the member record."""
        runner = self._ready()
        adapter = await runner.load_adapter(request.name, request.path)
        await self._publish()
        return adapter.record(runner.model.name)

    async def UnloadAdapter(
        self, request: engine_pb2.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.UnloadAdapterResponse:
        """Withdraw an adapter (member record first, so routers stop sending it), then
        unload it once its running requests are done; the reply waits for that."""
        runner = self._ready()
        adapter = await runner.withdraw_adapter(request.name)
        await self._publish()
        await asyncio.shield(runner.finish_unload(adapter))  # a caller that leaves does not stop it
        return engine_pb2.UnloadAdapterResponse()

    async def _publish(self) -> None:
        if self.publish is not None:
            await self.publish()

    async def StreamKvEvents(
        self, request: common_pb2.KvEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.KvEventsResponse]:
        """The engine's KV events after ``(epoch, after_sequence)``, then live."""
        events = self._ready().events
        assert events is not None
        async for reply in events.subscribe(request.epoch, request.after_sequence):
            yield reply

    async def GetKvSnapshot(
        self, request: common_pb2.KvSnapshotRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.KvSnapshot:
        """Every block the engine holds now, with the stream position it matches."""
        events = self._ready().events
        assert events is not None
        return events.snapshot()


class EngineStage(Stage):
    """An engine stage: one engine (vLLM or simulated) and a role's servicer over it. A
    role's stage (``prefill_svc/stage.py``, ``decode_svc/stage.py``) sets the role and
    NIXL ``kv_role`` and builds its servicer in :meth:`make_servicer`."""

    kv_role: ClassVar[str]

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._runner = _backend(
            config, resolve_model(config.model, Path(config.home)), self.kv_role
        )
        self._servicer = self.make_servicer(self._runner)

    def make_servicer(self, runner: EngineBackend) -> EngineServicer:
        """The role's EngineService over ``runner``."""
        raise NotImplementedError

    def services(self) -> list[tuple[descriptor.ServiceDescriptor, object]]:
        return [(engine_pb2.DESCRIPTOR.services_by_name["EngineService"], self._servicer)]

    async def start(self) -> None:
        await self._runner.start()
        ENGINE_LOADS.add(self._config.instance_id, self._runner)

    async def stop(self) -> None:
        ENGINE_LOADS.remove(self._config.instance_id)
        await self._runner.shutdown()

    def watch_member(self, publish: Callable[[], Awaitable[None]]) -> None:
        self._servicer.publish = publish

    def failure(self) -> str | None:
        return self._runner.failure()

    def describe(self, member: common_pb2.Member) -> None:
        member.models.append(self._runner.model.name)
        member.kv_block_size = self._runner.block_size
        member.kv_capacity_blocks = self._runner.total_blocks
        member.max_concurrency = self._config.max_num_seqs
        member.max_model_len = self._runner.max_model_len
        member.nixl_address = self._runner.nixl_address
        member.labels["kvstore"] = "on" if self._runner.uses_kvstore else "off"
        member.labels["engine"] = self._config.engine
        member.labels.update(self._runner.layout_labels())
        if self._config.lora_enabled:
            member.adapter_slots = self._config.max_loras
            member.adapters.extend(
                a.record(self._runner.model.name) for a in self._runner.adapters.served()
            )
        assert self._runner.events is not None
        member.kv_event_epoch = self._runner.events.epoch


def _backend(config: EngineConfig, model: ModelSpec, kv_role: str) -> EngineBackend:
    """The engine ``--engine`` names; each is imported only when chosen (vLLM takes
    seconds to import, and the simulated engine must run where vLLM is not installed)."""
    if config.engine == "sim":
        from services.engine.sim.runner import SimRunner

        return SimRunner(config, model, kv_role)
    from services.engine.engine import EngineRunner

    return EngineRunner(config, model, kv_role)


def _not_collected(handle: common_pb2.KvTransferHandle) -> KvNotCollected:
    """vLLM's kv_load_failure_policy "fail": the decode engine could not pull the KV."""
    return KvNotCollected(
        f"could not collect KV transfer handle {handle.remote_request_id!r} from "
        f"{handle.remote_host}:{handle.remote_port}: it is unknown or expired, or the "
        "prefill worker is gone; prefill again or run aggregated"
    )
