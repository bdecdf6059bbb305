"""The dispatcher's fallback path, over simulated engines (seconds, no vLLM): a prefill's
KV that no decode engine can take is abandoned in one step (the fallback counted, the KV
released on the prefill engine at once) and the request runs aggregated; KV that fits is
collected, and the decode engine's read frees it on the prefill engine.

Two engine processes with different KV block sizes stand in for a mesh whose layouts
differ; the router pairs them only when ``kv_mismatch`` says they fit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.clients import EngineClient
from tests.support.polling import eventually
from tests.support.sim import SimMesh, sim_mesh

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = " ".join(f"Line {i} of the ledger reads {i * 37 % 101} crowns." for i in range(40))
FALLBACKS = 'stagemesh_router_prefill_fallbacks_total{reason="layout_mismatch"}'
RELEASED = 'stagemesh_router_kv_releases_total{outcome="released"}'


async def run_one(mesh: SimMesh, prefill: EngineClient) -> None:
    """One completion through the mesh; afterwards the prefill engine holds no KV for it."""
    text, tokens, _ = await mesh.complete(PROMPT, max_tokens=4)
    assert tokens == 4 and text

    async def nothing_held() -> None:
        load = await prefill.load()
        assert load.pending_transfers == 0, f"the prefill engine still holds KV: {load}"

    await eventually(nothing_held, timeout=10, interval=0.1)


async def started(mesh: SimMesh, name: str, role: str, block_size: int) -> EngineClient:
    """A simulated ``role`` engine with KV blocks of ``block_size`` tokens, serving."""
    stage = mesh.engine(name, 1, "--block-size", str(block_size), role=role)
    stage.start()
    await stage.wait_healthy(60)
    return EngineClient(stage.grpc_address)


async def test_kv_no_decode_engine_can_take_is_released_and_the_request_runs_aggregated(
    home: Path, tmp_path: Path
) -> None:
    # The mesh's simulated decode engine uses the default block size (16 tokens); this
    # prefill engine does not, so no decode engine can pull its KV.
    async with (
        sim_mesh(home, tmp_path, {"decode-a": 1}, "--disagg-min-tokens", "1") as mesh,
        await started(mesh, "prefill-32", "prefill", 32) as prefill,
    ):
        await eventually(lambda: _routed(mesh, "remote"), timeout=20)
        fallbacks, released = await mesh.metric(FALLBACKS), await mesh.metric(RELEASED)
        aggregated = await mesh.metric(_sequences("aggregated"))
        await run_one(mesh, prefill)
        assert await mesh.metric(FALLBACKS) == fallbacks + 1
        assert await mesh.metric(RELEASED) == released + 1
        assert await mesh.metric(_sequences("aggregated")) == aggregated + 1


async def test_kv_that_fits_is_collected_and_freed_by_the_read(home: Path, tmp_path: Path) -> None:
    async with (
        sim_mesh(home, tmp_path, {"decode-a": 1}, "--disagg-min-tokens", "1") as mesh,
        await started(mesh, "prefill-16", "prefill", 16) as prefill,
    ):
        await eventually(lambda: _routed(mesh, "remote"), timeout=20)
        released = await mesh.metric(RELEASED)
        disaggregated = await mesh.metric(_sequences("disaggregated"))
        await run_one(mesh, prefill)
        assert await mesh.metric(_sequences("disaggregated")) == disaggregated + 1
        assert await mesh.metric(RELEASED) == released  # the read freed it, not the router


def _sequences(mode: str) -> str:
    return f'stagemesh_router_sequences_total{{mode="{mode}"}}'


async def _routed(mesh: SimMesh, decision: str) -> None:
    """The router sees a prefill member: a probe request is sent to it (``decision``)."""
    name = f'stagemesh_router_decisions_total{{policy="kv_aware",reason="{decision}"'
    before = await mesh.metric(name)
    await mesh.complete(PROMPT, max_tokens=1)
    assert await mesh.metric(name) > before, "the router does not know the prefill member yet"
