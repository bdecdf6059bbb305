"""The simulated engine behind an engine stage (``--engine sim``).

:class:`SimRunner` is the simulated counterpart of the vLLM
:class:`~services.engine.engine.EngineRunner`: the same
:class:`~services.engine.backend.EngineBackend` face over a
:class:`~services.engine.sim.scheduler.Scheduler` and its
:class:`~services.engine.sim.cache.BlockPool`. The model directory is read only for
its vocabulary, context length and special tokens (the tokenizer stage serves the same
model, so clients get real text for the ids), and LoRA adapters are checked against
its checkpoint as a vLLM engine checks them.

P/D: a prefill's handle names the prefill engine's gRPC address as its KV side channel.
A decode engine that collects a handle holds the prompt's blocks for the profile's
transfer time, then tells the prefill engine (``Abort`` of the handle's request id, the
call the router makes for a handle it drops) that it may free them, as NIXL's
completion notice does for vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

from services.clients import EngineClient
from services.engine.adapters import Adapter, AdapterSet, load_configured
from services.engine.backend import batches
from services.engine.config import EngineConfig
from services.engine.lengths import output_budget
from services.engine.sim.cache import BlockPool
from services.engine.sim.outputs import SimOutput
from services.engine.sim.requests import SimRequest, fail_after
from services.engine.sim.scheduler import Scheduler
from services.engine.sim.timing import load_profile
from services.engine.sim.tokens import TokenSource
from services.errors import InvalidRequest, Unavailable
from services.kv.events import KvEventLog
from services.model import ModelSpec
from services.pb import common_pb2, engine_pb2
from services.vocabulary import check_token_ids

log = logging.getLogger(__name__)

#: Defaults where a setting says "the engine's default": vLLM's on GPUs.
DEFAULT_BLOCK_SIZE = 16
DEFAULT_BLOCKS = 16_384
DEFAULT_BATCHED_TOKENS = 8_192


class SimRunner:
    """A simulated engine: scheduler, paged prefix cache, KV events, load figures."""

    def __init__(self, config: EngineConfig, model: ModelSpec, kv_role: str) -> None:
        self.config = config
        self.model = model
        self.kv_role = kv_role
        self.profile = load_profile(config.sim_profile)
        self.events: KvEventLog | None = None
        self.block_size = config.block_size or DEFAULT_BLOCK_SIZE
        self.total_blocks = config.kv_cache_blocks or DEFAULT_BLOCKS
        self.max_model_len = 0
        self.adapters = AdapterSet(
            model.name,
            model.path,
            config.max_lora_rank,
            config.lora_enabled,
            config.lora_root,
            config.max_adapters,
        )
        self._scheduler: Scheduler | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._crash_task: asyncio.Task[None] | None = None
        self._tokens: TokenSource | None = None
        self._eos_id: int | None = None
        self._kv_bytes_per_token = 0
        self._running: set[str] = set()
        self._prefill_engines: dict[str, EngineClient] = {}
        self._rng = random.Random(config.instance_id)

    @property
    def nixl_address(self) -> str:
        """The simulated KV side channel: the engine's own gRPC address."""
        return f"{self.config.advertise_host}:{self.config.port}"

    @property
    def uses_kvstore(self) -> bool:
        return False

    async def start(self) -> None:
        model_config = json.loads((self.model.path / "config.json").read_text())
        vocab_size = int(model_config["vocab_size"])
        eos = model_config.get("eos_token_id")
        self._eos_id = eos[0] if isinstance(eos, list) else eos
        context = int(model_config.get("max_position_embeddings") or 8192)
        self.max_model_len = min(
            self.config.max_model_len or context, self.total_blocks * self.block_size
        )
        self._tokens = TokenSource.for_model(self.model.path, vocab_size)
        self._kv_bytes_per_token = kv_bytes_per_token(model_config)
        self.events = KvEventLog(self.block_size, replay_window=self.config.kv_event_window)
        pool = BlockPool(self.total_blocks, self.block_size, self.events)
        host, _, port = self.nixl_address.rpartition(":")
        self._scheduler = Scheduler(
            pool,
            self.profile,
            self._tokens,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS,
            speedup=self.config.sim_speedup,
            kv_params={
                "remote_engine_id": self.config.instance_id,
                "remote_host": host,
                "remote_port": int(port),
            },
            lease_seconds=self.config.kv_lease_seconds,
        )
        self._loop_task = asyncio.create_task(
            self._scheduler.run(), name=f"sim {self.config.instance_id}"
        )
        if self.config.sim_exit_after_tokens:
            self._crash_task = asyncio.create_task(
                self._crash_after(self.config.sim_exit_after_tokens)
            )
        await load_configured(self.config.lora_adapters(), self.load_adapter)
        log.info(
            "simulated engine ready: %s, profile %s, block size %d, %d KV blocks, context %d",
            self.model.name,
            self.profile.name,
            self.block_size,
            self.total_blocks,
            self.max_model_len,
        )

    async def shutdown(self) -> None:
        for task in (self._loop_task, self._crash_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for client in self._prefill_engines.values():
            await client.close()

    def failure(self) -> str | None:
        if (
            self._loop_task is not None
            and self._loop_task.done()
            and not self._loop_task.cancelled()
        ):
            return f"the simulated engine's scheduler stopped: {self._loop_task.exception()!r}"
        return None

    def check_prompt(self, prompt_token_ids: Sequence[int]) -> None:
        """Reject an empty prompt or ids outside the vocabulary, as a vLLM engine does."""
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty; send at least one token id")
        assert self._tokens is not None
        check_token_ids(prompt_token_ids, self._tokens.vocab_size)

    def sampling(
        self,
        params: common_pb2.SamplingParams,
        prompt_tokens: int,
        kv_transfer_params: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        session_id: str = "",
    ) -> SimRequest:
        """A request template (no id or prompt yet) from the mesh's sampling parameters."""
        max_tokens, min_tokens = output_budget(
            params, prompt_tokens, self.max_model_len, max_tokens
        )
        params_kv = kv_transfer_params or {}
        return SimRequest(
            "",
            [],
            max_tokens,
            min_tokens,
            frozenset(params.stop_token_ids),
            self._eos_id,
            params.ignore_eos,
            params.seed if params.HasField("seed") else 0,
            params.logprobs if params.HasField("logprobs") else None,
            prefill_only=bool(params_kv.get("do_remote_decode")),
            transfer_seconds=(
                self.profile.transfer_seconds(
                    prompt_tokens, self._kv_bytes_per_token, self.config.sim_speedup
                )
                if params_kv.get("do_remote_prefill")
                else 0.0
            ),
            fail_after=fail_after(self.config.sim_fail_rate, max_tokens, self._rng),
            kv_source=(
                (
                    f"{params_kv['remote_host']}:{params_kv['remote_port']}",
                    str(params_kv["remote_request_id"]),
                )
                if params_kv.get("do_remote_prefill")
                else None
            ),
        )

    async def stream(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SimRequest,
        loading_kv: bool = False,
        cache_salt: str = "",
        adapter: str = "",
    ) -> AsyncIterator[list[SimOutput]]:
        """Run one request, yielding its outputs in batches; leaving early aborts it."""
        scheduler = self._ready()
        if request_id in self._running:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        lora = self.adapters.acquire(adapter) if adapter else None
        sampling.request_id, sampling.prompt = request_id, list(prompt_token_ids)
        sampling.salt, sampling.adapter = cache_salt, adapter
        self._running.add(request_id)
        outputs = scheduler.add(sampling)
        finished = False
        try:
            async for batch in batches(outputs):
                finished = batch[-1].finished
                if sampling.kv_source is not None:
                    self._collected(
                        *sampling.kv_source
                    )  # the KV is in: the prefill engine may free it
                    sampling.kv_source = None
                yield batch
        finally:
            self._running.discard(request_id)
            if lora is not None:
                self.adapters.release(lora)
            if not finished:
                scheduler.abort(request_id)

    def _collected(self, address: str, remote_id: str) -> None:
        client = self._prefill_engines.get(address)
        if client is None:
            client = self._prefill_engines[address] = EngineClient(address)
        task = asyncio.create_task(client.abort(remote_id))
        task.add_done_callback(_log_release_failure)

    async def abort(self, request_id: str) -> bool:
        return self._ready().abort(request_id)

    async def release_kv(self, request_ids: Sequence[str], attempts: int = 5) -> list[str]:
        return self._ready().release(list(request_ids))

    def load(self, pending_transfers: int) -> engine_pb2.Load:
        scheduler = self._ready()
        pool = scheduler.pool
        adapters = {
            s.request.adapter for s in (*scheduler.running, *scheduler.waiting) if s.request.adapter
        }
        return engine_pb2.Load(
            running_requests=len(scheduler.running),
            waiting_requests=len(scheduler.waiting) + len(scheduler.loading),
            kv_cache_usage=pool.usage,
            prefix_cache_hit_rate=pool.hits / pool.queries if pool.queries else 0.0,
            kv_block_size=self.block_size,
            kv_total_blocks=self.total_blocks,
            pending_transfers=pending_transfers,
            active_adapters=sorted(adapters),
            prefill_seconds_per_token=self.profile.prefill_seconds_per_token(
                scheduler.max_num_batched_tokens, scheduler.speedup
            ),
        )

    def layout_labels(self) -> dict[str, str]:
        return {
            "tensor_parallel_size": "1",
            "pipeline_parallel_size": "1",
            "data_parallel_size": "1",
            "expert_parallel": "off",
            "quantization": "none",
            "kv_dtype": "sim",
            "speculative": "off",
            "sim_profile": self.profile.name,
        }

    async def load_adapter(self, name: str, path: str, at_run_time: bool = True) -> Adapter:
        """Check an adapter as a vLLM engine would (PEFT format, rank, shapes against the
        base checkpoint, run-time loads under ``--lora-root``) and serve it; nothing is
        computed with it."""
        prepared = self.adapters.prepare(name, path, at_run_time)
        if isinstance(prepared, Adapter):
            return prepared
        return self.adapters.add(name, *prepared)

    async def withdraw_adapter(self, name: str) -> Adapter:
        return self.adapters.withdraw(name)

    def finish_unload(self, adapter: Adapter) -> asyncio.Task[None]:
        if adapter.removal is None:
            adapter.removal = asyncio.create_task(self._remove_when_idle(adapter))
        return adapter.removal

    async def _remove_when_idle(self, adapter: Adapter) -> None:
        await adapter.idle.wait()
        self.adapters.remove(adapter)

    def _ready(self) -> Scheduler:
        if self._scheduler is None:
            raise Unavailable("the simulated engine is still starting")
        return self._scheduler

    async def _crash_after(self, tokens: int) -> None:
        """``--sim-exit-after-tokens``: end the process abruptly, as a crashed host does."""
        while self._ready().tokens_out < tokens:
            await asyncio.sleep(0.02)
        log.error("simulated crash after %d tokens (--sim-exit-after-tokens)", tokens)
        os._exit(70)


def kv_bytes_per_token(model_config: dict[str, Any]) -> int:
    """KV bytes one token takes in a 16-bit cache: layers x 2 (K and V) x KV heads x head
    size x 2 bytes, from a Hugging Face config (as the mocker reads it)."""
    heads = int(model_config.get("num_attention_heads") or 1)
    kv_heads = int(model_config.get("num_key_value_heads") or heads)
    head_dim = int(model_config.get("head_dim") or int(model_config.get("hidden_size", 0)) // heads)
    return int(model_config.get("num_hidden_layers", 0)) * 2 * kv_heads * head_dim * 2


def _log_release_failure(task: asyncio.Task[list[str]]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # The prefill engine frees the blocks when their lease ends instead.
        log.debug("could not tell the prefill engine its KV was collected: %s", task.exception())
