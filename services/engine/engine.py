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
from vllm.config import KVEventsConfig, KVTransferConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase

from services.credentials import MESH_KEY_ENV
from services.engine.adapters import Adapter, AdapterSet, load_configured
from services.engine.backend import batches
from services.engine.config import EngineConfig
from services.engine.kv_release import END_KV_LEASES
from services.engine.sampling import to_vllm
from services.engine.vllm_events import ZmqKvEventBridge
from services.errors import InvalidRequest, StageDead
from services.kv.events import KvEventLog
from services.kv.nixl import POLL_MS_ENV
from services.model import ModelSpec
from services.net import free_port
from services.pb import common_pb2, engine_pb2

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Request:
    """One request in flight: its output queue, pump task and KV-load state."""

    request_id: str
    outputs: asyncio.Queue[RequestOutput | BaseException | None]
    loading_kv: bool
    abort_requested: bool = False
    task: asyncio.Task[None] | None = None


class _StatsSink(StatLoggerBase):
    """Receives vLLM's scheduler stats (in the API process) for the load figures."""

    def __init__(self, runner: EngineRunner) -> None:
        self._runner = runner

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self._runner._record_stats(scheduler_stats)

    def log_engine_initialized(self) -> None:
        pass


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
        self._running_reqs = 0
        self._waiting_reqs = 0
        self._kv_usage = 0.0
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._external_queries = 0
        self._external_hits = 0
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
        #: Adapters of the requests running or waiting, as of vLLM's latest stats.
        self._active_adapters: list[str] = []
        self._adapter_lock = asyncio.Lock()

    @property
    def nixl_address(self) -> str:
        return f"{self.config.nixl_host}:{self.nixl_port}"

    async def start(self) -> None:
        """Start the engine (tens of seconds on CPU) and the KV-event bridge."""
        self._export_vllm_environment()
        endpoint = f"ipc://{Path(self._event_dir) / 'events.sock'}"
        optional: dict[str, Any] = {}
        if self.config.max_model_len:
            optional["max_model_len"] = self.config.max_model_len
        if self.config.block_size:
            optional["block_size"] = self.config.block_size
        if self.config.max_num_batched_tokens:
            optional["max_num_batched_tokens"] = self.config.max_num_batched_tokens
        if self.config.kv_cache_blocks:
            optional["num_gpu_blocks_override"] = self.config.kv_cache_blocks
        if self.config.quantization:
            optional["quantization"] = self.config.quantization
        speculative = self.config.speculative()
        if speculative is not None:
            optional["speculative_config"] = speculative
        if self.config.world_size > 1:
            # Ranks run as worker processes (vLLM's multiprocess executor).
            optional["distributed_executor_backend"] = "mp"
        if self.config.lora_enabled:
            optional.update(
                enable_lora=True,
                max_loras=self.config.max_loras,
                max_lora_rank=self.config.max_lora_rank,
            )
        args = AsyncEngineArgs(
            model=str(self.model.path),
            served_model_name=self.model.name,
            # The tokenizer is loaded only for what vLLM needs it for inside the
            # engine: compiling structured-output grammars and bad_words. Text never
            # passes through here (requests are token ids, outputs are not detokenized).
            dtype=self.config.dtype,  # vLLM validates the name
            max_num_seqs=self.config.max_num_seqs,
            enable_prefix_caching=True,
            gpu_memory_utilization=self.config.gpu_memory_utilization,
            kv_transfer_config=self._kv_transfer_config(),
            kv_events_config=KVEventsConfig(
                enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint, topic="kv"
            ),
            tensor_parallel_size=self.config.tensor_parallel_size,
            pipeline_parallel_size=self.config.pipeline_parallel_size,
            data_parallel_size=self.config.data_parallel_size,
            enable_expert_parallel=self.config.enable_expert_parallel,
            **optional,
        )
        try:
            self.engine = AsyncLLM.from_engine_args(
                args, stat_loggers=[lambda config, index: _StatsSink(self)]
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

    def _kv_transfer_config(self) -> KVTransferConfig:
        """NixlConnector for the prefill-to-decode handoff; on prefill engines, with the
        KV store's connector beside it (vLLM's MultiConnector) when ``--kvstore`` is on."""
        nixl = {
            "kv_connector": "NixlConnector",
            "kv_role": self.kv_role,
            "kv_buffer_device": "cpu" if self.config.device == "cpu" else "cuda",
            "kv_connector_extra_config": {"kv_lease_duration": self.config.kv_lease_seconds},
        }
        if not self.uses_kvstore:
            # A decode that cannot pull the KV fails the request (the router then runs it
            # aggregated) rather than silently recomputing the prompt.
            return KVTransferConfig(**nixl, kv_load_failure_policy="fail")
        store = {
            "kv_connector": "KvStoreConnector",
            "kv_connector_module_path": "services.engine.kvstore_connector",
            "kv_role": self.kv_role,
            "kv_connector_extra_config": {
                "etcd": self.config.etcd,
                "poll_ms": self.config.nixl_poll_ms,
                # File names only: vLLM logs this config. A mesh key given by value
                # reaches the engine core through the environment (see start()).
                "credentials": {
                    "mesh_key_file": self.config.mesh_key_file,
                    "tls_cert": self.config.tls_cert,
                    "tls_key": self.config.tls_key,
                    "tls_ca": self.config.tls_ca,
                    "tls_server_name": self.config.tls_server_name,
                    "etcd_user": self.config.etcd_user,
                    "etcd_password_file": self.config.etcd_password_file,
                },
            },
        }
        return KVTransferConfig(
            kv_connector="MultiConnector",
            kv_role=self.kv_role,
            kv_buffer_device=nixl["kv_buffer_device"],
            kv_connector_extra_config={"connectors": [nixl, store]},
            # A prefill engine only ever loads from the store, a cache: a block it could
            # not read is recomputed, never a failed request.
            kv_load_failure_policy="recompute",
        )

    @property
    def uses_kvstore(self) -> bool:
        """Prefill engines use the store; decode engines keep "fail" for their handoff
        pulls (a policy is per engine), so they do not load from it."""
        return self.config.kvstore and self.kv_role == "kv_producer"

    def _export_vllm_environment(self) -> None:
        """vLLM reads these from the environment, in this process and its engine core."""
        settings = {
            "VLLM_NIXL_SIDE_CHANNEL_HOST": self.config.nixl_host,
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(self.nixl_port),
            POLL_MS_ENV: str(self.config.nixl_poll_ms),
        }
        if self.config.mesh_key and not self.config.mesh_key_file:
            # For the KV-store connector in the engine core; kept out of vLLM's config,
            # which it logs.
            settings[MESH_KEY_ENV] = self.config.mesh_key
        if self.config.device == "cpu":
            settings["VLLM_CPU_KVCACHE_SPACE"] = str(self.config.kv_cache_gib)
            if self.config.cpu_cores:
                settings["VLLM_CPU_OMP_THREADS_BIND"] = self.config.rank_cores()
            # vLLM's CPU platform otherwise forces the multiprocess executor, whose
            # EngineCore busy-waits on the worker's shared-memory queue for up to a
            # second after every step: a core's worth of spinning beside the compute
            # threads on the engine's own cores. The uniprocess executor runs the model
            # in EngineCore itself (still its own process): no queue, no spin.
            settings["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.config.world_size == 1 else "1"
        os.environ.update(settings)

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
        for position, token_id in enumerate(prompt_token_ids):
            if token_id >= self.vocab_size:
                raise InvalidRequest(
                    f"token id {token_id} at position {position} is outside the vocabulary "
                    f"(size {self.vocab_size})"
                )

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

    def _record_stats(self, stats: Any) -> None:
        self._running_reqs = int(stats.num_running_reqs)
        self._waiting_reqs = int(stats.num_waiting_reqs)
        self._kv_usage = float(stats.kv_cache_usage)
        prefix = getattr(stats, "prefix_cache_stats", None)
        if prefix is not None:
            self._prefix_queries += int(prefix.queries)
            self._prefix_hits += int(prefix.hits)
        external = getattr(stats, "connector_prefix_cache_stats", None)
        if external is not None:
            self._external_queries += int(external.queries)
            self._external_hits += int(external.hits)
        self._active_adapters = sorted(
            {
                *getattr(stats, "running_lora_adapters", {}),
                *getattr(stats, "waiting_lora_adapters", {}),
            }
        )

    def layout_labels(self) -> dict[str, str]:
        """How the engine computes, for its member record: parallelism, quantization, KV
        dtype and speculative decoding as vLLM resolved them (the router pairs prefill and
        decode engines whose KV can move between them)."""
        config = self._engine().vllm_config
        parallel = config.parallel_config
        speculative = config.speculative_config
        cache_dtype = str(config.cache_config.cache_dtype)
        return {
            "tensor_parallel_size": str(parallel.tensor_parallel_size),
            "pipeline_parallel_size": str(parallel.pipeline_parallel_size),
            "data_parallel_size": str(parallel.data_parallel_size),
            "expert_parallel": "on" if parallel.enable_expert_parallel else "off",
            "quantization": str(config.model_config.quantization or "none"),
            "kv_dtype": str(config.model_config.dtype).removeprefix("torch.")
            if cache_dtype == "auto"
            else cache_dtype,
            "speculative": str(speculative.method) if speculative is not None else "off",
        }

    def load(self, pending_transfers: int) -> engine_pb2.Load:
        """Load figures for routing. With nothing in flight the scheduler is idle, whatever
        its last (possibly older) stats report said."""
        busy = bool(self._requests)
        return engine_pb2.Load(
            running_requests=self._running_reqs if busy else 0,
            waiting_requests=self._waiting_reqs if busy else 0,
            kv_cache_usage=self._kv_usage,
            prefix_cache_hit_rate=(
                self._prefix_hits / self._prefix_queries if self._prefix_queries else 0.0
            ),
            kv_block_size=self.block_size,
            kv_total_blocks=self.total_blocks,
            pending_transfers=pending_transfers,
            external_prefix_queried_tokens=self._external_queries,
            external_prefix_hit_tokens=self._external_hits,
            active_adapters=self._active_adapters if busy else [],
        )
