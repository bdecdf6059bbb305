"""API keys on the router's public APIs: a call without a key, or with a wrong one, is
401 with OpenAI's error body over HTTP and UNAUTHENTICATED over gRPC; a right key is
served; health checks stay open. Real router (with keys) over the session's stages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import pytest_asyncio

from router_svc.auth import ApiKeys
from services.clients import EngineClient, RouterClient, health_status
from services.credentials import MeshCredentials
from services.errors import Unauthenticated
from services.kv.handles import issuer_mismatch
from services.operator.etcd_server import EmbeddedEtcd
from services.operator.launcher import StageProcess
from services.pb import (
    common_pb2,
    engine_pb2,
    engine_pb2_grpc,
    router_pb2,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from tests.support.stages import Mesh, router_process, running

KEYS = ("key-one", "key-two")


def test_keys_are_checked_whole_and_by_scheme(tmp_path: Path) -> None:
    keys = ApiKeys(KEYS)
    keys.check("Bearer key-one")
    keys.check("bearer  key-two ")  # the scheme is case-insensitive, spaces are not the key
    for bad in (
        None,
        "",
        "key-one",
        "Basic key-one",
        "Bearer key",
        "Bearer key-one-more",
        "Bearer ",
    ):
        with pytest.raises(Unauthenticated):
            keys.check(bad)
    ApiKeys([""]).check(None)  # no keys: the API is open
    assert not ApiKeys.from_settings("", "") and not ApiKeys([" ", ""])

    key_file = tmp_path / "keys"
    key_file.write_text("# the team's keys\nkey-three\n\n")
    from_both = ApiKeys.from_settings("key-one", str(key_file))
    from_both.check("Bearer key-three")
    from_both.check("Bearer key-one")
    with pytest.raises(Unauthenticated):
        from_both.check("Bearer # the team's keys")
    with pytest.raises(SystemExit, match="--api-key-file"):
        ApiKeys.from_settings("", str(tmp_path / "missing"))
    assert (
        ApiKeys.key_id("Bearer key-one")
        == ApiKeys.key_id("Bearer key-one")
        != ApiKeys.key_id("Bearer key-two")
    )
    assert "key-one" not in ApiKeys.key_id("Bearer key-one")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def keyed_router(
    etcd: EmbeddedEtcd, home: Path, mesh: Mesh, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[str, str]]:
    """A router over the session's stages that requires one of :data:`KEYS` (given in
    its environment, as an operator would); yields its HTTP URL and gRPC address."""
    router, http_port = router_process(etcd.endpoint, home, tmp_path_factory.mktemp("keyed-router"))
    router.env["STAGEMESH_API_KEY"] = ",".join(KEYS)
    async with running(router):
        yield f"http://127.0.0.1:{http_port}", router.grpc_address


@pytest.mark.asyncio(loop_scope="session")
async def test_http_needs_a_valid_key(keyed_router: tuple[str, str]) -> None:
    http_url, _ = keyed_router
    body = {"model": "", "prompt": "The sea is", "max_tokens": 4, "temperature": 0}
    async with httpx.AsyncClient(base_url=http_url, timeout=120) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}):
            reply = await http.post("/v1/completions", json=body, headers=headers)
            assert reply.status_code == 401, reply.text
            assert reply.headers["WWW-Authenticate"] == "Bearer"
            error = reply.json()["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert (await http.get("/v1/models")).status_code == 401
        # A refused body is not read: not even a malformed one gets past the key.
        assert (await http.post("/v1/completions", content=b"{not json")).status_code == 401
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/metrics")).status_code == 200

    async with openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key="wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError):
            await sdk.completions.create(model="", prompt="The sea is", max_tokens=4)
    async with openai.AsyncOpenAI(
        base_url=f"{http_url}/v1", api_key="key-two", max_retries=0, timeout=120
    ) as sdk:
        completion = await sdk.completions.create(
            model="", prompt="The sea is", max_tokens=4, temperature=0
        )
        assert completion.usage is not None and completion.usage.completion_tokens == 4


@pytest.mark.asyncio(loop_scope="session")
async def test_grpc_needs_a_valid_key(keyed_router: tuple[str, str]) -> None:
    _, grpc_address = keyed_router
    request = router_pb2.RouterGenerateRequest(
        text="The sea is", sampling=common_pb2.SamplingParams(max_tokens=4)
    )
    for key in ("", "wrong"):
        async with RouterClient(grpc_address, api_key=key) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.generate_unary(request, timeout=60)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                [delta async for delta in client.generate(request, timeout=60)]
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.list_models()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await health_status(grpc_address) == "SERVING"  # load balancers need no key
    async with RouterClient(grpc_address, api_key="key-one") as client:
        result = await client.generate_unary(request, timeout=120)
        assert result.usage.completion_tokens == 4
        assert [delta async for delta in client.generate(request, timeout=120)]
        assert await client.list_models()


@pytest.mark.asyncio(loop_scope="session")
async def test_internal_stage_apis_serve_only_mesh_members(
    engine_stages: tuple[StageProcess, StageProcess], tokenizer_stage: StageProcess
) -> None:
    """Engines and the tokenizer refuse callers without this mesh's stage token (none, or
    another mesh's): prompts, KV events with their token ids, generation. Health stays open."""
    prefill_stage, _ = engine_stages
    another_mesh = MeshCredentials(mesh_key=b"another mesh").call_metadata
    for metadata in ((), another_mesh):
        async with grpc.aio.insecure_channel(prefill_stage.grpc_address) as chan:
            engine = engine_pb2_grpc.EngineServiceStub(chan)
            calls = [
                engine.GetKvSnapshot(common_pb2.KvSnapshotRequest(), metadata=metadata),
                engine.GetLoad(engine_pb2.LoadRequest(), metadata=metadata),
                engine.Prefill(
                    engine_pb2.PrefillRequest(prompt_token_ids=[1, 2, 3]), metadata=metadata
                ),
            ]
            streams = [
                engine.StreamKvEvents(common_pb2.KvEventsRequest(), metadata=metadata),
                engine.Generate(
                    engine_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3]), metadata=metadata
                ),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value
            for stream in streams:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    [reply async for reply in stream]
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "stage credential" in (caught.value.details() or "")
        async with grpc.aio.insecure_channel(tokenizer_stage.grpc_address) as chan:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await tokenizer_pb2_grpc.TokenizerServiceStub(chan).Tokenize(
                    tokenizer_pb2.TokenizeRequest(text="hello"), metadata=metadata
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await health_status(prefill_stage.grpc_address) == "SERVING"
    async with EngineClient(prefill_stage.grpc_address) as member:  # this process holds the key
        assert (await member.kv_snapshot()).epoch


def test_a_handle_must_name_a_current_prefill_member() -> None:
    members = [
        common_pb2.Member(
            instance_id="prefill-a", role=common_pb2.ROLE_PREFILL, nixl_address="10.0.0.2:5600"
        ),
        common_pb2.Member(
            instance_id="prefill-b", role=common_pb2.ROLE_PREFILL, nixl_address="10.0.0.3:5600"
        ),
    ]

    def handle(instance: str, host: str, port: int) -> common_pb2.KvTransferHandle:
        return common_pb2.KvTransferHandle(
            prefill_instance_id=instance, remote_host=host, remote_port=port
        )

    assert issuer_mismatch(handle("prefill-a", "10.0.0.2", 5600), members) == ""
    assert "not 10.0.0.3:5600" in issuer_mismatch(handle("prefill-a", "10.0.0.3", 5600), members)
    assert "no current prefill member is prefill-c" in issuer_mismatch(
        handle("prefill-c", "10.0.0.2", 5600), members
    )
    assert issuer_mismatch(handle("", "10.0.0.2", 5600), members)
    assert issuer_mismatch(handle("prefill-a", "10.0.0.2", 5600), []) != ""
