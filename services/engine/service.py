"""The EngineService servicer and the Stage both engine roles run.

Prefill and decode differ only in their role, their NIXL ``kv_role`` and which calls
they accept: a prefill member answers ``Prefill``; a decode member answers ``Generate``
with or without a KV handle. The rest (abort, load, KV events) is the same. The engine
inside is vLLM or the simulated engine (``--engine``), behind
:class:`~services.engine.backend.EngineBackend`; nothing here imports vLLM.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import grpc
from google.protobuf import descriptor

from services.engine.backend import EngineBackend
from services.engine.config import EngineConfig
from services.engine.metrics import ENGINE_LOADS
from services.engine.replies import Reply
from services.errors import InvalidRequest, KvNotCollected, PermissionDenied, Unavailable
from services.etcd import EtcdSession
from services.kv.handles import EXTRA_KEYS, HandleSigner, allowed_extra, issuer_mismatch
from services.membership import MemberWatcher, role_prefix
from services.model import ModelSpec, resolve_model
from services.pb import common_pb2, engine_pb2
from services.server import Stage

# kv_transfer_params keys with a typed home in KvTransferHandle; others travel in extra_json.
_TYPED_KEYS = {
    "remote_engine_id",
    "remote_block_ids",
    "remote_host",
    "remote_port",
    "remote_request_id",
    "tp_size",
    "do_remote_prefill",
    "do_remote_decode",
}


def handle_from_params(
    params: dict[str, Any], num_tokens: int, instance_id: str, expires_at: float
) -> common_pb2.KvTransferHandle:
    """vLLM's kv_transfer_params from a prefill, as the mesh's typed handle.

    vLLM lists block ids per KV-cache group. With one group (every model without
    hybrid attention) they become the typed ``remote_block_ids``; several groups
    travel whole in ``extra_json``, which :func:`params_from_handle` prefers.
    """
    groups = params.get("remote_block_ids") or []
    if groups and not isinstance(groups[0], list):
        groups = [groups]  # older vLLM: one flat list
    # Keys outside the allowlist are not issued: a decode engine would refuse them.
    extra = {k: v for k, v in params.items() if k not in _TYPED_KEYS and k in EXTRA_KEYS}
    if len(groups) > 1:
        extra["remote_block_ids"] = groups
    block_ids = groups[0] if len(groups) == 1 else []
    return common_pb2.KvTransferHandle(
        remote_engine_id=str(params.get("remote_engine_id", "")),
        remote_block_ids=[int(b) for b in block_ids],
        remote_host=str(params.get("remote_host", "")),
        remote_port=int(params.get("remote_port") or 0),
        remote_request_id=str(params.get("remote_request_id", "")),
        num_tokens=num_tokens,
        tp_size=int(params.get("tp_size") or 1),
        prefill_instance_id=instance_id,
        expires_at=expires_at,
        extra_json=json.dumps(extra, separators=(",", ":")),
    )


def params_from_handle(handle: common_pb2.KvTransferHandle) -> dict[str, Any]:
    """The kv_transfer_params a decode request needs to pull the handle's KV."""
    if not handle.remote_engine_id or not handle.remote_host or not handle.remote_port:
        raise InvalidRequest("the KV transfer handle lacks the prefill engine's id or address")
    try:
        params: dict[str, Any] = (
            allowed_extra(json.loads(handle.extra_json)) if handle.extra_json else {}
        )
    except (json.JSONDecodeError, AttributeError, TypeError):
        raise InvalidRequest("the KV transfer handle's extra_json is not a JSON object") from None
    params.setdefault("remote_block_ids", [list(handle.remote_block_ids)])
    params.update(
        do_remote_prefill=True,
        do_remote_decode=False,
        remote_engine_id=handle.remote_engine_id,
        remote_host=handle.remote_host,
        remote_port=handle.remote_port,
        remote_request_id=handle.remote_request_id,
        tp_size=handle.tp_size or 1,
    )
    return params


class EngineServicer:
    """EngineService over an :class:`~services.engine.backend.EngineBackend`."""

    def __init__(
        self,
        runner: EngineBackend,
        role: int,
        instance_id: str,
        signer: HandleSigner,
        issuers: PrefillMembers | None = None,
        publish: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._runner = runner
        #: Publishes the member record again (its adapter list changed).
        self.publish = publish
        self._signer = signer
        self._issuers = issuers
        self._role = role
        self._instance_id = instance_id
        #: Finished prefills' KV held for a decode: request id -> (lease expiry, the
        #: engine's own id for it, which vLLM's connector tracks).
        self._handles: dict[str, tuple[float, str]] = {}

    def _ready(self) -> EngineBackend:
        if self._runner.events is None:
            raise Unavailable("the engine is still starting")
        return self._runner

    async def Prefill(
        self, request: engine_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.PrefillResponse:
        """Compute the prompt's KV and keep it for a decode engine to pull over NIXL."""
        runner = self._ready()
        if self._role != common_pb2.ROLE_PREFILL:
            raise InvalidRequest("Prefill goes to a prefill member; this is a decode member")
        runner.check_prompt(request.prompt_token_ids)
        request_id = request.request_id or f"prefill-{uuid.uuid4().hex}"
        sampling = runner.sampling(
            request.sampling,
            len(request.prompt_token_ids),
            kv_transfer_params={"do_remote_decode": True},
            max_tokens=1,
            session_id=request.session_id,
        )
        final = None
        try:
            async for batch in runner.stream(
                request_id,
                request.prompt_token_ids,
                sampling,
                cache_salt=request.sampling.cache_salt,
                adapter=request.adapter,
            ):
                final = batch[-1]
        except asyncio.CancelledError:
            # The caller left just as the prompt finished: nobody will collect its KV.
            if final is not None and final.finished and final.kv_transfer_params:
                engine_id = str(final.kv_transfer_params.get("remote_request_id", ""))
                await asyncio.shield(runner.release_kv([engine_id]))
            raise
        if final is None or not final.kv_transfer_params:
            raise Unavailable("the prefill finished without a KV transfer handle")
        expires_at = time.time() + runner.config.kv_lease_seconds
        handle = handle_from_params(
            final.kv_transfer_params, len(request.prompt_token_ids), self._instance_id, expires_at
        )
        self._signer.sign(handle)
        self._forget_expired()
        self._handles[request_id] = (expires_at, handle.remote_request_id)
        return engine_pb2.PrefillResponse(
            handle=handle,
            cached_tokens=int(final.num_cached_tokens or 0),
            prompt_tokens=len(request.prompt_token_ids),
        )

    async def Generate(
        self, request: engine_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        """Stream generated ids; with a handle the prompt's KV comes from the prefill engine."""
        runner = self._ready()
        runner.check_prompt(request.prompt_token_ids)
        kv_params = None
        if request.HasField("kv_handle"):
            if self._role != common_pb2.ROLE_DECODE:
                raise InvalidRequest("a KV handle can only be collected by a decode member")
            handle = request.kv_handle
            self._signer.check(handle)  # before anything else is read from it
            if handle.expires_at and handle.expires_at < time.time():
                raise KvNotCollected(
                    f"KV transfer handle {handle.remote_request_id!r} expired "
                    f"{time.time() - handle.expires_at:.1f}s ago; prefill again"
                )
            if self._issuers is not None:
                await self._issuers.check(handle)
            if handle.num_tokens and handle.num_tokens != len(request.prompt_token_ids):
                raise InvalidRequest(
                    f"the KV handle covers {handle.num_tokens} prompt tokens, "
                    f"the request has {len(request.prompt_token_ids)}"
                )
            kv_params = params_from_handle(handle)
        sampling = runner.sampling(
            request.sampling,
            len(request.prompt_token_ids),
            kv_params,
            session_id=request.session_id,
        )
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        reply = Reply(request)
        interval = runner.config.stream_interval
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
                # vLLM's kv_load_failure_policy "fail": the KV could not be pulled.
                raise KvNotCollected(
                    f"could not collect KV transfer handle {request.kv_handle.remote_request_id!r} "
                    f"from {request.kv_handle.remote_host}:{request.kv_handle.remote_port}: it is "
                    "unknown or expired, or the prefill worker is gone; prefill again or run aggregated"
                )
            for output in batch:
                reply.add(output)
            # --stream-interval holds ids back until that many are ready (not the first, nor the last).
            if reply.sent and not batch[-1].finished and len(reply.message.token_ids) < interval:
                continue
            yield reply.take()

    async def Abort(
        self, request: engine_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.AbortResponse:
        """Abort requests by id; unknown ids are skipped (they may have finished).

        On a prefill member, the id of a finished prefill whose KV no decode engine has
        collected frees that KV now instead of at the end of its lease: the router sends
        it when the handle will not be used (the client left, the decode side failed).
        """
        runner = self._ready()
        aborted = [rid for rid in request.request_ids if await runner.abort(rid)]
        self._forget_expired()
        held = {
            self._handles[rid][1]: rid
            for rid in request.request_ids
            if rid in self._handles and rid not in aborted
        }
        if held:
            for engine_id in await runner.release_kv(list(held)):
                aborted.append(held[engine_id])
                del self._handles[held[engine_id]]
        return engine_pb2.AbortResponse(aborted=aborted)

    async def GetLoad(
        self, request: engine_pb2.LoadRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.Load:
        """Running and waiting requests, KV use, prefix-cache hit rate, block size."""
        self._forget_expired()
        return self._ready().load(pending_transfers=len(self._handles))

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

    def _forget_expired(self) -> None:
        now = time.time()
        for request_id in [r for r, (expiry, _) in self._handles.items() if expiry < now]:
            del self._handles[request_id]


class PrefillMembers:
    """The mesh's prefill members, followed in etcd: a decode engine pulls KV only from
    the one a handle names, at the address that member registered
    (:func:`services.kv.handles.issuer_mismatch`)."""

    #: How long a handle naming an unknown member waits for the member's record (a
    #: prefill engine that registered a moment ago may not have reached the watch yet).
    GRACE_SECONDS = 1.0

    def __init__(self, etcd_endpoints: list[tuple[str, int]]) -> None:
        self._session = EtcdSession(etcd_endpoints)
        self._watcher: MemberWatcher[common_pb2.Member] = MemberWatcher(
            self._session, role_prefix(common_pb2.ROLE_PREFILL)
        )

    def start(self) -> None:
        self._watcher.start()

    async def close(self) -> None:
        await self._watcher.close()
        await self._session.close()

    async def check(self, handle: common_pb2.KvTransferHandle) -> None:
        """Return when a current prefill member issued ``handle``; PermissionDenied otherwise."""
        deadline = time.monotonic() + self.GRACE_SECONDS
        while reason := issuer_mismatch(handle, self._watcher.members.values()):
            if time.monotonic() >= deadline:
                raise PermissionDenied(
                    f"the KV handle names no prefill engine of this mesh: {reason}"
                )
            await asyncio.sleep(0.05)


class EngineStage(Stage):
    """An engine stage; subclasses set the role and NIXL kv_role."""

    kv_role: ClassVar[str]

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._runner = _backend(
            config, resolve_model(config.model, Path(config.home)), self.kv_role
        )
        signer = HandleSigner(config.credentials().mesh_key)
        self._issuers = (
            PrefillMembers(config.etcd_endpoints) if self.role == common_pb2.ROLE_DECODE else None
        )
        self._servicer = EngineServicer(
            self._runner, self.role, config.instance_id, signer, self._issuers
        )

    def services(self) -> list[tuple[descriptor.ServiceDescriptor, object]]:
        return [(engine_pb2.DESCRIPTOR.services_by_name["EngineService"], self._servicer)]

    async def start(self) -> None:
        if self._issuers is not None:
            self._issuers.start()
        await self._runner.start()
        ENGINE_LOADS.add(self._config.instance_id, self._runner)

    async def stop(self) -> None:
        ENGINE_LOADS.remove(self._config.instance_id)
        await self._runner.shutdown()
        if self._issuers is not None:
            await self._issuers.close()

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
