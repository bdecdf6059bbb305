"""Stages die under the router, during 32 greedy streams, and every stream ends
token-exact with an unbroken run:

- a router that drains (SIGTERM) finishes the streams open on it;
- a decode worker that drains finishes its streams; one killed mid-stream, or whose
  engine aborts a sequence, has its sequences migrated to the other decode worker;
- a prefill worker that drains or is killed costs only the remote prefill: requests
  fall back to aggregated decode;
- a dead only-decode worker gives 503 within the deadline, the prompt's KV is released
  on the prefill worker at once, and requests work again once the worker is back.

These kill the session's engines, so they run after every other test (``disruptive``).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import pytest_asyncio

from router_svc.workers import DOWN_SECONDS
from services.clients import EngineClient, RouterClient
from services.operator.etcd_server import EmbeddedEtcd
from services.operator.launcher import StageProcess, live_processes_in_group
from services.pb import common_pb2, router_pb2
from tests.support.polling import eventually
from tests.support.requests import QUESTION, metric
from tests.support.stages import (
    ENGINE_START_TIMEOUT,
    PREFILL_LEASE_SECONDS,
    Mesh,
    engine_process,
    router_process,
    running,
)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.disruptive]


async def sequences(mesh: Mesh, mode: str) -> float:
    return await metric(mesh, f'stagemesh_router_sequences_total{{mode="{mode}"}}')


async def ask(client: openai.AsyncOpenAI) -> str:
    reply = await client.chat.completions.create(
        model="", messages=QUESTION, temperature=0, max_tokens=16
    )
    return reply.choices[0].message.content or ""


STREAMS = 32
PROMPTS = [f"Story number {i}: once upon a time, in a kingdom by the sea," for i in range(STREAMS)]


async def greedy(
    router: RouterClient, prompt: str, started: Callable[[], None] = lambda: None
) -> list[int]:
    """A greedy stream's generated ids; ``started`` is called at its first token."""
    request = router_pb2.RouterGenerateRequest(
        text=prompt,
        return_token_ids=True,
        sampling=common_pb2.SamplingParams(max_tokens=32, temperature=0, ignore_eos=True),
    )
    ids: list[int] = []
    async for delta in router.generate(request, timeout=600):
        if delta.token_ids and not ids:
            started()
        ids.extend(delta.token_ids)
    return ids


async def under_streams(
    router: RouterClient, fault: Callable[[], None], after_started: int
) -> list[list[int]]:
    """Every prompt streamed at once; ``fault`` strikes once ``after_started`` have tokens."""
    count = 0
    struck = asyncio.Event()

    def started() -> None:
        nonlocal count
        count += 1
        if count == after_started:
            fault()
            struck.set()

    outputs = await asyncio.gather(*(greedy(router, p, started) for p in PROMPTS))
    assert struck.is_set()
    return outputs


async def left(router: RouterClient, role: int) -> None:
    """The router lists no member of ``role`` (a killed one's lease has expired)."""
    members = await router.list_members(role)
    assert not members, f"still listed: {[m.member.instance_id for m in members]}"


async def listed(router: RouterClient, stage: StageProcess, role: int) -> None:
    """Wait until the router lists ``stage`` among the members of ``role``."""

    async def joined() -> None:
        addresses = {m.member.grpc_address for m in await router.list_members(role)}
        assert stage.grpc_address in addresses, f"{stage.name} never joined the router's view"

    await eventually(joined)


async def second_decode(
    etcd: EmbeddedEtcd, home: Path, log_dir: Path, router: RouterClient
) -> StageProcess:
    """Another decode engine beside the session's, started and known to the router."""
    stage = engine_process("decode", etcd.endpoint, home, log_dir, "--cpu-cores", "1")
    stage.start()
    await stage.wait_healthy(ENGINE_START_TIMEOUT)
    await listed(router, stage, common_pb2.ROLE_DECODE)
    return stage


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def unbroken(router: RouterClient) -> list[list[int]]:
    """Every prompt's greedy ids on the whole, undisturbed mesh: what each fault must keep."""
    expected = await asyncio.gather(*(greedy(router, p) for p in PROMPTS))
    assert all(len(ids) == 32 for ids in expected)
    return expected


async def test_router_drained_mid_stream_loses_no_stream(
    unbroken: list[list[int]], mesh: Mesh, etcd: EmbeddedEtcd, home: Path, tmp_path: Path
) -> None:
    """SIGTERM of a router: it leaves etcd and refuses new calls, but the streams already
    open on it, over gRPC and HTTP, run to their end; then it exits 0."""
    second, http_port = router_process(etcd.endpoint, home, tmp_path, "--worker-wait", "3")
    http = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0
    )
    async with running(second), RouterClient(second.grpc_address) as client, http:

        async def http_stream(prompt: str) -> tuple[str, str | None]:
            stream = await http.completions.create(
                model="",
                prompt=prompt,
                max_tokens=32,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            text, finish = "", None
            async for chunk in stream:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            return text, finish

        assert second.process is not None
        process = second.process
        grpc_streams = under_streams(
            client, lambda: process.send_signal(signal.SIGTERM), STREAMS // 2
        )
        drained, *over_http = await asyncio.gather(
            grpc_streams, *(http_stream(p) for p in PROMPTS[:4])
        )
        assert drained == unbroken
        assert all(text and finish == "length" for text, finish in over_http), over_http
        assert process.wait(timeout=60) == 0


async def test_decode_drained_or_killed_mid_stream_loses_no_stream(
    unbroken: list[list[int]],
    router: RouterClient,
    decode: EngineClient,
    mesh: Mesh,
    etcd: EmbeddedEtcd,
    home: Path,
    tmp_path: Path,
) -> None:
    # SIGTERM: the member leaves etcd and is no longer picked, but its streams run on.
    stage = await second_decode(etcd, home, tmp_path, router)
    process = stage.process
    assert process is not None
    drained = await under_streams(router, lambda: process.send_signal(signal.SIGTERM), STREAMS // 2)
    assert drained == unbroken
    assert process.wait(timeout=60) == 0

    stage = await second_decode(etcd, home, tmp_path, router)
    # An engine that aborts a sequence (as it does when it stops) never ends it as an
    # answer: the sequence carries on on the other decode engine, token-exact.
    migrations = await metric(mesh, "stagemesh_router_migrations_total")
    request = router_pb2.RouterGenerateRequest(
        request_id="aborted-by-an-engine",
        text=PROMPTS[0],
        return_token_ids=True,
        sampling=common_pb2.SamplingParams(max_tokens=32, temperature=0, ignore_eos=True),
    )
    ids: list[int] = []
    async with EngineClient(stage.grpc_address) as other:
        async for delta in router.generate(request, timeout=600):
            ids.extend(delta.token_ids)
            if 4 <= len(ids) < 4 + len(delta.token_ids):
                aborted = [
                    *await decode.abort("aborted-by-an-engine-0"),
                    *await other.abort("aborted-by-an-engine-0"),
                ]
                assert aborted == ["aborted-by-an-engine-0"]
    assert ids == unbroken[0]
    assert await metric(mesh, "stagemesh_router_migrations_total") == migrations + 1
    await asyncio.sleep(DOWN_SECONDS)  # the engine that gave up is picked again

    # kill -9: the streams on it move to the surviving decode worker and carry on.
    migrations = await metric(mesh, "stagemesh_router_migrations_total")
    killed = await under_streams(router, stage.kill, STREAMS // 2)
    assert killed == unbroken
    assert await metric(mesh, "stagemesh_router_migrations_total") > migrations


async def test_dead_decode_is_503_then_recovers(
    client, router: RouterClient, mesh: Mesh, prefill: EngineClient
) -> None:
    mesh.decode.kill()
    # Its etcd lease outlives it by up to a TTL; once it has left, a request finds no
    # decode member at all. A long prompt: prefilled remotely, then nobody to decode it.
    await eventually(lambda: left(router, common_pb2.ROLE_DECODE), interval=0.5)
    prompt = " ".join(f"Entry {i} of the ledger reads {i * 37 % 101} crowns." for i in range(60))
    held_before = (await prefill.load()).kv_cache_usage
    released = await metric(mesh, 'stagemesh_router_kv_releases_total{outcome="released"}')
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        await client.completions.create(model="", prompt=prompt, max_tokens=8, temperature=0)
    assert caught.value.status_code == 503, caught.value
    assert "decode" in str(caught.value)
    assert time.monotonic() - started < 30

    # Nobody will collect that prompt's KV: the router released it on the prefill
    # worker at once, well inside the lease the engine would otherwise wait out.
    async def freed() -> None:
        now = await metric(mesh, 'stagemesh_router_kv_releases_total{outcome="released"}')
        assert now > released, "the KV was not released"

    elapsed = time.monotonic() - started
    await eventually(freed, timeout=30 + PREFILL_LEASE_SECONDS / 2 - elapsed, interval=0.1)
    assert (await prefill.load()).kv_cache_usage <= held_before

    mesh.decode.start()
    await mesh.decode.wait_healthy(ENGINE_START_TIMEOUT)
    assert "Paris" in await ask(client)


async def test_prefill_drained_or_killed_mid_stream_loses_no_stream(
    unbroken: list[list[int]], client, router: RouterClient, mesh: Mesh
) -> None:
    """Streams whose prompts were on the prefill worker when it went: those not yet
    prefilled fall back to aggregated decode, those whose KV could not be collected are
    decoded aggregated too, and every stream equals the unbroken run."""
    assert mesh.prefill.process is not None
    process = mesh.prefill.process
    drained = await under_streams(router, lambda: process.send_signal(signal.SIGTERM), 1)
    assert drained == unbroken
    assert process.wait(timeout=60) == 0
    mesh.prefill.start()
    await mesh.prefill.wait_healthy(ENGINE_START_TIMEOUT)
    await listed(router, mesh.prefill, common_pb2.ROLE_PREFILL)

    async def prefill_work() -> float:  # sequences prefilled there, or sent there and fallen back
        return await sequences(mesh, "disaggregated") + await metric(
            mesh, "stagemesh_router_prefill_fallbacks_total"
        )

    before = await prefill_work()
    killed = await under_streams(router, mesh.prefill.kill, 1)
    assert killed == unbroken
    assert await prefill_work() > before  # it had work when it died
    assert not live_processes_in_group(mesh.prefill.pid)  # vLLM's engine processes went with it

    # Its etcd lease outlives it by up to a TTL: until then the router copes by itself.
    aggregated = await sequences(mesh, "aggregated")
    for _ in range(2):
        assert "Paris" in await ask(client)
    assert await sequences(mesh, "aggregated") == aggregated + 2
    # Once its lease expires the member leaves, and its blocks leave the router's index.
    await eventually(lambda: left(router, common_pb2.ROLE_PREFILL), interval=0.5)
    decode_blocks = sum(
        m.kv_blocks_indexed for m in await router.list_members(common_pb2.ROLE_DECODE)
    )
    assert await metric(mesh, "stagemesh_router_kv_index_entries") == decode_blocks


async def test_serving_goes_on_while_etcd_is_down(
    client, router: RouterClient, etcd: EmbeddedEtcd
) -> None:
    """etcd stopped for 30 s under a steady load: the router serves on the membership it
    last saw, every request succeeds, and every member is listed again once etcd is back."""
    members = {m.member.instance_id for m in await router.list_members()}
    etcd.stop(wipe=False)
    failures, served = 0, 0
    try:
        until = time.monotonic() + 30
        while time.monotonic() < until:
            try:
                reply = await client.completions.create(
                    model="", prompt="The sea is", max_tokens=4, temperature=0
                )
                served += reply.usage is not None
            except openai.APIError:
                failures += 1
    finally:
        etcd.start()
    assert failures == 0 and served > 0

    async def back() -> None:
        listed = {m.member.instance_id for m in await router.list_members()}
        assert listed == members, f"members did not come back: {listed} != {members}"

    await eventually(back, interval=0.5)
    assert (
        await client.completions.create(model="", prompt="The sea is", max_tokens=4)
    ).usage is not None
