"""The control plane at width: stagemesh's membership, load polling and KV index with
many engine members (the scale lab's ``control-plane`` scenario).

- **reaction**: engines join, drain (SIGTERM) and crash (SIGKILL) in groups while the
  lab watches etcd itself and polls the router's ``stagemesh_router_workers`` gauge
  (20 ms apart). A join or a drain counts from the moment etcd has the change; a crash
  from the kill, since a crashed member's key stays until its lease runs out and the
  router must notice by itself (its load poll fails). Members are idle meanwhile.
- **load-poll cost**: the router's CPU over an idle interval, per member and poll.
- **KV index**: ``bench.routing`` at this width and 1M indexed blocks, in this process:
  decisions per second on one core and the index's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from bench.routing import measure as measure_index
from bench.scale.deploy import EngineSpec
from bench.scale.mesh import MeshDeployment
from services import credentials
from services.credentials import MeshCredentials
from services.etcd import EtcdSession
from services.membership import MemberWatcher, role_prefix
from services.operator.launcher import cpu_seconds
from services.pb import common_pb2

Row = dict[str, Any]
#: Engines that join, drain or crash together in one round (one process).
GROUP = 4


class Timeline:
    """When etcd saw each decode key come and go, and the router's up count over time."""

    def __init__(self) -> None:
        self.etcd: list[tuple[float, str, bool]] = []
        self.router: list[tuple[float, int]] = []

    def on_change(self, key: str, member: common_pb2.Member | None) -> None:
        self.etcd.append((time.monotonic(), key, member is not None))

    async def poll_router(self, metrics_url: str) -> None:
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.get(metrics_url) as reply:
                    text = await reply.text()
                up = sum(
                    int(float(line.rsplit(" ", 1)[1]))
                    for line in text.splitlines()
                    if line.startswith('stagemesh_router_workers{role="decode",state="up"}')
                )
                self.router.append((time.monotonic(), up))
                await asyncio.sleep(0.02)

    async def router_reaches(self, count: int, since: float, timeout: float = 30.0) -> float:
        """The first time after ``since`` the router's up count was ``count``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, up in self.router:
                if at >= since and up == count:
                    return at
            await asyncio.sleep(0.02)
        raise TimeoutError(f"the router never showed {count} decode members up")

    async def etcd_settles(
        self, present: bool, count: int, since: float, timeout: float = 60.0
    ) -> float:
        """When etcd had ``count`` distinct decode keys put (or deleted) after ``since``
        (a member's record may be written more than once)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            first: dict[str, float] = {}
            for at, key, put in self.etcd:
                if at >= since and put == present:
                    first.setdefault(key, at)
            if len(first) >= count:
                return sorted(first.values())[count - 1]
            await asyncio.sleep(0.01)
        raise TimeoutError(
            f"etcd never showed {count} decode keys {'put' if present else 'deleted'}"
        )


async def reactions(mesh: MeshDeployment, rounds: int) -> list[Row]:
    """Join, drain and crash ``rounds`` times each; the router's reaction in ms."""
    # The members' records are sealed under the mesh key: this process reads them as a stage.
    credentials.install(MeshCredentials(mesh_key=mesh.mesh_key.encode()))
    session = EtcdSession([("127.0.0.1", mesh.etcd_port)])
    timeline = Timeline()
    watcher: MemberWatcher[common_pb2.Member] = MemberWatcher(
        session, role_prefix(common_pb2.ROLE_DECODE), on_change=timeline.on_change
    )
    watcher.start()
    poller = asyncio.create_task(
        timeline.poll_router(mesh.base_url.removesuffix("/v1") + "/metrics")
    )
    base = mesh.spec.engines
    measured: dict[str, list[float]] = {"join": [], "drain": [], "crash": []}
    try:
        await timeline.router_reaches(base, 0.0)
        for round_ in range(rounds):
            for kind in ("drain", "crash"):
                since = time.monotonic()
                process = mesh.engine_process("decode", GROUP, 100 + 2 * round_ + (kind == "crash"))
                process.start()
                joined = await timeline.etcd_settles(True, GROUP, since)
                measured["join"].append(
                    await timeline.router_reaches(base + GROUP, joined) - joined
                )
                since = time.monotonic()
                if kind == "drain":
                    await asyncio.to_thread(process.stop)
                    start = await timeline.etcd_settles(False, GROUP, since)
                else:
                    start = time.monotonic()
                    process.kill()
                measured[kind].append(await timeline.router_reaches(base, start) - start)
                await timeline.etcd_settles(False, GROUP, since)  # the crashed lease ends too
    finally:
        poller.cancel()
        await watcher.close()
        await session.close()
    return [
        {
            "measure": f"{kind} of {GROUP} at {base + GROUP} members",
            "n": len(values),
            "p50_ms": statistics.median(values) * 1000,
            "max_ms": max(values) * 1000,
        }
        for kind, values in measured.items()
    ]


async def poll_cost(mesh: MeshDeployment, seconds: float = 10.0) -> Row:
    """The router's CPU while idle: what polling ``mesh``'s members costs it."""
    router = mesh.process_groups()["router"]
    before = cpu_seconds(router)
    await asyncio.sleep(seconds)
    spent = cpu_seconds(router) - before
    members = mesh.spec.engines + mesh.spec.prefill
    return {
        "measure": f"idle router at {members} members",
        "n": 1,
        "cpu_ms_per_s": spent * 1000 / seconds,
        "cpu_ms_per_poll": spent * 1000 / seconds / members,
    }


async def control_plane(args: argparse.Namespace, spec: EngineSpec, log_dir: Path) -> list[Row]:
    """Reaction times, load-poll cost and the KV index at ``spec.engines`` members."""
    spec = replace(spec, prefill=0)
    rows: list[Row] = []
    async with MeshDeployment(
        spec, "kv_aware", args.model_dir, "SmolLM2-135M-Instruct", log_dir, Path(args.home)
    ) as mesh:
        rows.append(await poll_cost(mesh))
        rows += await reactions(mesh, args.churn_rounds)
    index = await asyncio.to_thread(measure_index, spec.engines, 1_000_000)
    rows.append(
        {
            "measure": f"KV index, {index['workers']} workers, {index['entries']:,} blocks",
            "n": 20_000,
            **index,
        }
    )
    for row in rows:
        print(f"   {row}", flush=True)
    return rows
