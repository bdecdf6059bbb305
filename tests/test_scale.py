"""The mesh at width: sixteen simulated engines behind a real etcd, tokenizer and router,
driven through the official OpenAI SDK. The engines compute no model (services/engine/sim),
so these tests take seconds and check the mesh's own parts: KV-aware routing lands a
repeated prefix where it is cached (the engine's own cached_tokens says so), admission
answers 429 at the mesh's capacity, four engines killed at once lose no stream, and
member churn under load fails no request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import pytest_asyncio

from tests.support.sim import MAX_NUM_SEQS, SimMesh, sim_mesh

#: The router admits this many requests per model beyond the decode members' sum.
MAX_QUEUED = 16


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(
    home: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SimMesh]:
    """Twelve engines in one process and four in another, the router's queue small."""
    async with sim_mesh(
        home,
        tmp_path_factory.mktemp("sim-mesh"),
        {"twelve": 12, "four": 4},
        "--max-queued-requests",
        str(MAX_QUEUED),
    ) as started:
        yield started


#: About 1,000 tokens: longer than the router's load weight (512 tokens per queued request),
#: so a holder whose last load report still shows the previous request keeps the prefix.
RULES = 72
TENANT_PREFIX = " ".join(
    f"Tenant {{}} rule {i}: answer in kind, briefly and with care." for i in range(RULES)
)


async def test_a_repeated_prefix_lands_where_it_is_cached(mesh: SimMesh) -> None:
    """Each tenant's second and later requests reuse its prefix on the engine that holds it:
    with 16 engines, chance alone would find it one time in sixteen."""
    for tenant in range(4):
        prefix = TENANT_PREFIX.format(*[tenant] * RULES)
        _, _, cached = await mesh.complete(f"{prefix} First question?", 2)
        assert cached == 0
        await asyncio.sleep(
            0.3
        )  # the engine's KV events reach the router's index (a stream, not the reply)
        for query in range(3):
            _, _, cached = await mesh.complete(f"{prefix} Question {query} of tenant {tenant}?", 2)
            assert cached >= 256, f"tenant {tenant}, query {query}: {cached} cached tokens"


async def test_admission_answers_429_at_the_meshs_capacity(mesh: SimMesh) -> None:
    capacity = 16 * MAX_NUM_SEQS + MAX_QUEUED
    results = await asyncio.gather(
        *(mesh.complete(f"Request {i}: count slowly.", 60) for i in range(capacity + 48)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if isinstance(r, tuple)]
    assert len(refused) + len(served) == len(results), [
        r for r in results if isinstance(r, BaseException)
    ][:3]
    assert refused and len(served) >= 16 * MAX_NUM_SEQS
    assert all(tokens == 60 for _, tokens, _ in served)
    assert refused[0].response.headers.get("retry-after")


async def test_four_engines_killed_at_once_lose_no_stream(mesh: SimMesh) -> None:
    """Streams on the killed engines move to others (retried, or migrated once tokens
    flowed) and finish with the ids they would have had (the sim's ids depend only on the
    context): the same as a calm rerun."""
    prompts = [
        f"Story {i}: once upon a time" for i in range(16 * MAX_NUM_SEQS)
    ]  # every engine busy
    decisions = await mesh.metric("stagemesh_router_decisions_total")
    streams = [asyncio.create_task(mesh.complete(p, 60, stream=True)) for p in prompts]
    await asyncio.sleep(0.3)
    mesh.engines["four"].kill()
    results = await asyncio.gather(*streams)
    assert all(tokens == 60 for _, tokens, _ in results)
    # Some streams were placed twice: retried or migrated away from the dead engines.
    assert await mesh.metric("stagemesh_router_decisions_total") > decisions + len(prompts)
    calm = await asyncio.gather(*(mesh.complete(p, 60) for p in prompts))
    assert [text for text, _, _ in results] == [text for text, _, _ in calm]
    await mesh.replace("four", "four", 4, 16)


async def test_member_churn_under_load_fails_no_request(mesh: SimMesh) -> None:
    """Engines join, drain (SIGTERM) and crash (SIGKILL) while requests run: none fails."""
    done = asyncio.Event()

    async def load() -> list[int]:
        tokens: list[int] = []

        async def one(i: int) -> None:
            tokens.append((await mesh.complete(f"Churn {i}: go on.", 30, stream=i % 2 == 0))[1])

        for start in range(0, 96, 12):
            await asyncio.gather(*(one(i) for i in range(start, start + 12)))
        done.set()
        return tokens

    async def churn() -> None:
        round_ = 0
        while not done.is_set():
            joiner = mesh.engine(f"churn-{round_}", 2)
            joiner.start()
            await joiner.wait_healthy(60)
            await asyncio.sleep(0.3)
            if round_ % 2:
                joiner.kill()
            else:
                await asyncio.to_thread(joiner.stop)
            del mesh.engines[joiner.name]
            round_ += 1

    tokens, _ = await asyncio.gather(load(), churn())
    assert tokens == [30] * 96


async def test_streams_failing_mid_generation_finish_elsewhere(mesh: SimMesh) -> None:
    """Engines that fail half their streams part-way (fault injection): every request
    still completes, with the text of an undisturbed run."""
    flaky = await mesh.replace("four", "flaky", 4, 16, "--sim-fail-rate", "0.5")
    prompts = [f"Fable {i}: a fox and a crow" for i in range(16 * MAX_NUM_SEQS)]
    decisions = await mesh.metric("stagemesh_router_decisions_total")
    results = await asyncio.gather(*(mesh.complete(p, 40, stream=True) for p in prompts))
    assert all(tokens == 40 for _, tokens, _ in results)
    assert await mesh.metric("stagemesh_router_decisions_total") > decisions + len(prompts)
    await asyncio.to_thread(flaky.stop)
    await mesh.wait_members(12)
    calm = await asyncio.gather(*(mesh.complete(p, 40) for p in prompts))
    assert [text for text, _, _ in results] == [text for text, _, _ in calm]
