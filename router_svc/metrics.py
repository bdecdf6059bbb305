"""The router's Prometheus metrics, and the clock that observes a sequence's latencies.

Every router metric is defined here, so an operator reading a dashboard has one file
to look up what a series means and where it is counted.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from services.exposition import Sampled

SEQUENCES = Counter(
    "stagemesh_router_sequences_total",
    "Sequences started, by how their prompt was prefilled",
    ["mode"],  # disaggregated | aggregated
)
PREFILL_FALLBACKS = Counter(
    "stagemesh_router_prefill_fallbacks_total",
    "Sequences decoded aggregated after their remote prefill or KV pull failed",
    ["reason"],
)
KV_RELEASES = Counter(
    "stagemesh_router_kv_releases_total",
    "Prefilled KV that no decode engine collected, released on its prefill worker at once; "
    "by whether the worker still held it",
    ["outcome"],  # released | not_held
)
MIGRATIONS = Counter(
    "stagemesh_router_migrations_total",
    "Sequences moved to another decode worker after their stream broke mid-generation",
)
DECISIONS = Counter(
    "stagemesh_router_decisions_total",
    "Worker choices, by policy, role and the reason for the choice",
    ["policy", "role", "reason"],
)
IN_PROGRESS = Gauge(
    "stagemesh_router_requests_in_progress",
    "Requests admitted and not yet finished, by model (the router's queue included)",
    ["model"],
    multiprocess_mode="livesum",  # summed over the router's --workers processes
)
PROMPT_TOKENS = Counter("stagemesh_router_prompt_tokens_total", "Prompt tokens of routed sequences")
PREFIX_HIT_TOKENS = Counter(
    "stagemesh_router_prefix_hit_tokens_total",
    "Prompt tokens the chosen prefilling worker already held, per the router's KV index",
)
RESPONSES_STORED_BYTES = Sampled(
    "stagemesh_router_responses_stored_bytes",
    "What the stored Responses API responses are counted as, in bytes "
    "(bounded by --responses-max-mib; the answering router process's)",
)
INDEX_ENTRIES = Sampled(
    "stagemesh_router_kv_index_entries",
    "(block, worker) entries in the router's KV index (the answering router process's)",
)
#: Members the router knows, by role and state, counted at scrape time: ``up``, or
#: ``down`` (refused a connection and skipped for a few seconds). How soon a join, a
#: drain or a crash shows here is the control plane's reaction time (bench.scale).
WORKERS = Sampled(
    "stagemesh_router_workers",
    "Members the router routes to, by role and state",
    ["role", "state"],
)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
TIME_TO_FIRST_TOKEN = Histogram(
    "stagemesh_request_ttft_seconds",
    "From a sequence's request arriving to its first generated token",
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "stagemesh_request_itl_seconds",
    "Time between generated tokens of a sequence, as streamed to the caller",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
)
END_TO_END = Histogram(
    "stagemesh_request_e2e_seconds",
    "From a sequence's request arriving to its last token",
    buckets=_LATENCY_BUCKETS,
)


class SequenceClock:
    """Observes one sequence's TTFT, inter-token gaps and end-to-end time as replies come.

    An engine message may carry several tokens; its gap is shared among them, so the
    ITL histogram counts tokens, not messages.
    """

    def __init__(self, arrived: float) -> None:
        self._arrived = arrived
        self._last: float | None = None

    def reply(self, tokens: int) -> None:
        """A reply with ``tokens`` generated ids reached the router."""
        now = time.monotonic()
        if self._last is None:
            TIME_TO_FIRST_TOKEN.observe(now - self._arrived)
        elif tokens:
            gap = (now - self._last) / tokens
            for _ in range(tokens):
                INTER_TOKEN_LATENCY.observe(gap)
        self._last = now

    def finished(self) -> None:
        END_TO_END.observe(time.monotonic() - self._arrived)
