"""The KV-store connector's worker side (the process holding the KV cache): NIXL reads
and writes between the cache's blocks and the store's pool.

It registers the KV cache with a NIXL agent of its own, reads planned loads straight
from the store's pool into the allocated blocks before the forward pass, and writes
planned blocks after it on a background thread (``Reserve`` -> NIXL WRITE ->
``Commit``). A request with writes in flight keeps its blocks (vLLM's async-save
protocol) until they are done. A failed read reports its blocks (vLLM recomputes them);
a failed write is dropped: the store is a cache.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import uuid
from typing import TYPE_CHECKING, Any

import torch

from services.engine.kvstore_plan import Save, StoreConnectorMetadata
from services.kv.nixl import TransferError, new_agent
from services.kv.shards import ShardMap
from services.kv.store_link import Region, StoreLink

if TYPE_CHECKING:
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger(__name__)


class WorkerSide:
    """NIXL reads and writes between the KV cache and the store, in the worker."""

    def __init__(self, layout: str, extra: dict[str, Any], kv_cache_config: KVCacheConfig) -> None:
        self._layout = layout
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
                # Timed per store on the prefix, which its Release reports: the stores
                # measure what a load costs, and the router weighs their blocks by it.
                self._link.read(job.hits, [self.regions(b) for b in job.block_ids], job.prefix)
            except Exception as exc:  # noqa: BLE001  any failure: the blocks are recomputed
                job.prefix.reads.clear()  # recomputed blocks were not loaded
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

    def _write(self, shards: ShardMap, job: Save) -> None:
        try:
            self._link.store(
                shards,
                self._layout,
                job.hashes,
                self.block_bytes,
                lambda i: self.regions(job.block_ids[i]),
                session_id=job.session_id,
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
