"""Stages die under the router: a decode worker that drains (SIGTERM) finishes its
streams, and one killed mid-stream has its sequences migrated to the other decode worker,
token-exact; a dead prefill worker costs nothing but the remote prefill (requests fall
back to aggregated decode); a dead only-decode worker gives 503 within the deadline, and
requests work again once it is back.

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

from services.clients import RouterClient
from services.etcd_server import EmbeddedEtcd
from services.launcher import StageProcess, live_processes_in_group
from services.pb import common_pb2, router_pb2
from tests.conftest import ENGINE_START_TIMEOUT, Mesh, engine_process
from tests.test_router import QUESTION, metric

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.disruptive]


async def sequences(mesh: Mesh, mode: str) -> float:
    return await metric(mesh, f'stagemesh_router_sequences_total{{mode="{mode}"}}')


async def ask(client: openai.AsyncOpenAI) -> str:
    reply = await client.chat.completions.create(model="", messages=QUESTION, temperature=0, max_tokens=16)
    return reply.choices[0].message.content or ""


STREAMS = 32
PROMPTS = [f"Story number {i}: once upon a time, in a kingdom by the sea," for i in range(STREAMS)]


async def greedy(router: RouterClient, prompt: str, started: Callable[[], None] = lambda: None) -> list[int]:
    """A greedy stream's generated ids; ``started`` is called at its first token."""
    request = router_pb2.RouterGenerateRequest(
        text=prompt, return_token_ids=True,
        sampling=common_pb2.SamplingParams(max_tokens=32, temperature=0, ignore_eos=True),
    )
    ids: list[int] = []
    async for delta in router.generate(request, timeout=600):
        if delta.token_ids and not ids:
            started()
        ids.extend(delta.token_ids)
    return ids


async def under_streams(router: RouterClient, fault: Callable[[], None], after_started: int) -> list[list[int]]:
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


async def second_decode(etcd: EmbeddedEtcd, home: Path, log_dir: Path, router: RouterClient) -> StageProcess:
    """Another decode engine beside the session's, started and known to the router."""
    stage = engine_process("decode", etcd.endpoint, home, log_dir, "--cpu-cores", "1")
    stage.start()
    await stage.wait_healthy(ENGINE_START_TIMEOUT)
    deadline = time.monotonic() + 30
    while stage.grpc_address not in {m.member.grpc_address for m in await router.list_members(common_pb2.ROLE_DECODE)}:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    return stage


async def test_decode_drained_or_killed_mid_stream_loses_no_stream(
    router: RouterClient, mesh: Mesh, etcd: EmbeddedEtcd, home: Path, tmp_path: Path
) -> None:
    expected = await asyncio.gather(*(greedy(router, p) for p in PROMPTS))  # an unbroken mesh
    assert all(len(ids) == 32 for ids in expected)

    # SIGTERM: the member leaves etcd and is no longer picked, but its streams run on.
    stage = await second_decode(etcd, home, tmp_path, router)
    assert stage.process is not None
    drained = await under_streams(router, lambda: stage.process.send_signal(signal.SIGTERM), STREAMS // 2)  # type: ignore[union-attr]
    assert drained == expected
    assert stage.process.wait(timeout=60) == 0

    # kill -9: the streams on it move to the surviving decode worker and carry on.
    stage = await second_decode(etcd, home, tmp_path, router)
    migrations = await metric(mesh, "stagemesh_router_migrations_total")
    killed = await under_streams(router, stage.kill, STREAMS // 2)
    assert killed == expected
    assert await metric(mesh, "stagemesh_router_migrations_total") > migrations


async def test_dead_prefill_falls_back_to_aggregated(client, router: RouterClient, mesh: Mesh) -> None:
    assert "Paris" in await ask(client)
    assert await sequences(mesh, "disaggregated") > 0
    mesh.prefill.kill()  # its etcd lease outlives it by up to a TTL: the router must cope
    assert not live_processes_in_group(mesh.prefill.pid)  # vLLM's engine processes went with it
    aggregated = await sequences(mesh, "aggregated")
    for _ in range(2):
        assert "Paris" in await ask(client)
    assert await sequences(mesh, "aggregated") == aggregated + 2
    # Once its lease expires the member leaves, and its blocks leave the router's index.
    deadline = time.monotonic() + 30
    while await router.list_members(common_pb2.ROLE_PREFILL):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.5)
    decode_blocks = sum(m.kv_blocks_indexed for m in await router.list_members(common_pb2.ROLE_DECODE))
    assert await metric(mesh, "stagemesh_router_kv_index_entries") == decode_blocks


async def test_dead_decode_is_503_then_recovers(client, mesh: Mesh) -> None:
    mesh.decode.kill()
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        await ask(client)
    assert caught.value.status_code == 503, caught.value
    assert "decode" in str(caught.value)
    assert time.monotonic() - started < 30
    mesh.decode.start()
    await mesh.decode.wait_healthy(ENGINE_START_TIMEOUT)
    assert "Paris" in await ask(client)


async def test_serving_goes_on_while_etcd_is_down(client, router: RouterClient, etcd: EmbeddedEtcd) -> None:
    """etcd stopped for 30 s under a steady load: the router serves on the membership it
    last saw, every request succeeds, and every member is listed again once etcd is back."""
    members = {m.member.instance_id for m in await router.list_members()}
    etcd.stop(wipe=False)
    failures, served = 0, 0
    try:
        until = time.monotonic() + 30
        while time.monotonic() < until:
            try:
                reply = await client.completions.create(model="", prompt="The sea is", max_tokens=4, temperature=0)
                served += reply.usage is not None
            except openai.APIError:
                failures += 1
    finally:
        etcd.start()
    assert failures == 0 and served > 0
    deadline = time.monotonic() + 30
    while {m.member.instance_id for m in await router.list_members()} != members:
        assert time.monotonic() < deadline, "members did not come back"
        await asyncio.sleep(0.5)
    assert (await client.completions.create(model="", prompt="The sea is", max_tokens=4)).usage is not None
