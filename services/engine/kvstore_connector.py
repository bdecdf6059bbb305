"""The engines' KV-store connector: a vLLM KV connector that loads prefixes from the
mesh's KV store and writes newly computed blocks to it, over NIXL.

vLLM loads it by module path (``kv_connector_module_path``) as one child of its
MultiConnector, beside NixlConnector, so one prefill engine both hands KV to a decode
engine and shares it through the store. Both halves of a connector exist:

- **scheduler side** (engine core process): for a new request it names the prompt's
  full blocks by the mesh's chain hash (:mod:`services.kv.hashing`), asks the owning
  stores for the longest stored prefix (``Lookup`` pins the hits) and, when that
  reaches past the engine's own prefix cache, tells vLLM those tokens are computed
  externally. Each step it also plans writes of the prompt blocks the step completes.
- **worker side** (the process holding the KV cache): it registers the KV cache with
  a NIXL agent of its own, reads planned loads straight from the store's pool into the
  allocated blocks before the forward pass, and writes planned blocks after it on a
  background thread (``Reserve`` -> NIXL WRITE -> ``Commit``). A request with writes in
  flight keeps its blocks (vLLM's async-save protocol) until they are done.

Failure never costs a token: a store that is down or slow answers no hits (and is left
alone for ``retry_seconds``), a failed read reports its blocks to vLLM, which recomputes
them (the engine runs with ``kv_load_failure_policy="recompute"``), and a failed write
is abandoned, so no half-written block is ever served.

Blocks are keyed by a *layout* (model, dtype, block size, KV bytes per block): engines
share blocks only when their KV bytes are interchangeable.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from services import credentials
from services.config import parse_endpoints
from services.credentials import MESH_KEY_ENV, MeshCredentials
from services.kv.hashing import chain_hashes, chain_root
from services.kv.nixl import TransferError, new_agent
from services.kv.shards import ShardMap, ShardMapFollower
from services.kv.store_link import Hit, Prefix, Region, StoreError, StoreLink

if TYPE_CHECKING:
    from vllm.attention.backends.abstract import AttentionMetadata
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Load:
    """Blocks to read from the store into ``block_ids`` before this step's forward."""

    req_id: str
    block_ids: list[int]
    hits: list[Hit]
    prefix: Prefix


@dataclasses.dataclass
class _Save:
    """Prompt blocks this step completes, to write to the store after it."""

    req_id: str
    hashes: list[int]
    block_ids: list[int]


@dataclasses.dataclass
class StoreConnectorMetadata(KVConnectorMetadata):
    """What the scheduler tells the worker each step: blocks to load and to save, and where."""

    loads: list[_Load]
    saves: list[_Save]
    shards: ShardMap


@dataclasses.dataclass
class _Tracked:
    """A running request, as the scheduler side follows it to plan its writes."""

    prompt: list[int]
    block_ids: list[int]
    saved_blocks: int
    has_saves: bool = False


class KvStoreConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM KV connector for the stagemesh KV store (see the module docstring).

    It declares hybrid-allocator support so that vLLM keeps the allocator on (as it is
    on a decode engine with NixlConnector alone): NIXL's handshake refuses peers whose
    allocator setting differs. Models with one KV-cache group (every model without
    hybrid attention) are what it serves; with several groups it stays out of the way.
    """

    _cache_hit_source = CacheHitSource.HOST

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        # This may be the engine core's own process: it calls the stores and etcd with
        # the stage's credentials (file names from the config, a key given by value from
        # the environment the stage exported).
        credentials.install(
            MeshCredentials.load(
                mesh_key=os.environ.get(MESH_KEY_ENV, ""), **extra.get("credentials", {})
            )
        )
        self._block_size = int(vllm_config.cache_config.block_size)
        # What makes two engines' KV bytes interchangeable; the store also checks bytes per block.
        self.layout = ":".join(
            str(part)
            for part in (
                vllm_config.model_config.served_model_name,
                vllm_config.model_config.dtype,
                vllm_config.device_config.device_type,
                self._block_size,
            )
        )
        if len(kv_cache_config.kv_cache_groups) != 1:
            log.warning(
                "KV store connector off: the model has %d KV-cache groups",
                len(kv_cache_config.kv_cache_groups),
            )
            extra = {**extra, "disabled": True}
        self._scheduler = _SchedulerSide(self, extra) if role == KVConnectorRole.SCHEDULER else None
        self._worker = (
            _WorkerSide(self, extra, kv_cache_config) if role == KVConnectorRole.WORKER else None
        )

    # -- worker side ----------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.load(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads complete in ``start_load_kv``: a store read is one NIXL transfer for all layers."""

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """Writes happen per block after the step (``wait_for_save``), not per layer."""

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.save(self._get_connector_metadata())

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """A preempted request's blocks are freed at once: let writes from them finish first."""
        assert self._worker is not None
        self._worker.drain()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        return self._worker.finished(finished_req_ids), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.take_failed()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()

    # -- scheduler side -------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.matched(request, num_computed_tokens), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._scheduler is not None
        self._scheduler.allocated(request, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.plan(scheduler_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.finished(request.request_id), None

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, block_ids[0] if block_ids else [])

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped write is a future miss, nothing more


class _SchedulerSide:
    """Lookups, load and write planning, in vLLM's scheduler (one thread)."""

    def __init__(self, connector: KvStoreConnector, extra: dict[str, Any]) -> None:
        self._block_size = connector._block_size
        self._layout = connector.layout
        self._retry_seconds = float(extra.get("retry_seconds", 5.0))
        # Hits stay pinned from this lookup until the worker has read them, normally the
        # same step; the pin only needs to outlast a slow step (released explicitly).
        self._pin_seconds = float(extra.get("pin_seconds", 120.0))
        self._link = StoreLink(None, rpc_timeout=float(extra.get("rpc_timeout", 1.0)))
        self._follower = ShardMapFollower(parse_endpoints(str(extra["etcd"])))
        if not extra.get("disabled"):
            self._follower.start()  # without it the map stays empty: no lookups, no writes
        self._down_until = 0.0
        self._lookups: dict[str, tuple[Prefix, int]] = {}
        self._loads: dict[str, _Load] = {}
        self._tracked: dict[str, _Tracked] = {}
        #: Chain hashes of each live request's full prompt blocks, computed once: a
        #: waiting request is looked up again at every scheduling attempt.
        self._hashes: dict[str, list[int]] = {}
        #: (cache_salt, LoRA adapter) of the requests that have either (vLLM gives them
        #: only with the Request): blocks are named with them, loads and saves alike.
        self._roots: dict[str, tuple[str, str]] = {}

    def close(self) -> None:
        for prefix, _ in self._lookups.values():
            self._link.release(prefix)
        self._follower.stop()
        self._link.close()

    def _shards(self) -> ShardMap | None:
        shards = self._follower.current
        if not shards or time.monotonic() < self._down_until:
            return None
        return shards

    def _failed(self, exc: Exception) -> None:
        if time.monotonic() >= self._down_until:
            log.warning(
                "KV store unavailable (%s); computing without it for %.0fs",
                exc,
                self._retry_seconds,
            )
        self._down_until = time.monotonic() + self._retry_seconds

    def matched(self, request: Request, num_computed_tokens: int) -> int:
        """Tokens the store holds past the engine's own prefix cache (whole blocks, never
        the prompt's last token, which vLLM must compute to sample)."""
        self._forget_lookup(request.request_id)
        adapter = request.lora_request.lora_name if request.lora_request is not None else ""
        if request.cache_salt or adapter:
            self._roots[request.request_id] = (request.cache_salt or "", adapter)
        shards = self._shards()
        prompt = request.prompt_token_ids or []
        usable = (len(prompt) - 1) // self._block_size
        local = num_computed_tokens // self._block_size
        if shards is None or usable <= local:
            return 0
        hashes = self._prompt_hashes(request.request_id, prompt)[:usable]
        try:
            prefix = self._link.lookup(shards, self._layout, hashes, self._pin_seconds)
        except StoreError as exc:
            self._failed(exc)
            return 0
        if len(prefix.hits) <= local:
            self._link.release(prefix)
            return 0
        self._lookups[request.request_id] = (prefix, local)
        return (len(prefix.hits) - local) * self._block_size

    def allocated(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        entry = self._lookups.pop(request.request_id, None)
        if entry is None:
            return
        prefix, local = entry
        count = num_external_tokens // self._block_size
        if count <= 0:
            self._link.release(prefix)
            return
        self._loads[request.request_id] = _Load(
            request.request_id,
            list(block_ids[local : local + count]),
            prefix.hits[local : local + count],
            prefix,
        )

    def plan(self, out: SchedulerOutput) -> StoreConnectorMetadata:
        shards = self._shards()
        meta = StoreConnectorMetadata(list(self._loads.values()), [], shards or ShardMap())
        self._loads.clear()
        for new in out.scheduled_new_reqs:
            tracked = _Tracked(
                list(new.prompt_token_ids or []),
                list(new.block_ids[0]),
                saved_blocks=new.num_computed_tokens // self._block_size,
            )
            self._tracked[new.req_id] = tracked
            self._plan_save(
                meta,
                new.req_id,
                tracked,
                new.num_computed_tokens + out.num_scheduled_tokens[new.req_id],
            )
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            known = self._tracked.get(req_id)
            new_blocks = cached.new_block_ids[i]
            if known is None:
                continue
            if new_blocks is not None:
                if req_id in cached.resumed_req_ids:
                    known.block_ids = list(new_blocks[0])
                else:
                    known.block_ids.extend(new_blocks[0])
            self._plan_save(
                meta,
                req_id,
                known,
                cached.num_computed_tokens[i] + out.num_scheduled_tokens[req_id],
            )
        return meta

    def _plan_save(
        self, meta: StoreConnectorMetadata, req_id: str, tracked: _Tracked, done_tokens: int
    ) -> None:
        full = min(done_tokens, len(tracked.prompt)) // self._block_size
        if not meta.shards or full <= tracked.saved_blocks:
            return
        hashes = self._prompt_hashes(req_id, tracked.prompt)
        meta.saves.append(
            _Save(
                req_id,
                hashes[tracked.saved_blocks : full],
                tracked.block_ids[tracked.saved_blocks : full],
            )
        )
        tracked.saved_blocks = full
        tracked.has_saves = True

    def finished(self, req_id: str) -> bool:
        """Whether the request's blocks must wait for its writes (reported by the worker)."""
        self._forget_lookup(req_id)
        self._hashes.pop(req_id, None)
        self._roots.pop(req_id, None)
        tracked = self._tracked.pop(req_id, None)
        return tracked is not None and tracked.has_saves

    def _prompt_hashes(self, req_id: str, prompt: list[int]) -> list[int]:
        hashes = self._hashes.get(req_id)
        if hashes is None:
            root = chain_root(*self._roots.get(req_id, ("", "")))
            hashes = self._hashes[req_id] = chain_hashes(prompt, self._block_size, root)
        return hashes

    def _forget_lookup(self, req_id: str) -> None:
        entry = self._lookups.pop(req_id, None)
        if entry is not None:
            self._link.release(entry[0])


class _WorkerSide:
    """NIXL reads and writes between the KV cache and the store, in the worker."""

    def __init__(
        self, connector: KvStoreConnector, extra: dict[str, Any], kv_cache_config: KVCacheConfig
    ) -> None:
        self._layout = connector.layout
        self._num_blocks = int(kv_cache_config.num_blocks)
        self._agent = new_agent(
            f"kvstore-conn-{uuid.uuid4().hex[:12]}", int(extra.get("poll_ms", 1))
        )
        self._link = StoreLink(
            self._agent,
            rpc_timeout=float(extra.get("rpc_timeout", 1.0)),
            transfer_timeout=float(extra.get("transfer_timeout", 10.0)),
        )
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvstore-write")
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._finishing: set[str] = set()
        self._failed: set[int] = set()
        self._registrations: list[Any] = []
        #: Per layer: (base address, offsets of a block's pieces, piece bytes = block stride)
        self._layers: list[tuple[int, list[int], int]] = []
        self.block_bytes = 0

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Register the KV cache with NIXL and work out where each block's bytes are.

        Any layout with a block dimension works if each block is contiguous from that
        dimension on (CPU: ``[2, blocks, heads, block_size, head]``, one piece for K and
        one for V; many GPU backends: ``[blocks, 2, ...]``, one piece).
        """
        for name, tensor in kv_caches.items():
            dims = [d for d, size in enumerate(tensor.shape) if size == self._num_blocks]
            if not dims or not tensor.is_contiguous():
                raise ValueError(
                    f"KV cache {name} {tuple(tensor.shape)}: no contiguous block dimension"
                )
            dim = dims[0]
            element = tensor.element_size()
            block_stride = tensor.stride(dim) * element
            outer = [0]
            for d in range(dim):
                outer = [
                    o + i * tensor.stride(d) * element
                    for o in outer
                    for i in range(tensor.shape[d])
                ]
            self._layers.append((tensor.data_ptr(), outer, block_stride))
            self._registrations.append(
                self._agent.register_memory(
                    [(tensor.data_ptr(), tensor.numel() * element, 0, name)], "DRAM"
                )
            )
        self.block_bytes = sum(len(outer) * piece for _, outer, piece in self._layers)
        log.info(
            "KV store connector: %d layers, %d bytes per block", len(self._layers), self.block_bytes
        )

    def regions(self, block_id: int) -> list[Region]:
        return [
            (base + offset + block_id * piece, piece)
            for base, outer, piece in self._layers
            for offset in outer
        ]

    def load(self, meta: StoreConnectorMetadata) -> None:
        for job in meta.loads:
            try:
                self._link.read(job.hits, [self.regions(b) for b in job.block_ids])
            except Exception as exc:  # noqa: BLE001  any failure: the blocks are recomputed
                log.warning(
                    "KV store read of %d blocks for %s failed (%s); recomputing them",
                    len(job.block_ids),
                    job.req_id,
                    exc,
                )
                with self._lock:
                    self._failed.update(job.block_ids)
                if isinstance(exc, TransferError) and not exc.settled:
                    # The read may still land: its slots must keep this prefix's bytes
                    # until the pin expires, so it is not released early.
                    continue
            self._writer.submit(self._link.release, job.prefix)

    def save(self, meta: StoreConnectorMetadata) -> None:
        for job in meta.saves:
            with self._lock:
                self._pending[job.req_id] = self._pending.get(job.req_id, 0) + 1
            self._writer.submit(self._write, meta.shards, job)

    def _write(self, shards: ShardMap, job: _Save) -> None:
        try:
            self._link.store(
                shards,
                self._layout,
                job.hashes,
                self.block_bytes,
                lambda i: self.regions(job.block_ids[i]),
            )
        except Exception as exc:  # noqa: BLE001  a cache: any failed write is dropped, nothing else
            log.warning(
                "KV store write of %d blocks for %s dropped: %s", len(job.hashes), job.req_id, exc
            )
        finally:
            with self._lock:
                self._pending[job.req_id] -= 1

    def finished(self, finished_req_ids: set[str]) -> set[str] | None:
        """Requests whose blocks may be freed: finished, with every write done."""
        with self._lock:
            self._finishing.update(r for r in finished_req_ids if r in self._pending)
            done = {r for r in self._finishing if self._pending[r] == 0}
            for req_id in done:
                self._finishing.discard(req_id)
                del self._pending[req_id]
        return done or None

    def drain(self) -> None:
        self._writer.submit(lambda: None).result()

    def take_failed(self) -> set[int]:
        with self._lock:
            failed, self._failed = self._failed, set()
        return failed

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._link.close()
        for registration in self._registrations:
            self._agent.deregister_memory(registration)
        self._registrations.clear()
