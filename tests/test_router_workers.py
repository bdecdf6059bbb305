"""``stagemesh router --workers N``: router processes that share their ports.

Simulated engines stand in for accelerators here because what is tested is the router's
process model (ports, metrics, supervision), not what an engine does."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import httpx
import pytest

from services.pb import common_pb2
from tests.support.polling import eventually
from tests.support.sim import SimMesh, sim_mesh

#: Connections opened at once; the kernel spreads them over the workers by their ports.
CONNECTIONS = 16


def children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


async def completions(mesh: SimMesh, count: int) -> None:
    """``count`` completions at once, each on a connection of its own."""
    base = str(mesh.client.base_url)

    async def one(index: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            reply = await http.post(
                "completions", json={"model": "", "prompt": f"hello {index}", "max_tokens": 4}
            )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4

    await asyncio.gather(*(one(i) for i in range(count)))


@pytest.mark.asyncio(loop_scope="session")
async def test_workers_share_the_ports_sum_their_metrics_and_a_crashed_one_is_replaced(
    home: Path, tmp_path: Path
) -> None:
    """Two router workers register as two members and serve the same HTTP port; a scrape
    of either sums both workers' counters. A worker killed with SIGKILL is started again
    while the other keeps serving, and SIGTERM to the parent drains and ends them all."""
    async with sim_mesh(home, tmp_path, {"sim-decode": 1}, "--workers", "2") as mesh:

        async def two_routers() -> None:
            found = await mesh.members(common_pb2.ROLE_ROUTER)
            assert found >= 2, f"{found} router members registered, not two"

        await eventually(two_routers)
        workers = children(mesh.router.pid)
        assert len(workers) == 2, workers
        await completions(mesh, CONNECTIONS)
        assert await mesh.metric("stagemesh_router_sequences_total") == CONNECTIONS

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> None:
            now = children(mesh.router.pid)
            assert len(now) == 2 and victim not in now, f"not started again: {now}"

        await eventually(replaced)
        await completions(mesh, CONNECTIONS)
        assert await mesh.metric("stagemesh_router_sequences_total") == 2 * CONNECTIONS

        final = children(mesh.router.pid)
        assert mesh.router.stop() == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in final)


@pytest.mark.unit
def test_workers_need_fixed_ports() -> None:
    """Port 0 cannot be shared: each process would pick its own."""
    from router_svc.config import RouterConfig
    from router_svc.fleet import check

    with pytest.raises(SystemExit, match="--port"):
        check(RouterConfig(workers=2, port=0))
    with pytest.raises(SystemExit, match="1 or more"):
        check(RouterConfig(workers=0))
    check(RouterConfig(workers=2, port=50051, http_port=-1))


#: Streams held open across a worker's death. Four simulated engines run 16 at once, so
#: the two workers' independent routing choices never queue one behind another.
STREAMS = 12
#: Long enough (10 ms steps, 15 s) to still be streaming when the worker dies, even on a
#: slow two-core CI host where the last of the twelve streams starts seconds after the first.
STREAM_TOKENS = 1500


async def stream_to_end(base: str, index: int, started: asyncio.Event) -> int:
    """Stream a completion on a connection of its own; its ids, or raise if it was cut."""
    body = {"model": "", "prompt": f"story {index}", "max_tokens": STREAM_TOKENS, "stream": True}
    body["stream_options"] = {"include_usage": True}
    tokens = 0
    async with (
        httpx.AsyncClient(base_url=base, timeout=60) as http,
        http.stream("POST", "completions", json=body) as reply,
    ):
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            started.set()
            if line.startswith("data: {") and (usage := json.loads(line[6:]).get("usage")):
                tokens = usage["completion_tokens"]
            if line == "data: [DONE]":
                return tokens
    raise AssertionError(f"stream {index} ended without [DONE] and without an error")


@pytest.mark.asyncio(loop_scope="session")
async def test_a_killed_worker_fails_only_its_own_streams(home: Path, tmp_path: Path) -> None:
    """Streams on the surviving worker finish whole; the killed worker's end with a
    transport error at the client, never as a silently short answer."""
    async with sim_mesh(home, tmp_path, {"sim-decode": 4}, "--workers", "2") as mesh:

        async def two_routers() -> None:
            assert await mesh.members(common_pb2.ROLE_ROUTER) >= 2

        await eventually(two_routers)
        await completions(mesh, CONNECTIONS)  # both workers have their decoders before the clock
        base = str(mesh.client.base_url)
        events = [asyncio.Event() for _ in range(STREAMS)]
        tasks = [
            asyncio.create_task(stream_to_end(base, i, event)) for i, event in enumerate(events)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
        ended = [task for task in tasks if task.done()]
        assert not ended, [task.exception() or task.result() for task in ended]
        os.kill(min(children(mesh.router.pid)), signal.SIGKILL)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        whole = [o for o in outcomes if isinstance(o, int)]
        cut = [o for o in outcomes if isinstance(o, BaseException)]
        assert whole and cut, outcomes  # 12 connections over 2 workers: both had some
        assert all(tokens == STREAM_TOKENS for tokens in whole), whole
        assert all(isinstance(o, httpx.TransportError) for o in cut), cut
