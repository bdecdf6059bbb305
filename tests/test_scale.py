"""The mesh at width: sixteen simulated engines behind a real etcd, tokenizer and router,
driven through the official OpenAI SDK. The engines compute no model (services/engine/sim),
so these tests take seconds and check the mesh's own parts: KV-aware routing lands a
repeated prefix where it is cached (the engine's own cached_tokens says so), admission
answers 429 at the mesh's capacity, four engines killed at once lose no stream, and
member churn under load fails no request."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio

from services.etcd import EtcdSession
from services.etcd_server import EmbeddedEtcd
from services.launcher import StageProcess
from services.membership import role_prefix
from services.net import free_port
from services.pb import common_pb2
from tests.conftest import private_etcd, router_process, running, tokenizer_process

#: Each simulated engine runs this many sequences at once; the router admits
#: MAX_QUEUED more per model beyond the decode members' sum.
MAX_NUM_SEQS = 4
MAX_QUEUED = 16


@dataclass
class SimMesh:
    """A mesh of its own (its own etcd: the session's vLLM mesh must not see these engines)."""

    etcd: EmbeddedEtcd
    home: Path
    log_dir: Path
    client: openai.AsyncOpenAI
    engines: dict[str, StageProcess] = field(default_factory=dict)

    def engine(self, name: str, count: int, *extra: str) -> StageProcess:
        """A process of ``count`` simulated decode engines at an accelerator's pace (not started)."""
        port = free_port()
        process = StageProcess(
            name, "decode_svc",
            ["--engine", "sim", "--sim-engines", str(count), "--sim-profile", "pace-10ms",
             "--max-num-seqs", str(MAX_NUM_SEQS), "--port", str(port), "--etcd", self.etcd.endpoint,
             "--home", str(self.home), "--metrics-port", "-1", "--grace-seconds", "30", *extra],
            f"127.0.0.1:{port}", self.log_dir,
        )
        self.engines[name] = process
        return process

    async def metric(self, name: str) -> float:
        """A counter of the router's, summed over its labels."""
        async with httpx.AsyncClient(base_url=str(self.client.base_url).removesuffix("v1/")) as http:
            text = (await http.get("/metrics")).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    async def decode_members(self) -> int:
        session = EtcdSession([("127.0.0.1", self.etcd.client_port)])
        try:
            listing = await (await session.client()).get_prefix(role_prefix(common_pb2.ROLE_DECODE).encode())
            return len(list(listing))
        finally:
            await session.close()

    async def wait_members(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while (found := await self.decode_members()) != count:
            assert time.monotonic() < deadline, f"{found} decode members, not {count}"
            await asyncio.sleep(0.2)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def sim_mesh(home: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SimMesh]:
    """Twelve engines in one process and four in another, the router's queue small."""
    log_dir = tmp_path_factory.mktemp("sim-mesh")
    with private_etcd() as etcd:
        tokenizer = tokenizer_process("sim-tokenizer", etcd.endpoint, home, log_dir)
        router, http_port = router_process(
            etcd.endpoint, home, log_dir, "--max-queued-requests", str(MAX_QUEUED), "--worker-wait", "5",
        )
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=120
        )
        mesh = SimMesh(etcd, home, log_dir, client)
        async with contextlib.AsyncExitStack() as stack:
            for stage in (tokenizer, router, mesh.engine("twelve", 12), mesh.engine("four", 4)):
                await stack.enter_async_context(running(stage))
            await mesh.wait_members(16)
            yield mesh
            for process in mesh.engines.values():
                process.stop()


async def complete(mesh: SimMesh, prompt: str, max_tokens: int, stream: bool = False) -> tuple[str, int, int]:
    """Text, completion tokens and engine-reported cached prompt tokens of one completion."""
    if not stream:
        reply = await mesh.client.completions.create(model="", prompt=prompt, max_tokens=max_tokens)
        assert reply.usage is not None
        details = reply.usage.prompt_tokens_details
        return reply.choices[0].text, reply.usage.completion_tokens, (details.cached_tokens or 0) if details else 0
    text, usage = "", None
    chunks = await mesh.client.completions.create(
        model="", prompt=prompt, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in chunks:
        text += "".join(choice.text for choice in chunk.choices)
        usage = chunk.usage or usage
    assert usage is not None
    return text, usage.completion_tokens, 0


TENANT_PREFIX = " ".join(f"Tenant {{}} rule {i}: answer in kind, briefly and with care." for i in range(24))


async def test_a_repeated_prefix_lands_where_it_is_cached(sim_mesh: SimMesh) -> None:
    """Each tenant's second and later requests reuse its prefix on the engine that holds it:
    with 16 engines, chance alone would find it one time in sixteen."""
    for tenant in range(4):
        prefix = TENANT_PREFIX.format(*[tenant] * 24)
        _, _, cached = await complete(sim_mesh, f"{prefix} First question?", 2)
        assert cached == 0
        await asyncio.sleep(0.3)  # the engine's KV events reach the router's index (a stream, not the reply)
        for query in range(3):
            _, _, cached = await complete(sim_mesh, f"{prefix} Question {query} of tenant {tenant}?", 2)
            assert cached >= 256, f"tenant {tenant}, query {query}: {cached} cached tokens"


async def test_admission_answers_429_at_the_meshs_capacity(sim_mesh: SimMesh) -> None:
    capacity = 16 * MAX_NUM_SEQS + MAX_QUEUED
    results = await asyncio.gather(
        *(complete(sim_mesh, f"Request {i}: count slowly.", 60) for i in range(capacity + 48)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if isinstance(r, tuple)]
    assert len(refused) + len(served) == len(results), [r for r in results if isinstance(r, BaseException)][:3]
    assert refused and len(served) >= 16 * MAX_NUM_SEQS
    assert all(tokens == 60 for _, tokens, _ in served)
    assert refused[0].response.headers.get("retry-after")


async def test_four_engines_killed_at_once_lose_no_stream(sim_mesh: SimMesh) -> None:
    """Streams on the killed engines move to others (retried, or migrated once tokens
    flowed) and finish with the ids they would have had (the sim's ids depend only on the
    context): the same as a calm rerun."""
    prompts = [f"Story {i}: once upon a time" for i in range(16 * MAX_NUM_SEQS)]  # every engine busy
    decisions = await sim_mesh.metric("stagemesh_router_decisions_total")
    streams = [asyncio.create_task(complete(sim_mesh, p, 60, stream=True)) for p in prompts]
    await asyncio.sleep(0.3)
    sim_mesh.engines["four"].kill()
    results = await asyncio.gather(*streams)
    assert all(tokens == 60 for _, tokens, _ in results)
    # Some streams were placed twice: retried or migrated away from the dead engines.
    assert await sim_mesh.metric("stagemesh_router_decisions_total") > decisions + len(prompts)
    calm = await asyncio.gather(*(complete(sim_mesh, p, 60) for p in prompts))
    assert [text for text, _, _ in results] == [text for text, _, _ in calm]
    await restart(sim_mesh, "four", 4)


async def restart(mesh: SimMesh, name: str, count: int) -> None:
    old = mesh.engines[name]
    old.stop()
    await mesh.wait_members(16 - count)
    replacement = mesh.engine(name, count)
    replacement.start()
    await replacement.wait_healthy(60)
    await mesh.wait_members(16)


async def test_member_churn_under_load_fails_no_request(sim_mesh: SimMesh) -> None:
    """Engines join, drain (SIGTERM) and crash (SIGKILL) while requests run: none fails."""
    done = asyncio.Event()

    async def load() -> list[int]:
        tokens: list[int] = []

        async def one(i: int) -> None:
            tokens.append((await complete(sim_mesh, f"Churn {i}: go on.", 30, stream=i % 2 == 0))[1])

        for start in range(0, 96, 12):
            await asyncio.gather(*(one(i) for i in range(start, start + 12)))
        done.set()
        return tokens

    async def churn() -> None:
        round_ = 0
        while not done.is_set():
            joiner = sim_mesh.engine(f"churn-{round_}", 2)
            joiner.start()
            await joiner.wait_healthy(60)
            await asyncio.sleep(0.3)
            if round_ % 2:
                joiner.kill()
            else:
                await asyncio.to_thread(joiner.stop)
            del sim_mesh.engines[joiner.name]
            round_ += 1

    tokens, _ = await asyncio.gather(load(), churn())
    assert tokens == [30] * 96
