"""Typed clients for the stages. Every caller (router, CLI, tests) uses these instead of
building raw stubs, so deadlines and message shapes are decided in one place."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services import credentials
from services.detokenizer import TokenDecoder
from services.kv.hashing import to_wire
from services.pb import (
    common_pb2,
    engine_pb2,
    engine_pb2_grpc,
    kvstore_pb2,
    kvstore_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

#: Deadline for short control calls (seconds).
DEFAULT_TIMEOUT = 10.0


class _Stamp:
    """Adds fixed metadata (the stage token) to every call of one kind on a channel.

    grpc.aio files each interceptor under one call kind only (the first it is an
    instance of), hence one subclass per kind."""

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self._pairs = tuple(pairs)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._pairs)
        return details._replace(metadata=metadata)  # a namedtuple


class _StampUnaryUnary(_Stamp, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StampUnaryStream(_Stamp, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StampStreamUnary(_Stamp, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Any,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _StampStreamStream(_Stamp, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: Any,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def channel(address: str, role: str = "", stage_token: bool = True) -> grpc.aio.Channel:
    """A channel to a stage that presents this process's mesh credentials
    (:mod:`services.credentials`): TLS when configured, the stage token when there is a
    mesh key (and ``stage_token``), and the mesh's message-size limits.

    ``address`` must come from a member record that verified (:mod:`services.records`)
    or from the operator: the token goes to whoever listens there. Under TLS the stage's
    certificate must name ``role`` when it is given (see
    :meth:`~services.credentials.Tls.name_of`)."""
    creds = credentials.current()
    stamps = (_StampUnaryUnary, _StampUnaryStream, _StampStreamUnary, _StampStreamStream)
    metadata = creds.call_metadata if stage_token else ()
    interceptors = [stamp(metadata) for stamp in stamps] if metadata else None
    channel: grpc.aio.Channel = creds.dial(grpc.aio, address, role, interceptors=interceptors)
    return channel


async def health_status(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The stage's grpc.health.v1 status name, or ``UNREACHABLE`` when it does not answer.
    Health is open on every stage, so the call carries no stage token."""
    async with channel(address, stage_token=False) as chan:
        try:
            reply = await health_pb2_grpc.HealthStub(chan).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class _StageClient:
    """A channel to one stage member, closed with the client (use ``async with``).

    ``role`` is the role the member must hold (under TLS, its certificate must name it);
    each client class knows its own but the engine's, which the caller names."""

    #: The role of the stages this client calls ("" when the caller says).
    role = ""
    #: Whether calls carry the stage token (internal APIs), or not (the router's public API).
    stage_token = True

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT, role: str = "") -> None:
        self.address = address
        self.role = role or self.role
        self._channel = channel(address, self.role, self.stage_token)
        self._timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class TokenizerClient(_StageClient):
    """Client of the tokenizer stage (TokenizerService)."""

    role = "tokenizer"

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(address, timeout)
        self._stub = tokenizer_pb2_grpc.TokenizerServiceStub(self._channel)

    async def tokenize(
        self,
        text: str,
        model: str = "",
        add_special_tokens: bool | None = None,
        return_token_strings: bool = False,
    ) -> tokenizer_pb2.TokenizeResponse:
        """Token ids of plain text."""
        request = tokenizer_pb2.TokenizeRequest(
            model=model, text=text, return_token_strings=return_token_strings
        )
        if add_special_tokens is not None:
            request.add_special_tokens = add_special_tokens
        return await self.tokenize_request(request)

    async def tokenize_chat(
        self,
        messages: Iterable[Mapping[str, Any]],
        model: str = "",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> tokenizer_pb2.TokenizeResponse:
        """Token ids of a conversation rendered through the model's chat template."""
        chat = tokenizer_pb2.ChatInput(
            messages=[tokenizer_pb2.ChatMessage(**dict(m)) for m in messages],
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        return await self.tokenize_conversation(chat, model)

    async def tokenize_conversation(
        self, chat: tokenizer_pb2.ChatInput, model: str = ""
    ) -> tokenizer_pb2.TokenizeResponse:
        """Token ids of a whole chat input (messages with tool calls, and the tools)."""
        return await self.tokenize_request(tokenizer_pb2.TokenizeRequest(model=model, chat=chat))

    async def tokenize_request(
        self, request: tokenizer_pb2.TokenizeRequest
    ) -> tokenizer_pb2.TokenizeResponse:
        """The Tokenize call itself, for a request built elsewhere (the HTTP /tokenize)."""
        return await self._stub.Tokenize(request, timeout=self._timeout)

    async def model_info(self, model: str = "") -> tokenizer_pb2.ModelInfo:
        return await self._stub.GetModelInfo(
            tokenizer_pb2.ModelInfoRequest(model=model), timeout=self._timeout
        )

    async def decoder(self, model: str = "") -> TokenDecoder:
        """The model's decoder, to detokenize locally (rebuilt off the event loop)."""
        call = self._stub.GetDecoder(
            tokenizer_pb2.ModelInfoRequest(model=model), timeout=self._timeout
        )
        serialized = b"".join([chunk.data async for chunk in call])
        return await asyncio.to_thread(TokenDecoder.from_json, serialized.decode())


class _KvEventSource(_StageClient):
    """A stage that publishes KV events (an engine or a KV store): same two calls."""

    _stub: engine_pb2_grpc.EngineServiceStub | kvstore_pb2_grpc.KvStoreServiceStub

    def kv_events(self, epoch: int = 0, after_sequence: int = 0) -> grpc.aio.UnaryStreamCall:
        """The member's KV-event stream after ``(epoch, after_sequence)``."""
        return self._stub.StreamKvEvents(
            common_pb2.KvEventsRequest(epoch=epoch, after_sequence=after_sequence)
        )

    async def kv_snapshot(self) -> common_pb2.KvSnapshot:
        return await self._stub.GetKvSnapshot(common_pb2.KvSnapshotRequest(), timeout=self._timeout)


class KvStoreClient(_KvEventSource):
    """Client of a KV store's control API (the bytes move over NIXL, see kvstore_client)."""

    _stub: kvstore_pb2_grpc.KvStoreServiceStub
    role = "kvstore"

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(address, timeout)
        self._stub = kvstore_pb2_grpc.KvStoreServiceStub(self._channel)

    async def stats(self, timeout: float | None = None) -> kvstore_pb2.Stats:
        """The store's figures (``timeout``: the client's when not given)."""
        return await self._stub.GetStats(
            kvstore_pb2.StatsRequest(), timeout=timeout if timeout is not None else self._timeout
        )

    async def evict(self, hashes: Sequence[int] = (), memory_only: bool = False) -> int:
        """Drop the named blocks (all when none are named); ``memory_only``: from memory."""
        request = kvstore_pb2.EvictRequest(
            chain_names=[to_wire(h) for h in hashes], all=not hashes, memory_only=memory_only
        )
        return (await self._stub.Evict(request, timeout=self._timeout)).evicted


class EngineClient(_KvEventSource):
    """Client of an engine stage (EngineService): prefill or decode member. The router
    names the member's ``role`` (``prefill`` or ``decode``), so that under TLS only a
    certificate of that role serves; without it, any stage certificate of the mesh does."""

    _stub: engine_pb2_grpc.EngineServiceStub

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT, role: str = "") -> None:
        super().__init__(address, timeout, role)
        self._stub = engine_pb2_grpc.EngineServiceStub(self._channel)

    async def prefill(
        self,
        prompt_token_ids: Sequence[int],
        sampling: common_pb2.SamplingParams | None = None,
        request_id: str = "",
        timeout: float | None = 120.0,
        adapter: str = "",
        session_id: str = "",
    ) -> engine_pb2.PrefillResponse:
        """Compute the prompt's KV on this (prefill) member; returns the transfer handle."""
        request = engine_pb2.PrefillRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling=sampling,
            adapter=adapter,
            session_id=session_id,
        )
        return await self._stub.Prefill(request, timeout=timeout)

    def generate(
        self,
        prompt_token_ids: Sequence[int],
        sampling: common_pb2.SamplingParams | None = None,
        kv_handle: common_pb2.KvTransferHandle | None = None,
        request_id: str = "",
        timeout: float | None = None,
        adapter: str = "",
        session_id: str = "",
        min_ids_per_message: int = 0,
    ) -> grpc.aio.UnaryStreamCall:
        """Stream generated ids (iterate the call; cancel it to abort the request)."""
        request = engine_pb2.GenerateRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling=sampling,
            kv_handle=kv_handle,  # None: unset (aggregated)
            adapter=adapter,
            session_id=session_id,
            min_ids_per_message=min_ids_per_message,
        )
        return self._stub.Generate(request, timeout=timeout)

    async def abort(self, *request_ids: str) -> list[str]:
        request = engine_pb2.AbortRequest(request_ids=request_ids)
        return list((await self._stub.Abort(request, timeout=self._timeout)).aborted)

    async def load(self, timeout: float | None = None) -> engine_pb2.Load:
        return await self._stub.GetLoad(engine_pb2.LoadRequest(), timeout=timeout or self._timeout)

    async def load_adapter(
        self, name: str, path: str, timeout: float | None = None
    ) -> common_pb2.Adapter:
        """Load a LoRA adapter on this engine (vLLM reads its weights: seconds)."""
        return await self._stub.LoadAdapter(
            engine_pb2.LoadAdapterRequest(name=name, path=path), timeout=timeout or self._timeout
        )

    async def unload_adapter(self, name: str, timeout: float | None = None) -> None:
        """Unload an adapter; returns once the requests running with it are done."""
        await self._stub.UnloadAdapter(engine_pb2.UnloadAdapterRequest(name=name), timeout=timeout)


class RouterClient(_StageClient):
    """Client of the router's public API (RouterService); ``api_key`` goes with every call,
    the stage token never (the API is public: users hold keys, not the mesh's secret)."""

    role = "router"
    stage_token = False

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT, api_key: str = "") -> None:
        super().__init__(address, timeout)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self._auth: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )

    def generate(
        self,
        request: router_pb2.RouterGenerateRequest,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> grpc.aio.UnaryStreamCall:
        """Stream text deltas (iterate the call; cancel it to stop the generation)."""
        return self._stub.Generate(request, timeout=timeout, metadata=(*self._auth, *metadata))

    async def generate_unary(
        self,
        request: router_pb2.RouterGenerateRequest,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> router_pb2.RouterGenerateResult:
        return await self._stub.GenerateUnary(
            request, timeout=timeout, metadata=(*self._auth, *metadata)
        )

    async def load_adapter(self, name: str, path: str, base_model: str = "") -> list[str]:
        """Load a LoRA adapter on the mesh's engines; the instance ids that loaded it."""
        reply = await self._stub.LoadAdapter(
            router_pb2.RouterLoadAdapterRequest(name=name, path=path, base_model=base_model),
            metadata=self._auth,
        )
        return list(reply.instances)

    async def unload_adapter(self, name: str) -> list[str]:
        """Unload a LoRA adapter from every engine that has it."""
        reply = await self._stub.UnloadAdapter(
            router_pb2.RouterUnloadAdapterRequest(name=name), metadata=self._auth
        )
        return list(reply.instances)

    async def list_models(self) -> list[router_pb2.ModelCard]:
        reply = await self._stub.ListModels(
            router_pb2.ListModelsRequest(), timeout=self._timeout, metadata=self._auth
        )
        return list(reply.models)

    async def list_members(
        self, role: int = common_pb2.ROLE_UNSPECIFIED
    ) -> list[router_pb2.MemberStatus]:
        reply = await self._stub.ListMembers(
            router_pb2.ListMembersRequest(role=common_pb2.Role.ValueType(role)),
            timeout=self._timeout,
            metadata=self._auth,
        )
        return list(reply.members)
