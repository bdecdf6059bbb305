"""KV-aware routing with two decode workers (aggregated): requests that share a long
prefix land on the worker that holds it, requests with one session key stay on one
worker, and a dead worker's blocks leave the index.

It starts a second decode engine where the session's prefill engine was (the prefill
is killed first: a disaggregated mesh would send the prompt to the prefill pool), so
it runs after the other tests (``disruptive``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.clients import RouterClient
from services.operator.etcd_server import EmbeddedEtcd
from services.pb import common_pb2, router_pb2
from tests.support.polling import eventually
from tests.support.requests import metric
from tests.support.stages import ENGINE_START_TIMEOUT, Mesh, engine_process

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.disruptive]

SYSTEM = " ".join(
    f"Rule {i}: always answer question {i} with the number {i * 7}." for i in range(45)
)
PREFIX_HITS = (
    'stagemesh_router_decisions_total{policy="kv_aware",reason="prefix_hit",role="decode"}'
)
SESSION_PINS = (
    'stagemesh_router_decisions_total{policy="kv_aware",reason="session_affinity",role="decode"}'
)


async def decode_blocks(router: RouterClient) -> dict[str, int]:
    return {
        m.member.instance_id: m.kv_blocks_indexed
        for m in await router.list_members(common_pb2.ROLE_DECODE)
    }


async def test_shared_prefix_follows_its_holder(
    client, router: RouterClient, mesh: Mesh, etcd: EmbeddedEtcd, home: Path, tmp_path: Path
) -> None:
    mesh.prefill.kill()
    second = engine_process("decode", etcd.endpoint, home, tmp_path, "--cpu-cores", "0")
    second.start()
    try:
        await second.wait_healthy(ENGINE_START_TIMEOUT)
        await eventually(lambda: _has(router, decode=2, prefill=0), interval=0.3)

        start = await decode_blocks(router)
        await client.completions.create(
            model="", prompt=SYSTEM + " Question 1?", temperature=0, max_tokens=2
        )
        holder = await eventually(lambda: _holder(router, start), interval=0.3)
        before = await decode_blocks(router)
        hits = await metric(mesh, PREFIX_HITS)
        for question in range(2, 6):
            await client.completions.create(
                model="", prompt=f"{SYSTEM} Question {question}?", temperature=0, max_tokens=2
            )
        assert await metric(mesh, PREFIX_HITS) == hits + 4
        after = await decode_blocks(router)
        others = [worker for worker in after if worker != holder]
        assert all(after[w] - before.get(w, 0) < 4 for w in others), (holder, before, after)

        # Session affinity: prompts too short to share a block still stay together when
        # they carry one session key, as an HTTP header or as gRPC metadata.
        sticky = await metric(mesh, SESSION_PINS)
        for turn in range(3):
            await client.completions.create(
                model="",
                prompt=f"Tell me fact {turn}.",
                temperature=0,
                max_tokens=2,
                extra_headers={"X-Session-Id": "alice"},
            )
        request = router_pb2.RouterGenerateRequest(
            text="One more fact.", sampling=common_pb2.SamplingParams(temperature=0, max_tokens=2)
        )
        await router.generate_unary(request, metadata=[("x-session-id", "alice")])
        assert await metric(mesh, SESSION_PINS) == sticky + 3  # every request after the first
    finally:
        second.kill()
    # Its lease expires, the member leaves, and its blocks leave the index with it.
    await eventually(lambda: _has(router, decode=1, prefill=0), interval=0.3)
    remaining = sum((await decode_blocks(router)).values())
    assert await metric(mesh, "stagemesh_router_kv_index_entries") == remaining


async def _has(router: RouterClient, decode: int, prefill: int) -> None:
    """The router lists ``decode`` decode members and ``prefill`` prefill members."""
    roles = [m.member.role for m in await router.list_members()]
    found = (roles.count(common_pb2.ROLE_DECODE), roles.count(common_pb2.ROLE_PREFILL))
    assert found == (decode, prefill), f"(decode, prefill) members: {found}"


async def _holder(router: RouterClient, start: dict[str, int]) -> str:
    """The decode worker that took the system prompt's blocks (4 or more since ``start``)."""
    blocks = await decode_blocks(router)
    holder = next((w for w, count in blocks.items() if count - start.get(w, 0) >= 4), None)
    assert holder is not None, f"no decode worker took the prompt's blocks: {start} -> {blocks}"
    return holder
