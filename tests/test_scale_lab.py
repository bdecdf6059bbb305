"""The scale lab's own logic (pure, seconds): its workloads are a function of the seed,
its percentiles are numpy's, and its client reads a streamed answer (vLLM's, Dynamo's and
stagemesh's event shapes, over real HTTP on loopback) into the right TTFT, chunk and token counts,
with refusals counted by status."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from functools import partial

import numpy
import pytest
from aiohttp import web

from bench.scale.client import Result, Run, percentile, send, session, summarize
from bench.scale.workload import Request, TenantWorkload, poisson_arrivals, stream_prompts

pytestmark = pytest.mark.unit

MODEL = "m"


def test_tenant_workload_is_a_function_of_its_seed() -> None:
    a = TenantWorkload(
        tenants=4,
        prefix_tokens=128,
        query_tokens=32,
        output_tokens=8,
        qps=(2.0, 4.0),
        step_seconds=10,
        seed=7,
    )
    b = TenantWorkload(
        tenants=4,
        prefix_tokens=128,
        query_tokens=32,
        output_tokens=8,
        qps=(2.0, 4.0),
        step_seconds=10,
        seed=7,
    )
    steps_a, steps_b = list(a.steps(MODEL)), list(b.steps(MODEL))
    assert steps_a == steps_b
    assert [rate for rate, _ in steps_a] == [2.0, 4.0]
    other = list(
        TenantWorkload(tenants=4, prefix_tokens=128, query_tokens=32, seed=8, qps=(2.0,)).steps(
            MODEL
        )
    )
    assert other[0][1] != steps_a[0][1]


def test_tenant_requests_share_their_tenants_prefix_exactly() -> None:
    workload = TenantWorkload(
        tenants=3,
        prefix_tokens=100,
        query_tokens=20,
        output_tokens=5,
        qps=(50.0,),
        step_seconds=2,
        seed=1,
    )
    ((_, schedule),) = workload.steps(MODEL)
    bodies = [(request.tenant, json.loads(request.body)) for _, request in schedule]
    assert len({tenant for tenant, _ in bodies}) == 3
    for tenant, body in bodies:
        assert len(body["prompt"]) == 120 and body["max_tokens"] == 5 and body["ignore_eos"]
        assert body["prompt"][:100] == workload.prefix(tenant)
    # Queries differ, and another round names other prefixes.
    assert len({tuple(body["prompt"][100:]) for _, body in bodies}) == len(bodies)
    assert TenantWorkload(prefix_tokens=100, round=1).prefix(0) != TenantWorkload(
        prefix_tokens=100
    ).prefix(0)


def test_poisson_arrivals_have_the_asked_rate_and_order() -> None:
    times = poisson_arrivals(20.0, 500.0, "s")
    assert times == sorted(times) and 0 < times[0] and times[-1] < 500.0
    assert len(times) / 500.0 == pytest.approx(20.0, rel=0.05)
    assert times == poisson_arrivals(20.0, 500.0, "s")


def test_percentile_is_numpys_linear_percentile() -> None:
    values = [float(v) for v in (13, 1, 7, 2, 2, 40, 9, 5, 3, 21, 8)]
    for q in (0, 10, 50, 90, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) != percentile([], 50)  # NaN


def test_summary_counts_refusals_apart_and_rates_over_wall_time() -> None:
    ok = [
        Result(
            sent=0,
            ttft=0.1 * i,
            itl=[0.01, 0.03],
            output_tokens=10,
            prompt_tokens=100,
            cached_tokens=50,
        )
        for i in range(1, 5)
    ]
    refused = [
        Result(sent=0, status=429),
        Result(sent=0, status=429),
        Result(sent=0, status=0, error="reset"),
    ]
    row = summarize(Run(ok + refused, wall_s=2.0, client_cpu_s=0.5))
    assert (row["requests"], row["ok"], row["rejected_429"], row["errors"]) == (7, 4, 2, 1)
    assert row["output_tps"] == 20.0 and row["hit_rate"] == 0.5
    assert row["ttft_p50_ms"] == pytest.approx(250.0) and row["itl_p50_ms"] == pytest.approx(20.0)
    assert row["client_core_share"] == 0.25


#: A completion streamed as vLLM sends it (text and finish reason together) and as
#: Dynamo sends it (an empty finish event, ``usage: null`` on every chunk).
VLLM_EVENTS: list[dict[str, object]] = [
    {"choices": [{"text": "a", "index": 0}]},
    {"choices": [{"text": '"', "index": 0}]},
    {"choices": [{"text": "c", "index": 0, "finish_reason": "length"}]},
    {
        "choices": [],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    },
]
DYNAMO_CHAT_EVENTS: list[dict[str, object]] = [
    {"choices": [{"delta": {"role": "assistant", "content": ""}}], "usage": None},
    {"choices": [{"delta": {"content": "x"}}], "usage": None},
    {"choices": [{"delta": {"content": "y"}}], "usage": None},
    {"choices": [{"delta": {}, "finish_reason": "length"}], "usage": None},
    {
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": None},
    },
]


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async def events(
        request: web.Request, chunks: list[dict[str, object]], compact: bool = True
    ) -> web.StreamResponse:
        reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await reply.prepare(request)
        for chunk in chunks:  # each event in two writes, cut mid-line
            event = (
                b"data: "
                + json.dumps(chunk, separators=(",", ":") if compact else None).encode()
                + b"\n\n"
            )
            await reply.write(event[:9])
            await asyncio.sleep(0.001)
            await reply.write(event[9:])
        await reply.write(b"data: [DONE]\n\n")
        return reply

    async def limited(_: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "busy"}}, status=429)

    app = web.Application()
    app.router.add_post("/v1/completions", partial(events, chunks=VLLM_EVENTS))
    app.router.add_post("/v1/chat/completions", partial(events, chunks=DYNAMO_CHAT_EVENTS))
    app.router.add_post(
        "/v1/spaced/completions", partial(events, chunks=VLLM_EVENTS, compact=False)
    )
    app.router.add_post("/v1/limited", limited)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


async def test_client_reads_streams_into_tokens_and_usage(server: str) -> None:
    completion, chat = (
        stream_prompts(MODEL, 1, 4, 3, 0)[0],
        stream_prompts(MODEL, 1, 4, 2, 0, chat=True)[0],
    )
    limited, spaced = (
        Request("limited", b"{}", 4, 2),
        Request("spaced/completions", completion.body, 4, 3),
    )
    async with session() as http:
        vllm, dynamo, refused, stagemesh = [
            await send(http, server, r) for r in (completion, chat, limited, spaced)
        ]
    assert (vllm.status, vllm.chunks, len(vllm.itl), vllm.output_tokens) == (200, 3, 2, 3)
    assert (vllm.prompt_tokens, vllm.cached_tokens) == (9, 4) and vllm.ttft is not None
    assert (dynamo.status, dynamo.chunks, dynamo.output_tokens, dynamo.cached_tokens) == (
        200,
        2,
        2,
        0,
    )
    assert (refused.status, refused.output_tokens) == (429, 0) and "busy" in refused.error
    # stagemesh writes JSON with Python's default separators ("usage": {...}, "choices": []).
    assert (stagemesh.chunks, stagemesh.output_tokens, stagemesh.cached_tokens) == (3, 3, 4)
