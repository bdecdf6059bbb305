"""The engines' KV-store connector: a vLLM KV connector that loads prefixes from the
mesh's KV store and writes newly computed blocks to it, over NIXL.

vLLM loads it by module path (``kv_connector_module_path``) as one child of its
MultiConnector, beside NixlConnector, so one prefill engine both hands KV to a decode
engine and shares it through the store. This module is vLLM's entry point; the two
halves of a connector live beside it:

- **scheduler side** (engine core process, :mod:`services.engine.kvstore_plan`): the
  store lookups of new requests and the plan of which blocks to load and write;
- **worker side** (the process holding the KV cache, :mod:`services.engine.kvstore_io`):
  the NIXL reads and writes between the KV cache and the stores' pools.

A request's agent session (the router's session key, in the sampling parameters'
``extra_args``) goes with its lookups and writes, so the store keeps the blocks of
sessions likely to come back.

Failure never costs a token: a store that is down or slow answers no hits (and is left
alone for ``retry_seconds``), a failed read reports its blocks to vLLM, which recomputes
them (the engine runs with ``kv_load_failure_policy="recompute"``), and a failed write
is abandoned, so no half-written block is ever served.

Blocks are keyed by a *layout* (model, dtype, block size, KV bytes per block): engines
share blocks only when their KV bytes are interchangeable.
"""

from __future__ import annotations

import logging
import os
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
from services.credentials import MESH_KEY_ENV, MeshCredentials
from services.engine.kvstore_io import WorkerSide
from services.engine.kvstore_plan import SchedulerSide

if TYPE_CHECKING:
    from vllm.attention.backends.abstract import AttentionMetadata
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


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
        scheduler = role == KVConnectorRole.SCHEDULER
        self._scheduler = SchedulerSide(self._block_size, self.layout, extra) if scheduler else None
        worker = role == KVConnectorRole.WORKER
        self._worker = WorkerSide(self.layout, extra, kv_cache_config) if worker else None

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
