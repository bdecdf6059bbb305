"""Stages die under the router: a dead prefill worker costs nothing but the remote
prefill (requests fall back to aggregated decode); a dead only-decode worker gives
503 within the deadline, and requests work again once it is back.

These kill the session's engines, so they run after every other test (``disruptive``).
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ENGINE_START_TIMEOUT, Mesh
from tests.test_router import QUESTION

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.disruptive]


def live_processes_in_group(pgid: int) -> list[int]:
    """Pids in process group ``pgid`` that are not zombies (this host's init may not reap)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                live.append(int(stat.parent.name))
    return live


async def sequences(mesh: Mesh, mode: str) -> float:
    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        metrics = (await http.get("/metrics")).text
    found = re.search(rf'^stagemesh_router_sequences_total{{mode="{mode}"}} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


async def ask(client: openai.AsyncOpenAI) -> str:
    reply = await client.chat.completions.create(model="", messages=QUESTION, temperature=0, max_tokens=16)
    return reply.choices[0].message.content or ""


async def test_dead_prefill_falls_back_to_aggregated(client, mesh: Mesh) -> None:
    assert "Paris" in await ask(client)
    assert await sequences(mesh, "disaggregated") > 0
    mesh.prefill.kill()  # its etcd lease outlives it by up to a TTL: the router must cope
    assert not live_processes_in_group(mesh.prefill.pid)  # vLLM's engine processes went with it
    aggregated = await sequences(mesh, "aggregated")
    for _ in range(2):
        assert "Paris" in await ask(client)
    assert await sequences(mesh, "aggregated") == aggregated + 2


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
