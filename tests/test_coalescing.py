"""Coalescing in the engine stage: ids made while the router is behind travel in one
message, and ``--stream-interval N`` sends at least N per message. What a client sees is
the same either way: text, logprobs, usage, and a stop string that spans a coalesced
message cuts at the same place. Simulated engines: coalescing is the engine stage's own
work (services/engine/service.py), the same over either engine, not something vLLM does."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.clients import EngineClient
from services.engine.backend import batches
from services.engine.replies import MAX_IDS_PER_MESSAGE
from services.pb import common_pb2
from tests.support.sim import SimMesh, sim_mesh

PROMPTS = [f"Chapter {i}: the lighthouse keeper" for i in range(6)]


@pytest.mark.unit
async def test_batches_carry_everything_already_queued() -> None:
    queue: asyncio.Queue[int | BaseException | None] = asyncio.Queue()
    stream = batches(queue)
    queue.put_nowait(1)
    assert await anext(stream) == [1]
    for item in (2, 3, 4):
        queue.put_nowait(item)
    assert await anext(stream) == [2, 3, 4]
    queue.put_nowait(5)
    queue.put_nowait(ValueError("engine failed"))
    assert await anext(stream) == [5]
    with pytest.raises(ValueError, match="engine failed"):
        await anext(stream)
    ended = batches(queue)
    queue.put_nowait(6)
    queue.put_nowait(None)
    assert [b async for b in ended] == [[6]]


async def read(mesh: SimMesh, prompt: str, stop: str | None = None) -> dict[str, Any]:
    """One streamed completion with logprobs, as a client reads it."""
    chunks = await mesh.client.completions.create(
        model="",
        prompt=prompt,
        max_tokens=40,
        logprobs=2,
        stop=stop,
        stream=True,
        stream_options={"include_usage": True},
    )
    seen: dict[str, Any] = {"text": "", "token_logprobs": [], "top": [], "events": 0, "usage": None}
    async for chunk in chunks:
        if chunk.usage is not None:
            seen["usage"] = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        for choice in chunk.choices:
            seen["events"] += 1
            seen["text"] += choice.text
            if choice.logprobs is not None:
                seen["token_logprobs"] += choice.logprobs.token_logprobs or []
                seen["top"] += [sorted(t.items()) for t in choice.logprobs.top_logprobs or []]
    return seen


async def engine_messages(address: str, min_ids: int) -> list[list[int]]:
    """The ids of each message of one Generate stream, asking for ``min_ids`` per message
    (as a router does while its relay is behind)."""
    async with EngineClient(address) as engine:
        call = engine.generate(
            list(range(100, 140)),
            common_pb2.SamplingParams(max_tokens=40, seed=7),
            min_ids_per_message=min_ids,
        )
        return [list(message.token_ids) async for message in call]


async def test_coalesced_and_uncoalesced_streams_read_the_same(
    home: Path, model_dir: Path, tmp_path: Path
) -> None:
    async with sim_mesh(home, tmp_path, {"plain": 1}) as mesh:
        plain = [await read(mesh, p) for p in PROMPTS]
        # Stop strings that straddle the fifth and sixth messages' text.
        stops = [text[len(text) // 3 : len(text) // 3 + 6] for text in (r["text"] for r in plain)]
        plain_stopped = [await read(mesh, p, s) for p, s in zip(PROMPTS, stops)]
        asked = await engine_messages(mesh.engines["plain"].grpc_address, 6)
        unasked = await engine_messages(mesh.engines["plain"].grpc_address, 0)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await engine_messages(mesh.engines["plain"].grpc_address, MAX_IDS_PER_MESSAGE + 1)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await mesh.replace("plain", "wide", 1, 1, "--stream-interval", "5")
        coalesced = [await read(mesh, p) for p in PROMPTS]
        coalesced_stopped = [await read(mesh, p, s) for p, s in zip(PROMPTS, stops)]
    for before, after in zip(plain + plain_stopped, coalesced + coalesced_stopped):
        assert {k: v for k, v in after.items() if k != "events"} == {
            k: v for k, v in before.items() if k != "events"
        }
    for before, after, stop in zip(plain, plain_stopped, stops):
        assert after["text"] == before["text"][: before["text"].index(stop)]
    # Five ids per engine message: far fewer events reach the client.
    assert sum(r["events"] for r in coalesced) < sum(r["events"] for r in plain) / 2
    # A request's own ask works the same, on an engine left at one id per message.
    ids = list(itertools.chain(*asked))
    assert ids == list(itertools.chain(*unasked)) and len(ids) == 40
    assert [len(ids) for ids in asked[1:-1]] and all(len(ids) >= 6 for ids in asked[1:-1])
    assert len(asked) < len(unasked) / 2
