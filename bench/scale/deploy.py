"""What the scale lab drives: a deployment that serves the OpenAI API, and the engine
shape both sides of a comparison are given.

A target (NVIDIA Dynamo with its mocker engines in ``bench.scale.dynamo``, stagemesh with
its simulated engines in ``bench.scale.mesh``) is one class that implements
:class:`Deployment`. The lab builds it from an :class:`EngineSpec` and a router policy,
enters it, drives ``base_url`` with its client, and reads ``process_groups()`` before and
after each step for the CPU every process spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import aiohttp


@dataclass(frozen=True)
class EngineSpec:
    """The simulated engines' shape and timing, the same for every target in a run.

    The defaults are those of Dynamo's mocker (vLLM engine type), so a run with no flags
    compares like with like: 64-token blocks, 16,384 KV blocks per engine, 256 sequences
    and 8,192 batched tokens per step, and the mocker's default polynomial timing model
    divided by ``speedup`` (see bench/scale/README.md for the model itself).
    """

    #: Engines that prefill and decode (aggregated), or decode engines when ``prefill`` > 0.
    engines: int = 8
    #: Prefill-only engines (P/D); 0 for aggregated serving.
    prefill: int = 0
    block_size: int = 64
    kv_blocks: int = 16_384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8_192
    #: Divides every simulated step time (the mocker's ``--speedup-ratio``).
    speedup: float = 1.0

    def describe(self) -> str:
        layout = f"{self.prefill}P+{self.engines}D" if self.prefill else f"{self.engines} engines"
        return (
            f"{layout}, block {self.block_size}, {self.kv_blocks} KV blocks, "
            f"{self.max_num_seqs} seqs, {self.max_num_batched_tokens} batched tokens, "
            f"speedup {self.speedup:g}"
        )


@runtime_checkable
class Deployment(Protocol):
    """One serving deployment under test, started on ``__aenter__`` and stopped on
    ``__aexit__`` (every process it started, also when the run fails)."""

    #: A label for tables: target and router policy, e.g. ``dynamo/kv``.
    name: str
    #: The OpenAI API root, ending in ``/v1``.
    base_url: str
    #: The model name requests carry.
    model: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

    def process_groups(self) -> dict[str, list[int]]:
        """Process ids by role (``router``, ``engines``, ...), read for CPU accounting.

        Called before and after each measured step; a process that died in between
        drops out of the second reading, so return the pids alive now."""
        ...


async def wait_for_model(
    base_url: str,
    model: str,
    alive: Callable[[], bool],
    log_tail: Callable[[], str],
    timeout: float = 120.0,
) -> None:
    """Until ``model`` is listed at ``base_url``/models and a one-token completion of it
    succeeds; raises with the log's tail if the deployment dies or the time runs out."""
    deadline = time.monotonic() + timeout
    body = {"model": model, "prompt": [1, 2, 3, 4], "max_tokens": 1}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while True:
            if not alive():
                raise RuntimeError(f"{base_url} exited during start:\n{log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{base_url} did not serve {model} in {timeout:.0f} s:\n{log_tail()}"
                )
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(f"{base_url}/models") as reply:
                    listed = reply.status == 200 and model in {
                        m["id"] for m in (await reply.json())["data"]
                    }
                if listed:
                    async with http.post(f"{base_url}/completions", json=body) as reply:
                        if reply.status == 200:
                            return
            await asyncio.sleep(0.5)
