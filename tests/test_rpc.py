"""The shared handler registry maps errors to statuses the same way for every stage.

A small servicer on a real grpc.aio server over loopback stands in for a stage whose
handlers fail in each way the taxonomy names.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from services.clients import TokenizerClient
from services.errors import (
    ContextLengthExceeded,
    DeadlineExceeded,
    InvalidRequest,
    KvNotCollected,
    ModelNotFound,
    NotFound,
    Overloaded,
    StageDead,
    StageError,
    Unavailable,
    from_rpc_error,
)
from services.net import free_port
from services.pb import tokenizer_pb2, tokenizer_pb2_grpc
from services.rpc import register_service

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Failing:
    async def Tokenize(self, request, context):
        raise RuntimeError("secret internal detail")

    async def GetDecoder(self, request, context) -> AsyncIterator[tokenizer_pb2.DecoderChunk]:
        yield tokenizer_pb2.DecoderChunk(data=b"ok")
        raise InvalidRequest("bad after one reply")

    def GetModelInfo(self, request, context):
        """Not async: left unregistered, so the call is UNIMPLEMENTED."""


async def serve(servicer: object, port: int = 0) -> tuple[grpc.aio.Server, int]:
    """A started server with ``servicer`` as the TokenizerService on loopback ``port``
    (0: a free one), and the port it took."""
    server = grpc.aio.server()
    register_service(
        server, tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"], servicer
    )
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


async def test_errors_map_to_their_status() -> None:
    server = grpc.aio.server()
    registered = register_service(
        server, tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"], Failing()
    )
    assert registered == ["GetDecoder", "Tokenize"]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with TokenizerClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.tokenize("x")
            assert caught.value.code() == grpc.StatusCode.INTERNAL
            assert "secret" not in caught.value.details()

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.model_info()
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            chunks = []
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for chunk in stub.GetDecoder(tokenizer_pb2.ModelInfoRequest()):
                    chunks.append(chunk.data)
            assert chunks == [b"ok"]
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == "bad after one reply"
    finally:
        await server.stop(0)


class Raising:
    """Raises the error kind its Tokenize request names, as a stage would."""

    def __init__(self, kinds: dict[str, type[StageError]]) -> None:
        self._kinds = kinds

    async def Tokenize(self, request, context):
        raise self._kinds[request.text](f"raised {request.text}")


KINDS: dict[str, type[StageError]] = {
    kind.kind(): kind
    for kind in (
        InvalidRequest,
        ContextLengthExceeded,
        NotFound,
        ModelNotFound,
        KvNotCollected,
        Unavailable,
        Overloaded,
        DeadlineExceeded,
        StageDead,
    )
}


async def test_error_kinds_survive_the_hop() -> None:
    """The caller rebuilds the kind the server raised, not just its status code: the router
    decides fallbacks and the bridge picks OpenAI codes by it."""
    server, port = await serve(Raising(KINDS))
    try:
        async with TokenizerClient(f"127.0.0.1:{port}") as client:
            for name, kind in KINDS.items():
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.tokenize(name)
                assert caught.value.code() == kind.code
                error = from_rpc_error(caught.value, "tokenizer t1")
                assert type(error) is kind, name
                assert str(error) == f"tokenizer t1: raised {name}"
    finally:
        await server.stop(0)
    # A status grpc made itself (nothing listens any more) has no kind: its code decides.
    async with TokenizerClient(f"127.0.0.1:{port}", timeout=2) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.tokenize("x")
    assert type(from_rpc_error(caught.value, "tokenizer")) is Unavailable
    assert Unavailable.retry_elsewhere and StageDead.retry_elsewhere
    assert not DeadlineExceeded.retry_elsewhere and not InvalidRequest.retry_elsewhere


async def test_a_stage_back_at_its_address_is_reached_within_seconds() -> None:
    """A channel that failed to connect for 20 s reaches a stage that comes back at the
    same address within the mesh's 2 s backoff cap, plus jitter and the connect. gRPC's
    own backoff (1 s, times 1.6 up to 120 s) would next dial about 6 s later: measured,
    7.8 s against 2.3 s with the mesh's options."""
    port = free_port()
    async with TokenizerClient(f"127.0.0.1:{port}", timeout=1) as client:
        down_until = time.monotonic() + 20
        while time.monotonic() < down_until:
            with pytest.raises(grpc.aio.AioRpcError):
                await client.tokenize("x")
            await asyncio.sleep(0.05)
        server, _ = await serve(Failing(), port)
        try:
            up = time.monotonic()
            while True:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.tokenize("x")
                if caught.value.code() == grpc.StatusCode.INTERNAL:  # the stage answered
                    break
                assert time.monotonic() - up < 3.5, "the channel did not dial the stage again"
                await asyncio.sleep(0.05)
        finally:
            await server.stop(0)
