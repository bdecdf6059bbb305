"""A mesh of simulated engines for tests: its own etcd, tokenizer and router (the
session's vLLM mesh must not see these engines), engines started and stopped at will,
and the official OpenAI SDK as the client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

from services.etcd import EtcdSession
from services.membership import role_prefix
from services.net import free_port
from services.operator.etcd_server import EmbeddedEtcd
from services.operator.launcher import StageProcess
from services.pb import common_pb2
from tests.support.polling import eventually
from tests.support.stages import private_etcd, router_process, running, tokenizer_process

#: Each simulated engine runs this many sequences at once.
MAX_NUM_SEQS = 4


@dataclass
class SimMesh:
    """Simulated decode engines behind a real etcd, tokenizer and router."""

    etcd: EmbeddedEtcd
    home: Path
    log_dir: Path
    client: openai.AsyncOpenAI
    router: StageProcess
    engines: dict[str, StageProcess] = field(default_factory=dict)

    def engine(self, name: str, count: int, *extra: str, role: str = "decode") -> StageProcess:
        """A process of ``count`` simulated ``role`` engines at an accelerator's pace (not
        started)."""
        port = free_port()
        process = StageProcess(
            name,
            f"{role}_svc",
            [
                "--engine",
                "sim",
                "--sim-engines",
                str(count),
                "--sim-profile",
                "pace-10ms",
                "--max-num-seqs",
                str(MAX_NUM_SEQS),
                "--port",
                str(port),
                "--etcd",
                self.etcd.endpoint,
                "--home",
                str(self.home),
                "--metrics-port",
                "-1",
                "--grace-seconds",
                "30",
                *extra,
            ],
            f"127.0.0.1:{port}",
            self.log_dir,
        )
        self.engines[name] = process
        return process

    async def replace(
        self, old: str, new: str, count: int, members: int, *extra: str
    ) -> StageProcess:
        """Drain the process ``old`` (``count`` engines; a killed one's leases run out),
        then start ``count`` engines as ``new`` in its place; returns once etcd lists the
        mesh's ``members`` decode engines again."""
        await asyncio.to_thread(self.engines.pop(old).stop)
        await self.wait_members(members - count)
        replacement = self.engine(new, count, *extra)
        replacement.start()
        await replacement.wait_healthy(60)
        await self.wait_members(members)
        return replacement

    async def complete(
        self, prompt: str, max_tokens: int, stream: bool = False
    ) -> tuple[str, int, int]:
        """Text, completion tokens and engine-reported cached prompt tokens of one completion."""
        if not stream:
            reply = await self.client.completions.create(
                model="", prompt=prompt, max_tokens=max_tokens
            )
            assert reply.usage is not None
            details = reply.usage.prompt_tokens_details
            return (
                reply.choices[0].text,
                reply.usage.completion_tokens,
                (details.cached_tokens or 0) if details else 0,
            )
        text, usage = "", None
        chunks = await self.client.completions.create(
            model="",
            prompt=prompt,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in chunks:
            text += "".join(choice.text for choice in chunk.choices)
            usage = chunk.usage or usage
        assert usage is not None
        return text, usage.completion_tokens, 0

    async def metric(self, name: str) -> float:
        """A counter of the router's, summed over its labels."""
        async with httpx.AsyncClient(
            base_url=str(self.client.base_url).removesuffix("v1/")
        ) as http:
            text = (await http.get("/metrics")).text
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)
        )

    async def decode_members(self) -> int:
        """Decode member records in etcd."""
        return await self.members(common_pb2.ROLE_DECODE)

    async def members(self, role: common_pb2.Role) -> int:
        """Member records of ``role`` in etcd."""
        session = EtcdSession([("127.0.0.1", self.etcd.client_port)])
        try:
            listing = await (await session.client()).get_prefix(role_prefix(role).encode())
            return len(list(listing))
        finally:
            await session.close()

    async def wait_members(self, count: int, timeout: float = 30.0) -> None:
        """Wait until etcd lists ``count`` decode members."""

        async def listed() -> None:
            found = await self.decode_members()
            assert found == count, f"{found} decode members, not {count}"

        await eventually(listed, timeout)


@contextlib.asynccontextmanager
async def sim_mesh(
    home: Path, log_dir: Path, engines: dict[str, int], *router_flags: str
) -> AsyncIterator[SimMesh]:
    """A mesh with ``engines`` (process name: engine count) started, stopped on the way out."""
    with private_etcd() as etcd:
        tokenizer = tokenizer_process("sim-tokenizer", etcd.endpoint, home, log_dir)
        router, http_port = router_process(
            etcd.endpoint, home, log_dir, "--worker-wait", "5", *router_flags
        )
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{http_port}/v1",
            api_key="unused",
            max_retries=0,
            timeout=120,
        )
        mesh = SimMesh(etcd, home, log_dir, client, router)
        async with contextlib.AsyncExitStack() as stack:
            for stage in (
                tokenizer,
                router,
                *(mesh.engine(name, count) for name, count in engines.items()),
            ):
                await stack.enter_async_context(running(stage))
            await mesh.wait_members(sum(engines.values()))
            yield mesh
            for process in mesh.engines.values():
                process.stop()
