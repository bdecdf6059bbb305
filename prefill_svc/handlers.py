"""What a prefill engine does: compute a prompt's KV and keep it for a decode engine.

``Prefill`` runs the prompt with ``max_tokens=1`` and ``do_remote_decode``, so vLLM's
NixlConnector holds the finished prompt's blocks for a decode engine to pull, and
answers with a signed handle naming them. The blocks stay held until a decode engine
reads them or ``--kv-lease-seconds`` runs out; the router ends a lease early with an
``Abort`` of the prefill's request id when it knows nobody will collect it
(docs/design.md, "A prefill no decode will collect is released at once"). The shared
calls (``Generate`` without a handle, load, adapters, KV events) are
:class:`~services.engine.service.EngineServicer`'s.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from services.engine.backend import EngineBackend
from services.engine.service import EngineServicer
from services.errors import Unavailable
from services.kv.handles import HandleSigner, handle_from_params
from services.pb import engine_pb2


class LeaseBook:
    """Finished prefills' KV held for a decode engine: the router's request id -> (lease
    expiry, the engine's own id for it, which vLLM's connector tracks). An entry past
    its expiry is dropped: the connector has freed those blocks on its own."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[float, str]] = {}

    def __len__(self) -> int:
        self.forget_expired()
        return len(self._held)

    def hold(self, request_id: str, expires_at: float, engine_id: str) -> None:
        """Note a finished prefill's KV, held under ``engine_id`` until ``expires_at``."""
        self.forget_expired()
        self._held[request_id] = (expires_at, engine_id)

    def held(self, request_ids: list[str]) -> dict[str, str]:
        """The engine's id -> the router's id, of those of ``request_ids`` still held."""
        self.forget_expired()
        return {self._held[r][1]: r for r in request_ids if r in self._held}

    def drop(self, request_id: str) -> None:
        """Forget ``request_id``: its KV was released."""
        self._held.pop(request_id, None)

    def forget_expired(self) -> None:
        """Drop the entries whose lease has run out."""
        now = time.time()
        for request_id in [r for r, (expiry, _) in self._held.items() if expiry < now]:
            del self._held[request_id]


class PrefillServicer(EngineServicer):
    """EngineService on a prefill member: ``Prefill``, and ``Abort`` that also releases a
    finished prefill's KV that no decode engine has collected."""

    def __init__(self, runner: EngineBackend, instance_id: str, signer: HandleSigner) -> None:
        super().__init__(runner)
        self._instance_id = instance_id
        self._signer = signer
        self._leases = LeaseBook()

    async def Prefill(
        self, request: engine_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.PrefillResponse:
        """Compute the prompt's KV and keep it for a decode engine to pull over NIXL."""
        runner = self._ready()
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
        self._leases.hold(request_id, expires_at, handle.remote_request_id)
        return engine_pb2.PrefillResponse(
            handle=handle,
            cached_tokens=int(final.num_cached_tokens or 0),
            prompt_tokens=len(request.prompt_token_ids),
        )

    async def Abort(
        self, request: engine_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.AbortResponse:
        """Abort requests by id; unknown ids are skipped (they may have finished).

        The id of a finished prefill whose KV no decode engine has collected frees that
        KV now instead of at the end of its lease: the router sends it when the handle
        will not be used (the client left, the decode side failed).
        """
        reply = await super().Abort(request, context)
        aborted = set(reply.aborted)
        held = self._leases.held([r for r in request.request_ids if r not in aborted])
        if held:
            for engine_id in await self._runner.release_kv(list(held)):
                reply.aborted.append(held[engine_id])
                self._leases.drop(held[engine_id])
        return reply

    def pending_transfers(self) -> int:
        """Finished prefills whose KV no decode engine has collected yet."""
        return len(self._leases)
