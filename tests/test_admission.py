"""Admission: every limit on what a request may ask for is a 4xx with OpenAI's error body
(or INVALID_ARGUMENT) before anything is allocated; a full model queue is 429 with
Retry-After (RESOURCE_EXHAUSTED), not 503; and none of it disturbs good requests or
grows the router. Real router, tokenizer and engines (the session's mesh)."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import pytest_asyncio

from services.clients import RouterClient
from services.operator.etcd_server import EmbeddedEtcd
from services.pb import common_pb2, router_pb2
from tests.support.requests import STORY, post, rss_mib
from tests.support.stages import Mesh, router_process, running


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": "", "prompt": ["hi"] * 257}, "at most 256 prompts"),
        ({"model": "", "prompt": [[1, 2]] * 300}, "at most 256 prompts"),
        (
            {"model": "", "prompt": "hi", "stop": [f"s{i}" for i in range(17)]},
            "at most 16 stop strings",
        ),
        ({"model": "", "prompt": "hi", "stop_token_ids": list(range(17))}, "16 stop token ids"),
        ({"model": "", "prompt": "hi", "stop": "x" * 257}, "at most 256 characters"),
        (
            {"model": "", "messages": [{"role": "user", "content": "hi"}] * 2049},
            "at most 2048 messages",
        ),
        ({"model": "", "prompt": "hi", "n": 2**31}, "n must be between 1 and 16"),
        (
            {"model": "", "messages": [{"role": "user", "content": "hi"}], "n": 2**31},
            "n must be between",
        ),
        ({"model": "", "prompt": "hi", "n": 2**40}, "invalid value"),
    ],
)
async def test_limits_are_400s(mesh: Mesh, body: dict, fragment: str) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    reply = await post(mesh, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


async def test_bad_headers_and_encodings_are_4xx(mesh: Mesh) -> None:
    good = b'{"model": "", "prompt": "hi", "max_tokens": 2}'
    cases: list[tuple[dict[bytes, bytes], bytes, int, str]] = [
        ({b"Content-Encoding": b"gzip"}, good, 400, "could not be decoded as gzip"),
        ({b"Content-Encoding": b"zstd-ish"}, good, 415, "not supported"),
        ({b"X-Session-Id": b"caf\xe9"}, good, 400, "x-session-id"),
        ({b"X-Session-Id": b"s" * 257}, good, 400, "at most 256"),
        ({b"Content-Encoding": b"gzip"}, gzip.compress(good), 200, ""),
    ]
    for headers, content, status, fragment in cases:
        # One connection per case: after a body it could not decode, the server closes it.
        async with httpx.AsyncClient(base_url=mesh.http_url, timeout=120) as http:
            reply = await http.post(
                "/v1/completions",
                content=content,
                headers={b"Content-Type": b"application/json", **headers},
            )
        assert reply.status_code == status, (headers, reply.text)
        if fragment:
            assert fragment in reply.json()["error"]["message"]


async def test_grpc_limits_are_invalid_argument(router: RouterClient) -> None:
    cases = [
        router_pb2.RouterGenerateRequest(text="hi", n=2**31),
        router_pb2.RouterGenerateRequest(text="hi", request_id="r" * 257),
        router_pb2.RouterGenerateRequest(text="hi", session_id="s" * 257),
        router_pb2.RouterGenerateRequest(
            text="hi", sampling=common_pb2.SamplingParams(stop=["x"] * 17)
        ),
    ]
    for request in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await router.generate_unary(request, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()


async def test_oversized_asks_leave_the_router_small(
    client: openai.AsyncOpenAI, mesh: Mesh
) -> None:
    """What once grew the router to 17 GB (n = 2^31) now costs nothing; good requests
    sent at the same time succeed."""
    before = rss_mib(mesh.router.pid)
    good = asyncio.create_task(
        client.completions.create(model="", prompt=STORY, temperature=0, max_tokens=12)
    )
    bad: list[dict[str, object]] = [
        {"model": "", "messages": [{"role": "user", "content": "hi"}], "n": 2**31 - 1},
        {"model": "", "prompt": ["x"] * 100_000},
        {"model": "", "prompt": "hi", "stop": ["y" * 1000] * 1000},
    ]
    replies = await asyncio.gather(
        *(
            post(mesh, "/v1/chat/completions" if "messages" in b else "/v1/completions", b)
            for b in bad * 5
        )
    )
    assert [r.status_code for r in replies] == [400] * len(replies)
    usage = (await good).usage
    assert usage is not None and usage.completion_tokens == 12
    assert rss_mib(mesh.router.pid) < before + 200
    assert mesh.router.alive()


@pytest_asyncio.fixture(loop_scope="session")
async def strict_router(
    etcd: EmbeddedEtcd, home: Path, mesh: Mesh, tmp_path: Path
) -> AsyncIterator[tuple[str, str]]:
    """A second router over the session's stages that queues nothing beyond what the
    engines run at once; yields its HTTP URL and gRPC address."""
    router, http_port = router_process(etcd.endpoint, home, tmp_path, "--max-queued-requests", "0")
    async with running(router):
        yield f"http://127.0.0.1:{http_port}", router.grpc_address


async def test_a_full_queue_is_429_with_retry_after(
    strict_router: tuple[str, str], router: RouterClient
) -> None:
    http_url, grpc_address = strict_router
    members = await router.list_members(common_pb2.ROLE_DECODE)
    capacity = sum(m.member.max_concurrency for m in members)
    body = {"model": "", "prompt": STORY, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=http_url, timeout=300) as http:
        replies = await asyncio.gather(
            *(http.post("/v1/completions", json=body) for _ in range(capacity + 8))
        )
        statuses = [r.status_code for r in replies]
        assert set(statuses) == {200, 429}, statuses
        assert statuses.count(200) >= capacity // 2  # the queue bound is what was passed, no less
        refused = next(r for r in replies if r.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert "try again" in refused.json()["error"]["message"]
        # Nothing stays counted: the same router admits again once the burst is done.
        assert (await http.post("/v1/completions", json=body)).status_code == 200

    async with RouterClient(grpc_address) as strict:
        calls = [
            strict.generate_unary(
                router_pb2.RouterGenerateRequest(
                    text=STORY, sampling=common_pb2.SamplingParams(max_tokens=24, ignore_eos=True)
                ),
                timeout=300,
            )
            for _ in range(capacity + 8)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
    codes = {r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)}
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert any(isinstance(r, router_pb2.RouterGenerateResult) for r in results)
