"""stagemesh as the scale lab's target: etcd, the tokenizer, one router and simulated
engines (``--engine sim``) shaped by the lab's :class:`~bench.scale.deploy.EngineSpec`.

The engines run Dynamo's mocker timing model (``--sim-profile dynamo-default``) with the
spec's block size, KV capacity, batch limits and speedup, so a table that holds this
deployment beside :class:`bench.scale.dynamo.DynamoDeployment` compares the two meshes
on identical engines. Every process is a real stage started the way ``stagemesh up``
starts it, with a mesh key (internal calls carry the stage token, as deployed).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from bench.scale.deploy import EngineSpec, wait_for_model
from services.credentials import MESH_KEY_ENV
from services.etcd import EtcdSession
from services.etcd_server import EmbeddedEtcd
from services.launcher import StageProcess
from services.membership import MEMBERS_PREFIX
from services.net import free_port

#: The router's policies, as the lab names them.
POLICIES = ("kv_aware", "least_load", "round_robin")
#: Engine members per simulated engine process: a process is one event loop, so a wide
#: mesh spreads its engines over several, as several hosts would.
ENGINES_PER_PROCESS = 16


class MeshDeployment:
    """stagemesh over simulated engines; implements :class:`bench.scale.deploy.Deployment`."""

    def __init__(
        self,
        spec: EngineSpec,
        policy: str,
        model_dir: Path,
        model: str,
        log_dir: Path,
        home: Path,
        kv_transfer_gbps: float | None = None,
        max_queued: int = 100_000,
        router_workers: int = 1,
    ) -> None:
        if policy not in POLICIES:
            raise SystemExit(f"stagemesh has no router policy {policy!r} ({', '.join(POLICIES)})")
        self.spec = spec
        self.name = f"stagemesh/{policy}" + (
            f"/{router_workers}routers" if router_workers > 1 else ""
        )
        self._router_workers = router_workers
        self.model = model
        self._log_dir = (
            log_dir / f"stagemesh-{policy}-{spec.prefill}p{spec.engines}d-{secrets.token_hex(2)}"
        )
        self._log_dir.mkdir(parents=True)
        self._etcd = EmbeddedEtcd(client_port=0, data_dir=self._log_dir / "etcd")
        self._env = {**os.environ, MESH_KEY_ENV: secrets.token_hex(16)}
        self._home = home
        self._policy = policy
        self._max_queued = max_queued
        self._profile = self._write_profile(kv_transfer_gbps)
        self._model_flag = ["--model", f"{model}={model_dir}"]
        self.http_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.http_port}/v1"
        self.router: StageProcess | None = None
        self.tokenizer: StageProcess | None = None
        self.engines: list[StageProcess] = []

    def _write_profile(self, kv_transfer_gbps: float | None) -> str:
        """The mocker's polynomial, with the lab's P/D bandwidth when it sets one."""
        if kv_transfer_gbps is None:
            return "dynamo-default"
        from services.engine.sim.timing import PROFILES

        default = PROFILES["dynamo-default"]
        path = self._log_dir / "profile.json"
        path.write_text(
            json.dumps(
                {
                    "name": "dynamo-default",
                    "source": default.source,
                    "prefill_ms": list(default.prefill_ms),
                    "decode_ms": list(default.decode_ms),
                    "transfer_gbps": kv_transfer_gbps,
                }
            )
        )
        return str(path)

    def stage(self, name: str, module: str, *extra: str) -> StageProcess:
        port = free_port()
        return StageProcess(
            name,
            module,
            [
                "--port",
                str(port),
                "--etcd",
                self._etcd.endpoint,
                "--home",
                str(self._home),
                "--metrics-port",
                "-1",
                "--log-level",
                "WARNING",
                *extra,
            ],
            f"127.0.0.1:{port}",
            self._log_dir,
            env=self._env,
        )

    def engine_process(self, role: str, count: int, index: int) -> StageProcess:
        """``count`` simulated engines of ``role`` in one process."""
        spec = self.spec
        return self.stage(
            f"{role}-{index}",
            f"{role}_svc",
            *self._model_flag,
            "--engine",
            "sim",
            "--sim-engines",
            str(count),
            "--sim-profile",
            self._profile,
            "--sim-speedup",
            str(spec.speedup),
            "--block-size",
            str(spec.block_size),
            "--kv-cache-blocks",
            str(spec.kv_blocks),
            "--max-num-seqs",
            str(spec.max_num_seqs),
            "--max-num-batched-tokens",
            str(spec.max_num_batched_tokens),
        )

    async def __aenter__(self) -> Self:
        started = time.monotonic()
        self._etcd.start()
        self.tokenizer = self.stage("tokenizer", "tokenizer_svc", *self._model_flag)
        self.router = self.stage(
            "router",
            "router_svc",
            "--http-port",
            str(self.http_port),
            "--router-policy",
            self._policy,
            "--max-queued-requests",
            str(self._max_queued),
            "--host",
            "127.0.0.1",
            "--workers",
            str(self._router_workers),
        )
        for role, count in (("decode", self.spec.engines), ("prefill", self.spec.prefill)):
            for index, start in enumerate(range(0, count, ENGINES_PER_PROCESS)):
                self.engines.append(
                    self.engine_process(role, min(ENGINES_PER_PROCESS, count - start), index)
                )
        try:
            for process in self._processes:
                process.start()
            await self.wait_members(self.spec.engines + self.spec.prefill)
            await wait_for_model(self.base_url, self.model, self._alive, self._log_tail)
        except BaseException:
            self._stop()
            raise
        print(
            f"   {self.name}: {self.spec.describe()}; up in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self._stop)

    @property
    def _processes(self) -> list[StageProcess]:
        return [p for p in (self.tokenizer, self.router, *self.engines) if p is not None]

    def _alive(self) -> bool:
        return all(p.alive() for p in self._processes)

    def _log_tail(self) -> str:
        return "\n".join(f"-- {p.name}:\n{p.log_tail(15)}" for p in self._processes)

    @property
    def mesh_key(self) -> str:
        """The mesh key the stages share (a reader of their sealed etcd records needs it)."""
        return self._env[MESH_KEY_ENV]

    @property
    def etcd_port(self) -> int:
        return self._etcd.client_port

    async def engine_members(self) -> int:
        """Engine members registered in etcd now."""
        session = EtcdSession([("127.0.0.1", self._etcd.client_port)])
        try:
            client = await session.client()
            count = 0
            for role in ("prefill", "decode"):
                count += len(list(await client.get_prefix(f"{MEMBERS_PREFIX}{role}/".encode())))
            return count
        finally:
            await session.close()

    async def wait_members(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while (found := await self.engine_members()) < count:
            if not self._alive():
                raise RuntimeError(f"a stage exited during start:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{found} of {count} engines registered:\n{self._log_tail()}")
            await asyncio.sleep(0.2)

    def _stop(self) -> None:
        for process in reversed(self._processes):
            process.stop(timeout=15)
        self._etcd.stop(wipe=True)

    def process_groups(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {"router": [], "tokenizer": [], "engines": []}
        for process in self._processes:
            if process.alive():
                groups["engines" if process in self.engines else process.name].append(process.pid)
        return groups
