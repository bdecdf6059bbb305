"""The simulated engine's outputs, in the shape of vLLM's ``RequestOutput``.

The engine servicer reads the same attributes from either engine, so the sim's outputs
carry vLLM's names: per-step deltas of token ids, a finish reason, a stop reason, the
cached prompt tokens, and a prefill's KV transfer parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(slots=True)
class SimLogprob:
    """vLLM's ``Logprob``: a log-probability and its rank."""

    logprob: float
    rank: int


@dataclasses.dataclass(slots=True)
class SimCompletion:
    """vLLM's ``CompletionOutput`` for one step of one sequence."""

    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | None
    logprobs: list[dict[int, SimLogprob]] | None = None


@dataclasses.dataclass(slots=True)
class SimOutput:
    """vLLM's ``RequestOutput`` (delta mode)."""

    outputs: list[SimCompletion]
    finished: bool
    num_cached_tokens: int
    kv_transfer_params: dict[str, Any] | None = None
    prompt_logprobs: list[dict[int, SimLogprob] | None] | None = None
