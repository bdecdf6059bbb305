"""The in-process vLLM engine of an engine stage, token-in/token-out.

:class:`EngineRunner` owns one ``AsyncLLM`` with vLLM's NixlConnector (producer on
prefill, consumer on decode) and the KV-event publisher turned on. It adds what the
stage needs around it:

- every request runs in a pump task that feeds a queue, so a caller that goes away
  does not cancel vLLM's generator mid-step. That is how an abort is *deferred* while
  a decode request is still pulling its prompt's KV over NIXL (aborting during the
  read can crash vLLM's engine core): the abort is sent once the first output shows
  the transfer finished;
- load figures from vLLM's scheduler stats;
- the settings it starts with, in :mod:`services.engine.vllm_args`;
- vLLM's KV events, read from its ZMQ publisher and re-published through a
  :class:`~services.kv.events.KvEventLog` with the mesh's sequence numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from services.engine.adapters import Adapter, AdapterSet, load_configured
from services.engine.backend import batches
from services.engine.config import EngineConfig
from services.engine.kv_release import END_KV_LEASES
from services.engine.sampling import to_vllm
from services.engine.vllm_args import (
    engine_args,
    export_environment,
    layout_labels,
    uses_kvstore,
)
from services.engine.vllm_events import ZmqKvEventBridge
from services.engine.vllm_stats import LoadStats
from services.errors import InvalidRequest, StageDead
from services.kv.events import KvEventLog
from services.model import ModelSpec
from services.net import free_port
from services.pb import common_pb2, engine_pb2
from services.vocabulary import check_token_ids

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Request:
    """One request in flight: its output queue, pump task and KV-load state."""

    request_id: str
    outputs: asyncio.Queue[RequestOutput | BaseException | None]
    loading_kv: bool
    abort_requested: bool = False
    task: asyncio.Task[None] | None = None


class EngineRunner:
    """An AsyncLLM with NIXL, KV events and load figures, for one engine stage."""

    def __init__(self, config: EngineConfig, model: ModelSpec, kv_role: str) -> None:
        self.config = config
        self.model = model
        self.kv_role = kv_role
        self.nixl_port = config.nixl_port or free_port(config.nixl_host)
        self.engine: AsyncLLM | None = None
        self.events: KvEventLog | None = None
        self.block_size = 0
        self.total_blocks = 0
        self.max_model_len = 0
        self.vocab_size = 0
        self._requests: dict[str, _Request] = {}
        #: Load figures from vLLM's scheduler stats.
        self.stats = LoadStats()
        self._event_dir = tempfile.mkdtemp(prefix="stagemesh-kvev-")
        self._bridge: ZmqKvEventBridge | None = None
        self.adapters = AdapterSet(
            model.name,
            model.path,
            config.max_lora_rank,
            config.lora_enabled,
            config.lora_root,
            config.max_adapters,
        )
        self._adapter_lock = asyncio.Lock()

    @property
    def nixl_address(self) -> str:
        return f"{self.config.nixl_host}:{self.nixl_port}"

    async def start(self) -> None:
        """Start the engine (tens of seconds on CPU) and the KV-event bridge."""
        export_environment(self.config, self.nixl_port)
        endpoint = f"ipc://{Path(self._event_dir) / 'events.sock'}"
        args = engine_args(self.config, self.model, self.kv_role, endpoint)
        try:
            self.engine = AsyncLLM.from_engine_args(
                args, stat_loggers=[lambda config, index: self.stats.sink()]
            )
        except (ValueError, TypeError, NotImplementedError) as exc:
            # vLLM checks the settings against the model and the device (pydantic's
            # ValidationError is a ValueError): say so in one line, not a traceback.
            reason = " ".join(str(exc).split())
            raise SystemExit(
                f"the engine cannot start with these settings on {self.config.device}: {reason}"
            ) from None
        vllm_config = self.engine.vllm_config
        self.block_size = int(vllm_config.cache_config.block_size)
        self.stats.block_size = self.block_size
        self.total_blocks = int(vllm_config.cache_config.num_gpu_blocks or 0)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.vocab_size = int(vllm_config.model_config.get_vocab_size())
        self.events = KvEventLog(self.block_size, replay_window=self.config.kv_event_window)
        self._bridge = ZmqKvEventBridge(endpoint, "kv", self.events)
        self._bridge.start()
        await load_configured(self.config.lora_adapters(), self.load_adapter)
        log.info(
            "engine ready: %s, block size %d, %d KV blocks, context %d, NIXL side channel %s",
            self.model.name,
            self.block_size,
            self.total_blocks,
            self.max_model_len,
            self.nixl_address,
        )

    @property
    def uses_kvstore(self) -> bool:
        """Whether this engine loads prompts' KV from the KV store (:func:`uses_kvstore`)."""
        return uses_kvstore(self.config, self.kv_role)

    async def shutdown(self) -> None:
        if self._bridge is not None:
            await self._bridge.close()
        if self.engine is not None:
            self.engine.shutdown()
        with contextlib.suppress(OSError):
            for path in Path(self._event_dir).iterdir():
                path.unlink()
            os.rmdir(self._event_dir)

    def failure(self) -> str | None:
        """Why the engine can no longer serve (its engine core died), or None."""
        if self.engine is not None and self.engine.errored:
            return f"the vLLM engine died: {self.engine.dead_error}"
        return None

    def sampling(
        self,
        params: common_pb2.SamplingParams,
        prompt_tokens: int,
        kv_transfer_params: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        session_id: str = "",
    ) -> SamplingParams:
        """vLLM's sampling parameters for a request (checked; see :func:`to_vllm`)."""
        return to_vllm(
            params, prompt_tokens, self.max_model_len, kv_transfer_params, max_tokens, session_id
        )

    def check_prompt(self, prompt_token_ids: Sequence[int]) -> None:
        """Reject an empty prompt or ids outside the vocabulary before vLLM sees them."""
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty; send at least one token id")
        check_token_ids(prompt_token_ids, self.vocab_size)

    async def load_adapter(self, name: str, path: str, at_run_time: bool = True) -> Adapter:
        """Load a LoRA adapter (idempotent for the same name and directory). A bad one
        is refused with the reason; the engine keeps serving. Run-time loads come only
        from under ``--lora-root`` (start-time ones are the operator's ``--lora``)."""
        engine = self._engine()
        leaving = self.adapters.leaving(name)
        if leaving is not None:  # loaded again while its unload drains: after it
            await asyncio.shield(self.finish_unload(leaving))
        async with self._adapter_lock:
            prepared = self.adapters.prepare(name, path, at_run_time)
            if isinstance(prepared, Adapter):
                return prepared
            source, rank = prepared
            adapter = self.adapters.add(name, source, rank)
            try:
                # vLLM reads and checks the weights against the model (target modules,
                # shapes) now, so a misfit fails here rather than in a request.
                await engine.add_lora(self._lora_request(adapter))
            except EngineDeadError:
                self.adapters.remove(adapter)
                raise
            except Exception as exc:  # noqa: BLE001 - vLLM's loader raises many kinds; all mean "does not fit"
                self.adapters.remove(adapter)
                reason = " ".join(str(exc).split()) or type(exc).__name__
                raise InvalidRequest(
                    f"adapter {name!r} from {source} does not fit this engine: {reason}"
                ) from None
            log.info("adapter %s loaded from %s (rank %d)", name, source, rank)
            return adapter

    async def withdraw_adapter(self, name: str) -> Adapter:
        """First half of an unload: refuse new requests for ``name`` from now on."""
        self._engine()
        return self.adapters.withdraw(name)

    def finish_unload(self, adapter: Adapter) -> asyncio.Task[None]:
        """Second half: once the requests running with it are done, vLLM drops it. One
        task per adapter, which runs on when the caller waiting for it goes away."""
        if adapter.removal is None:
            adapter.removal = asyncio.create_task(
                self._remove_when_idle(adapter), name=f"unload {adapter.name}"
            )
        return adapter.removal

    async def _remove_when_idle(self, adapter: Adapter) -> None:
        await adapter.idle.wait()
        async with self._adapter_lock:
            try:
                await self._engine().remove_lora(adapter.lora_id)
            finally:
                self.adapters.remove(adapter)
        log.info("adapter %s unloaded", adapter.name)

    @staticmethod
    def _lora_request(adapter: Adapter) -> LoRARequest:
        return LoRARequest(adapter.name, adapter.lora_id, str(adapter.source))

    async def stream(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        loading_kv: bool = False,
        cache_salt: str = "",
        adapter: str = "",
    ) -> AsyncIterator[list[RequestOutput]]:
        """Run one request, yielding vLLM's delta outputs in batches (every output made
        since the caller last took one); leaving early aborts it.
        ``cache_salt`` keeps its prefix-cache blocks apart from other salts' (vLLM's);
        ``adapter`` names the LoRA adapter to run with (vLLM keeps its blocks apart too)."""
        engine = self._engine()
        if request_id in self._requests:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        lora = self.adapters.acquire(adapter) if adapter else None
        request = _Request(request_id, asyncio.Queue(), loading_kv)
        self._requests[request_id] = request
        salted = {"cache_salt": cache_salt} if cache_salt else {}
        request.task = asyncio.create_task(
            self._pump(
                engine,
                request,
                TokensPrompt(prompt_token_ids=list(prompt_token_ids), **salted),
                sampling,
                lora,
            ),
            name=f"req {request_id}",
        )
        finished = False
        try:
            async for batch in batches(request.outputs):
                finished = batch[-1].finished
                yield batch
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> bool:
        """Abort a running request; deferred while its KV is still arriving over NIXL."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        if request.loading_kv:
            request.abort_requested = True
            log.debug("abort of %s deferred until its KV transfer completes", request_id)
        else:
            await self._engine().abort(request_id)
        return True

    async def release_kv(self, request_ids: Sequence[str], attempts: int = 5) -> list[str]:
        """Free the KV blocks that finished prefills hold for a decode that will not come.

        Returns the ids whose blocks the NIXL connector held and now frees (on its next
        step). The connector learns of a finished prefill a step after its output, so
        ids not found are asked for again, a few steps apart; one a decode engine
        already collected is never found.
        """
        engine = self._engine()
        released: list[str] = []
        pending = list(request_ids)
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(0.05)
            # A cloudpickled function in place of a method name: vLLM's run_method
            # calls it in the engine core, where the connector lives.
            found = (await engine.collective_rpc(END_KV_LEASES, args=(pending,)))[0]
            released += found
            pending = [r for r in pending if r not in found]
            if not pending:
                break
        return released

    async def _pump(
        self,
        engine: AsyncLLM,
        request: _Request,
        prompt: TokensPrompt,
        sampling: SamplingParams,
        adapter: Adapter | None,
    ) -> None:
        lora = self._lora_request(adapter) if adapter is not None else None
        try:
            async for output in engine.generate(
                prompt, sampling, request.request_id, lora_request=lora
            ):
                if request.loading_kv:
                    request.loading_kv = False  # KV is in: aborting is safe from here
                    if request.abort_requested:
                        await engine.abort(request.request_id)
                await request.outputs.put(output)
        except EngineDeadError as exc:
            await request.outputs.put(StageDead(f"the vLLM engine died: {exc}"))
        except (ValueError, VLLMClientError) as exc:  # vLLM's own input validation
            await request.outputs.put(InvalidRequest(str(exc)))
        except Exception as exc:  # noqa: BLE001 - handed to the caller, which raises it
            await request.outputs.put(exc)
        finally:
            self._requests.pop(request.request_id, None)
            if adapter is not None:
                self.adapters.release(adapter)
            await request.outputs.put(None)

    def _engine(self) -> AsyncLLM:
        if self.engine is None:
            raise StageDead("the engine is not started")
        if self.engine.errored:
            raise StageDead(f"the vLLM engine died: {self.engine.dead_error}")
        return self.engine

    def layout_labels(self) -> dict[str, str]:
        """How the engine computes, for its member record (:func:`layout_labels`)."""
        return layout_labels(self._engine().vllm_config)

    def load(self, pending_transfers: int) -> engine_pb2.Load:
        """Load figures for routing (:meth:`LoadStats.load`)."""
        return self.stats.load(
            bool(self._requests), self.block_size, self.total_blocks, pending_transfers
        )
