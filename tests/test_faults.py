"""Stages die under the router: a dead prefill worker costs nothing but the remote
prefill (requests fall back to aggregated decode); a dead only-decode worker gives
503 within the deadline, and requests work again once it is back.

These kill the session's engines, so they run after every other test (``disruptive``).
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from services.clients import RouterClient
from services.launcher import live_processes_in_group
from services.pb import common_pb2
from tests.conftest import ENGINE_START_TIMEOUT, Mesh
from tests.test_router import QUESTION, metric

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.disruptive]


async def sequences(mesh: Mesh, mode: str) -> float:
    return await metric(mesh, f'stagemesh_router_sequences_total{{mode="{mode}"}}')


async def ask(client: openai.AsyncOpenAI) -> str:
    reply = await client.chat.completions.create(model="", messages=QUESTION, temperature=0, max_tokens=16)
    return reply.choices[0].message.content or ""


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
