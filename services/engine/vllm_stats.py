"""An engine's load figures, from the stats vLLM reports to its stat loggers.

vLLM calls a stat logger (in the API process) after its engine steps; the figures the
router routes by (queue depths, KV use, prefix-cache hits, adapters in use) are kept
from its scheduler stats here, apart from the engine runner. From its iteration stats
(the requests that finished) comes what computing a prompt token costs here: the router
weighs loading a prefix from the KV store against it.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from services.pb import engine_pb2
from services.smoothing import MovingMean

#: How far one finished request moves the prefill cost per token: about the last ten
#: requests count, so the figure follows the engine's batch as it fills and drains.
PREFILL_COST_WEIGHT = 0.1


class LoadStats:
    """The latest scheduler figures, the prefix-cache counts summed over time, and the
    prefill cost per computed token (a moving mean)."""

    def __init__(self, block_size: int = 0) -> None:
        #: Fewest tokens a request must compute to count in the prefill cost (the KV block
        #: size once the engine knows it): a request that found nearly all of its prompt
        #: cached spent its prefill time on one forward step and the store's load, not
        #: on its few computed tokens.
        self.block_size = block_size
        self._prefill_cost = MovingMean(PREFILL_COST_WEIGHT)
        self._running_reqs = 0
        self._waiting_reqs = 0
        self._kv_usage = 0.0
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._external_queries = 0
        self._external_hits = 0
        #: Adapters of the requests running or waiting, as of vLLM's latest stats.
        self._active_adapters: list[str] = []

    def sink(self) -> StatLoggerBase:
        """A stat logger for ``AsyncLLM`` that records into these figures."""
        return _StatsSink(self)

    def record(self, stats: Any) -> None:
        """Take one scheduler stats report."""
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

    def finished(self, requests: Any) -> None:
        """Take the requests that finished in one iteration (vLLM's
        ``FinishedRequestStats``): the prefill seconds per computed prompt token of each
        that computed at least a block's worth. Prefill time runs from the request's
        first scheduling to its first token, so it includes waiting on the batch's other
        work and any KV-store load: the cost of a token here and now, as routing wants."""
        for request in requests:
            computed = int(request.num_prompt_tokens) - int(request.num_cached_tokens)
            if computed >= max(self.block_size, 1) and request.prefill_time > 0:
                self._prefill_cost.add(float(request.prefill_time) / computed)

    def load(
        self, busy: bool, block_size: int, total_blocks: int, pending_transfers: int
    ) -> engine_pb2.Load:
        """Load figures for routing. With nothing in flight (not ``busy``) the scheduler is
        idle, whatever its last (possibly older) stats report said."""
        return engine_pb2.Load(
            running_requests=self._running_reqs if busy else 0,
            waiting_requests=self._waiting_reqs if busy else 0,
            kv_cache_usage=self._kv_usage,
            prefix_cache_hit_rate=(
                self._prefix_hits / self._prefix_queries if self._prefix_queries else 0.0
            ),
            kv_block_size=block_size,
            kv_total_blocks=total_blocks,
            pending_transfers=pending_transfers,
            external_prefix_queried_tokens=self._external_queries,
            external_prefix_hit_tokens=self._external_hits,
            active_adapters=self._active_adapters if busy else [],
            prefill_seconds_per_token=self._prefill_cost.value,
        )


class _StatsSink(StatLoggerBase):
    """Receives vLLM's scheduler stats (in the API process) for the load figures."""

    def __init__(self, stats: LoadStats) -> None:
        self._stats = stats

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self._stats.record(scheduler_stats)
        if iteration_stats is not None:
            self._stats.finished(iteration_stats.finished_requests)

    def log_engine_initialized(self) -> None:
        pass
