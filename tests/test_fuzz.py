"""A bounded fuzz of the router's two front ends: a few thousand malformed, mistyped,
oversized and truncated requests over HTTP and gRPC, with streams cut early and bodies
sent slowly. None may get a 500 (or INTERNAL / UNKNOWN), and the mesh must serve a good
request afterwards. Seeded, so a failure reproduces. Real router, tokenizer and engines;
the router under test caps max_tokens at 4, so requests that happen to be valid cost
little engine time."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest_asyncio

from services.clients import channel
from services.operator.etcd_server import EmbeddedEtcd
from services.operator.launcher import StageProcess
from services.pb import router_pb2
from tests.support.stages import Mesh, router_process, running

SEED = 20261202
#: Values a fuzzed field may take: wrong types, edges, huge and odd text.
JUNK: list[Any] = [
    None,
    True,
    -1,
    0,
    1,
    2**31,
    2**64,
    -(2**63),
    1.5,
    float("1e308"),
    "",
    "3",
    "\x00",
    "é" * 3,
    "\ud800",
    "x" * 70_000,
    [],
    [None],
    [1, "a"],
    {},
    {"a": 1},
    [[1, 2]],
    [-5],
    ["s"] * 40,
    {"type": "text", "text": 5},
    [{"role": "user"}],
    [{"role": 7, "content": "hi"}],
]
FIELDS = [
    "model",
    "prompt",
    "messages",
    "n",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stop_token_ids",
    "seed",
    "logprobs",
    "top_logprobs",
    "stream",
    "stream_options",
    "min_tokens",
    "ignore_eos",
    "presence_penalty",
    "logit_bias",
    "best_of",
    "echo",
    "response_format",
]
PATHS = ["/v1/completions", "/v1/chat/completions"]


def mutated(rng: random.Random, path: str) -> bytes:
    """A body near a valid one: fields replaced, removed or added, sometimes cut short."""
    body: dict[str, Any] = {"model": "", "max_tokens": 2}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        body["prompt"] = "Hi"
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(FIELDS)
        if rng.random() < 0.2:
            body.pop(field, None)
        else:
            body[field] = rng.choice(JUNK)
    raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    roll = rng.random()
    if roll < 0.15:
        raw = raw[: rng.randrange(len(raw))]  # truncated
    elif roll < 0.2:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))  # noise
    elif roll < 0.23:
        raw = b"[" * 5000 + b"]" * 5000  # deep nesting
    return raw


async def slow_body(raw: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(raw), 7):
        yield raw[i : i + 7]
        await asyncio.sleep(0.001)


@pytest_asyncio.fixture(loop_scope="session")
async def fuzz_router(
    etcd: EmbeddedEtcd, home: Path, mesh: Mesh, tmp_path: Path
) -> AsyncIterator[tuple[str, StageProcess]]:
    router, http_port = router_process(etcd.endpoint, home, tmp_path, "--max-tokens-limit", "4")
    async with running(router):
        yield f"http://127.0.0.1:{http_port}", router


async def test_fuzzed_requests_never_get_a_500(fuzz_router: tuple[str, StageProcess]) -> None:
    http_url, router = fuzz_router
    rng = random.Random(SEED)
    statuses: dict[int, int] = {}
    server_errors: list[str] = []
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=http_url, timeout=300, limits=limits) as http:
        gate = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            path = rng.choice(PATHS)
            raw = mutated(rng, path)
            mode = rng.random()
            async with gate:
                try:
                    if mode < 0.05:  # a stream whose client leaves after the headers
                        body = {"model": "", "prompt": "Hi", "max_tokens": 4, "stream": True}
                        async with http.stream("POST", "/v1/completions", json=body) as reply:
                            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
                        return
                    content: bytes | AsyncIterator[bytes] = slow_body(raw) if mode < 0.1 else raw
                    reply = await http.post(
                        path, content=content, headers={"Content-Type": "application/json"}
                    )
                except httpx.TransportError:
                    return  # the server closing a connection it could not read is fine
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
            if reply.status_code >= 500:
                server_errors.append(
                    f"{reply.status_code} {path} {raw[:200]!r}: {reply.text[:300]}"
                )
            elif reply.status_code != 200:
                assert reply.json()["error"]["message"], reply.text

        await asyncio.gather(*(one(i) for i in range(2000)))
    assert not server_errors, server_errors[:5]
    assert statuses.get(400, 0) > 500, statuses  # most are refused, as they should be

    # gRPC: random bytes and random fields as the request message.
    codes: dict[grpc.StatusCode, int] = {}
    async with channel(router.grpc_address) as chan:
        calls = {
            "GenerateUnary": chan.unary_unary("/stagemesh.v1.RouterService/GenerateUnary"),
            "Generate": chan.unary_stream("/stagemesh.v1.RouterService/Generate"),
        }
        for i in range(600):
            if i % 2:
                message = router_pb2.RouterGenerateRequest(text=rng.choice(["", "Hi", "x" * 1000]))
                message.n = rng.choice([0, 1, 17, 2**31])
                message.sampling.max_tokens = rng.choice([0, 1, 3, 9, 2**31])
                message.sampling.top_p = rng.choice([0.5, -1.0, 7.0])
                payload = message.SerializeToString()
            else:
                payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
            name = rng.choice(list(calls))
            try:
                if name == "Generate":
                    async for _ in calls[name](payload, timeout=120):
                        break  # an early disconnect
                else:
                    await calls[name](payload, timeout=120)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                code = error.code()
            codes[code] = codes.get(code, 0) + 1
    assert not {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN} & set(codes), codes
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 100, codes

    assert router.alive()
    async with httpx.AsyncClient(base_url=http_url, timeout=120) as http:
        good = await http.post(
            "/v1/completions", json={"model": "", "prompt": "The sea is", "max_tokens": 3}
        )
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 3
