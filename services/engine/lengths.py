"""How many tokens a request may generate: the one check every engine applies.

vLLM's sampling translation and the simulated engine both take their limits from here,
so an over-long prompt or a bad max_tokens is refused with the same words by either.
No vLLM here.
"""

from __future__ import annotations

from services.errors import InvalidRequest
from services.pb import common_pb2


def output_budget(
    params: common_pb2.SamplingParams,
    prompt_tokens: int,
    max_model_len: int,
    max_tokens: int | None = None,
) -> tuple[int, int]:
    """``(max_tokens, min_tokens)`` for one sequence.

    ``max_tokens`` overrides the request's (prefill runs with 1). An unset max_tokens
    means "up to the context limit"; one that would pass the limit is capped there and
    the sequence ends with finish reason LENGTH.
    """
    room = max_model_len - prompt_tokens
    if room < 1:
        raise InvalidRequest(
            f"prompt has {prompt_tokens} tokens; the model allows at most {max_model_len - 1} "
            f"(context length {max_model_len}, leaving room for one generated token)"
        )
    if max_tokens is None:
        if params.HasField("max_tokens") and params.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {params.max_tokens}")
        max_tokens = params.max_tokens if params.HasField("max_tokens") else room
    return min(max_tokens, room), min(params.min_tokens, max_tokens)
