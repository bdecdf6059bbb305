"""A Responses chain is a session: every turn that continues ``previous_response_id``
carries the chain's first response id as its session key, so the router sends it back
to the engine that ran the chain (and the KV store keeps the chain's blocks). An
``X-Session-Id`` header still wins. Simulated engines under round-robin routing: without
the key, turns would alternate between the two engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.sim import sim_mesh

PINNED = (
    'stagemesh_router_decisions_total{policy="round_robin",reason="session_affinity",role="decode"}'
)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_chain_stays_on_its_engine_and_a_new_chain_is_its_own_session(
    home: Path, tmp_path: Path
) -> None:
    flags = ("--router-policy", "round_robin")
    async with sim_mesh(home, tmp_path, {"sim-decode": 2}, *flags) as mesh:
        client = mesh.client
        first = await client.responses.create(model="", input="Turn one.", max_output_tokens=4)
        previous = first.id
        for turn in range(2, 5):
            reply = await client.responses.create(
                model="", input=f"Turn {turn}.", previous_response_id=previous, max_output_tokens=4
            )
            previous = reply.id
        assert await mesh.metric(PINNED) == 3  # every turn after the chain's first

        # Another chain starts its own session; unchained responses have none.
        await client.responses.create(model="", input="Another chain.", max_output_tokens=4)
        await client.responses.create(model="", input="And another.", max_output_tokens=4)
        assert await mesh.metric(PINNED) == 3

        # The header names the session when the client gives one, chain or not.
        headers = {"X-Session-Id": "carol"}
        await client.responses.create(
            model="", input="Hello.", max_output_tokens=4, extra_headers=headers
        )
        await client.responses.create(
            model="",
            input="Again.",
            previous_response_id=first.id,
            max_output_tokens=4,
            extra_headers=headers,
        )
        assert await mesh.metric(PINNED) == 4
