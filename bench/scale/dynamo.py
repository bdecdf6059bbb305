"""NVIDIA Dynamo as the scale lab's peer: its frontend (OpenAI HTTP, tokenizer, router)
and its mocker engines, started on this host without etcd or NATS.

Needs ``make bench-dynamo-env`` (Dynamo 1.6.1 in ``.venv-dynamo``). Discovery goes
through files (``DYN_DISCOVERY_BACKEND=file``), requests over TCP and KV events over ZMQ,
as /work/shared/ENVIRONMENT.md records. One ``dynamo.mocker`` process runs every
aggregated engine (``--num-workers N``, each its own runtime, lease and KV event source);
a P/D deployment runs one process of prefill workers and one of decode workers, and the
frontend pairs them itself.

The mocker's model, read from Dynamo 1.6.1's sources (its engine core is AISimulate's,
``aisimulate-core`` 0.13.0 inside ``dynamo/_core.abi3.so``), is written out in
bench/scale/README.md: the stagemesh simulated engine follows the same timing model.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp

from bench.scale.deploy import EngineSpec, wait_for_model
from services.net import free_port
from services.operator.launcher import child_setup

#: Where ``make bench-dynamo-env`` builds Dynamo's environment.
DYNAMO_VENV = Path(".venv-dynamo")
#: The frontend's ``--router-mode`` for each of the lab's policy names.
ROUTER_MODES = {
    "kv": "kv",
    "kv_aware": "kv",
    "round_robin": "round-robin",
    "round-robin": "round-robin",
    "random": "random",
    "least_load": "least-loaded",
    "least-loaded": "least-loaded",
}
#: Environment for every Dynamo process: file discovery, TCP requests, ZMQ events, no
#: metrics port, no hub downloads, and no per-request INFO logs from the engines.
_DYNAMO_ENV = {
    "DYN_DISCOVERY_BACKEND": "file",
    "DYN_REQUEST_PLANE": "tcp",
    "DYN_EVENT_PLANE": "zmq",
    "DYN_SYSTEM_PORT": "-1",
    "HF_HUB_OFFLINE": "1",
    "DYN_LOG": "warn",
}
_PLANES = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]


class DynamoProcess:
    """One Dynamo process (``python -m dynamo.<module>``) from Dynamo's venv, its output in
    a log file, in a session of its own so that stopping it reaches all its threads."""

    def __init__(
        self,
        name: str,
        python: Path,
        module: str,
        args: list[str],
        env: dict[str, str],
        log_dir: Path,
    ) -> None:
        self.name = name
        self.command = [str(python), "-m", module, *args]
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=child_setup(),  # noqa: PLW1509 - two system calls
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"-- {self.name}:\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the process's group (Dynamo drains and deregisters), then SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class DynamoDeployment:
    """Dynamo's frontend with ``router`` mode over mocker engines shaped by ``spec``.

    Implements :class:`bench.scale.deploy.Deployment`; ``process_groups()`` reports the
    frontend (HTTP, tokenizer and router in one process) and the engines apart."""

    def __init__(
        self,
        spec: EngineSpec,
        router: str,
        model_dir: Path,
        model: str,
        log_dir: Path,
        venv: Path = DYNAMO_VENV,
        kv_transfer_gbps: float | None = None,
    ) -> None:
        python = venv.resolve() / "bin" / "python"
        if not python.exists():
            raise SystemExit(
                f"Dynamo is not installed at {venv}; build it with `make bench-dynamo-env`"
            )
        self.spec = spec
        self.name = f"dynamo/{ROUTER_MODES[router]}"
        self.model = model
        self._store = Path(tempfile.mkdtemp(prefix="scale-dynamo-kv-"))
        env = {**os.environ, **_DYNAMO_ENV, "DYN_FILE_KV": str(self._store)}
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._frontend = DynamoProcess(
            "dynamo-frontend",
            python,
            "dynamo.frontend",
            ["--http-port", str(port), "--router-mode", ROUTER_MODES[router], *_PLANES],
            env,
            log_dir,
        )
        engine_args = self._engine_args(model_dir, kv_transfer_gbps)
        roles = (
            [("decode", spec.engines), ("prefill", spec.prefill)]
            if spec.prefill
            else [("agg", spec.engines)]
        )
        self._engines = [
            DynamoProcess(
                f"dynamo-mocker-{role}",
                python,
                "dynamo.mocker",
                [*engine_args, "--num-workers", str(count), "--disaggregation-mode", role],
                env,
                log_dir,
            )
            for role, count in roles
        ]

    def _engine_args(self, model_dir: Path, kv_transfer_gbps: float | None) -> list[str]:
        spec = self.spec
        args = [
            "--model-path",
            str(model_dir),
            "--model-name",
            self.model,
            "--block-size",
            str(spec.block_size),
            "--num-gpu-blocks-override",
            str(spec.kv_blocks),
            "--max-num-seqs",
            str(spec.max_num_seqs),
            "--max-num-batched-tokens",
            str(spec.max_num_batched_tokens),
            "--speedup-ratio",
            str(spec.speedup),
            *_PLANES,
        ]
        if kv_transfer_gbps is not None:
            args += ["--kv-transfer-bandwidth", str(kv_transfer_gbps)]
        return args

    @property
    def _processes(self) -> list[DynamoProcess]:
        return [self._frontend, *self._engines]

    def _alive(self) -> bool:
        return all(p.alive() for p in self._processes)

    def _log_tail(self) -> str:
        return "\n".join(p.log_tail() for p in self._processes)

    async def __aenter__(self) -> Self:
        started = time.monotonic()
        for process in self._processes:
            process.start()
        try:
            await self._wait_for_engines(self.spec.engines + self.spec.prefill)
            await wait_for_model(self.base_url, self.model, self._alive, self._log_tail)
        except BaseException:
            self._stop()
            raise
        print(
            f"   {self.name}: {self.spec.describe()}; up in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        return self

    async def _wait_for_engines(self, count: int, timeout: float = 180.0) -> None:
        """Until the frontend lists ``count`` engine instances (its ``/health``)."""
        url = self.base_url.removesuffix("/v1") + "/health"
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while time.monotonic() < deadline:
                if not self._alive():
                    raise RuntimeError(f"Dynamo exited during start:\n{self._log_tail()}")
                try:
                    async with http.get(url) as reply:
                        instances = (
                            (await reply.json()).get("instances", []) if reply.status == 200 else []
                        )
                except (TimeoutError, aiohttp.ClientError, ValueError):
                    instances = []
                if sum(1 for i in instances if i.get("endpoint") == "generate") >= count:
                    return
                await asyncio.sleep(0.5)
        raise TimeoutError(
            f"Dynamo did not list {count} engines in {timeout:.0f} s:\n{self._log_tail()}"
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        for process in self._processes:
            process.stop()
        shutil.rmtree(self._store, ignore_errors=True)

    def process_groups(self) -> dict[str, list[int]]:
        return {
            "frontend": [self._frontend.pid] if self._frontend.alive() else [],
            "engines": [p.pid for p in self._engines if p.alive()],
        }
